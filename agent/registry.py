"""Driver discovery through the ``wardpost.drivers`` entry-point group.

The core never imports a driver by name: any installed distribution can add
drivers by declaring, in its ``pyproject.toml``::

    [project.entry-points."wardpost.drivers"]
    my_gate = "my_package.gate:MyGateDriver"
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from agent.config import Config, ConfigError, DriverSection, parse_section
from agent.driver import Driver

GROUP = "wardpost.drivers"


def available_drivers() -> dict[str, Any]:
    """Entry points by driver type name (not yet imported)."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def driver_class(type_name: str, where: str = "") -> type[Driver]:
    eps = available_drivers()
    if type_name not in eps:
        known = ", ".join(sorted(eps)) or "none installed"
        raise ConfigError(f"unknown driver type {type_name!r} (available: {known})", where)
    try:
        cls = eps[type_name].load()
    except Exception as exc:  # a broken plug-in must not take the agent down
        raise ConfigError(f"driver type {type_name!r} failed to load: {exc}", where) from exc
    if not (isinstance(cls, type) and issubclass(cls, Driver)):
        raise ConfigError(f"entry point {type_name!r} is not a wardpost Driver", where)
    return cls


def driver_config(section: DriverSection) -> tuple[type[Driver], Any]:
    """The driver class and its validated options for one ``[drivers.<name>]`` table."""
    where = f"drivers.{section.name}"
    cls = driver_class(section.type, f"{where}.type")
    return cls, parse_section(cls.config_class, section.options, where)


def validate_drivers(config: Config) -> None:
    """Validate every driver's options, disabled ones too (a typo shows before it is
    switched on); raises a located :class:`ConfigError`."""
    for section in config.drivers:
        try:
            driver_config(section)
        except ConfigError as exc:
            raise exc.located(config.source) from None
