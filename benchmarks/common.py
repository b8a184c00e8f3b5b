"""Small helpers every benchmark shares: repeat-and-summarise timings, and result files that
record the configuration, versions and machine next to each figure."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def timings(fn: Callable[[], object], repeats: int = 7, warmup: int = 1) -> dict:
    """Median, min and max wall time of ``fn`` over ``repeats`` runs, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "repeats": repeats,
    }


def ratio(numerator: dict, denominator: dict) -> dict:
    """A timing ratio with its spread (min/max over max/min of the two series)."""
    return {
        "median": numerator["median_s"] / denominator["median_s"],
        "min": numerator["min_s"] / denominator["max_s"],
        "max": numerator["max_s"] / denominator["min_s"],
    }


def environment() -> dict:
    """Versions, machine and commit that a figure was measured with."""
    import numpy
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "commit": commit,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_result(name: str, payload: dict) -> Path:
    """Write ``results/<name>.json`` atomically, with the environment added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**payload, "environment": environment()}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def load_result(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None
