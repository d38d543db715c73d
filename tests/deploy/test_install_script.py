"""scripts/install and scripts/uninstall: --dry-run on the real paths, real runs into --root.

The scripts run from a copy of the files they install, so the tests do not
depend on anything else in the checkout (the example config is copied when the
checkout has one). No test here changes the host: real runs use ``--root``,
where users, systemd, udev and apt are only printed as skipped.

The ``slow`` tests install for real, each route once (wheels from the index,
Debian's python3-cryptography with --system-site-packages, and offline from a
wheelhouse built in the test), then check the installed config and run the
installed agent against the test broker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

from agent.testing.agent import Recorder
from agent.testing.broker import Broker
from agent.testing.toml_writer import dumps
from tests.support.shared import missing_prerequisite

REPO = Path(__file__).resolve().parents[2]
SHIPPED = (
    "scripts/install",
    "scripts/uninstall",
    "scripts/install-common.bash",
    "systemd/wardpost.service",
    "config/udev/99-wardpost-serial.rules",
    "pyproject.toml",
    "constraints.txt",
)
EXAMPLE = "config/wardpost.example.toml"


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "checkout"
    for name in SHIPPED:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name)
    if (REPO / EXAMPLE).exists():
        shutil.copy2(REPO / EXAMPLE, src / EXAMPLE)
    else:
        (src / EXAMPLE).write_text('[agent]\nsite = "site"\ndevice = "device"\n')
    return src


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


def run(
    source: Path,
    script: str,
    *args: str | Path,
    check: bool = True,
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["bash", str(source / "scripts" / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def tree(root: Path) -> dict[str, str]:
    """Everything under root: relative path -> 'dir', 'link:<target>' or file mode."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = f"link:{os.readlink(path)}"
        elif path.is_dir():
            found[rel] = "dir"
        else:
            found[rel] = oct(stat.S_IMODE(path.stat().st_mode))
    return found


# ------------------------------------------------------------------ dry run


def test_dry_run_prints_the_real_install_and_changes_nothing(source: Path) -> None:
    watched = [
        "/opt/wardpost",
        "/etc/wardpost",
        "/etc/systemd/system/wardpost.service",
        "/etc/udev/rules.d/99-wardpost-serial.rules",
        "/usr/local/bin/wardpost",
    ]
    before = {p: os.path.lexists(p) for p in watched}
    out = run(source, "install", "--dry-run", "--extras", "camera").stdout
    lines = out.splitlines()
    assert "install: dry run: nothing is changed" in lines
    assert "[dry-run] python3 -m venv /opt/wardpost/venv" in lines
    pip = (
        "[dry-run] /opt/wardpost/venv/bin/pip install --upgrade --no-cache-dir "
        "--constraint /opt/wardpost/constraints.txt"
    )
    assert f"{pip} {source}\\[camera\\]" in lines
    assert (
        f"[dry-run] install -D -m 0644 {source}/systemd/wardpost.service "
        "/etc/systemd/system/wardpost.service"
    ) in lines
    assert "[dry-run] systemctl enable wardpost.service" in lines
    if not os.path.exists("/etc/wardpost/wardpost.toml"):
        assert f"[dry-run] install -m 0640 {source}/{EXAMPLE} /etc/wardpost/wardpost.toml" in lines
    if subprocess.run(["id", "wardpost"], capture_output=True, check=False).returncode != 0:
        assert any(line.startswith("[dry-run] useradd --system --gid wardpost") for line in lines)
    # Every change is announced as a dry-run line; nothing is executed.
    assert not [line for line in lines if line.startswith("+ ")]
    assert {p: os.path.lexists(p) for p in watched} == before


def test_dry_run_with_system_site_packages(source: Path) -> None:
    out = run(source, "install", "--dry-run", "--system-site-packages").stdout
    if not os.path.exists("/opt/wardpost/venv/bin/python"):
        assert (
            "[dry-run] python3 -m venv --system-site-packages /opt/wardpost/venv"
            in out.splitlines()
        )


def test_dry_run_into_a_root_creates_nothing(source: Path, root: Path) -> None:
    out = run(source, "install", "--dry-run", "--root", root, "--no-venv").stdout
    assert f"[dry-run] install -m 0640 {source}/{EXAMPLE} {root}/etc/wardpost/wardpost.toml" in out
    assert "[skipped: --root] useradd" in out
    assert tree(root) == {}


