"""Wardpost's bundled device drivers, one package per device kind.

Each is registered in ``pyproject.toml`` under the ``wardpost.drivers`` entry
points; the core finds them there and never imports them by name.
"""
