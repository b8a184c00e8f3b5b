"""The CIFAR-10 experiment of the paper's table, one cached result per configuration.

Teacher; the shallower, narrower student in full precision with and without distillation; PM
2/4/8-bit; quantized distillation 2/4/8-bit; differentiable quantization 2/4-bit with bit
allocation (a budget of code bits, and the paper's budget of points); and QKD's ablation
(:data:`QKD_ABLATION`): at W4A4, W3A3 and W2A2, plain QAT, QAT with a frozen teacher's
distillation loss, and QKD's three phases, on the same quantizers, steps and batches, with
extra seeds at W2A2. Every configuration writes ``{out_dir}/{name}.json`` (accuracy, packed
and fp32 file bytes, configuration, versions, machine) atomically and is skipped when that
file exists with the same configuration, so a stopped run resumes; trained models are kept
under ``work_dir`` and reused by the configurations that start from them.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

import compressor
from compressor.format.files import (
    CheckpointError,
    atomic_save,
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
)
from compressor.format.packed import entropy_ans_available
from recipes import small_runs as runs

ABLATION_BITS = (4, 3, 2)
ABLATION_SEEDS = {4: (0,), 3: (0,), 2: (0, 1, 2)}  # the gaps are widest at W2A2


def ablation_name(method: str, bits: int, seed: int = 0) -> str:
    """``qat_w3a3``, ``qat_kd_w2a2_seed1``, ``qkd_w4a4``: a row of the QKD ablation."""
    return f"{method}_w{bits}a{bits}" + (f"_seed{seed}" if seed else "")


QKD_ABLATION = tuple(
    ablation_name(method, bits, seed)
    for bits in ABLATION_BITS
    for seed in ABLATION_SEEDS[bits]
    for method in runs.WA_METHODS
)
CONFIGURATIONS = (
    "teacher",
    "student_fp32",
    "student_fp32_distilled",
    "pm_2",
    "pm_4",
    "pm_8",
    "qd_2",
    "qd_4",
    "qd_8",
    "qd_4_kernel",
    "dq_2",
    "dq_4",
    "dq_2_points",
    "dq_4_points",
    *QKD_ABLATION,
)


def _fp32_bytes(model: nn.Module, path: Path) -> int:
    state = (
        compressor.shadow_state_dict(model)
        if list(compressor.quantized_tensors(model))
        else model.state_dict()
    )
    return atomic_write_bytes(
        path, safetensors_bytes({k: v.contiguous() for k, v in state.items()})
    )


def cached_result(cfg: runs.SmallRunConfig, out_dir: str | os.PathLike, name: str) -> dict | None:
    """The result of configuration ``name`` that :func:`run` wrote to ``out_dir``, if it was
    run with these parameters and settings; None when it must be (re)done."""
    cached = _read_result(Path(out_dir) / f"{name}.json")
    if cached is None or cached["config"] != asdict(cfg):
        return None
    return cached if cached.get("settings") == _settings(name) else None


def starts_from(name: str) -> tuple[str, ...]:
    """The trained models (teacher, full-precision students) configuration ``name`` needs."""
    if name in ("teacher", "student_fp32"):
        return (name,)
    if name in QKD_ABLATION:
        return ("teacher", "student_fp32")
    if name == "student_fp32_distilled" or name.startswith(("pm_", "dq_")):
        return ("teacher", "student_fp32_distilled")
    return ("teacher",)


def _read_result(path: Path) -> dict | None:
    """A configuration's earlier result, or None (absent, or unreadable: then redone)."""
    if not path.exists():
        return None
    try:
        cached = json.loads(path.read_text())
        if not isinstance(cached, dict) or "config" not in cached or "accuracy" not in cached:
            raise ValueError("not a result")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        print(f"  {path.name} does not read as a result ({exc}); running it again", flush=True)
        return None
    return cached


