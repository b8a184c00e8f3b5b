"""The torchvision plugin on real CIFAR-10 images: distillation into a 4-bit student, DDP,
resume after a kill, the packed export, the pretrained-weights path and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vision_plugin.models import build_model, build_teacher
from vision_plugin.train import run

# A BatchNorm-free, dropout-free student: every process computes exactly what one process would.
STUDENT = ["--model", "squeezenet1_1", "--dropout", "0", "--cifar-stem"]
SMALL = ["--max-train-samples", "128", "--max-val-samples", "64", "-b", "32", "--quiet"]


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    teacher = build_model("squeezenet1_1", 10, cifar_stem=True, dropout=0.0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save({"model": teacher.state_dict(), "epoch": 0}, path)
    return path


def _args(cifar10_dir, out, teacher_checkpoint, *extra):
    return [
        "--data-path",
        str(cifar10_dir),
        *STUDENT,
        *SMALL,
        "--teacher",
        "squeezenet1_1",
        "--teacher-checkpoint",
        str(teacher_checkpoint),
        "--lr",
        "0.01",
        "--output-dir",
        str(out),
        *extra,
    ]


def _python(*args, env=None, **kwargs):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=environment, **kwargs
    )


def test_distils_a_4bit_student_and_packs_it(cifar10_dir, teacher_checkpoint, tmp_path):
    out = tmp_path / "run"
    assert (
        run(_args(cifar10_dir, out, teacher_checkpoint, "--epochs", "1", "--quant-bits", "4")) == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["packed_bytes"] == (out / "student.qd").stat().st_size
    assert summary["compression_vs_student_fp32"] > 6.5
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=False)
    assert set(checkpoint) >= {"model", "optimizer", "lr_scheduler", "epoch", "args"}
    # The packed export evaluates to exactly the in-memory student's accuracy.
    done = _python(
        "-m",
        "vision_plugin.train",
        "--data-path",
        str(cifar10_dir),
        *STUDENT,
        *SMALL,
        "--test-only",
        "--resume",
        str(out / "student.qd"),
    )
    assert done.returncode == 0, done.stderr
    assert f"Acc@1 {summary['acc1']:.3f}" in done.stdout
    # Every quantized tensor of the export has at most 2**4 values per bucket.
    from compressor.format.packed import load_packed, packed_specs

    state, meta = load_packed(out / "student.qd")
    assert meta["model"] == "squeezenet1_1"
    for name, spec in packed_specs(out / "student.qd").items():
        for bucket in state[name].reshape(-1).split(spec.bucket_size):
            assert bucket.unique().numel() <= 16


def test_learned_points_keep_their_own_small_learning_rate(
    cifar10_dir, teacher_checkpoint, tmp_path
):
    """--quant-method differentiable at the weights' --lr 0.1: the points learn at --points-lr,
    so none of them run into an end of [0, 1] and merge with a neighbour."""
    out = tmp_path / "run"
    args = _args(
        cifar10_dir,
        out,
        teacher_checkpoint,
        "--epochs",
        "1",
        "--quant-bits",
        "2",
        "--quant-method",
        "differentiable",
        "--lr",
        "0.1",
    )
    assert run(args) == 0
    from compressor.format.packed import packed_specs

    specs = packed_specs(out / "student.qd")
    assert specs and all(spec.method == "nonuniform" for spec in specs.values())
    for name, spec in specs.items():
        gaps = [b - a for a, b in zip(spec.points, spec.points[1:])]
        assert len(spec.points) == 4 and min(gaps) > 0.05, (name, spec.points)


def test_ddp_on_two_cpu_processes_matches_one_process(cifar10_dir, teacher_checkpoint, tmp_path):
    single, double = tmp_path / "one", tmp_path / "two"
    common = _args(cifar10_dir, single, teacher_checkpoint, "--epochs", "1")
    assert run(common) == 0
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "vision_plugin.train",
            *_args(cifar10_dir, double, teacher_checkpoint, "--epochs", "1"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    one = torch.load(single / "checkpoint.pth", weights_only=False)["model"]
    two = torch.load(double / "checkpoint.pth", weights_only=False)["model"]
    assert one.keys() == two.keys()
    for key in one:
        assert torch.allclose(one[key], two[key], rtol=1e-4, atol=1e-5), key
    a = json.loads((single / "summary.json").read_text())
    b = json.loads((double / "summary.json").read_text())
    assert abs(a["acc1"] - b["acc1"]) <= 100 / 64 + 1e-9  # at most one image flips


def test_resume_after_a_kill_equals_an_uninterrupted_run(cifar10_dir, teacher_checkpoint, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    extra = ("--epochs", "2", "--max-train-samples", "256")
    assert run(_args(cifar10_dir, whole, teacher_checkpoint, *extra)) == 0
    command = [sys.executable, "-m", "vision_plugin.train"]
    command += _args(cifar10_dir, killed, teacher_checkpoint, *extra)
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment
    )
    deadline = time.time() + 120
    while (
        not (killed / "model_0.pth").exists() and process.poll() is None and time.time() < deadline
    ):
        time.sleep(0.02)
    while not (killed / "checkpoint.pth").exists() and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "model_1.pth").exists(), "the run finished before it could be killed"
    assert torch.load(killed / "checkpoint.pth", weights_only=False)["epoch"] == 0
    resumed = _args(
        cifar10_dir, killed, teacher_checkpoint, *extra, "--resume", str(killed / "checkpoint.pth")
    )
    assert run(resumed) == 0
    a = torch.load(whole / "checkpoint.pth", weights_only=False)
    b = torch.load(killed / "checkpoint.pth", weights_only=False)
    assert a["epoch"] == b["epoch"] == 1
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_teacher_weights_enum_loads_through_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    pretrained = build_model("resnet18", 1000).state_dict()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(pretrained, cache / "resnet18-f37072fd.pth")  # the file name in the enum's URL
    teacher = build_teacher("resnet18", 1000, weights="ResNet18_Weights.IMAGENET1K_V1")
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in pretrained.items())
    from vision_plugin.models import ModelError

    with pytest.raises(ModelError, match="predict 1000 classes, the data has 10"):
        build_teacher("resnet18", 10, weights="ResNet18_Weights.IMAGENET1K_V1")


def test_cifar_stem_and_quantization_cover_the_model_families():
    x = torch.randn(2, 3, 32, 32)
    for name in ("resnet18", "mobilenet_v3_small", "efficientnet_b0"):
        model = build_model(name, 10, cifar_stem=True).eval()
        assert model(x).shape == (2, 10), name
    import compressor

    # The surgery reaches every convolution (grouped and depthwise too) and linear layer.
    for name in ("mobilenet_v2", "efficientnet_b0", "convnext_tiny", "vgg11", "wide_resnet50_2"):
        model = build_model(name, 10)
        compressor.quantize_(model, compressor.QuantConfig(bits=4))
        layers = [
            n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
        ]
        assert len(compressor.quantization_specs(model)) == len(layers), name


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "resnet9000"], "unknown model 'resnet9000'"),
        (["--quant-bits", "9"], "--quant-bits must be from 1 to 8"),
        (["--data-path", "/nonexistent/cifar"], "does not exist"),
        (
            ["--teacher", "squeezenet1_1", "--teacher-checkpoint", "WRONG"],
            "predicts 100 classes, the data has 10",
        ),
    ],
)
def test_bad_input_is_a_one_line_error(cifar10_dir, tmp_path, extra, message):
    wrong = build_model("squeezenet1_1", 100, cifar_stem=True)
    torch.save({"model": wrong.state_dict()}, tmp_path / "wrong.pth")
    extra = [str(tmp_path / "wrong.pth") if e == "WRONG" else e for e in extra]
    args = [
        "--data-path",
        str(cifar10_dir),
        *STUDENT,
        *SMALL,
        "--epochs",
        "1",
        "--output-dir",
        str(tmp_path),
        *extra,
    ]
    done = _python("-m", "vision_plugin.train", *args)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in done.stderr, done.stderr


def test_malformed_data_is_a_one_line_error(tmp_path):
    (tmp_path / "train.npz").write_bytes(b"not an npz")
    (tmp_path / "test.npz").write_bytes(b"not an npz")
    done = _python(
        "-m", "vision_plugin.train", "--data-path", str(tmp_path), *STUDENT, "--epochs", "1"
    )
    assert done.returncode == 2 and "not a CIFAR-10 npz file" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_imagefolder_tree(cifar10_dir, tmp_path):
    """An ImageNet-style train/ and val/ tree of real images, with the references' transforms."""
    import numpy as np
    from PIL import Image

    with np.load(cifar10_dir / "test.npz") as npz:
        images, labels = npz["images"][:2000], npz["labels"][:2000]
    for split, offset in (("train", 0), ("val", 1)):
        for cls in (0, 1):
            folder = tmp_path / "data" / split / f"class{cls}"
            folder.mkdir(parents=True)
            picks = np.flatnonzero(labels == cls)[offset::2][:8]
            for i in picks:
                Image.fromarray(images[i]).resize((40, 40)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    args = [
        "--data-path",
        str(tmp_path / "data"),
        *STUDENT,
        "-b",
        "4",
        "--epochs",
        "1",
        "--quiet",
        "--train-crop-size",
        "32",
        "--val-resize-size",
        "36",
        "--val-crop-size",
        "32",
        "--output-dir",
        str(out),
    ]
    assert run(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["acc1"] <= 100 and (out / "student.qd").exists()
