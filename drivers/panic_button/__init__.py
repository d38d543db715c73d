"""Panic (duress) buttons on GPIO pins, with an LED showing each alarm's journey."""

from drivers.panic_button.driver import Location, PanicButtonConfig, PanicButtonDriver

__all__ = ["Location", "PanicButtonConfig", "PanicButtonDriver"]