class _Models:
    """Teacher and full-precision students, trained once and reloaded afterwards."""

    def __init__(self, cfg: runs.SmallRunConfig, data: dict, work: Path) -> None:
        self.cfg, self.data, self.work = cfg, data, work
        self._cache: dict[str, nn.Module] = {}
        self._table: torch.Tensor | None = None

    def teacher_logits(self) -> torch.Tensor:
        """The teacher's logit table, computed once for every run that distils from it."""
        if self._table is None:
            teacher = compressor.freeze_(self.get("teacher"))
            self._table = runs.teacher_logit_table(teacher, self.data)
        return self._table

    def _load(self, path: Path, build: Callable[[], nn.Module]) -> nn.Module | None:
        """A trained model kept in ``path``, or None (with one line saying why) when the file
        does not load or does not fit: it is then trained again."""
        model = build().to(self.cfg.device)
        try:
            model.load_state_dict(load_checkpoint(path))
        except (CheckpointError, RuntimeError, TypeError, AttributeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"  {path.name} does not load ({reason}); training it again", flush=True)
            return None
        return model

    def _parameters(self) -> dict:
        """What a kept model was trained with (the device does not change what it learns)."""
        return {k: v for k, v in asdict(self.cfg).items() if k != "device"}

    def _trained_alike(self, path: Path) -> bool:
        """Whether ``path`` holds a model trained with this run's parameters; a model kept
        from a run with other steps, widths or images (or kept without its parameters) is
        trained again, with one line saying so."""
        if not path.exists():
            return False
        kept = _read_json(_parameters_file(path))
        if kept == self._parameters():
            return True
        why = "other parameters" if kept else "no record of its parameters"
        print(f"  {path.name} was trained with {why}; training it again", flush=True)
        return False

    def get(self, name: str) -> nn.Module:
        if name not in self._cache:
            build, train = {
                "teacher": (
                    lambda: runs.tiny_cnn(self.cfg.teacher_width, self.cfg.teacher_depth),
                    lambda: runs.train_teacher(self.data, self.cfg),
                ),
                "student_fp32": (
                    lambda: runs.student(self.cfg),
                    lambda: runs.run_fp32_student(self.data, self.cfg, None),
                ),
                "student_fp32_distilled": (
                    lambda: runs.student(self.cfg),
                    lambda: runs.run_fp32_student(
                        self.data, self.cfg, self.get("teacher"), self.teacher_logits()
                    ),
                ),
            }[name]
            path = self.work / f"{name}.pt"
            model = self._load(path, build) if self._trained_alike(path) else None
            if model is None:
                model = train()
                atomic_save(model.state_dict(), path)
                atomic_write_json(_parameters_file(path), self._parameters())
            self._cache[name] = model
        return self._cache[name]


def _parameters_file(model: Path) -> Path:
    return model.with_suffix(".parameters.json")


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def trained_model(
    cfg: runs.SmallRunConfig, data: dict, work_dir: str | os.PathLike, name: str
) -> nn.Module:
    """The teacher, ``student_fp32`` or ``student_fp32_distilled``: trained once into
    ``work_dir`` (as :func:`run` does) and reloaded afterwards."""
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    return _Models(cfg, data, Path(work_dir)).get(name)


# A configuration: its method, bits, and what trains it (a model, or a model and the figures
# the run measured besides accuracy, which replace those that :func:`run` measures).
Job = tuple[str, int | None, Callable[[], nn.Module | tuple[nn.Module, dict]]]


def _settings(name: str) -> dict | None:
    """What a configuration's cached result must have been run with besides the recipe's
    parameters (None for the rows whose settings live in the code alone)."""
    if name not in QKD_ABLATION:
        return None
    method, _, rest = name.rpartition("_w")
    bits = int(rest.split("a")[0])
    settings = {
        "method": method,
        "bits": bits,
        "act_bits": bits,
        "seed": int(rest.partition("_seed")[2] or 0),
        "init": "student_fp32",
        "quantizers": "lsq, first and last layers in full precision",
    }
    if method == "qkd":
        settings["phases"] = list(runs.QKD_PHASES)
    return settings


def _ablation_jobs(models: _Models) -> dict[str, Job]:
    cfg, data = models.cfg, models.data
    label = {"qat": "QAT, labels only", "qat_kd": "QAT + frozen-teacher KD", "qkd": "QKD"}
    jobs: dict[str, Job] = {}
    for name in QKD_ABLATION:
        settings = _settings(name)
        method, bits, seed = settings["method"], settings["bits"], settings["seed"]

        def make(method=method, bits=bits, seed=seed, init=settings["init"]):
            teacher, start = models.get("teacher"), models.get(init)
            # only the frozen-teacher row reads the logit table; QKD's teacher changes as it trains
            table = models.teacher_logits() if method == "qat_kd" else None
            began = time.perf_counter()  # the row's own training, not the models it shares
            model, info = runs.run_wa_quantization(
                data, replace(cfg, seed=cfg.seed + seed), teacher, start, bits, method, table=table
            )
            info.pop("history")
            return model, {"train_s": time.perf_counter() - began, **info}

        jobs[name] = (f"{label[method]} W{bits}A{bits}", bits, make)
    return jobs


