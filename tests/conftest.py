"""Shared fixtures: paths to ../shared data and small deterministic data sets."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT.parent / "shared" / "data" / "ml-100k"


@pytest.fixture(scope="session")
def ml100k_path() -> Path:
    if not (ML100K / "u.data").is_file():
        pytest.skip(f"ml-100k not found at {ML100K}")
    return ML100K
