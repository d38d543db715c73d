"""X-ray baggage scanner alerts on a serial port (``type = "xray"``)."""

from drivers.xray.driver import XrayConfig, XrayDriver

__all__ = ["XrayConfig", "XrayDriver"]
