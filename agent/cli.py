"""The ``wardpost`` command line.

``run`` is the daemon; ``check-config`` validates a file; ``status``, ``events``,
``emit``, ``simulate`` and ``reload`` talk to a running agent over its control
socket; ``keys`` makes the centre's signing keys; plug-ins add more sub-commands
through the ``wardpost.cli`` entry-point group (the centre's ``receiver``,
``monitor`` and ``command`` among them).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import (
    DEFAULT_CONFIG_PATH,
    DELIVERY_GUARANTEES,
    Config,
    ConfigError,
    load_config,
)
from agent.control import (
    MAX_PAYLOAD_BYTES,
    ControlError,
    ControlServer,
    check_kind,
    check_payload,
    request,
    strict_json,
)
from agent.registry import (
    available_drivers,
    check_metrics_extra,
    missing_extra,
    validate_drivers,
)

log = logging.getLogger("wardpost")


def _load(path: str) -> Config:
    config = load_config(path)
    validate_drivers(config)
    check_metrics_extra(config)
    return config


def _setup_logging(level: str) -> None:
    from agent.logs import setup_logging

    setup_logging(level)


# ------------------------------------------------------------------ run


def cmd_run(args: argparse.Namespace) -> int:
    from agent.logs import flush_repeats, register_secret, setup_logging
    from agent.runtime import Agent
    from agent.sdnotify import Notifier

    try:
        config = _load(args.config)
    except ConfigError as exc:
        print(f"wardpost: refusing to start: {exc}", file=sys.stderr)
        return 2
    # Warnings are logged once the agent starts; files anyone may change stop it here.
    errors, _ = _permission_problems(config, args.allow_insecure)
    for error in errors:
        print(f"wardpost: refusing to start: {error}", file=sys.stderr)
    if errors:
        return 2
    setup_logging(args.log_level or config.agent.log_level)
    if (password := config.password()) is not None:
        register_secret(password)
    notifier = Notifier.from_env()
    collector = None
    if config.metrics.enabled:  # _load checked that the metrics extra is installed
        from agent.metrics import AgentCollector

        # Late-bound: agent is made below, and scrapes begin only after it started.
        collector = AgentCollector(lambda: agent.status())  # noqa: PLW0108

    def apply_log_level(level: str) -> None:
        setup_logging(args.log_level or level)

    agent = Agent(
        config,
        on_transmitted=collector.latency.observe if collector else None,
        on_event=collector.count_event if collector else None,
        apply_log_level=apply_log_level,
    )
    stop = threading.Event()
    reload_requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())
    agent.start()
    control = ControlServer(config.agent.control_socket_path, agent)
    control.start()
    metrics = None
    if collector is not None:
        from agent.metrics import MetricsServer

        metrics = MetricsServer(collector, *config.metrics.address)
        try:
            metrics.start()
        except OSError as exc:
            log.error("metrics disabled: %s", exc)
            metrics = None
    status = _status_line(agent)
    notifier.ready(status)
    watchdog_every = notifier.watchdog_interval()
    last_watchdog = 0.0
    try:
        while not stop.wait(0.5):
            if reload_requested.is_set():
                reload_requested.clear()
                notifier.reloading()
                agent.reload(args.config)
                notifier.ready(_status_line(agent))
            now = time.monotonic()
            if watchdog_every and now - last_watchdog >= watchdog_every and agent.healthy():
                notifier.watchdog()
                last_watchdog = now
            if (line := _status_line(agent)) != status:
                status = line
                notifier.status(status)
            flush_repeats()
    finally:
        notifier.stopping()
        if metrics is not None:
            metrics.stop()
        control.stop()
        agent.stop()
        flush_repeats()
        notifier.close()
    return 0


def _status_line(agent: Any) -> str:
    status = agent.status()
    drivers = status.heartbeat.drivers
    ok = sum(1 for d in drivers.values() if d.health.state in ("ok", "degraded"))
    link = "up" if status.link.connected else "down"
    return f"link {link}, backlog {status.heartbeat.backlog.count}, drivers {ok}/{len(drivers)} ok"


# ------------------------------------------------------------ config & info


def cmd_check_config(args: argparse.Namespace) -> int:
    path = args.path or args.config
    try:
        config = load_config(path)
        unchecked = validate_drivers(config)
        check_metrics_extra(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    errors, warnings = _permission_problems(config, args.allow_insecure)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if errors:
        return 2
    enabled = [f"{s.name} ({s.type})" for s in config.drivers if s.enabled]
    print(
        f"{path}: ok — site {config.agent.site}, device {config.agent.device}, broker {config.mqtt.host}:{config.mqtt.port}, drivers: {', '.join(enabled) or 'none'}"
    )
    print(f"delivery = {config.mqtt.delivery}: {DELIVERY_GUARANTEES[config.mqtt.delivery]}")
    for note in unchecked:
        print(f"note: {note}")
    return 0


def _permission_problems(config: Config, allow_insecure: bool) -> tuple[list[str], list[str]]:
    """The config's files and folders that other users could read or change: (errors that
    refuse the config, warnings). ``allow_insecure`` turns the errors into warnings."""
    from agent.security import check_permissions

    errors, warnings = [], []
    for problem in check_permissions(config):
        if problem.refused and not allow_insecure:
            errors.append(f"{problem} (--allow-insecure accepts it)")
        else:
            warnings.append(str(problem))
    return errors, warnings


def cmd_drivers(args: argparse.Namespace) -> int:
    for name, ep in sorted(available_drivers().items()):
        try:
            summary = ep.load().summary
        except Exception as exc:
            summary = f"(unavailable: {missing_extra(ep, exc) or exc})"
        print(f"{name:16} {summary}")
    return 0


# ------------------------------------------------------------ control socket


def _socket(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    try:
        return load_config(args.config).agent.control_socket_path
    except ConfigError as exc:
        raise ControlError(f"cannot find the control socket: {exc} (or pass --socket)") from None


def _control(args: argparse.Namespace, body: dict[str, Any]) -> dict[str, Any]:
    reply = request(_socket(args), body)
    if not reply.get("ok", False):
        raise ControlError(str(reply.get("error", "failed")))
    return reply


def cmd_status(args: argparse.Namespace) -> int:
    status = _control(args, {"op": "status"})["status"]
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    link = status["link"]
    backlog = status["backlog"]
    print(
        f"wardpost {status['version']}  site {status['site']}  device {status['device']}  up {status['uptime']:.0f}s  boot {status['boot']}"
    )
    print(
        f"broker   {link['broker']}  {'connected' if link['connected'] else 'DISCONNECTED'}  in flight {link['in_flight']}"
        + (f"  last error: {link['last_error']}" if link["last_error"] else "")
    )
    print(f"delivery {link['delivery']}: {link['guarantee']}")
    ignored = link["counters"].get("receipt_ids_ignored", 0)
    if ignored:
        print(
            f"receipts {ignored} receipt ids ignored: no such event in flight (not sent yet, unknown or forged)"
        )
    age = backlog["oldest_age"]
    print(
        f"backlog  {backlog['count']} events"
        + (f", oldest {age:.1f}s" if age is not None else "")
        + (f", {backlog['in_memory']} only in memory" if backlog["in_memory"] else "")
    )
    if status["storage"]["fault"]:
        print(f"STORAGE  {status['storage']['fault']}")
    tx = status["transmission"]
    if tx.get("count"):
        print(
            f"transmission  mean {tx['mean'] * 1000:.1f} ms  p95 {tx['p95'] * 1000:.1f} ms  max {tx['max'] * 1000:.1f} ms  ({tx['count']} events)"
        )
    for name, health in sorted(status["drivers"].items()):
        print(f"driver   {name:20} {health['type']:14} {health['state']:9} {health['detail']}")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    events = _control(args, {"op": "events", "limit": args.limit, "pending": args.pending})[
        "events"
    ]
    for e in reversed(events):
        if args.json:
            print(e["body"])
            continue
        state = "sent   " if e["published"] else "PENDING"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["accepted"]))
        print(f"{when} {state} {e['priority']:8} #{e['seq']:<6} {e['kind']:24} {e['id']}")
    return 0


def cmd_emit(args: argparse.Namespace) -> int:
    kind = check_kind(args.kind)
    if args.payload_file:
        text = _read_payload_file(args.payload_file)
        where = "stdin" if args.payload_file == "-" else args.payload_file
    else:
        text, where = args.payload, "--payload"
    if len(text) > MAX_PAYLOAD_BYTES * 2:  # whitespace aside, it cannot fit
        raise ControlError(
            f"{where}: payload too large (at most {MAX_PAYLOAD_BYTES} bytes as JSON)"
        )
    payload = check_payload(strict_json(text, where))
    reply = _control(
        args,
        {
            "op": "emit",
            "kind": kind,
            "payload": payload,
            "priority": args.priority,
            "test": args.test,
        },
    )
    return _report_fate(reply)


#: ``wardpost emit``'s exit code when the event is held in memory only.
EXIT_HELD_IN_MEMORY = 3


def _report_fate(reply: dict[str, Any]) -> int:
    """Say truthfully where the event is kept: on disk, or only in memory."""
    if reply["fate"] == "durable":
        print(f"accepted {reply['id']} (seq {reply['seq']}), on disk")
        return 0
    why = reply.get("storage_fault") or "its free space is kept for more urgent events"
    print(
        f"held in memory only {reply['id']} (seq {reply['seq']}): storage cannot take it "
        f"({why}); it is delivered while the agent runs, lost if the agent stops first"
    )
    return EXIT_HELD_IN_MEMORY


def _read_payload_file(name: str) -> bytes:
    """The payload file's bytes (``-`` is stdin), reading no more than the limit allows."""
    limit = MAX_PAYLOAD_BYTES * 2 + 1
    try:
        if name == "-":
            return sys.stdin.buffer.read(limit)
        with open(name, "rb") as f:
            return f.read(limit)
    except OSError as exc:
        raise ControlError(f"cannot read --payload-file {name}: {exc.strerror}") from None