# ------------------------------------------------------------- into a root


def test_install_into_root(source: Path, root: Path) -> None:
    out = run(source, "install", "--root", root, "--no-venv").stdout
    assert tree(root) == {
        "etc": "dir",
        "etc/systemd": "dir",
        "etc/systemd/system": "dir",
        "etc/systemd/system/wardpost.service": "0o644",
        "etc/udev": "dir",
        "etc/udev/rules.d": "dir",
        "etc/udev/rules.d/99-wardpost-serial.rules": "0o644",
        "etc/wardpost": "dir",
        "etc/wardpost/wardpost.toml": "0o640",
        "opt": "dir",
        "opt/wardpost": "dir",
        "usr": "dir",
        "usr/local": "dir",
        "usr/local/bin": "dir",
        "usr/local/bin/wardpost": "link:/opt/wardpost/venv/bin/wardpost",
    }
    assert stat.S_IMODE((root / "etc/wardpost").stat().st_mode) == 0o750
    unit = root / "etc/systemd/system/wardpost.service"
    assert unit.read_bytes() == (source / "systemd/wardpost.service").read_bytes()
    assert (root / "etc/wardpost/wardpost.toml").read_bytes() == (source / EXAMPLE).read_bytes()
    for skipped in (
        "useradd --system --gid wardpost",
        "usermod --append --groups dialout wardpost",
        f"chown root:wardpost {root}/etc/wardpost/wardpost.toml",
        "udevadm control --reload-rules",
        "systemctl daemon-reload",
        "systemctl enable wardpost.service",
    ):
        assert f"[skipped: --root] {skipped}" in out
    assert "--no-venv: not creating /opt/wardpost/venv" in out


def test_install_again_keeps_config_and_rules_and_refreshes_the_unit(
    source: Path, root: Path
) -> None:
    run(source, "install", "--root", root, "--no-venv")
    config = root / "etc/wardpost/wardpost.toml"
    rules = root / "etc/udev/rules.d/99-wardpost-serial.rules"
    unit = root / "etc/systemd/system/wardpost.service"
    config.write_text('[agent]\nsite = "st-marys"\ndevice = "ed"\n')
    rules.write_text('SUBSYSTEM=="tty", ENV{ID_SERIAL_SHORT}=="X", SYMLINK+="wardpost/gate1"\n')
    unit.write_text("[Service]\nExecStart=/bin/false\n")

    out = run(source, "install", "--root", root, "--no-venv").stdout
    assert "keeping the existing /etc/wardpost/wardpost.toml" in out
    assert "keeping the existing /etc/udev/rules.d/99-wardpost-serial.rules" in out
    assert config.read_text() == '[agent]\nsite = "st-marys"\ndevice = "ed"\n'
    assert "gate1" in rules.read_text()
    assert unit.read_bytes() == (source / "systemd/wardpost.service").read_bytes()

    # A third run finds nothing to do.
    out = run(source, "install", "--root", root, "--no-venv").stdout
    assert "/etc/systemd/system/wardpost.service is up to date" in out
    assert not [line for line in out.splitlines() if line.startswith("+ ")]


def test_foreign_cli_is_left_alone(source: Path, root: Path) -> None:
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "usr/local/bin/wardpost").write_text("#!/bin/sh\n")
    out = run(source, "install", "--root", root, "--no-venv").stdout
    assert "/usr/local/bin/wardpost exists and is not ours" in out
    assert (root / "usr/local/bin/wardpost").read_text() == "#!/bin/sh\n"


# ------------------------------------------------------------------ routes


