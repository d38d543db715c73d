"""Wardpost: an edge agent that turns hospital security hardware into durable MQTT events."""

__version__ = "0.1.0"
