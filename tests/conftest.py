"""Shared fixtures: where the real data lives, and small helpers for subprocess runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("QDISTILL_DATA", ROOT.parent / "shared" / "data"))
BIN = Path(sys.executable).parent
QDISTILL = BIN / "qdistill"


def data_path(*parts: str) -> Path:
    """A path under the shared data folder; the test is skipped, saying why, if it is absent."""
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (set QDISTILL_DATA to the shared data folder)")
    return path


@pytest.fixture
def cifar10_dir() -> Path:
    return data_path("cifar10")


@pytest.fixture
def multi30k_dir() -> Path:
    return data_path("multi30k")


@pytest.fixture
def toy_ende_dir() -> Path:
    return data_path("toy-ende")


@pytest.fixture(autouse=True)
def _single_thread(monkeypatch):
    """Tests run two at a time on two cores: one intra-op thread each keeps them from fighting."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)
