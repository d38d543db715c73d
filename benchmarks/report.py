"""One table format for every benchmark: figure, baseline, ratio, target, with the machine."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
# scripts/bench sets this to a file where each suite script leaves its headline rows.
ROWS_ENV = "WARDPOST_BENCH_ROWS"


@dataclass
class Row:
    section: str
    metric: str
    value: float
    unit: str
    baseline_name: str = ""
    baseline: float | None = None
    target: str = ""
    ok: bool | None = None
    lower_is_better: bool = True
    notes: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline in (None, 0):
            return None
        return self.value / self.baseline  # type: ignore[operator]


@dataclass
class Report:
    title: str
    rows: list[Row] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def extend(self, rows: list[dict[str, Any]]) -> None:
        for r in rows:
            self.rows.append(Row(**{k: v for k, v in r.items() if k != "ratio"}))

    def print(self) -> None:
        print(f"\n{self.title}")
        print(f"machine: {machine_line(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}")
        header = f"{'section':14} {'metric':44} {'value':>12} {'unit':8} {'baseline':>12}  {'ratio':>7}  {'target':22} ok"
        print(header)
        print("-" * len(header))
        for r in self.rows:
            base = "" if r.baseline is None else _fmt(r.baseline)
            ratio = "" if r.ratio is None else f"{r.ratio:.2f}x"
            ok = "" if r.ok is None else ("yes" if r.ok else "NO")
            print(
                f"{r.section:14} {r.metric:44} {_fmt(r.value):>12} {r.unit:8} {base:>12}  {ratio:>7}  {r.target:22} {ok}"
            )
            if r.baseline_name:
                print(
                    f"{'':14}   baseline: {r.baseline_name}" + (f"; {r.notes}" if r.notes else "")
                )
            elif r.notes:
                print(f"{'':14}   {r.notes}")

    def save(self, name: str, **extra: Any) -> Path:
        """Write ``results/<date>-<name>.json``: title, machine, rows and any ``extra`` keys."""
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{time.strftime('%Y-%m-%d')}-{name}.json"
        body = {
            "title": self.title,
            "machine": machine(),
            "rows": [{**asdict(r), "ratio": r.ratio} for r in self.rows],
            **extra,
        }
        path.write_text(json.dumps(body, indent=2) + "\n")
        return path


def hand_over(rows: list[Row]) -> None:
    """Leave a suite's headline rows for ``scripts/bench``'s one table (when it runs us)."""
    path = os.environ.get(ROWS_ENV)
    if path:
        Path(path).write_text(json.dumps([asdict(r) for r in rows]))


def versions(*distributions: str) -> list[str]:
    """``name version`` of each installed distribution, for a suite's machine line."""
    from importlib.metadata import version

    return [f"{name} {version(name)}" for name in distributions]


def machine_line(*extra: str) -> str:
    """:func:`machine` as one line, with the versions a suite cares about appended."""
    info = machine()
    return ", ".join(
        [
            f"{info['cpu']} ({info['cores']} cores)",
            f"{info['memory_gib']} GiB",
            info["os"],
            f"Python {info['python']}",
            info["broker"],
            *extra,
        ]
    )


def _fmt(v: float) -> str:
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3f}"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    try:
        mosq = subprocess.run(
            ["mosquitto", "-h"], capture_output=True, text=True, timeout=5, check=False
        ).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        mosq = "mosquitto ?"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "broker": mosq,
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]
