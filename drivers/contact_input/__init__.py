"""Dry-contact inputs on GPIO (``type = "contact_input"``): alarm relays and beacons."""

from drivers.contact_input.driver import (
    ContactConfig,
    ContactInputConfig,
    ContactInputDriver,
    NoGpioError,
)

__all__ = ["ContactConfig", "ContactInputConfig", "ContactInputDriver", "NoGpioError"]
