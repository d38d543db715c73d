"""``wardpost check-config`` and ``wardpost run`` check the same files: the config, keys,
password files and the state directory. A config every user may change is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.cli import main
from agent.security import generate_keypair
from agent.testing.agent import write_config


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config naming a state directory, a password file and a centre key, all private."""
    state = tmp_path / "state"
    state.mkdir(mode=0o750)
    password = tmp_path / "mqtt.password"
    password.write_text("s3cret\n")
    os.chmod(password, 0o600)
    generate_keypair(tmp_path / "centre.key", tmp_path / "centre.pub")
    doc = {
        "agent": {"site": "north", "device": "ward3", "state_dir": str(state)},
        "mqtt": {"username": "ward3", "password_file": str(password)},
        "commands": {"public_keys": [str(tmp_path / "centre.pub")]},
    }
    path = write_config(tmp_path / "wardpost.toml", doc)
    os.chmod(path, 0o640)
    return path


def check_config(config: Path, *extra: str) -> int:
    return main(["check-config", str(config), *extra])


def test_private_files_pass_without_a_word(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert check_config(config) == 0
    out, err = capsys.readouterr()
    assert err == "" and ": ok" in out


def test_check_config_warns_about_readable_secrets_and_an_open_state_dir(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    password, state = tmp_path / "mqtt.password", tmp_path / "state"
    os.chmod(password, 0o644)
    os.chmod(state, 0o777)
    assert check_config(config) == 0, "readable secrets are warnings, as at start-up"
    err = capsys.readouterr().err
    assert (
        f"warning: {password} is a secret that other users can read or change (mode 0644); "
        f"fix with: chmod 600 (or 640) {password}"
    ) in err
    assert f"warning: {state} is open to other users (mode 0777)" in err
    assert "s3cret" not in err


@pytest.mark.parametrize("mode", [0o666, 0o646])
def test_a_config_every_user_may_change_is_refused(
    config: Path, mode: int, capsys: pytest.CaptureFixture[str]
) -> None:
    os.chmod(config, mode)
    assert check_config(config) == 2
    err = capsys.readouterr().err
    assert f"error: {config} is the config, writable by other users" in err
    assert f"(mode {mode:04o}); fix with: chmod 644 {config} (--allow-insecure accepts it)" in err

    assert main(["--config", str(config), "run"]) == 2, "the agent does not start either"
    assert "wardpost: refusing to start: " in capsys.readouterr().err

    assert check_config(config, "--allow-insecure") == 0
    out, err = capsys.readouterr()
    assert f"warning: {config} is the config, writable by other users" in err and ": ok" in out


def test_a_group_writable_config_is_a_warning(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    os.chmod(config, 0o664)
    assert check_config(config) == 0
    assert f"warning: {config} is the config, writable by other users" in capsys.readouterr().err


def test_a_trusted_key_every_user_may_replace_is_refused(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    public = tmp_path / "centre.pub"
    os.chmod(public, 0o666)
    assert check_config(config) == 2
    assert f"error: {public} is trusted by the agent but writable by other users" in (
        capsys.readouterr().err
    )
