"""Reading a stopped agent's outbox from outside, as tests and the fleet simulation do."""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from pathlib import Path


def outbox_rows(db_path: Path) -> list[tuple[str, int, int, str, float | None]]:
    """Rows of a stopped agent's outbox, read from a copy so the original stays untouched."""
    if not db_path.exists():
        return []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / db_path.name
        for suffix in ("", "-wal"):
            src = Path(str(db_path) + suffix)
            if src.exists():
                shutil.copyfile(src, Path(str(copy) + suffix))
        conn = sqlite3.connect(copy)
        try:
            return list(conn.execute("SELECT id, rank, seq, kind, published FROM events"))
        finally:
            conn.close()
