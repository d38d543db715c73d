"""The wire contract as package data: JSON Schemas both the edge and the centre load.

``agent/`` and ``drivers/`` never import ``central/``, and the centre must not carry
its own copy of what a device expects, so the one definition lives here, next to
the schemas themselves. See :mod:`contract.commands`.
"""
