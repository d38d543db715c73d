"""The centre's side of Wardpost: a receiver that stores every event before receipting it.

* :mod:`central.receiver` — the service (MQTT in, store, receipts, supervision);
* :mod:`central.intake` — what each message means (dedupe, device state, gaps, lost devices);
* :mod:`central.store` — SQLite or PostgreSQL, one interface;
* :mod:`central.alarms` — the alarm lifecycle operators drive (new → acknowledged → resolved);
* :mod:`central.stats` — transmission time and path availability for the report;
* :mod:`central.dc09`, :mod:`central.bridge`, :mod:`central.dc09_receiver` — SIA DC-09 / Contact ID
  to an alarm receiving centre, and a minimal receiver for tests;
* :mod:`central.devicesim` — a device that speaks the wire contract, for tests and benchmarks.
"""
