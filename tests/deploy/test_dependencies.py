"""constraints.txt against pyproject.toml: every edge dependency pinned, floors kept.

scripts/lock regenerates constraints.txt; these checks catch a pyproject.toml edit
without a new lock, and a lock that would install a version below a security floor.
They read files only (no package index).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
#: The edge agent's dependencies: the core and the camera extra (the centre's are not locked).
EDGE = [*PROJECT["dependencies"], *PROJECT["optional-dependencies"]["camera"]]
#: The platforms the lock serves: 64-bit Raspberry Pi OS (Bookworm, Trixie), 32-bit (its
#: pure-Python part), and the x86_64 machines that test and build wheelhouses.
PLATFORMS = [
    {"platform_machine": machine, "python_version": python, "python_full_version": f"{python}.0"}
    for machine in ("aarch64", "armv7l", "x86_64")
    for python in ("3.11", "3.13")
]


def pins() -> list[tuple[Requirement, Version]]:
    """Each ``name==version ; marker`` line of constraints.txt."""
    found = []
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            found.append((requirement, Version(spec.version)))
    return found


def pinned_for(name: str, environment: dict[str, str]) -> Version | None:
    versions = [
        version
        for requirement, version in pins()
        if canonicalize_name(requirement.name) == canonicalize_name(name)
        and (requirement.marker is None or requirement.marker.evaluate(environment))
    ]
    assert len(versions) <= 1, f"{name} pinned twice for {environment}"
    return versions[0] if versions else None


@pytest.mark.parametrize(
    "environment", PLATFORMS, ids=lambda e: f"{e['platform_machine']}-py{e['python_version']}"
)
def test_every_edge_dependency_is_pinned_within_pyproject(environment: dict[str, str]) -> None:
    for line in EDGE:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        version = pinned_for(requirement.name, environment)
        assert version is not None, (
            f"{requirement.name} is not in constraints.txt: run scripts/lock"
        )
        assert version in requirement.specifier, (
            f"constraints.txt pins {requirement.name}=={version}, outside pyproject's "
            f"{requirement.specifier}: run scripts/lock"
        )


def test_security_floors() -> None:
    """The wheel route gets the fixed versions; pyproject's floor for cryptography stays
    low enough for Debian 12's python3-cryptography (38) on the apt route."""
    floors = {
        Requirement(line.split("#")[0]).name: Requirement(line.split("#")[0]).specifier
        for line in (REPO / "constraints.in").read_text().splitlines()
        if line.split("#")[0].strip()
    }
    assert floors["cryptography"] == SpecifierSet(">=44.0.1")
    environment = PLATFORMS[0]
    assert pinned_for("cryptography", environment) in SpecifierSet(">=44.0.1")
    assert pinned_for("opencv-python-headless", environment) in SpecifierSet(">=4.8.1.78")
    declared = {Requirement(line).name: Requirement(line).specifier for line in EDGE}
    assert Version("38.0.4") in declared["cryptography"]
    assert declared["opencv-python-headless"] == SpecifierSet(">=4.8.1.78")


def test_the_edge_does_not_need_rich() -> None:
    """rich draws the centre's console; a device installs without it."""
    assert not [line for line in EDGE if Requirement(line).name == "rich"]
    assert "rich" in {
        Requirement(line).name for line in PROJECT["optional-dependencies"]["central"]
    }
    assert all(canonicalize_name(r.name) != "rich" for r, _ in pins())


def test_pins_do_not_depend_on_the_python_version() -> None:
    """pip evaluates markers on the machine running it, so scripts/build-wheelhouse, run
    with one Python for a device with another, needs one pin per package for every Python
    (constraints.in caps what would fork)."""
    for requirement, _ in pins():
        marker = str(requirement.marker or "")
        assert "python_version" not in marker and "python_full_version" not in marker, requirement
