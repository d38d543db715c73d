"""The ``serial_gate`` driver: alarms, tampers and transit counts from a metal-detector gate."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.homeassistant import Entity
from drivers.serial_common import SerialDialectDriver, SerialDriverConfig


@dataclass(frozen=True)
class SerialGateConfig(SerialDriverConfig):
    """Options of ``[drivers.<name>] type = "serial_gate"``: the shared serial options,
    defaulting to the ``text-gate`` dialect and transit counts summed per minute."""

    dialect: str = "text-gate"
    aggregate: list[str] = field(default_factory=lambda: ["gate.transit"])


class SerialGateDriver(SerialDialectDriver):
    """Emits ``gate.alarm`` (high: zones, intensity, class), ``gate.tamper`` (high) and
    ``gate.transit`` (low, summed over ``aggregate_interval``) from a gate's serial port."""

    config_class = SerialGateConfig
    summary = "walk-through metal-detector gate on a serial port (dialect file)"

    # A gate alarm is a moment: the sensor shows it for half a minute.
    home_assistant = (
        Entity(
            "binary_sensor",
            "alarm",
            "metal detected",
            "gate.alarm",
            "'ON'",
            options={"device_class": "safety", "off_delay": 30},
        ),
    )
