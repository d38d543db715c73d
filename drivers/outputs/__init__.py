"""Local outputs (LEDs, buzzers, sirens, strobe relays) switched by rules on events."""

from drivers.outputs.driver import OutputsConfig, OutputsDriver, OutputSpec, Rule

__all__ = ["OutputSpec", "OutputsConfig", "OutputsDriver", "Rule"]