def _jobs(models: _Models) -> dict[str, Job]:
    cfg, data = models.cfg, models.data
    jobs: dict[str, Job] = {
        "teacher": ("teacher fp32", None, lambda: models.get("teacher")),
        "student_fp32": ("student fp32", None, lambda: models.get("student_fp32")),
        "student_fp32_distilled": (
            "student fp32 distilled",
            None,
            lambda: models.get("student_fp32_distilled"),
        ),
    }
    for bits in (2, 4, 8):
        jobs[f"pm_{bits}"] = (
            "PM",
            bits,
            lambda b=bits: runs.run_post_training(models.get("student_fp32_distilled"), b),
        )
        jobs[f"qd_{bits}"] = (
            "quantized distillation",
            bits,
            lambda b=bits: runs.run_quantized_distillation(
                data, cfg, models.get("teacher"), b, models.teacher_logits()
            )[0],
        )
    jobs["qd_4_kernel"] = (
        "quantized distillation, int4 kernel grid",
        4,
        lambda: runs.run_quantized_distillation(
            data, cfg, models.get("teacher"), 4, models.teacher_logits(), grid="int4_kernel"
        )[0],
    )
    for bits in (2, 4):
        for unit, suffix, method in (
            ("bits", "", "differentiable quantization + bit allocation"),
            ("points", "_points", "differentiable quantization + the paper's point allocation"),
        ):
            jobs[f"dq_{bits}{suffix}"] = (
                method,
                bits,
                lambda b=bits, u=unit: runs.run_differentiable_quantization(
                    data,
                    cfg,
                    models.get("teacher"),
                    models.get("student_fp32_distilled"),
                    b,
                    u,
                    models.teacher_logits(),
                )[0],
            )
    jobs.update(_ablation_jobs(models))
    return jobs


def run(
    cfg: runs.SmallRunConfig,
    out_dir: str | os.PathLike,
    work_dir: str | os.PathLike,
    configurations: Iterable[str] = CONFIGURATIONS,
    data_root: Path | None = None,
    environment: Callable[[], dict] | None = None,
) -> list[dict]:
    """Run (or finish) the given configurations; returns their results."""
    out, work = Path(out_dir), Path(work_dir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    data = runs.load_cifar10(
        data_root or runs.data_root(), cfg.train_images, cfg.test_images, cfg.seed, cfg.device
    )
    jobs = _jobs(_Models(cfg, data, work))
    unknown = sorted(set(configurations) - set(jobs))
    if unknown:
        raise ValueError(f"unknown CIFAR-10 configurations {unknown}; choose from {list(jobs)}")
    results = []
    for name in configurations:
        method, bits, make = jobs[name]
        path = out / f"{name}.json"
        cached = cached_result(cfg, out, name)
        settings = _settings(name)
        if cached is not None:
            print(f"  {name:<26} cached: {cached['accuracy']:.2f}%", flush=True)
            results.append(cached)
            continue
        start = time.perf_counter()
        made = make()
        model, measured = made if isinstance(made, tuple) else (made, {})
        accuracy = runs.accuracy(model, data)
        model = copy.deepcopy(model).cpu()  # the cached teacher and students stay put
        quantized = bool(compressor.quantization_specs(model))
        packed = compressor.save_packed(model, work / f"{name}.qd") if quantized else None
        # The same weights with their codes entropy-coded (rANS), where constriction is there.
        packed_ans = (
            compressor.save_packed(model, work / f"{name}.ans.qd", entropy="ans")
            if quantized and entropy_ans_available()
            else None
        )
        result = {
            "name": name,
            "method": method,
            "bits": bits,
            "accuracy": accuracy,
            "packed_bytes": packed,
            "packed_bytes_ans": packed_ans,
            "fp32_bytes": _fp32_bytes(model, work / f"{name}.fp32.safetensors"),
            "train_s": time.perf_counter() - start,
            "config": asdict(cfg),
            **({"settings": settings} if settings else {}),
            **measured,
        }
        if environment is not None:
            result["environment"] = environment()
        atomic_write_json(path, result)
        print(f"  {name:<26} {result['accuracy']:.2f}%  packed {packed or '-'} bytes", flush=True)
        results.append(result)
    return results
