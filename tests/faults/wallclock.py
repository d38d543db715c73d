"""Run ``wardpost`` with a wall clock the test can step: ``python -m tests.faults.wallclock FILE <cli args>``.

FILE holds an offset in seconds (``-3600`` = one hour back); every ``time.time()`` and
``time.time_ns()`` in the agent adds the offset current at that moment, while the
monotonic and boot clocks run on untouched — exactly what an NTP or RTC step does.

Why not libfaketime: Debian 12's 0.9.10 with ``DONT_FAKE_MONOTONIC=1`` makes
``clock_nanosleep`` fail (``time.sleep`` raises ``OSError: [Errno 22]``), and faking the
monotonic clock as well moves clocks a real wall-clock step never moves.
"""

from __future__ import annotations

import os
import sys
import time

_real_time = time.time
_real_time_ns = time.time_ns


class _Offset:
    def __init__(self, path: str):
        self.path = path
        self.mtime_ns = -1
        self.seconds = 0.0

    def current(self) -> float:
        try:
            mtime = os.stat(self.path).st_mtime_ns
            if mtime != self.mtime_ns:
                with open(self.path, encoding="ascii") as f:
                    self.seconds = float(f.read().strip() or 0)
                self.mtime_ns = mtime
        except (OSError, ValueError):
            pass
        return self.seconds


def main() -> int:
    offset = _Offset(sys.argv[1])
    time.time = lambda: _real_time() + offset.current()
    time.time_ns = lambda: _real_time_ns() + int(offset.current() * 1e9)
    from agent.cli import main as cli_main

    return cli_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
