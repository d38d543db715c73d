"""The whole alarm loop on real parts, each started through its own command line.

One :class:`Loop` per store engine (SQLite, PostgreSQL), shared by the tests of a
module, which run in file order as one story:

* mosquitto from ``config/mosquitto/`` (TLS, client certificates, the shipped ACL);
* ``wardpost receiver run`` with the DC-09 bridge on, forwarding to pysiaalarm (the
  receiver library Home Assistant's SIA integration uses) as the alarm-receiving centre;
* three ``wardpost run`` agents: a panic button with its LED (gpiozero MockFactory pins,
  pressed through ``wardpost simulate``), a walk-through gate on a pseudo-terminal and a
  camera playing a video made from ``../shared/faces``;
* a hostile device with a valid certificate of its own (tests/system/hostile.py).

The operator acts only through the CLI (``wardpost receiver ack/resolve``, ``wardpost
command``, ``wardpost monitor``). The tests read the centre's store directly, as an
observer; what a device shows is read from the device (``wardpost status``, ``events``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import pytest

from agent.testing.broker import Broker, free_port
from agent.testing.process import REPO, AgentProcess
from agent.testing.serial_pty import PtyDevice
from agent.testing.toml_writer import dumps
from central.config import parse_receiver_config
from central.store import Store, open_store
from central.testing.postgres import PostgresCluster
from drivers.camera_face.models import DEFAULT_EMBEDDER
from tests.drivers.test_camera_face import photo, write_video
from tests.support.proxy import TcpProxy
from tests.support.shared import FACES, MODELS, require
from tests.support.tls import MOSQUITTO_DIR, Identity, TestPKI, shipped_broker_config

SITE = "north"
PANIC, GATE, CAMERA, HOSTILE = "ward3", "entrance", "door-cam", "intruder"
#: The receiver's DC-09 account at the alarm-receiving centre.
ARC_ACCOUNT = "1234"
#: The person enrolled on the camera's watchlist (photos in ../shared/faces/lfw_dev).
WATCHED = "Bill_Gates"
#: Generous: CI is a loaded 2-core box; tests wait for conditions, never sleep for luck.
DEADLINE = 45.0
WARDPOST = [sys.executable, "-m", "agent.cli"]  # the `wardpost` console script, same entry

T = TypeVar("T")


def wait_for(
    probe: Callable[[], T],
    what: str | Callable[[], str],
    timeout: float = DEADLINE,
    every: float = 0.1,
) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` (a callable
    ``what`` describes the state at the time of failure)."""
    deadline = time.monotonic() + timeout
    last: T = probe()
    while not last:
        if time.monotonic() >= deadline:
            described = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g} s waiting for {described}")
        time.sleep(every)
        last = probe()
    return last


