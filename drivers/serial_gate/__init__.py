"""Walk-through metal-detector gates on a serial port (``type = "serial_gate"``)."""

from drivers.serial_gate.driver import SerialGateConfig, SerialGateDriver

__all__ = ["SerialGateConfig", "SerialGateDriver"]
