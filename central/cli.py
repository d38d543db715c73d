"""The centre's verbs: ``wardpost receiver ...`` (run the receiver, its report, alarms,
DC-09), ``wardpost monitor`` (the operator console) and ``wardpost command``.

Plugged into the ``wardpost`` command through the ``wardpost.cli`` entry points
(:func:`add_cli`, :func:`add_monitor_cli`, :func:`add_command_cli`); the receiver's
verbs are also runnable as ``python -m central ...``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime
from typing import Any

from agent.config import ConfigError
from agent.control import ControlError
from central.config import DEFAULT_CENTRAL_CONFIG, ReceiverConfig, load_receiver_config

log = logging.getLogger("wardpost.central")


def _config(args: argparse.Namespace) -> ReceiverConfig:
    return load_receiver_config(args.central_config)


def _setup_logging(level: str) -> None:
    try:
        from agent.logs import setup_logging

        setup_logging(level)
    except ImportError:  # pragma: no cover - older core
        logging.basicConfig(
            level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )


def cmd_run(args: argparse.Namespace) -> int:
    from central.receiver import Receiver
    from central.store import StoreBusy

    config = _config(args)
    if args.instance:
        # Several receivers from one config file (systemd: wardpost-receiver@<n>): the broker
        # and the supervision lease tell them apart by their client ids.
        mqtt = replace(config.mqtt, client_id=f"{config.mqtt.client_id}-{args.instance}")
        config = replace(config, mqtt=mqtt)
    _setup_logging(config.log_level)
    try:
        receiver = Receiver(config).start()
    except StoreBusy as exc:
        print(f"wardpost receiver: {exc}", file=sys.stderr)
        return 2
    console = None
    if config.console.enabled:
        from central.console.cli import start_console

        console = start_console(config, receiver.commander())
        receiver.on_committed(console.console.live.wake)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    log.info("receiver running (store %s)", receiver.store.engine)
    done.wait(args.duration)
    if console is not None:
        console.stop()
    receiver.stop()
    log.info("receiver stopped: %s", receiver.stats)
    return 0


def _instance(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", text):
        raise argparse.ArgumentTypeError("1-32 letters, digits, '_' or '-'")
    return text


def cmd_check(args: argparse.Namespace) -> int:
    config = _config(args)
    print(
        f"{config.source}: OK (store {config.store.url.split('://')[0]}, dc09 "
        f"{'on' if config.dc09.enabled else 'off'}, {len(config.dc09.map)} Contact ID mappings)"
    )
    return 0


def _store(args: argparse.Namespace) -> Any:
    from central.store import open_store

    return open_store(_config(args).store)


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def cmd_report(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from central.stats import gather

    store = _store(args)
    try:
        now = time.time()
        days, windows = gather(store, now, args.days, args.windows)
        devices = store.devices()
        quarantine = store.quarantine_summary()
    finally:
        store.close()
    if args.json:
        print(
            json.dumps(
                {
                    "transmission": [asdict(d) for d in days],
                    "availability": [{**asdict(a), "ratio": a.ratio} for a in windows],
                    "devices": [
                        {
                            "site": d.site,
                            "device": d.device,
                            "state": d.state,
                            "lost": d.lost,
                            "backlog": d.backlog,
                            "last_heartbeat": d.last_heartbeat,
                        }
                        for d in devices
                    ],
                    "quarantine": [asdict(q) for q in quarantine],
                },
                indent=2,
            )
        )
        return 0
    console = Console()
    table = Table(title=f"Transmission time, device accepted → stored (last {args.days} days, UTC)")
    for column in ("site", "device", "day", "events", "mean s", "p95 s", "max s"):
        table.add_column(column, justify="right" if column.endswith(("s", "events")) else "left")
    for d in days:
        table.add_row(
            d.site, d.device, d.day, str(d.count), f"{d.mean:.3f}", f"{d.p95:.3f}", f"{d.max:.3f}"
        )
    console.print(table)
    table = Table(title="Path availability per 7-day window (newest first)")
    for column in ("site", "device", "window from", "window to", "known h", "availability"):
        table.add_column(column)
    for a in windows:
        ratio = "-" if a.ratio is None else f"{100 * a.ratio:.3f} %"
        table.add_row(
            a.site, a.device, _when(a.start), _when(a.end), f"{a.known / 3600:.1f}", ratio
        )
    console.print(table)
    table = Table(title="Devices")
    for column in (
        "site",
        "device",
        "status",
        "supervision",
        "backlog",
        "last heartbeat",
        "interval s",
    ):
        table.add_column(column)
    for d in devices:
        table.add_row(
            d.site,
            d.device,
            d.state,
            "LOST" if d.lost else "ok",
            str(d.backlog if d.backlog is not None else "-"),
            _when(d.last_heartbeat),
            f"{d.heartbeat_interval:g}" if d.heartbeat_interval else "-",
        )
    console.print(table)
    if quarantine:
        table = Table(title="Quarantined messages (kept aside, acknowledged, not stored as events)")
        for column in ("site", "device", "messages", "last", "last reason"):
            table.add_column(column)
        for q in quarantine:
            table.add_row(
                q.site or "-", q.device or "-", str(q.count), _when(q.last_at), q.last_reason
            )
        console.print(table)
    return 0


def cmd_alarms(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        alarms = store.alarms(state=args.state)
    finally:
        store.close()
    for a in alarms:
        who = f" by {a.acknowledged_by}" if a.acknowledged_by else ""
        print(
            f"{a.id}  {_when(a.raised_at)}  {a.priority:8} {a.state:12}{who:14}"
            f" {a.site}/{a.device} {a.kind}"
            f"{' [test]' if a.test else ''}"
            f"{f'  ({a.at_device})' if a.at_device else ''}"
        )
    return 0


#: Exit status of ``receiver ack/resolve`` when the device has not confirmed within ``--wait``.
NOT_CONFIRMED_YET = 3


def cmd_transition(args: argparse.Namespace) -> int:
    """Move the alarm on, then wait for the device to confirm (the receiver stores its answer)."""
    from agent.mqttloop import disconnect_and_stop
    from central.alarms import AlarmDesk, AlarmError, MqttCommander
    from central.receiver import command_signer, connect, make_client
    from central.store import open_store
    from contract.commands import ContractError

    config = _config(args)
    store = open_store(config.store)
    mq = config.mqtt
    client = make_client(
        mq, f"{mq.client_id}-desk-{int(time.time())}", persistent=False, password=config.password()
    )
    connect(client, mq, persistent=False)
    verb = f"wardpost receiver {args.command_name}"
    try:
        desk = AlarmDesk(store, MqttCommander(client, mq.topic_prefix, command_signer(config)))
        move = desk.acknowledge if args.command_name == "ack" else desk.resolve
        alarm = move(args.alarm, args.by, args.note)
        print(f"{alarm.id}: {alarm.state} by {args.by}", flush=True)
        deadline = time.monotonic() + args.wait
        while alarm.device_state == "sent" and time.monotonic() < deadline:
            time.sleep(0.1)
            alarm = store.alarm(alarm.id) or alarm
        if alarm.device_state is None:
            return 0  # raised by the centre itself: no device to tell
        print(f"{alarm.id}: {alarm.at_device}")
        if alarm.device_state == "confirmed":
            return 0
        if alarm.device_state == "sent":
            print(
                f"{verb}: not confirmed within {args.wait:g} s; the receiver keeps sending it"
                f" for {config.commands.confirm_within:g} s (is `wardpost receiver run` running?)",
                file=sys.stderr,
            )
            return NOT_CONFIRMED_YET
        return 1
    except (AlarmError, ContractError) as exc:
        print(f"{verb}: {exc}", file=sys.stderr)
        return 1
    finally:
        time.sleep(0.2)  # let the command leave before disconnecting
        disconnect_and_stop(client)
        store.close()


def cmd_dc09_listen(args: argparse.Namespace) -> int:
    from central.dc09 import parse_key
    from central.dc09_receiver import Dc09Receiver, Received

    accounts: dict[str, bytes | None] = {}
    for spec in args.account:
        account, _, key_file = spec.partition(":")
        if key_file:
            with open(key_file, encoding="ascii") as f:
                accounts[account] = parse_key(f.read())
        else:
            accounts[account] = None

    def show(received: Received) -> None:
        frame = received.frame
        what = (
            f"{frame.id} seq {frame.seq:04d} #{frame.account} [{frame.data}]"
            if frame
            else received.raw.decode("ascii", "replace").strip()
        )
        print(
            f"{_when(received.at)} {received.transport} {received.reply}: {what} {received.error}",
            flush=True,
        )

    receiver = Dc09Receiver(accounts, args.host, args.port, on_frame=show).start()
    print(
        f"listening on {receiver.host}:{receiver.port} (TCP and UDP),"
        f" accounts {', '.join(accounts)}",
        flush=True,
    )
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait(args.duration)
    receiver.stop()
    return 0


def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--config`` (the centre's central.toml) on a sub-command."""
    p.add_argument(
        "--config",
        dest="central_config",
        default=str(DEFAULT_CENTRAL_CONFIG),
        help=f"centre config (default {DEFAULT_CENTRAL_CONFIG})",
    )
    return p


