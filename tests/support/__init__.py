"""Shared test support: a private mosquitto broker and a recording driver context."""
