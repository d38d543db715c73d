"""Test fixtures shipped with the centre, beside :mod:`agent.testing`: a private PostgreSQL
cluster (:mod:`~central.testing.postgres`), receivers in processes of their own to kill and
restart (:mod:`~central.testing.receivers`) and the headless Chromium the console is driven
with (:mod:`~central.testing.browser`).

The project's tests and benchmarks use them. Nothing in the running centre imports this
package.
"""
