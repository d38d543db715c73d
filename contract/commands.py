"""The command vocabulary: one JSON Schema per command's ``args`` in ``schemas/command_args/``.

Both sides read the same files:

* a driver takes its argument names with :func:`arg` at import time, so a name the
  contract does not define fails when the driver loads, not in the field;
* the centre checks what it is about to send with :func:`validate_args`
  (``jsonschema``), so a misspelt argument is an error at the centre instead of a
  command no device recognises.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ARGS_DIR = Path(__file__).resolve().parent / "schemas" / "command_args"


class ContractError(ValueError):
    """Arguments (or a name) the contract does not allow; the text says which and why."""


@functools.cache
def command_names() -> tuple[str, ...]:
    """Every command the contract defines, sorted."""
    return tuple(sorted(p.name.removesuffix(".json") for p in ARGS_DIR.glob("*.json")))


@functools.cache
def args_schema(command: str) -> dict[str, Any]:
    """The JSON Schema of ``command``'s ``args``."""
    if command not in command_names():
        raise ContractError(
            f"command {command!r} is not in the contract (known: {', '.join(command_names())})"
        )
    schema: dict[str, Any] = json.loads((ARGS_DIR / f"{command}.json").read_text("utf-8"))
    return schema


def arg(name: str, *commands: str) -> str:
    """``name`` if the contract defines it as an argument of every one of ``commands``,
    else :class:`ContractError`."""
    for command in commands:
        if name not in args_schema(command).get("properties", {}):
            raise ContractError(f"command {command!r} has no argument {name!r} in the contract")
    return name


def validate_args(command: str, args: Mapping[str, Any]) -> None:
    """Raise :class:`ContractError` naming every argument of ``args`` the contract refuses."""
    from jsonschema import Draft7Validator

    errors = sorted(
        Draft7Validator(args_schema(command)).iter_errors(dict(args)), key=lambda e: str(e.path)
    )
    if errors:
        problems = "; ".join(
            f"{'.'.join(map(str, e.absolute_path)) or 'args'}: {e.message}" for e in errors
        )
        raise ContractError(f"{command} args do not match the contract: {problems}")