def wardpost(
    *args: str, timeout: float = 60.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run one ``wardpost`` command as the operator would."""
    done = subprocess.run(
        [*WARDPOST, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"wardpost {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
    return done


class Service:
    """A long-running command of ours (receiver, monitor): its own log, stopped by its pid."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: BinaryIO | None = None
        self._log_start = 0

    def start(self) -> Service:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the child
        self._log_start = self._log.tell()
        self.proc = subprocess.Popen(
            self.argv,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
        )
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        proc, self.proc = self.proc, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(sig)
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def text(self, this_run: bool = False) -> str:
        """The whole log, or only what the current (last started) process wrote."""
        with contextlib.suppress(OSError), open(self.log_path, "rb") as f:
            f.seek(self._log_start if this_run else 0)
            return f.read().decode(errors="replace")
        return ""


@dataclass
class AclIdentities:
    """Who config/mosquitto/wardpost.acl lets write receipts, and who only commands."""

    receiver: str
    console: str


def acl_identities(acl: Path) -> AclIdentities:
    """Read the shipped ACL: the user that may write ``receipts`` is the receiver; a user
    that may write ``cmd/#`` but not receipts is an operator console. Where the ACL names
    no such console, consoles share the receiver's identity (and so its powers)."""
    writes: dict[str, set[str]] = {}
    user = ""
    for raw in acl.read_text().splitlines():
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if line.startswith("user "):
            user = line.split(None, 1)[1]
            writes.setdefault(user, set())
        elif line.startswith("pattern "):
            user = ""
        elif user and (m := re.match(r"topic\s+(write|readwrite)\s+(\S+)", line)):
            writes[user].add(m.group(2))
    receivers = [u for u, topics in writes.items() if any(t.endswith("/receipts") for t in topics)]
    consoles = [
        u
        for u, topics in writes.items()
        if any("/cmd/" in t for t in topics) and not any(t.endswith("/receipts") for t in topics)
    ]
    assert receivers, f"{acl}: no identity may write receipts"
    return AclIdentities(receivers[0], consoles[0] if consoles else receivers[0])


class Arc:
    """pysiaalarm as the alarm-receiving centre: records every Contact ID report it ACKs."""

    def __init__(self, port: int):
        from pysiaalarm import SIAAccount, SIAClient

        self.port = port
        self.reports: list[Any] = []
        self._lock = threading.Lock()
        self.client = SIAClient("127.0.0.1", port, [SIAAccount(ARC_ACCOUNT)], self._on_event)

    def _on_event(self, event: Any) -> None:
        with self._lock:
            self.reports.append(event)

    def received(self) -> list[Any]:
        with self._lock:
            return list(self.reports)


@dataclass
class Loop:
    """Everything one run of the loop needs; see the module docstring."""

    engine: str
    root: Path
    pki: TestPKI
    broker: Broker
    acl: AclIdentities
    store_url: str
    receiver_config: Path
    receiver: Service
    monitor: Service
    arc: Arc
    agents: dict[str, AgentProcess]
    configs: dict[str, dict[str, Any]]
    gate_port: PtyDevice
    #: The gate reaches the broker through this proxy: its network cable, for dead-link tests.
    gate_link: TcpProxy
    centre_key: Path
    identities: dict[str, Identity]
    figures: dict[str, float] = field(default_factory=dict)
    #: device -> time its state was wiped: events stored since belong to a new numbering.
    new_numbering_since: dict[str, float] = field(default_factory=dict)

    def read(self, query: Callable[[Store], T]) -> T:
        """One look at the centre's store, as an observer (opened and closed each time)."""
        store = open_store(
            parse_receiver_config({"store": {"url": self.store_url}}, "<test>").store
        )
        try:
            return query(store)
        finally:
            store.close()

    def stored(self, **filters: Any) -> list[Any]:
        return self.read(lambda store: store.events(limit=100_000, **filters))

    def devices(self) -> list[Any]:
        return self.read(lambda store: store.devices())

    def alarms(self) -> list[Any]:
        return self.read(lambda store: store.alarms())

    def device_cli(
        self, name: str, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``wardpost --config <that device's config> ...`` (status, events, simulate, reload)."""
        return wardpost("--config", str(self.agents[name].config_path), *args, check=check)

    def device_status(self, name: str) -> dict[str, Any]:
        status: dict[str, Any] = json.loads(self.device_cli(name, "status", "--json").stdout)
        return status

    def device_events(self, name: str, limit: int = 500) -> list[dict[str, Any]]:
        out = self.device_cli(name, "events", "--json", "--limit", str(limit)).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def broker_args(self, identity: str) -> list[str]:
        who = self.identities[identity]
        return [
            "--host",
            self.broker.host,
            "--port",
            str(self.broker.port),
            "--ca-file",
            str(self.pki.ca_file),
            "--cert-file",
            str(who.cert_file),
            "--key-file",
            str(who.key_file),
        ]

    def operator(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``wardpost receiver <args> --config central.toml``."""
        return wardpost("receiver", *args, "--config", str(self.receiver_config), check=check)

    def command(
        self,
        device: str,
        name: str,
        args: dict[str, Any],
        *,
        key: bool = True,
        target: str | None = None,
        timeout: float = 20.0,
    ) -> dict[str, Any]:
        """``wardpost command`` from the operator console; returns the device's result."""
        done = wardpost(
            "command",
            f"{SITE}/{device}",
            name,
            "--args",
            json.dumps(args),
            "--timeout",
            str(timeout),
            *(["--key", str(self.centre_key)] if key else []),
            *(["--target", target] if target else []),
            *self.broker_args(self.acl.console),
            check=False,
            timeout=timeout + 30,
        )
        try:
            result: dict[str, Any] = json.loads(done.stdout)
        except json.JSONDecodeError:
            raise AssertionError(
                f"wardpost command printed no result: {done.stdout}\n{done.stderr}"
            ) from None
        return result

    def start_receiver(self) -> None:
        self.receiver.start()
        wait_for(
            lambda: (
                "subscribed to" in self.receiver.text(this_run=True) or not self.receiver.running
            ),
            "the receiver to subscribe",
        )
        assert self.receiver.running, self.receiver.text(this_run=True)[-3000:]


def example_config(name: str) -> dict[str, Any]:
    with open(REPO / "config" / name, "rb") as f:
        return tomllib.load(f)


def _agent_config(
    loop_root: Path,
    device: str,
    tls: Identity,
    pki: TestPKI,
    port: int,
    centre_pub: Path,
    drivers: dict[str, Any],
) -> dict[str, Any]:
    example = example_config("wardpost.example.toml")
    return {
        "agent": {
            "site": SITE,
            "device": device,
            "state_dir": str(loop_root / device / "state"),
            "heartbeat_interval": 1.0,
        },
        "mqtt": {
            # keepalive and the dead-link settings stay at their defaults (defect 6).
            "host": "127.0.0.1",
            "port": port,
            # The delivery guarantee the shipped example gives a hospital (issue: defect 5).
            "delivery": example["mqtt"]["delivery"],
            # Re-send unreceipted events after 5 s, not 30: the outage test waits for them.
            "receipt_timeout": 5.0,
            "reconnect_min_delay": 0.05,
            "reconnect_max_delay": 1.0,
            "tls": {
                "enabled": True,
                "ca_file": str(pki.ca_file),
                "cert_file": str(tls.cert_file),
                "key_file": str(tls.key_file),
            },
        },
        "commands": {"require_signature": True, "public_keys": [str(centre_pub)]},
        "drivers": drivers,
    }


def _write(path: Path, doc: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(doc))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def loop(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Loop]:
    require(MODELS / DEFAULT_EMBEDDER, FACES)
    engine: str = request.param
    root = tmp_path_factory.mktemp(f"loop-{engine}")
    with contextlib.ExitStack() as cleanup:
        pki = TestPKI(root / "pki")
        pki.issue("broker", server=True)
        shutil.copy(MOSQUITTO_DIR / "wardpost.acl", pki.directory / "wardpost.acl")
        acl = acl_identities(MOSQUITTO_DIR / "wardpost.acl")
        identities = {cn: pki.issue(cn) for cn in {acl.receiver, acl.console}}
        for device in (PANIC, GATE, CAMERA, HOSTILE):
            identities[device] = pki.issue(f"{SITE}/{device}")
        port = free_port()
        broker = Broker(
            root / "broker", port=port, extra_config=shipped_broker_config(pki.directory, port)
        )
        broker.start()
        cleanup.callback(broker.stop)

        wardpost(
            "keys",
            "generate",
            "--private",
            str(root / "centre.key"),
            "--public",
            str(root / "centre.pub"),
        )

        if engine == "sqlite":
            store_url = f"sqlite:///{root / 'central.db'}"
        else:
            cluster: PostgresCluster = request.getfixturevalue("postgres")
            store_url = cluster.create_database("loop")
        arc = Arc(free_port())
        arc.client.start()
        cleanup.callback(arc.client.stop)

        central = example_config("central.example.toml")
        receiver_tls = identities[acl.receiver]
        receiver_config = _write(
            root / "central.toml",
            {
                "log_level": "info",
                "mqtt": {
                    "host": broker.host,
                    "port": broker.port,
                    "client_id": f"wardpost-receiver-{engine}",
                    "keepalive": 5,
                    "tls": {
                        "enabled": True,
                        "ca_file": str(pki.ca_file),
                        "cert_file": str(receiver_tls.cert_file),
                        "key_file": str(receiver_tls.key_file),
                    },
                },
                "store": {"url": store_url},
                "supervision": {
                    "lost_after": 2.5,
                    "default_interval": 1.0,
                    "check_every": 0.2,
                    "gap_grace": 3.0,
                    "gap_timeout": 30.0,
                },
                "commands": {"signing_key": str(root / "centre.key")},
                # The example's bridge and Contact ID map, receiver number left at its default.
                "dc09": {
                    "enabled": True,
                    "host": "127.0.0.1",
                    "port": arc.port,
                    "transport": "tcp",
                    "account": ARC_ACCOUNT,
                    "timeout": 3.0,
                    "attempts": 2,
                    "retry_every": 1.0,
                    "null_interval": 0.0,
                    "map": central["dc09"]["map"],
                },
            },
        )
        receiver = Service(
            "receiver",
            [*WARDPOST, "receiver", "run", "--config", str(receiver_config)],
            root / "receiver.log",
        )

        gate_port = PtyDevice(root / "gate-tty")
        cleanup.callback(gate_port.close)
        video = root / "door.avi"
        write_video(video, [(None, 4), (photo(WATCHED, 3), 8), (None, 4)])
        drivers: dict[str, dict[str, Any]] = {
            PANIC: {
                "button": {
                    "type": "panic_button",
                    "pin": 17,
                    "led_pin": 22,
                    "pin_factory": "mock",
                    "stuck_after": 0.0,
                    "location": {"ward": "Ward 3", "room": "12"},
                }
            },
            GATE: {
                "gate": {"type": "serial_gate", "port": str(gate_port.link), "dialect": "text-gate"}
            },
            CAMERA: {
                "door": {
                    "type": "camera_face",
                    "source": str(video),
                    "source_type": "video_file",
                    "loop": True,
                    "models_dir": str(MODELS),
                    "max_fps": 5.0,
                    "cooldown": 1.0,
                }
            },
        }
        configs: dict[str, dict[str, Any]] = {}
        agents: dict[str, AgentProcess] = {}
        gate_link = TcpProxy(broker.host, broker.port).start()
        cleanup.callback(gate_link.stop)
        for device, table in drivers.items():
            port = gate_link.port if device == GATE else broker.port
            doc = _agent_config(
                root, device, identities[device], pki, port, root / "centre.pub", table
            )
            if device == CAMERA:
                # One event in flight at a time, released by receipts only: the events behind
                # it are accepted but not yet sent, which a forged receipt must not release.
                doc["mqtt"].update(delivery="receipt", inflight_window=1)
            configs[device] = doc
            path = _write(root / device / "wardpost.toml", doc)
            agents[device] = AgentProcess(path, root / device / "state" / "control.sock")
        wardpost(
            "watchlist",
            "add",
            "--config",
            str(agents[CAMERA].config_path),
            "--driver",
            "door",
            "--id",
            "W-17",
            "--name",
            WATCHED.replace("_", " "),
            "--list",
            "banned",
            str(photo(WATCHED, 1)),
        )

        loop = Loop(
            engine=engine,
            root=root,
            pki=pki,
            broker=broker,
            acl=acl,
            store_url=store_url,
            receiver_config=receiver_config,
            receiver=receiver,
            monitor=Service("monitor", [], root / "monitor.log"),
            arc=arc,
            agents=agents,
            configs=configs,
            gate_port=gate_port,
            gate_link=gate_link,
            centre_key=root / "centre.key",
            identities=identities,
        )
        # Older consoles sent receipts themselves (told not to: the receiver does); newer
        # ones read the receiver's alarm store.
        offered = wardpost("monitor", "--help").stdout
        extra = [
            *(["--no-receipts"] if "--no-receipts" in offered else []),
            *(
                ["--receiver-config", str(receiver_config)]
                if "--receiver-config" in offered
                else []
            ),
        ]
        loop.monitor.argv = [
            *WARDPOST,
            "monitor",
            "--json",
            "--no-input",
            *extra,
            "--key",
            str(loop.centre_key),
            *loop.broker_args(acl.console),
        ]
        loop.start_receiver()
        cleanup.callback(receiver.stop)
        loop.monitor.start()
        cleanup.callback(loop.monitor.stop)
        for agent in agents.values():
            cleanup.callback(agent.kill)
            agent.start(timeout=DEADLINE)
        for device in agents:
            wait_for(
                lambda d=device: any(s.device == d and s.state == "online" for s in loop.devices()),  # type: ignore[misc]
                f"{device} online at the centre",
            )
        yield loop
        if loop.figures:
            print(f"\nloop figures ({engine}): {json.dumps(loop.figures)}")
