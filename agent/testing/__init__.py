"""Test fixtures shipped with the agent (as gpiozero ships its mock pins): a private
mosquitto (:mod:`~agent.testing.broker`), an in-process agent and an MQTT recorder
(:mod:`~agent.testing.agent`), an agent in its own process (:mod:`~agent.testing.process`),
pseudo-terminal serial devices and their frames, and a reader for a stopped agent's outbox.

The project's tests, benchmarks and scripts use them; so can a driver's own tests. Nothing
in the running agent imports this package.
"""
