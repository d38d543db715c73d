"""A driver that emits configurable events: for demos, benchmarks and tests."""

from drivers.simulated.driver import SimulatedConfig, SimulatedDriver

__all__ = ["SimulatedConfig", "SimulatedDriver"]