def cmd_simulate(args: argparse.Namespace) -> int:
    try:
        extra = json.loads(args.args)
    except json.JSONDecodeError as exc:
        raise ControlError(f"--args is not JSON: {exc}") from None
    reply = _control(
        args, {"op": "simulate", "driver": args.driver, "action": args.action, "args": extra}
    )
    print(json.dumps(reply["result"]))
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    reply = _control(args, {"op": "reload"})
    print(
        f"reloaded: started {reply['started']}, stopped {reply['stopped']}"
        + (f"; applied {', '.join(reply['applied'])}" if reply.get("applied") else "")
        + (
            f"; restart needed for {', '.join(reply['restart_needed'])}"
            if reply["restart_needed"]
            else ""
        )
    )
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from agent.security import (
        generate_keypair,
        key_id,
        load_private_key,
        load_public_key,
    )

    if args.keys_command == "generate":
        private, public = Path(args.private), Path(args.public)
        try:
            kid = generate_keypair(private, public)
        except FileExistsError:
            raise ControlError(f"{private} exists; refusing to overwrite a key") from None
        except OSError as exc:
            raise ControlError(f"cannot write the key pair: {exc}") from None
        print(
            f"wrote {private} (keep it secret, mode 0600) and {public} "
            f"(list it in [commands] public_keys on every device); key id {kid}"
        )
        return 0
    path = args.path
    try:
        key = load_public_key(path)
    except ConfigError:
        key = load_private_key(path).public_key()
        print(f"{path}: Ed25519 PRIVATE key, key id {key_id(key)}")
        return 0
    print(f"{path}: Ed25519 public key, key id {key_id(key)}")
    return 0


