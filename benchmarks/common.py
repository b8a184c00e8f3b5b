"""Small helpers every benchmark shares: repeat-and-summarise timings, and result files that
record the configuration, versions and machine next to each figure."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from compressor.format.files import atomic_write_json
from recipes.environment import environment

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def timings(fn: Callable[[], object], repeats: int = 7, warmup: int = 1) -> dict:
    """Median, min and max wall time of ``fn`` over ``repeats`` runs, after ``warmup`` runs."""
    return interleaved_timings({"fn": fn}, repeats, warmup)["fn"]


def interleaved_timings(
    fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 1
) -> dict[str, dict]:
    """:func:`timings` of several functions, taken in turn within each repeat, so that this
    machine's slow and fast spells fall on all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {
        name: {
            "median_s": statistics.median(s),
            "min_s": min(s),
            "max_s": max(s),
            "repeats": repeats,
        }
        for name, s in samples.items()
    }


def ratio(numerator: dict, denominator: dict) -> dict:
    """A timing ratio with its spread (min/max over max/min of the two series)."""
    return {
        "median": numerator["median_s"] / denominator["median_s"],
        "min": numerator["min_s"] / denominator["max_s"],
        "max": numerator["max_s"] / denominator["min_s"],
    }


def write_result(name: str, payload: dict) -> Path:
    """Write ``results/<name>.json`` atomically, with the environment added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    atomic_write_json(path, {**payload, "environment": environment()})
    return path


def load_result(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def kept_figures(name: str, keys: tuple[str, ...]) -> dict:
    """The parts ``keys`` of the last ``results/<name>.json``, each marked with the run it was
    measured in: what a fresh clone keeps when the models to measure them again are absent."""
    last = load_result(name) or {}
    return {k: {"measured_in": last.get("environment"), **last[k]} for k in keys if k in last}


def run_one_thread_workers(module: str, argv_lists: list[list[str]]) -> list[list[str]]:
    """``python -m module ARGV`` once per list, all at once, each on one thread (small models
    do about twice the work in two one-thread processes as in one two-thread process); waits
    for every one and returns the argument lists of those that failed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen([sys.executable, "-m", module, *argv], cwd=ROOT, env=env)
        for argv in argv_lists
    ]
    return [argv for worker, argv in zip(workers, argv_lists) if worker.wait()]
