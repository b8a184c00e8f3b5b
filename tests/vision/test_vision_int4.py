"""``python -m vision_plugin.train --test-only --resume student.qd`` runs the Linear layers of a
student trained on the int4 kernel grid on the int4 kernel (issue 16)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import compressor
from vision_plugin.models import build_model

ARGS = ["--model", "mobilenet_v3_small", "--cifar-stem", "--max-val-samples", "64", "-b", "32"]


@pytest.mark.skipif(not compressor.int4_kernel_available(), reason="no CPU int4 kernel")
def test_test_only_runs_the_linear_layers_on_the_int4_kernel(cifar10_dir, tmp_path):
    torch.manual_seed(0)
    student = build_model("mobilenet_v3_small", 10, cifar_stem=True, dropout=0.0)
    config = compressor.QuantConfig(bits=4, bucket_size=64, grid="int4_kernel")
    compressor.quantize_(student, config)
    compressor.finish_(
        student.eval(), tmp_path / "student.qd", metadata={"model": "mobilenet_v3_small"}
    )
    runs = {}
    for runtime in ("auto", "fp32"):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "vision_plugin.train",
                "--data-path",
                str(cifar10_dir),
                *ARGS,
                "--test-only",
                "--resume",
                str(tmp_path / "student.qd"),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "QDISTILL_RUNTIME": runtime},
        )
        assert done.returncode == 0, done.stderr[-2000:]
        runs[runtime] = done.stdout
    assert "runtime int4 (modules: 2 on the int4 kernel" in runs["auto"]  # the classifier
    assert "runtime fp32 (QDISTILL_RUNTIME=fp32)" in runs["fp32"]
    acc = {k: float(re.search(r"Acc@1 ([0-9.]+)", v).group(1)) for k, v in runs.items()}
    assert abs(acc["auto"] - acc["fp32"]) <= 100 / 64 + 1e-6  # at most one image of 64 differs
