"""Write simple TOML (tables, scalars, lists, inline tables) for test configs."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def dumps(doc: Mapping[str, Any]) -> str:
    lines: list[str] = []

    def table(prefix: str, data: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in data.items() if not (isinstance(v, Mapping) and _is_table(v))}
        tables = {k: v for k, v in data.items() if isinstance(v, Mapping) and _is_table(v)}
        if prefix and (scalars or not tables):
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{json.dumps(str(k))} = {_value(v)}")
        for k, v in tables.items():
            table(f"{prefix}.{_key(k)}" if prefix else _key(k), v)

    table("", doc)
    return "\n".join(lines) + "\n"


def _key(key: str) -> str:
    """A table name part: bare when it can be, quoted otherwise (``dc09.map."gate.alarm"``)."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _is_table(v: Mapping[str, Any]) -> bool:
    # Sub-tables are written as [a.b] sections; a mapping marked inline stays inline.
    return not getattr(v, "inline", False)


class Inline(dict[str, Any]):
    """A mapping written as an inline table (e.g. a driver's `payload = {...}`)."""

    inline = True
