"""Shared serial plumbing: a self-healing port, the data-driven dialect engine,
and the driver base the gate, X-ray and patrol drivers build on."""

from drivers.serial_common.dialect import Dialect, builtin_dialects, load_dialect
from drivers.serial_common.driver import DEFAULT_PRIORITIES, SerialDialectDriver, SerialDriverConfig
from drivers.serial_common.engine import DialectEngine, Message, Reply
from drivers.serial_common.framing import Frame, Unparsed
from drivers.serial_common.transport import LinkChange, PortSettings, SerialLink

__all__ = [
    "DEFAULT_PRIORITIES",
    "Dialect",
    "DialectEngine",
    "Frame",
    "LinkChange",
    "Message",
    "PortSettings",
    "Reply",
    "SerialDialectDriver",
    "SerialDriverConfig",
    "SerialLink",
    "Unparsed",
    "builtin_dialects",
    "load_dialect",
]