def add_cli(subparsers: Any) -> None:
    """Add ``receiver`` and its sub-commands to the ``wardpost`` parser."""
    parser = subparsers.add_parser(
        "receiver", help="the centre: store events from devices, receipts, supervision"
    )
    sub = parser.add_subparsers(dest="receiver_command", required=True, metavar="COMMAND")

    p = with_config(sub.add_parser("run", help="run the receiver service"))
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.add_argument(
        "--instance",
        type=_instance,
        default=None,
        help="this receiver's name among several sharing one config; appended to the client id",
    )
    p.set_defaults(func=cmd_run)
    with_config(sub.add_parser("check-config", help="validate the receiver config")).set_defaults(
        func=cmd_check
    )
    p = with_config(
        sub.add_parser("report", help="transmission times and path availability (EN 50136 figures)")
    )
    p.add_argument("--days", type=int, default=7, help="transmission days to show")
    p.add_argument("--windows", type=int, default=4, help="7-day availability windows to show")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_report)
    p = with_config(sub.add_parser("alarms", help="list alarms at the centre"))
    p.add_argument("--state", choices=("new", "acknowledged", "resolved"), default=None)
    p.set_defaults(func=cmd_alarms)
    for name, text in (
        ("ack", "acknowledge an alarm (tells the device)"),
        ("resolve", "resolve an alarm"),
    ):
        p = with_config(sub.add_parser(name, help=text))
        p.add_argument("alarm", help="alarm id (the id of the event that raised it)")
        p.add_argument("--by", required=True, help="operator name")
        p.add_argument("--note", default=None)
        p.add_argument(
            "--wait",
            type=float,
            default=15.0,
            help="seconds to wait for the device's confirmation (exit 0 confirmed,"
            f" 1 refused or failed, {NOT_CONFIRMED_YET} not confirmed yet)",
        )
        p.set_defaults(func=cmd_transition, command_name=name)
    p = sub.add_parser(
        "dc09-listen", help="a minimal SIA DC-09 receiver that validates and ACKs (for tests)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=12000)
    p.add_argument(
        "--account", action="append", required=True, help="ACCOUNT or ACCOUNT:KEYFILE (hex AES key)"
    )
    p.add_argument("--duration", type=float, default=None)
    p.set_defaults(func=cmd_dc09_listen)


# ------------------------------------------------------- the console and single commands


def _broker_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--username", default="")
    p.add_argument("--password-file", default="")
    p.add_argument(
        "--ca-file", default="", help="CA certificate to verify the broker (enables TLS)"
    )
    p.add_argument("--cert-file", default="", help="this console's certificate (TLS)")
    p.add_argument("--key-file", default="", help="this console's private key (TLS)")
    p.add_argument("--prefix", default="wardpost", help="topic prefix")
    p.add_argument("--key", default="", help="the centre's Ed25519 private key: signs the commands")


def _broker_options(args: argparse.Namespace) -> Any:
    from central.monitor import BrokerOptions

    return BrokerOptions(
        host=args.host,
        port=args.port,
        username=args.username,
        password_file=args.password_file,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
        prefix=args.prefix,
    )


def _signer(args: argparse.Namespace) -> Any:
    from agent.security import Signer

    return Signer.from_file(args.key) if args.key else None


def cmd_monitor(args: argparse.Namespace) -> int:
    from central.monitor import Monitor, TerminalView
    from central.store import open_store

    try:
        view = TerminalView(as_json=args.json)  # first: a missing extra is named before the config
    except ImportError as exc:
        raise ControlError(str(exc)) from None
    store = open_store(load_receiver_config(args.receiver_config).store)
    monitor = Monitor(
        _broker_options(args),
        store,
        args.site,
        signer=_signer(args),
        operator=args.operator,
        view=view,
    )
    lines = None if args.no_input else sys.stdin
    try:
        return monitor.run(duration=args.duration, table_every=args.table_every, lines=lines)
    except (OSError, ConnectionError) as exc:
        raise ControlError(f"cannot watch {args.host}:{args.port}: {exc}") from None
    finally:
        store.close()


def cmd_command(args: argparse.Namespace) -> int:
    from central.monitor import send_command
    from contract.commands import ContractError

    try:
        cmd_args = json.loads(args.args)
    except json.JSONDecodeError as exc:
        raise ControlError(f"--args is not JSON: {exc}") from None
    if not isinstance(cmd_args, dict):
        raise ControlError("--args must be a JSON object")
    site, _, device = args.device.partition("/")
    if not site or not device:
        raise ControlError("device must be given as SITE/DEVICE")
    try:
        result = send_command(
            _broker_options(args),
            site,
            device,
            args.name,
            args=cmd_args,
            target=args.target,
            timeout=args.timeout,
            signer=_signer(args),
        )
    except ContractError as exc:
        raise ControlError(str(exc)) from None
    except OSError as exc:
        raise ControlError(f"cannot reach {args.host}:{args.port}: {exc}") from None
    print(json.dumps(result, indent=2))
    return 0 if result.get("ok") else 1


def add_monitor_cli(subparsers: Any) -> None:
    """Add ``monitor``, the operator console, to the ``wardpost`` parser."""
    p = subparsers.add_parser(
        "monitor", help="the operator console: alarms from the receiver's store, live traffic"
    )
    _broker_arguments(p)
    p.add_argument(
        "--receiver-config",
        default=str(DEFAULT_CENTRAL_CONFIG),
        help=f"the receiver's config, for its store of alarms (default {DEFAULT_CENTRAL_CONFIG})",
    )
    p.add_argument("--site", default="+", help="site to watch (default all)")
    p.add_argument(
        "--operator",
        default=getpass.getuser(),
        help="who acknowledges and resolves (default: login name)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line, for scripts")
    p.add_argument("--no-input", action="store_true", help="do not read commands from stdin")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.add_argument(
        "--table-every",
        type=float,
        default=30.0,
        help="print the device and alarm tables this often",
    )
    p.set_defaults(func=cmd_monitor)


def add_command_cli(subparsers: Any) -> None:
    """Add ``command``: send one command (from the contract's vocabulary) and print its result."""
    p = subparsers.add_parser("command", help="send a command to a device and print its result")
    _broker_arguments(p)
    p.add_argument("device", help="SITE/DEVICE")
    p.add_argument("name", help="ack, resolve, silence, test, reload, ping, ... (contract/)")
    p.add_argument("--args", default="{}", help="JSON object")
    p.add_argument("--target", default=None, help="driver instance name")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_command)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m central <sub-command> ...`` (same as ``wardpost receiver ...``)."""
    parser = argparse.ArgumentParser(prog="python -m central")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["receiver", *(sys.argv[1:] if argv is None else argv)])
    try:
        code: int = args.func(args)
        return code
    except ConfigError as exc:
        print(f"wardpost receiver: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
