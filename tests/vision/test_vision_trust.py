"""Issue 15, the torchvision trainer: no run writes over a checkpoint it reads (3), every
checkpoint it wrote evaluates with --test-only as it was trained (14), files appear whole or
not at all (8), and bad input is a one-line error, never a traceback (11).

The runs use the CIFAR-10 sample bundled with the project, a tiny student and a few steps."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

from vision_plugin.models import build_model, load_state
from vision_plugin.train import UsageError, get_args_parser, main, run

SAMPLE = ROOT / "vision_plugin" / "demo_data"
STUDENT = ["--model", "squeezenet1_1", "--dropout", "0", "--cifar-stem"]
SMALL = [
    "--data-path",
    str(SAMPLE),
    "--max-train-samples",
    "64",
    "--max-val-samples",
    "48",
    "-b",
    "32",
    "--quiet",
    "--lr",
    "0.01",
]


def _python(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", **env}
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=environment,
        cwd=cwd,
        timeout=300,
    )


def _train(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return _python("-m", "vision_plugin.train", *args, cwd=cwd)


def _one_line_error(done: subprocess.CompletedProcess, message: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(lines) == 1 and message in lines[0], done.stderr


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_teacher(path: Path, arch: str = "squeezenet1_1") -> Path:
    torch.manual_seed(0)
    kwargs = {"dropout": 0.0} if arch == "squeezenet1_1" else {}
    model = build_model(arch, 10, cifar_stem=True, **kwargs)
    torch.save({"model": model.state_dict(), "epoch": 0}, path)
    return path


# ---------------------------------------------------------------------------------------------
# 3. No run writes over a checkpoint it reads.


@pytest.mark.parametrize("flag", ["--teacher-checkpoint", "--student-checkpoint"])
def test_a_run_in_the_folder_of_its_input_checkpoint_leaves_it_alone(tmp_path, flag):
    """The default --output-dir is "."; run where the teacher's checkpoint.pth lives (or with
    model_0.pth as the student's start), the old trainer replaced it with the student at
    epoch 0. Now nothing is written and the input is untouched."""
    name = "checkpoint.pth" if flag == "--teacher-checkpoint" else "model_0.pth"
    source = _save_teacher(tmp_path / name)
    before = _digest(source)
    teacher = ["--teacher", "squeezenet1_1"] if flag == "--teacher-checkpoint" else []
    done = _train(*STUDENT, *SMALL, "--epochs", "1", *teacher, flag, name, cwd=tmp_path)
    _one_line_error(done, f"would write {name} over the {flag} {name} that this run reads")
    assert _digest(source) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_fresh_run_keeps_an_earlier_runs_files_and_resume_continues_them(tmp_path):
    out = tmp_path / "run"
    assert (
        run([*STUDENT, *SMALL, "--full-precision", "--epochs", "1", "--output-dir", str(out)]) == 0
    )
    before = _digest(out / "checkpoint.pth")
    done = _train(*STUDENT, *SMALL, "--epochs", "1", "--output-dir", str(out))
    _one_line_error(done, f"continue it with --resume {out / 'checkpoint.pth'}")
    assert "--force" in done.stderr and _digest(out / "checkpoint.pth") == before
    # Resuming the run in its own folder replaces its files, as it always did.
    resumed = [
        *STUDENT,
        *SMALL,
        "--full-precision",
        "--epochs",
        "2",
        "--output-dir",
        str(out),
        "--resume",
        str(out / "checkpoint.pth"),
    ]
    assert run(resumed) == 0
    assert torch.load(out / "checkpoint.pth", weights_only=False)["epoch"] == 1
    assert (out / "model_0.pth").exists() and (out / "model_1.pth").exists()


# ---------------------------------------------------------------------------------------------
# 14. --test-only evaluates the training checkpoints of a quantized run.


@pytest.mark.parametrize(
    "quantization",
    [
        ["--quant-bits", "2"],
        ["--quant-bits", "3", "--act-bits", "4", "--qkd-self-epochs", "1"],
    ],
    ids=["2-bit", "qkd-3-bit-act-4"],
)
def test_test_only_evaluates_a_quantized_training_checkpoint(tmp_path, capsys, quantization):
    out = tmp_path / "run"
    assert run([*STUDENT, *SMALL, *quantization, "--epochs", "1", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    reported = f"Acc@1 {summary['acc1']:.3f} Acc@5 {summary['acc5']:.3f}"
    # No --model, and another --quant-bits: the checkpoint's own settings are used.
    done = _train(
        *SMALL, "--quant-bits", "8", "--test-only", "--resume", str(out / "checkpoint.pth")
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert reported in done.stdout and "epoch 0, squeezenet1_1" in done.stdout
    capsys.readouterr()
    assert run([*SMALL, "--test-only", "--resume", str(out / "model_0.pth")]) == 0
    assert reported in capsys.readouterr().out
    if "--act-bits" not in quantization:
        # The rebuilt quantized student computes exactly what its packed export computes.
        from vision_plugin.train import load_for_evaluation

        args = get_args_parser().parse_args([*SMALL, "--resume", str(out / "checkpoint.pth")])
        rebuilt = load_for_evaluation(args, 10).eval()
        packed = build_model("squeezenet1_1", 10, cifar_stem=True, dropout=0.0)
        packed.load_state_dict(load_state(out / "student.qd"))
        images = torch.randn(4, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(rebuilt(images), packed.eval()(images))


def test_test_only_refuses_a_checkpoint_of_another_model(tmp_path, capsys):
    out = tmp_path / "run"
    assert run([*STUDENT, *SMALL, "--epochs", "1", "--output-dir", str(out)]) == 0
    capsys.readouterr()
    args = [*SMALL, "--model", "resnet18", "--test-only", "--resume", str(out / "checkpoint.pth")]
    assert run(args) == 2
    assert "holds a squeezenet1_1, not a resnet18" in capsys.readouterr().err
    # Resuming with other quantization settings would load into another model: refused.
    args = [
        *STUDENT,
        *SMALL,
        "--epochs",
        "2",
        "--quant-bits",
        "2",
        "--output-dir",
        str(out),
        "--resume",
        str(out / "checkpoint.pth"),
    ]
    assert run(args) == 2
    err = capsys.readouterr().err
    assert "was trained with --quant-bits 4, this run asks for --quant-bits 2" in err


# ---------------------------------------------------------------------------------------------
# 8. Files appear whole or not at all.

KILLED_PAST_LIMIT = (
    "import resource, signal, sys\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it: a write past the limit "
    "now kills the process, as kill -9 would, in the middle of the write\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (@LIMIT@, @LIMIT@))\n"
)


# The summary is made 4 MB long (valid JSON: trailing spaces) so that a 3.5 MB file-size limit
# kills the run in the middle of writing it, after the 2.9 MB safetensors export succeeded.
BIG_SUMMARY = (
    "import json\n"
    "_dumps = json.dumps\n"
    "def dumps(obj, *args, **kwargs):\n"
    "    text = _dumps(obj, *args, **kwargs)\n"
    "    big = isinstance(obj, dict) and 'acc1' in obj and kwargs.get('indent')\n"
    "    return text + ' ' * (4 << 20) if big else text\n"
    "json.dumps = dumps\n"
    "from vision_plugin.train import cli\n"
    "sys.argv[0] = 'train'\n"
    "cli()\n"
)


def test_a_kill_while_writing_the_summary_leaves_no_truncated_file(tmp_path):
    """summary.json used to be written in place: a kill in the middle left a truncated file
    under its final name (and an earlier run's summary destroyed)."""
    code = KILLED_PAST_LIMIT.replace("@LIMIT@", "3_500_000") + BIG_SUMMARY
    out = tmp_path / "run"
    args = [*STUDENT, *SMALL, "--full-precision", "--epochs", "0", "--output-dir", str(out)]
    done = _python("-c", code, *args)
    assert done.returncode == -signal.SIGXFSZ, done.stderr[-3000:]
    assert (out / "student_fp32.safetensors").stat().st_size > 2**20  # written before
    assert not (out / "summary.json").exists()
    partial = [p for p in out.iterdir() if p.name.startswith(".summary.json")]
    assert partial and partial[0].stat().st_size == 3_500_000  # killed inside that write
    # A complete earlier summary stays whole when the run that replaces it is killed.
    earlier = tmp_path / "earlier"
    assert run([*args[:-1], str(earlier)]) == 0
    before = _digest(earlier / "summary.json")
    done = _python("-c", code, *args[:-1], str(earlier), "--force")
    assert done.returncode == -signal.SIGXFSZ, done.stderr[-3000:]
    assert _digest(earlier / "summary.json") == before


def test_a_kill_while_the_demo_writes_its_report_leaves_the_earlier_report(tmp_path):
    rows = [
        ("teacher", "teacher", {"acc1": 50.0, "student_fp32_bytes": 44_000_000}),
        ("qd_4bit", "4-bit", {"acc1": 40.0, "packed_bytes": 600_000, "student_fp32_bytes": 1}),
    ]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    code = (
        "import json, sys\nfrom pathlib import Path\nfrom vision_plugin.demo import report\n"
        "out = Path(sys.argv[1])\n"
        "report(out, [tuple(r) for r in json.loads((out / 'rows.json').read_text())])\n"
    )
    env = {"MPLCONFIGDIR": str(tmp_path / "mpl")}
    assert _python("-c", code, str(tmp_path), **env).returncode == 0
    png, report_md = tmp_path / "accuracy_vs_bytes.png", tmp_path / "REPORT.md"
    before = _digest(png), _digest(report_md)
    assert png.stat().st_size > 4096
    done = _python("-c", KILLED_PAST_LIMIT.replace("@LIMIT@", "4096") + code, str(tmp_path), **env)
    assert done.returncode == -signal.SIGXFSZ, done.stderr[-3000:]
    assert (_digest(png), _digest(report_md)) == before


def test_vision_writers_go_through_compressor_files():
    """No hand-written temporary-name-and-rename, and no direct write, in the plugin."""
    folder = ROOT / "vision_plugin"
    for source in folder.glob("*.py"):
        text = source.read_text()
        for direct in ("os.replace(", ".write_text(", "torch.save(", "save_file(", ".savefig(out"):
            assert direct not in text, f"{source.name}: {direct}"


# ---------------------------------------------------------------------------------------------
# 11. Bad input: one line saying what is wrong and how to fix it, exit status 2.


@pytest.fixture
def bad_files(tmp_path):
    plain = build_model("squeezenet1_1", 10, cifar_stem=True, dropout=0.0).state_dict()
    torch.save(plain, tmp_path / "plain.pth")
    _save_teacher(tmp_path / "resnet18.pth", "resnet18")
    (tmp_path / "notes.pth").write_text("teacher: runs/r34/checkpoint.pth, acc 93.1\n")
    (tmp_path / "a_file").write_text("not a folder\n")
    data = tmp_path / "badlabels"
    data.mkdir()
    for split, count in (("train", 64), ("test", 48)):
        with np.load(SAMPLE / f"{split}.npz") as npz:
            images, labels = npz["images"][:count], npz["labels"][:count].copy()
        if split == "train":
            labels[5] = 12
        np.savez(data / f"{split}.npz", images=images, labels=labels)
    return tmp_path


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--resume", "{d}/plain.pth"], "is not a training checkpoint"),
        (["-b", "0"], "-b must be a positive whole number, got 0"),
        (["-b", "1000"], "-b 1000 is larger than the 64 training images"),
        (["--interpolation", "junk"], "--interpolation 'junk' is not a mode; choose one of"),
        (["--output-dir", "{d}/a_file"], "is a file, not a folder"),
        (["--print-freq", "0"], "--print-freq must be a positive whole number"),
        (
            ["--data-path", "{d}/badlabels"],
            "labels must be class numbers 0 to 9; found 1 outside that range (first: label 12",
        ),
        (
            ["--teacher", "squeezenet1_1", "--teacher-checkpoint", "{d}/notes.pth"],
            "is a text file, not a checkpoint",
        ),
        (
            ["--student-checkpoint", "{d}/resnet18.pth"],
            "does not fit the architecture squeezenet1_1",
        ),
        (
            ["--test-only", "--resume", "{d}/resnet18.pth"],
            "does not fit the architecture squeezenet1_1",
        ),
        (["--epochs", "-3"], "--epochs must be 0 or more"),
        (["--lr", "-0.1"], "--lr must be 0 or more"),
        (["--device", "junk"], "--device 'junk' is not a device"),
    ],
    ids=[
        "resume-state-dict",
        "b0",
        "b-too-large",
        "interpolation",
        "output-dir-file",
        "print-freq0",
        "labels",
        "text-checkpoint",
        "other-arch",
        "test-other-arch",
        "negative-epochs",
        "negative-lr",
        "device",
    ],
)
def test_bad_input_is_a_one_line_error(bad_files, extra, message):
    extra = [e.replace("{d}", str(bad_files)) for e in extra]
    out = bad_files / "out"
    done = _train(*STUDENT, *SMALL, "--epochs", "1", "--output-dir", str(out), *extra)
    _one_line_error(done, message)
    assert not out.exists() or not any(out.iterdir())


def test_library_code_raises_and_only_the_console_entry_exits(tmp_path, capsys):
    args = get_args_parser().parse_args(
        [*SMALL, "--print-freq", "0", "--output-dir", str(tmp_path)]
    )
    with pytest.raises(UsageError, match="--print-freq"):
        main(args)
    assert run([*SMALL, "--print-freq", "0"]) == 2  # returns; cli() alone calls sys.exit
    assert "--print-freq must be" in capsys.readouterr().err


def test_the_demo_refuses_a_file_as_its_output_folder(tmp_path):
    (tmp_path / "demo_out").write_text("keep me\n")
    done = _python("-m", "vision_plugin.demo", "--output-dir", str(tmp_path / "demo_out"))
    _one_line_error(done, "is a file, not a folder")
    assert (tmp_path / "demo_out").read_text() == "keep me\n"
