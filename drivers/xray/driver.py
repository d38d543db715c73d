"""The ``xray`` driver: operator alarms, automatic threat detections and tamper from a scanner."""

from __future__ import annotations

from dataclasses import dataclass

from agent.homeassistant import Entity
from drivers.serial_common import SerialDialectDriver, SerialDriverConfig


@dataclass(frozen=True)
class XrayConfig(SerialDriverConfig):
    """Options of ``[drivers.<name>] type = "xray"``: the shared serial options,
    defaulting to the ``xray-alert`` dialect."""

    dialect: str = "xray-alert"


class XrayDriver(SerialDialectDriver):
    """Emits ``xray.alert`` (high: ``class`` operator or automatic, threat, bag, operator)
    and ``xray.tamper`` (high) from a scanner workstation's serial alert line."""

    config_class = XrayConfig
    summary = "X-ray baggage scanner alert line on a serial port (dialect file)"

    home_assistant = (
        Entity(
            "event",
            "alert",
            "alert",
            "xray.alert",
            "'alert'",
            attributes=("class", "threat", "bag", "operator"),
            options={"event_types": ["alert"], "icon": "mdi:bag-suitcase-outline"},
        ),
    )
