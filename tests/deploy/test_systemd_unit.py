"""The shipped systemd unit passes systemd's own checks.

``systemd-analyze verify`` reports unknown keys and bad values only as warnings
(exit status 0), so any stderr output counts as a failure here. It also refuses
a unit whose ``ExecStart=`` binary is missing, so it checks a copy that points
at an executable present on this host.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "wardpost.service"
MAX_EXPOSURE = 2.0
EXEC_START = "/opt/wardpost/venv/bin/wardpost run --config /etc/wardpost/wardpost.toml"

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (apt-get install systemd)",
)


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False
    )


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_security_exposure_is_at_most_two() -> None:
    result = analyze("security", "--offline=true", "--no-pager", str(UNIT))
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:]
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, result.stdout


def test_security_threshold_gate_agrees() -> None:
    # The CI gate form: --threshold uses a 0-100 scale and fails above it.
    result = analyze(
        "security",
        "--offline=true",
        "--no-pager",
        f"--threshold={int(MAX_EXPOSURE * 10)}",
        str(UNIT),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


def test_verify_is_silent(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert f"ExecStart={EXEC_START}" in text
    present = shutil.which("true")
    assert present is not None
    copy = tmp_path / UNIT.name
    copy.write_text(re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={present}", text))
    result = analyze("verify", str(copy))
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


def test_verify_would_catch_a_typo(tmp_path: Path) -> None:
    # Guards the check above: a misspelt key must produce stderr output.
    present = shutil.which("true")
    copy = tmp_path / UNIT.name
    text = re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={present}", UNIT.read_text())
    copy.write_text(text.replace("ProtectHome=yes", "ProtectHomes=yes"))
    assert analyze("verify", str(copy)).stderr != ""


def test_service_contract() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["Restart"] == ["always"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert float(s["WatchdogSec"][0]) > 0
    assert s["User"] == ["wardpost"] and s["Group"] == ["wardpost"]
    assert s["SupplementaryGroups"] == ["gpio dialout video"]
    assert s["WorkingDirectory"] == ["/var/lib/wardpost"]
    assert s["StateDirectory"] == ["wardpost"]
    assert s["DevicePolicy"] == ["closed"]
    allowed = {v.split()[0] for v in s["DeviceAllow"]}
    assert {"char-gpiochip", "char-ttyUSB", "char-ttyACM", "char-video4linux"} <= allowed
    assert s["CapabilityBoundingSet"] == [""]