# ------------------------------------------------------------------ parser


def _allow_insecure_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-insecure",
        action="store_true",
        help="accept a config or trusted key that every user may change (a warning, not an error)",
    )


def _common_options(default: Any) -> argparse.ArgumentParser:
    """--config/--socket, accepted before or after the sub-command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        default=default if default is argparse.SUPPRESS else str(DEFAULT_CONFIG_PATH),
        help=f"config file (default {DEFAULT_CONFIG_PATH})",
    )
    common.add_argument(
        "--socket",
        default=default if default is argparse.SUPPRESS else "",
        help="control socket (default: from the config)",
    )
    return common


class _SubParsers:
    """Adds the shared options to every sub-command, plug-ins' included."""

    def __init__(self, action: Any):
        self._action = action
        self._common = _common_options(argparse.SUPPRESS)

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs["parents"] = [*kwargs.get("parents", []), self._common]
        parser: argparse.ArgumentParser = self._action.add_parser(name, **kwargs)
        return parser


CORE_COMMANDS = (
    "run",
    "check-config",
    "drivers",
    "status",
    "events",
    "emit",
    "simulate",
    "reload",
    "keys",
)


def build_parser(plugins: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wardpost",
        description="Wardpost edge agent for hospital security",
        parents=[_common_options(None)],
    )
    parser.add_argument("--version", action="version", version=f"wardpost {__version__}")
    sub: Any = _SubParsers(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))

    p = sub.add_parser("run", help="run the agent (the systemd service)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    _allow_insecure_argument(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a config file and exit non-zero if it is bad")
    p.add_argument("path", nargs="?")
    _allow_insecure_argument(p)
    p.set_defaults(func=cmd_check_config)

    sub.add_parser("drivers", help="list installed driver types").set_defaults(func=cmd_drivers)

    p = sub.add_parser("status", help="backlog, drivers and broker link of the running agent")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("events", help="recent and buffered events of the running agent")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument(
        "--pending", action="store_true", help="only events not yet confirmed by the centre"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser(
        "emit", help="inject a test event into the running agent (exit 3: held in memory only)"
    )
    p.add_argument("kind")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--payload", default="{}", help="JSON object")
    source.add_argument(
        "--payload-file", metavar="FILE", help="read the JSON object from FILE (- for stdin)"
    )
    p.add_argument("--priority", default="normal", choices=["critical", "high", "normal", "low"])
    p.add_argument("--test", action="store_true", help="mark the event as a test")
    p.set_defaults(func=cmd_emit)

    p = sub.add_parser(
        "simulate", help="make a driver act as its hardware would (press a simulated button)"
    )
    p.add_argument("driver")
    p.add_argument("action")
    p.add_argument("--args", default="{}", help="JSON object")
    p.set_defaults(func=cmd_simulate)

    sub.add_parser("reload", help="re-read the config (like systemctl reload)").set_defaults(
        func=cmd_reload
    )

    p = sub.add_parser("keys", help="make and inspect the centre's command-signing keys")
    keys = p.add_subparsers(dest="keys_command", required=True)
    g = keys.add_parser("generate", help="write a new Ed25519 key pair")
    g.add_argument("--private", default="centre.key")
    g.add_argument("--public", default="centre.pub")
    k = keys.add_parser("show", help="print a key's type and id")
    k.add_argument("path")
    p.set_defaults(func=cmd_keys)

    if plugins:
        for ep in entry_points(group="wardpost.cli"):
            try:
                ep.load()(sub)
            except Exception as exc:  # a broken plug-in must not break the core commands
                why = missing_extra(ep, exc) or str(exc)
                sub.add_parser(ep.name, help=f"(unavailable: {why})").set_defaults(
                    func=_unavailable(ep.name, why)
                )
    return parser


def _unavailable(name: str, why: str) -> Callable[[argparse.Namespace], int]:
    """The stand-in for a plug-in command that could not load: says why when it is used."""

    def explain(args: argparse.Namespace) -> int:
        raise ControlError(f"{name} is unavailable: {why}")

    return explain


def _command_word(argv: list[str]) -> str | None:
    """The sub-command named in ``argv``: the first word that is not an option or its value."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in ("--config", "--socket"):
            skip = True
        elif not word.startswith("-"):
            return word
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Plug-in sub-commands (and what they import, OpenCV for one) load only when asked for,
    # so the daemon and the core commands stay small and start fast.
    args = build_parser(plugins=_command_word(argv) not in CORE_COMMANDS).parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except (ControlError, ConfigError) as exc:
        print(f"wardpost {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
