"""Every driver ships a ``sample.toml``, and every sample is a valid config fragment: loaded
the way the agent loads a config, so a renamed or retyped option fails here first (as
Telegraf tests each plug-in's sample config)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.registry import available_drivers, validate_drivers

DRIVERS = Path(__file__).resolve().parents[2] / "drivers"
SAMPLES = sorted(DRIVERS.glob("*/sample.toml"))
#: Drivers without hardware have nothing a site would configure from a sample.
WITHOUT_SAMPLE = {"simulated"}


def folder_of(entry_point_value: str) -> str:
    """``drivers.xray:XrayDriver`` -> ``xray``."""
    return entry_point_value.split(":", maxsplit=1)[0].split(".")[1]


def test_every_driver_has_a_sample() -> None:
    folders = {
        folder_of(ep.value)
        for name, ep in available_drivers().items()
        if ep.value.startswith("drivers.") and name not in WITHOUT_SAMPLE
    }
    assert folders, "no drivers found: is the project installed (scripts/setup-env)?"
    assert folders <= {sample.parent.name for sample in SAMPLES}


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.parent.name)
def test_the_sample_is_a_valid_config_fragment(sample: Path) -> None:
    fragment = tomllib.loads(sample.read_text())
    assert set(fragment) == {"drivers"}, f"{sample}: only [drivers.<name>] tables belong here"
    doc = {"agent": {"site": "sample-site", "device": "sample-device"}, **fragment}
    config = parse_config(doc, str(sample))
    validate_drivers(config)  # raises ConfigError naming the file and the field
    assert config.drivers, f"{sample} configures no driver"
    types = {section.type for section in config.drivers}
    folders = {folder_of(available_drivers()[t].value) for t in types}
    assert folders == {sample.parent.name}, f"{sample} configures drivers of other folders: {types}"