def test_dry_run_names_the_platform_and_the_route(source: Path) -> None:
    out = run(source, "install", "--dry-run").stdout
    version = subprocess.run(
        ["python3", "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    bits = 64 if sys.maxsize > 2**32 else 32
    assert f"machine {os.uname().machine}, {bits}-bit Python {version} (python3)" in out
    if bits == 64:
        assert "install: route: wheels (64-bit: the package index has wheels" in out


def test_apt_route_uses_debians_python_and_cryptography(source: Path) -> None:
    out = run(source, "install", "--dry-run", "--route", "apt").stdout
    lines = out.splitlines()
    assert "install: route: apt (chosen with --route)" in lines
    if not os.path.exists("/opt/wardpost/venv/bin/python"):
        assert (
            "[dry-run] /usr/bin/python3 -m venv --system-site-packages /opt/wardpost/venv" in lines
        )
    assert (
        f"[dry-run] write_constraints {source}/constraints.txt /opt/wardpost/constraints.txt "
        "cryptography"
    ) in lines
    assert (
        "[dry-run] /opt/wardpost/venv/bin/pip install --upgrade --no-cache-dir "
        f"--only-binary cryptography --constraint /opt/wardpost/constraints.txt {source}"
    ) in lines


def test_apt_route_refuses_the_camera(source: Path, root: Path) -> None:
    result = run(
        source, "install", "--root", root, "--route", "apt", "--extras", "camera", check=False
    )
    assert result.returncode == 1
    assert "the camera extra is not available on the apt route (32-bit systems)" in result.stderr
    assert "LiteRT, which has no 32-bit ARM build" in result.stderr
    assert tree(root) == {}


def test_apt_route_will_not_reuse_a_venv_blind_to_debians_packages(
    source: Path, root: Path
) -> None:
    venv = root / "opt/wardpost/venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/python").write_text("#!/bin/sh\n")
    (venv / "bin/python").chmod(0o755)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = false\n")
    result = run(source, "install", "--root", root, "--route", "apt", check=False)
    assert result.returncode == 1
    assert "/opt/wardpost/venv was made without --system-site-packages" in result.stderr
    assert not (root / "opt/wardpost/constraints.txt").exists()


def test_wheelhouse_must_exist(source: Path, tmp_path: Path) -> None:
    result = run(source, "install", "--dry-run", "--wheelhouse", tmp_path / "nope", check=False)
    assert result.returncode == 1
    assert "--wheelhouse" in result.stderr and "no such directory" in result.stderr


def test_wheelhouse_install_is_offline(source: Path, tmp_path: Path) -> None:
    out = run(source, "install", "--dry-run", "--wheelhouse", tmp_path).stdout
    assert f"install: offline: wheels only from {tmp_path}" in out
    assert f"--no-index --find-links {tmp_path} {source}" in out


# -------------------------------------------------------- real installs


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole source tree, as a technician copies it to the Pi (pip builds the package
    from it, so it must not be the working checkout)."""
    dest = tmp_path_factory.mktemp("install") / "wardpost"
    shutil.copytree(
        REPO,
        dest,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", "*.egg-info", "build", ".*_cache", ".hypothesis"
        ),
    )
    return dest


def offline_environment() -> dict[str, str]:
    """No pip configuration and an index that cannot answer: only the wheelhouse works."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_INDEX_URL"] = "http://127.0.0.1:9/simple"
    return env


