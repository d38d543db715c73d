"""Driver discovery through the ``wardpost.drivers`` entry-point group.

The core never imports a driver by name: any installed distribution can add
drivers by declaring, in its ``pyproject.toml``::

    [project.entry-points."wardpost.drivers"]
    my_gate = "my_package.gate:MyGateDriver"
    my_camera = "my_package.camera:MyCameraDriver [camera]"

A driver that needs optional dependencies names their extra in brackets: when
they are missing, the error says which extra to install instead of a bare
``No module named ...``, and a disabled driver of that type is left unchecked
rather than failing the whole config. ``[metrics] enabled = true`` without the
``metrics`` extra gets the same kind of error (:func:`check_metrics_extra`).
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any

from agent.config import Config, ConfigError, DriverSection, parse_section
from agent.driver import Driver

GROUP = "wardpost.drivers"
#: This project's own distribution: its extras are installed with scripts/install.
DISTRIBUTION = "wardpost"


class MissingExtraError(ConfigError):
    """A driver (or ``[metrics]``) cannot load because its optional dependencies are not
    installed."""


def missing_extra(ep: EntryPoint, exc: BaseException) -> str | None:
    """What to install when ``ep`` failed to load with ``exc`` for want of its extra's
    dependencies; None if ``exc`` is something else (a bug in the plug-in, say)."""
    if not (isinstance(exc, ModuleNotFoundError) and exc.name and ep.extras):
        return None
    if exc.name.partition(".")[0] == ep.module.partition(".")[0]:
        return None  # one of the plug-in's own modules is missing: not an extra
    dist = ep.dist.name if ep.dist is not None else DISTRIBUTION
    return _needs_extra(",".join(ep.extras), exc.name, dist)


def _needs_extra(extras: str, module: str, dist: str = DISTRIBUTION) -> str:
    if dist == DISTRIBUTION:
        how = (
            f"sudo scripts/install --extras {extras} (in a checkout: pip install -e '.[{extras}]')"
        )
    else:
        how = f"pip install '{dist}[{extras}]'"
    return (
        f"needs the optional {extras!r} dependencies, which are not installed "
        f"(No module named {module!r}): install them with {how}"
    )


def check_metrics_extra(config: Config) -> None:
    """``[metrics] enabled = true`` needs the ``metrics`` extra (prometheus-client): raises
    a located :class:`MissingExtraError` naming it when it is not installed."""
    if not config.metrics.enabled:
        return
    try:
        import agent.metrics  # noqa: F401
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "prometheus_client":
            raise
        raise MissingExtraError(
            f"the Prometheus endpoint {_needs_extra('metrics', exc.name or '')}",
            "metrics.enabled",
        ).located(config.source) from None


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
        if (hint := missing_extra(eps[type_name], exc)) is not None:
            raise MissingExtraError(f"driver type {type_name!r} {hint}", where) from exc
        raise ConfigError(f"driver type {type_name!r} failed to load: {exc}", where) from exc
    if not (isinstance(cls, type) and issubclass(cls, Driver)):
        raise ConfigError(f"entry point {type_name!r} is not a wardpost Driver", where)
    return cls


def driver_config(section: DriverSection) -> tuple[type[Driver], Any]:
    """The driver class and its validated options for one ``[drivers.<name>]`` table."""
    where = f"drivers.{section.name}"
    cls = driver_class(section.type, f"{where}.type")
    return cls, parse_section(cls.config_class, section.options, where)


def validate_drivers(config: Config) -> list[str]:
    """Validate every driver's options, disabled ones too (a typo shows before it is
    switched on); raises a located :class:`ConfigError`.

    A disabled driver whose optional dependencies are not installed cannot be checked
    and is no error (the example config ships the camera that way): the returned notes
    say which ones were skipped and what to install."""
    unchecked = []
    for section in config.drivers:
        try:
            driver_config(section)
        except MissingExtraError as exc:
            if section.enabled:
                raise exc.located(config.source) from None
            unchecked.append(
                f"drivers.{section.name} is disabled and was not checked: {exc.message}"
            )
        except ConfigError as exc:
            raise exc.located(config.source) from None
    return unchecked
