"""``wardpost console ...``: serve the web console on its own, manage operator accounts.

Plugged into ``wardpost`` through the ``wardpost.cli`` entry point. The console
can also run inside the receiver: ``[console] enabled = true`` in central.toml.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import signal
import sys
import threading
import time
from typing import Any

from agent.mqttloop import disconnect_and_stop
from central.config import ReceiverConfig, load_receiver_config

log = logging.getLogger("wardpost.console")


def start_console(config: ReceiverConfig, commander: Any) -> Any:
    """Start the console for ``config`` (imports the web stack only when asked to)."""
    try:
        from central.console.server import ConsoleServer
    except ImportError as exc:
        raise SystemExit(
            f"the web console needs its extra: pip install 'wardpost[console]' ({exc})"
        ) from None
    return ConsoleServer(config, commander).start()


def cmd_run(args: argparse.Namespace) -> int:
    from central.alarms import MqttCommander
    from central.cli import _setup_logging
    from central.receiver import command_signer, connect, make_client

    config = load_receiver_config(args.central_config)
    _setup_logging(config.log_level)
    mq = config.mqtt
    client = make_client(
        mq, f"{mq.client_id}-console", persistent=False, password=config.password()
    )
    connect(client, mq, persistent=False)
    server = start_console(config, MqttCommander(client, mq.topic_prefix, command_signer(config)))
    print(f"console at {server.url}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait(args.duration)
    server.stop()
    disconnect_and_stop(client)
    return 0


def _password(args: argparse.Namespace) -> str:
    if args.password_file:
        with open(args.password_file, encoding="utf-8") as f:
            return f.read().strip()
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise SystemExit("wardpost console: the passwords differ")
        return first
    return sys.stdin.readline().strip()


def cmd_add_operator(args: argparse.Namespace) -> int:
    from argon2 import PasswordHasher

    from central.console.tables import ConsoleTables
    from central.store import open_store

    password = _password(args)
    if len(password) < 8:
        print("wardpost console: a password has at least 8 characters", file=sys.stderr)
        return 1
    store = open_store(load_receiver_config(args.central_config).store)
    try:
        tables = ConsoleTables(store)
        tables.add_operator(args.name, args.role, PasswordHasher().hash(password))
        tables.audit("(command line)", "saved operator", {"operator": args.name, "role": args.role})
    finally:
        store.close()
    print(f"operator {args.name} ({args.role}) saved")
    return 0


def cmd_operators(args: argparse.Namespace) -> int:
    from central.console.tables import ConsoleTables
    from central.store import open_store

    store = open_store(load_receiver_config(args.central_config).store)
    try:
        for o in ConsoleTables(store).operators():
            since = time.strftime("%Y-%m-%d", time.gmtime(o.created_at))
            print(f"{o.name:24} {o.role:11} since {since}{'' if o.active else '  (disabled)'}")
    finally:
        store.close()
    return 0


def add_cli(subparsers: Any) -> None:
    """Add ``console`` and its sub-commands to the ``wardpost`` parser."""
    from central.cli import with_config
    from central.console.tables import ROLES

    parser = subparsers.add_parser("console", help="the centre's web console for operators")
    sub = parser.add_subparsers(dest="console_command", required=True, metavar="COMMAND")

    p = with_config(sub.add_parser("run", help="serve the console (beside a running receiver)"))
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.set_defaults(func=cmd_run)
    p = with_config(sub.add_parser("add-operator", help="create an operator or set a password"))
    p.add_argument("name")
    p.add_argument("--role", choices=ROLES, default="operator")
    p.add_argument(
        "--password-file", default="", help="read the password from this file (else prompt/stdin)"
    )
    p.set_defaults(func=cmd_add_operator)
    with_config(sub.add_parser("operators", help="list operator accounts")).set_defaults(
        func=cmd_operators
    )
