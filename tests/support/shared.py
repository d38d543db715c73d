"""The shared test data outside the repository (face models and photos in ``../shared``),
and the rule for anything a test needs that set-up provides (that data, Chromium, shellcheck).

Without it the tests that need it skip on a developer's machine, but in CI (``CI=true``,
as CI services and .ci/run set it) it fails the run: a green CI must mean every test ran.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

SHARED = Path(os.environ.get("WARDPOST_SHARED", Path(__file__).resolve().parents[3] / "shared"))
MODELS = SHARED / "models"
FACES = SHARED / "faces" / "lfw_dev"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require(*paths: Path) -> None:
    """Skip the calling test when one of ``paths`` is missing, or fail it in CI."""
    missing = [p for p in paths if not p.exists()]
    if not missing:
        return
    missing_prerequisite(
        f"shared test data not found: {missing[0]} (put it in {SHARED} or set WARDPOST_SHARED)"
    )


def missing_prerequisite(reason: str) -> NoReturn:
    """Skip the calling test for ``reason``, or fail it in CI."""
    if in_ci():
        pytest.fail(f"{reason}; CI=true, so this is an error, not a skip", pytrace=False)
    pytest.skip(reason)
