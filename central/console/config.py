"""``[console]`` in ``central.toml``: the operators' web console."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from agent.config import check


def _file_or_empty(value: str) -> bool:
    return value == "" or os.path.exists(value)


@dataclass(frozen=True)
class ConsoleConfig:
    """``[console]``: where the web console listens and how it treats alarms."""

    enabled: bool = field(
        default=False, metadata=check(help="serve the console from `wardpost receiver run`")
    )
    host: str = "127.0.0.1"
    port: int = field(default=8480, metadata=check(minimum=0, maximum=65535, help="0: any free"))
    tls_cert_file: str = field(
        default="",
        metadata=check(_file_or_empty, "file does not exist", help="PEM; with tls_key_file: HTTPS"),
    )
    tls_key_file: str = field(default="", metadata=check(_file_or_empty, "file does not exist"))
    session_idle: float = field(
        default=900.0,
        metadata=check(minimum=1.0, maximum=86400.0, help="seconds without a request: log out"),
    )
    session_max: float = field(
        default=12 * 3600.0,
        metadata=check(minimum=1.0, maximum=7 * 86400.0, help="seconds a login lasts at most"),
    )
    escalate_after: float = field(
        default=60.0,
        metadata=check(minimum=1.0, maximum=86400.0, help="seconds an alarm may stay new"),
    )
    escalation_forward: bool = field(
        default=False,
        metadata=check(
            help='forward alarm.escalated over DC-09 (map "alarm.escalated" in [dc09.map])'
        ),
    )
    ack_target: float = field(
        default=30.0, metadata=check(minimum=1.0, maximum=86400.0, help="seconds, for reports")
    )
    resolve_target: float = field(
        default=900.0, metadata=check(minimum=1.0, maximum=7 * 86400.0, help="seconds, for reports")
    )
    action_plans: dict[str, str] = field(
        default_factory=dict,
        metadata=check(help='"<site>/<kind>", "<kind>", "<site>/*" or "*" -> what to do'),
    )

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file and self.tls_key_file)

    def action_plan(self, site: str, kind: str) -> str:
        """The most specific plan for this site and kind ("" if none)."""
        for key in (f"{site}/{kind}", kind, f"{site}/*", "*"):
            if key in self.action_plans:
                return self.action_plans[key]
        return ""