def installed_cli(root: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [root / "opt/wardpost/venv/bin/wardpost", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def check_installed(root: Path, tmp_path: Path, broker: Broker, device: str) -> None:
    """What a technician does next: check the installed config, then run the agent."""
    installed = root / "etc/wardpost/wardpost.toml"
    # The default install has no camera extra: its disabled driver is a note, not an error.
    check = installed_cli(root, "check-config", installed)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"{installed}: ok" in check.stdout
    assert "note: drivers.entrance_camera is disabled and was not checked" in check.stdout
    assert "install them with sudo scripts/install --extras camera" in check.stdout

    # The agent's core runs without rich (the centre's console needs it and says so).
    monitor = installed_cli(root, "monitor", "--duration", "1")
    assert monitor.returncode == 1
    assert "pip install 'wardpost[central]'" in monitor.stderr

    # Signing keys exercise the route's cryptography (Debian's on the apt route).
    keys = installed_cli(
        root,
        "keys",
        "generate",
        "--private",
        tmp_path / "centre.key",
        "--public",
        tmp_path / "centre.pub",
    )
    assert keys.returncode == 0, keys.stderr
    doc = tomllib.loads(installed.read_text())
    doc["agent"].update(device=device, state_dir=str(tmp_path / "state"))
    doc["mqtt"].update(host=broker.host, port=broker.port)
    doc["commands"]["public_keys"] = [str(tmp_path / "centre.pub")]
    doc["drivers"]["heartbeat_test"].update(enabled=True, rate=5.0)
    config = tmp_path / "wardpost.toml"
    config.write_text(dumps(doc))

    doc["drivers"]["entrance_camera"]["enabled"] = True
    with_camera = tmp_path / "with-camera.toml"
    with_camera.write_text(dumps(doc))
    check = installed_cli(root, "check-config", with_camera)
    assert check.returncode == 2
    assert (
        "drivers.entrance_camera.type: driver type 'camera_face' needs the optional 'camera'"
        in check.stderr
    )
    assert "sudo scripts/install --extras camera" in check.stderr

    with Recorder(broker, f"wardpost/{doc['agent']['site']}/{device}/#") as recorder:
        with (tmp_path / "agent.log").open("wb") as log:  # the child keeps its own copy
            agent = subprocess.Popen(
                [root / "opt/wardpost/venv/bin/wardpost", "--config", config, "run"],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        try:
            recorder.wait_events("sim.tick", count=2, timeout=60)
        finally:
            agent.terminate()
            code = agent.wait(timeout=60)
    assert code == 0, (tmp_path / "agent.log").read_text()
    status = recorder.on_topic("/status")
    assert [m.json()["state"] for m in status][-1] == "stopped"


@pytest.mark.slow
def test_wheels_route(checkout: Path, tmp_path: Path, broker: Broker) -> None:
    root = tmp_path / "root"
    root.mkdir()
    out = run(checkout, "install", "--root", root, "--route", "wheels", timeout=900).stdout
    assert "install: route: wheels (chosen with --route)" in out
    installed = root / "opt/wardpost/constraints.txt"
    assert installed.read_bytes() == (checkout / "constraints.txt").read_bytes()
    versions = pip_versions(root)
    assert "rich" not in versions
    assert versions["cryptography"] == pinned(checkout)["cryptography"]
    check_installed(root, tmp_path, broker, "install-wheels")


@pytest.mark.slow
def test_apt_route(checkout: Path, tmp_path: Path, broker: Broker) -> None:
    """The 32-bit route, forced here: Debian's python3-cryptography through
    --system-site-packages, everything else from pip."""
    root = tmp_path / "root"
    root.mkdir()
    out = run(checkout, "install", "--root", root, "--route", "apt", timeout=900).stdout
    assert "install: python3-cryptography is installed" in out
    venv_python = root / "opt/wardpost/venv/bin/python"
    where = subprocess.run(
        [
            venv_python,
            "-c",
            "import cryptography as c, sys; print(c.__version__, c.__file__, sys.version)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    debian = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "python3-cryptography"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert debian.startswith(where[0])
    assert where[1].startswith("/usr/lib/python3/dist-packages/")
    assert "cryptography==" not in (root / "opt/wardpost/constraints.txt").read_text()
    check_installed(root, tmp_path, broker, "install-apt")


@pytest.mark.slow
def test_wheelhouse_route(checkout: Path, tmp_path: Path, broker: Broker) -> None:
    wheelhouse = tmp_path / "wheels"
    built = run(checkout, "build-wheelhouse", wheelhouse, timeout=900)
    assert "Successfully downloaded" in built.stdout, built.stdout + built.stderr
    root = tmp_path / "root"
    root.mkdir()
    out = run(
        checkout,
        "install",
        "--root",
        root,
        "--wheelhouse",
        wheelhouse,
        timeout=900,
        env=offline_environment(),
    ).stdout
    assert f"install: offline: wheels only from {wheelhouse}" in out
    assert pip_versions(root)["cryptography"] == pinned(checkout)["cryptography"]
    check_installed(root, tmp_path, broker, "install-offline")


def pip_versions(root: Path) -> dict[str, str]:
    listing = subprocess.run(
        [root / "opt/wardpost/venv/bin/python", "-m", "pip", "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
        env=offline_environment(),
    )
    return {p["name"].lower(): p["version"] for p in json.loads(listing.stdout)}


def pinned(checkout: Path) -> dict[str, str]:
    pins = re.findall(r"^([a-z0-9-]+)==(\S+)", (checkout / "constraints.txt").read_text(), re.M)
    return dict(pins)


# ----------------------------------------------------------------- errors


def test_unknown_option_is_a_usage_error(source: Path) -> None:
    result = run(source, "install", "--fast", check=False)
    assert result.returncode == 2
    assert "unknown option --fast" in result.stderr
    assert "usage: sudo scripts/install" in result.stderr


def test_missing_root_directory(source: Path, tmp_path: Path) -> None:
    result = run(source, "install", "--root", tmp_path / "nope", check=False)
    assert result.returncode == 1
    assert "no such directory" in result.stderr


def test_incomplete_checkout_is_named(source: Path, root: Path) -> None:
    (source / EXAMPLE).unlink()
    result = run(source, "install", "--root", root, "--no-venv", check=False)
    assert result.returncode == 1
    assert f"{source}/{EXAMPLE} is missing" in result.stderr
    assert tree(root) == {}


def test_real_run_needs_root(source: Path) -> None:
    command = ["bash", "scripts/install"]
    if os.geteuid() == 0:
        runner = shutil.which("runuser")
        if runner is None:
            pytest.skip("runuser is not available to drop root")
        command = [runner, "-u", "nobody", "--", *command]
    # pytest's temporary directories are private to root: use one nobody can read.
    with tempfile.TemporaryDirectory() as shared:
        Path(shared).chmod(0o755)
        checkout = Path(shutil.copytree(source, Path(shared) / "checkout"))
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=60, check=False, cwd=checkout
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "run as root" in result.stderr


# -------------------------------------------------------------- uninstall


def test_uninstall_keeps_data_unless_purged(source: Path, root: Path) -> None:
    run(source, "install", "--root", root, "--no-venv")
    venv_python = root / "opt/wardpost/venv/bin/python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("")
    outbox = root / "var/lib/wardpost/outbox.db"
    outbox.parent.mkdir(parents=True)
    outbox.write_bytes(b"SQLite format 3\x00")

    dry = run(source, "uninstall", "--root", root, "--dry-run").stdout
    assert f"[dry-run] rm -rf -- {root}/opt/wardpost/venv" in dry
    assert venv_python.exists()

    out = run(source, "uninstall", "--root", root).stdout
    assert "[skipped: --root] systemctl disable --now wardpost.service" in out
    assert "kept /etc/wardpost, /var/lib/wardpost (outbox)" in out
    left = tree(root)
    for gone in ("etc/systemd/system/wardpost.service", "opt/wardpost", "usr/local/bin/wardpost"):
        assert gone not in left
    for kept in (
        "etc/wardpost/wardpost.toml",
        "var/lib/wardpost/outbox.db",
        "etc/udev/rules.d/99-wardpost-serial.rules",
    ):
        assert kept in left

    out = run(source, "uninstall", "--root", root, "--purge").stdout
    assert "deleting /var/lib/wardpost/outbox.db, including any events not yet delivered" in out
    assert "[skipped: --root] userdel wardpost" in out
    assert "[skipped: --root] groupdel wardpost" in out
    left = tree(root)
    for gone in ("etc/wardpost", "var/lib/wardpost", "etc/udev/rules.d/99-wardpost-serial.rules"):
        assert gone not in left

    # Uninstalling what is gone is fine too.
    assert "is already gone" in run(source, "uninstall", "--root", root, "--purge").stdout


def test_uninstall_dry_run_on_the_real_paths(source: Path) -> None:
    out = run(source, "uninstall", "--dry-run", "--purge").stdout
    assert "[dry-run] systemctl disable --now wardpost.service" in out
    assert not [line for line in out.splitlines() if line.startswith("+ ")]


# ------------------------------------------------------------------- lint


def test_shellcheck_is_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        missing_prerequisite("shellcheck is not installed (scripts/setup-env installs it)")
    names = ("install", "uninstall", "install-common.bash", "build-wheelhouse", "lock", "setup-env")
    scripts = [REPO / "scripts" / name for name in names]
    result = subprocess.run(
        [shellcheck, "-x", *map(str, scripts)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stdout


def test_udev_examples_are_inert_and_well_formed() -> None:
    """Installed as-is the rules do nothing; each example, uncommented, is key/op/value pairs."""
    text = (REPO / "config/udev/99-wardpost-serial.rules").read_text()
    pair = r'[A-Z_]+(\{[A-Za-z_]+\})?(==|!=|\+=|=)"[^"]*"'
    examples = 0
    for line in text.splitlines():
        assert not line.strip() or line.startswith("#"), f"active rule: {line}"
        body = line[1:]
        if body.startswith(("SUBSYSTEM==", "KERNEL==")):
            examples += 1
            for part in body.split(", "):
                assert re.fullmatch(pair, part), part
            assert 'SYMLINK+="wardpost/' in body
    assert examples >= 3
