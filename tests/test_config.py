"""Config validation: every bad file gets an error naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import main
from agent.config import ConfigError, load_config
from agent.registry import validate_drivers

GOOD = """
[agent]
site = "st-marys"
device = "entrance-a"
state_dir = "{state}"

[mqtt]
host = "127.0.0.1"
port = 1883

[drivers.sim]
type = "simulated"
rate = 2.0
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "wardpost.toml"
    path.write_text(text.replace("{state}", str(tmp_path / "state")))
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        validate_drivers(load_config(path))
    return str(info.value)


def test_good_config_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    validate_drivers(config)
    assert config.agent.site == "st-marys"
    assert config.client_id == "wardpost-st-marys-entrance-a"
    assert [d.name for d in config.drivers] == ["sim"]
    assert len(config.digest) == 16


@pytest.mark.parametrize(
    ("edit", "where", "what"),
    [
        (
            lambda t: t.replace("port = 1883", "port = 1883\nbogus = 1"),
            "mqtt.bogus",
            "unknown key 'bogus'",
        ),
        (lambda t: t.replace("port = 1883", 'port = "fast"'), "mqtt.port", "expected an integer"),
        (lambda t: t.replace("port = 1883", "port = 70000"), "mqtt.port", "at most 65535"),
        (lambda t: t.replace("rate = 2.0", 'rate = "x"'), "drivers.sim.rate", "expected a number"),
        (
            lambda t: t.replace("rate = 2.0", "baudrate = 9600"),
            "drivers.sim.baudrate",
            "unknown key",
        ),
        (
            lambda t: t.replace('type = "simulated"', 'type = "nope"'),
            "drivers.sim.type",
            "unknown driver type 'nope'",
        ),
        (lambda t: t.replace('site = "st-marys"', 'site = "a/b"'), "agent.site", "without '/'"),
        (lambda t: t.replace('site = "st-marys"\n', ""), "agent.site", "required key is missing"),
        (lambda t: t + "\n[nonsense]\nx = 1\n", "nonsense", "unknown section"),
        (
            lambda t: t.replace("[mqtt]", '[mqtt]\ndelivery = "maybe"'),
            "mqtt.delivery",
            "one of 'broker', 'receipt'",
        ),
        (
            lambda t: t.replace("[mqtt]", '[mqtt]\npassword_file = "/nonexistent/secret"'),
            "mqtt.password_file",
            "does not exist",
        ),
    ],
)
def test_bad_config_names_file_and_field(tmp_path: Path, edit, where: str, what: str) -> None:
    path = write(tmp_path, edit(GOOD))
    message = error_of(path)
    assert message.startswith(f"{path}: {where}: "), message
    assert what in message


def test_toml_syntax_error_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "\n[agent\n")
    assert error_of(path).startswith(f"{path}: TOML syntax error")


def test_missing_file(tmp_path: Path) -> None:
    assert (
        error_of(tmp_path / "absent.toml")
        == f"{tmp_path / 'absent.toml'}: config file does not exist"
    )


def test_unreadable_secret(tmp_path: Path) -> None:
    # A directory where the secret file should be: unreadable even for root.
    secret = tmp_path / "pw"
    secret.mkdir()
    path = write(
        tmp_path, GOOD.replace("[mqtt]", f'[mqtt]\nusername = "u"\npassword_file = "{secret}"')
    )
    assert (
        error_of(path)
        == f"{path}: mqtt.password_file: secret file '{secret}' cannot be read: Is a directory"
    )


def test_empty_secret_is_rejected_without_echoing_it(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("\n")
    path = write(
        tmp_path, GOOD.replace("[mqtt]", f'[mqtt]\nusername = "u"\npassword_file = "{secret}"')
    )
    assert error_of(path).endswith(f"mqtt.password_file: secret file '{secret}' is empty")


def test_secret_is_read_but_never_in_the_error(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2\n")
    path = write(
        tmp_path,
        GOOD.replace("[mqtt]", f'[mqtt]\nusername = "u"\npassword_file = "{secret}"\nport = "x"'),
    )
    message = error_of(path)
    assert "hunter2" not in message
    assert (
        load_config(
            write(
                tmp_path,
                GOOD.replace("[mqtt]", f'[mqtt]\nusername = "u"\npassword_file = "{secret}"'),
            )
        ).password()
        == "hunter2"
    )


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, GOOD)
    assert main(["check-config", str(good)]) == 0
    assert "ok" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("rate = 2.0", "rate = -1.0").replace("{state}", str(tmp_path)))
    assert main(["check-config", str(bad)]) == 2
    assert f"{bad}: drivers.sim.rate: must be at least 0.0" in capsys.readouterr().err


def test_example_configs_are_valid(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    checked = []
    for path in sorted((root / "config").glob("*.toml")):
        if path.name.startswith("central"):
            continue  # the receiver's own format, tested in tests/central
        # The demo's placeholders are filled in by scripts/demo.
        text = (
            path.read_text().replace("@PORT@", "1883").replace("@STATE@", str(tmp_path / "state"))
        )
        copy = tmp_path / path.name
        copy.write_text(text)
        validate_drivers(load_config(copy))
        checked.append(path.name)
    assert {"wardpost.example.toml", "demo.toml"} <= set(checked)
