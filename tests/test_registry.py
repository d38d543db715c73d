"""Driver plug-ins whose optional dependencies are missing: the error names the extra.

Each test installs a real plug-in distribution (a ``.dist-info`` folder with its entry
points, and its module) on ``sys.path``; its module imports a dependency that is not
installed, as the camera driver does on a device installed without the camera extra.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import main
from agent.config import ConfigError, load_config
from agent.registry import validate_drivers

CONFIG = """
[agent]
site = "st-marys"
device = "entrance-a"
state_dir = "{state}"

[drivers.door_camera]
type = "{type}"
enabled = {enabled}
"""


def plugin(site: Path, dist: str, entry: str, module_source: str) -> None:
    """A distribution ``dist`` declaring the driver ``entry`` (name = value) in ``site``."""
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[wardpost.drivers]\n{entry}\n")
    module = entry.split("=", 1)[1].strip().split(":")[0]
    (site / f"{module}.py").write_text(module_source)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    plugin(
        path,
        "acme-vision",
        "acme_camera = acme_camera:Camera [vision]",
        "import acme_absent_opencv  # noqa\n",
    )
    plugin(
        path,
        "acme-broken",
        "acme_broken = acme_broken:Broken [vision]",
        "import acme_broken.helper\n",
    )
    plugin(path, "acme-plain", "acme_plain = acme_plain:Plain", "import acme_absent_dependency\n")
    return path


def config(tmp_path: Path, type_name: str, *, enabled: bool) -> Path:
    path = tmp_path / "wardpost.toml"
    text = CONFIG.format(state=tmp_path / "state", type=type_name, enabled=str(enabled).lower())
    path.write_text(text)
    return path


def test_enabled_driver_without_its_extra_names_the_extra(site: Path, tmp_path: Path) -> None:
    path = config(tmp_path, "acme_camera", enabled=True)
    with pytest.raises(ConfigError) as info:
        validate_drivers(load_config(path))
    message = str(info.value)
    assert message.startswith(f"{path}: drivers.door_camera.type: driver type 'acme_camera'")
    assert "needs the optional 'vision' dependencies" in message
    assert "No module named 'acme_absent_opencv'" in message
    # Not this project's distribution: its own extra, installed with pip.
    assert "pip install 'acme-vision[vision]'" in message


def test_disabled_driver_without_its_extra_is_a_note(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path, "acme_camera", enabled=False)
    notes = validate_drivers(load_config(path))
    assert len(notes) == 1
    assert notes[0].startswith("drivers.door_camera is disabled and was not checked: ")
    assert "pip install 'acme-vision[vision]'" in notes[0]

    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: ok" in out
    assert "note: drivers.door_camera is disabled and was not checked" in out


@pytest.mark.parametrize("type_name", ["acme_broken", "acme_plain"])
@pytest.mark.parametrize("enabled", [True, False])
def test_other_load_failures_stay_errors(
    site: Path, tmp_path: Path, type_name: str, enabled: bool
) -> None:
    """A plug-in missing one of its own modules, or one declaring no extra, is broken:
    an error even when disabled, never blamed on an extra."""
    with pytest.raises(ConfigError) as info:
        validate_drivers(load_config(config(tmp_path, type_name, enabled=enabled)))
    assert f"driver type {type_name!r} failed to load: No module named" in str(info.value)
    assert "optional" not in str(info.value)


def test_wardpost_drivers_lists_what_to_install(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["drivers"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("acme_camera"))
    assert "(unavailable: needs the optional 'vision' dependencies" in line
