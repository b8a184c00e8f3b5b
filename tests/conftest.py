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


def run_command(args, cwd, env: dict | None = None, timeout: int = 600):
    """A command line run as a user would, one intra-op thread, output captured."""
    import subprocess

    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
    )


def train_tiny_onmt(folder: Path, pairs: int, valid: int, vocab: int, **model: object) -> Path:
    """A 5-step OpenNMT-py model ``folder/m_step_5.pt`` on the first ``pairs`` pairs of the
    toy en-de set, with the stock ``onmt_build_vocab`` and ``onmt_train``."""
    import yaml

    toy = data_path("toy-ende")
    sizes = {"src-train": pairs, "tgt-train": pairs, "src-val": valid, "tgt-val": valid}
    for name, n in sizes.items():
        lines = (toy / f"{name}.txt").read_text().splitlines()[:n]
        (folder / f"{name}.txt").write_text("\n".join(lines) + "\n")
    config = {
        "src_vocab": "vocab.src",
        "tgt_vocab": "vocab.tgt",
        "save_data": "vocab",
        "src_vocab_size": vocab,
        "tgt_vocab_size": vocab,
        "overwrite": True,
        "data": {
            "corpus_1": {"path_src": "src-train.txt", "path_tgt": "tgt-train.txt"},
            "valid": {"path_src": "src-val.txt", "path_tgt": "tgt-val.txt"},
        },
        "layers": 1,
        "hidden_size": 16,
        "word_vec_size": 16,
        "batch_size": 16,
        "batch_type": "sents",
        "train_steps": 5,
        "save_checkpoint_steps": 5,
        "valid_steps": 5,
        "seed": 1,
        "num_workers": 0,
        **model,
    }
    (folder / "c.yaml").write_text(yaml.safe_dump(config))
    done = run_command([BIN / "onmt_build_vocab", "-config", "c.yaml", "-n_sample", pairs], folder)
    assert done.returncode == 0, done.stderr[-2000:]
    done = run_command([BIN / "onmt_train", "-config", "c.yaml", "-save_model", "m"], folder)
    assert done.returncode == 0, done.stderr[-2000:]
    return folder / "m_step_5.pt"
