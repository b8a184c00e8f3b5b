"""Issue 15 for the recipes, the benchmarks and ``qdistill shrink``: a resume skips a checkpoint
that does not load (7), every write is atomic (8), one safe loader (10), shrink never replaces
its input or a file it did not write (2) and reports bad input in one line (11).

Real files in ``tmp_path`` and the real ``qdistill`` command (in process through
``compressor.cli.main``; once as a subprocess); tiny models throughout."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import QDISTILL, ROOT

from compressor.cli import main as qdistill
from compressor.format import files
from recipes import translation


def _run_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = qdistill([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code: int, err: str, command: str = "shrink") -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"qdistill {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---- 7: a recipe's resume skips a checkpoint that does not load ------------------------------


def _onmt_checkpoint(layers: int = 2) -> dict:
    """A small checkpoint in OpenNMT-py's format (options pickled as an argparse.Namespace)."""
    model = {}
    for k in range(layers):  # layer 0 reads the embeddings (4), the others a layer (6)
        model[f"encoder.rnn.weight_ih_l{k}"] = torch.randn(16, 4 if k == 0 else 6)
        model[f"decoder.rnn.layers.{k}.weight_ih"] = torch.randn(16, 4 if k == 0 else 6)
    model["encoder.embeddings.weight"] = torch.randn(10, 4)
    opt = argparse.Namespace(enc_layers=layers, dec_layers=layers, layers=layers, rnn_size=4)
    return {
        "model": model,
        "generator": {"weight": torch.randn(10, 4)},
        "opt": opt,
        "optim": {"step": 1},
        "vocab": {"src": ["<unk>", "a"], "tgt": ["<unk>", "b"]},
    }


def _truncated(path: Path) -> None:
    """What a kill -9 during torch.save leaves: the first part of a real checkpoint."""
    torch.save(_onmt_checkpoint(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_text("not a checkpoint\n")


class _FakeTrainer:
    """Stands in for ``onmt_train``: records its arguments and writes the final checkpoint."""

    def __init__(self, final: Path) -> None:
        self.final, self.commands = final, []

    def __call__(self, command, log, threads, echo=True):
        self.commands.append([str(c) for c in command])
        torch.save(_onmt_checkpoint(), self.final)

    def train_from(self) -> str | None:
        args = self.commands[-1]
        return args[args.index("-train_from") + 1] if "-train_from" in args else None


@pytest.mark.parametrize("damage", [_truncated, _garbage], ids=["truncated", "garbage"])
@pytest.mark.parametrize("broken_step", [300, 400], ids=["newest", "final"])
def test_resume_skips_a_checkpoint_that_does_not_load(
    tmp_path, capsys, monkeypatch, damage, broken_step
):
    work = tmp_path / "work"
    work.mkdir()
    torch.save(_onmt_checkpoint(), work / "student_step_100.pt")
    torch.save(_onmt_checkpoint(), work / "student_step_200.pt")
    damage(work / f"student_step_{broken_step}.pt")
    fake = _FakeTrainer(work / "student_step_400.pt")
    monkeypatch.setattr(translation, "_run", fake)
    init = ["-train_from", str(tmp_path / "init.pt"), "-reset_optim", "all"]
    final = translation.train({}, work, "student", 400, 1, init)
    assert final == work / "student_step_400.pt" and files.load_checkpoint(final)["model"]
    assert fake.train_from() == str(work / "student_step_200.pt")  # the newest that loads
    assert "-reset_optim" not in fake.commands[-1]
    log = capsys.readouterr().out
    skipped = [line for line in log.splitlines() if "skipping" in line]
    assert len(skipped) == 1 and f"student_step_{broken_step}.pt" in skipped[0], log
    assert "resuming student from step 200" in log
    # Finished now: a re-run reads the final checkpoint back and trains nothing.
    assert translation.train({}, work, "student", 400, 1, init) == final
    assert len(fake.commands) == 1


def test_resume_with_nothing_loadable_starts_from_the_initial_weights(
    tmp_path, capsys, monkeypatch
):
    work = tmp_path / "work"
    work.mkdir()
    _truncated(work / "student_step_100.pt")
    fake = _FakeTrainer(work / "student_step_200.pt")
    monkeypatch.setattr(translation, "_run", fake)
    init = ["-train_from", str(tmp_path / "init.pt"), "-reset_optim", "all"]
    translation.train({}, work, "student", 200, 1, init)
    assert fake.commands[-1][-4:] == init
    assert "skipping student_step_100.pt" in capsys.readouterr().out


def test_resume_with_the_real_onmt_train(tmp_path, capsys):
    """The same with OpenNMT-py itself: a truncated newer checkpoint, the real onmt_train
    continues from the older one and writes the final step."""
    from conftest import data_path

    toy = data_path("toy-ende")
    work = tmp_path / "work"
    work.mkdir()
    for side in ("src", "tgt"):
        lines = (toy / f"{side}-train.txt").read_text().splitlines()
        (work / f"train.{side}").write_text("\n".join(lines[:60]) + "\n")
    config = {
        "src_vocab": str(work / "vocab.src"),
        "tgt_vocab": str(work / "vocab.tgt"),
        "data": {
            "corpus_1": {"path_src": str(work / "train.src"), "path_tgt": str(work / "train.tgt")}
        },
        "encoder_type": "rnn",
        "decoder_type": "rnn",
        "rnn_type": "LSTM",
        "layers": 1,
        "hidden_size": 8,
        "word_vec_size": 8,
        "batch_size": 8,
        "batch_type": "sents",
        "report_every": 1,
        "seed": 1,
        "num_workers": 0,
        "bucket_size": 32,
    }
    for side in ("src", "tgt"):  # what onmt_build_vocab writes: "token<TAB>count" lines
        words = Counter((work / f"train.{side}").read_text().split())
        vocab = "".join(f"{w}\t{c}\n" for w, c in words.most_common())
        (work / f"vocab.{side}").write_text(vocab)
    first = translation.train(config, work, "m", 2, 1)
    assert first.name == "m_step_2.pt"
    _truncated(work / "m_step_3.pt")
    capsys.readouterr()
    final = translation.train(config, work, "m", 4, 1)
    out = capsys.readouterr().out
    assert "skipping m_step_3.pt" in out and "resuming m from step 2" in out
    assert files.load_checkpoint(final)["model"]
    assert f"-train_from {work / 'm_step_2.pt'}" in (work / "m.log").read_text()


# ---- 8: every write in recipes/ and benchmarks/ is atomic ------------------------------------

# (file, call) pairs allowed to write directly: bench_packed times torch.save/torch.load
# themselves (into a temporary folder), and the recipe's tool log is appended line by line.
# bench_topk copies into the staging folder of an atomic_directory.
_ALLOWED = {
    ("benchmarks/bench_packed.py", "torch.save"),
    ("benchmarks/bench_packed.py", "torch.load"),
    ("recipes/translation.py", "open"),
    ("benchmarks/bench_topk.py", "shutil.copytree"),
}
_FORBIDDEN = {
    "os.replace",
    "os.rename",
    "shutil.copy",
    "shutil.copyfile",
    "shutil.copy2",
    "shutil.copytree",
    "shutil.move",
    "torch.save",
    "torch.load",
    "save_file",
    "np.save",
    "np.savez",
    "json.dump",
    "open",
    "write_text",
    "write_bytes",
}


def _writes(node: ast.Call) -> bool:
    """Whether an open() call opens for writing (reads are fine)."""
    mode = node.args[1] if len(node.args) > 1 else None
    mode = next((k.value for k in node.keywords if k.arg == "mode"), mode)
    if mode is None:
        return False
    return not isinstance(mode, ast.Constant) or any(c in str(mode.value) for c in "wax+")


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                yield node, func.id
            elif isinstance(func, ast.Attribute):
                base = func.value.id if isinstance(func.value, ast.Name) else None
                yield node, f"{base}.{func.attr}" if base else func.attr
                if base is not None:
                    yield node, func.attr  # write_text, savefig on any object


def test_no_direct_writes_or_unsafe_loads_in_recipes_and_benchmarks():
    found = []
    for folder in ("recipes", "benchmarks"):
        for path in sorted((ROOT / folder).glob("*.py")):
            rel = str(path.relative_to(ROOT))
            for node, name in _calls(ast.parse(path.read_text())):
                if name == "open" and not _writes(node):
                    continue
                if name in _FORBIDDEN and (rel, name) not in _ALLOWED:
                    found.append(f"{rel}:{node.lineno} {name}")
                if name == "savefig":  # into an atomic_write handle, never a path
                    target = node.args[0] if node.args else None
                    if not isinstance(target, ast.Name) or not any(
                        k.arg == "format" for k in node.keywords
                    ):
                        found.append(f"{rel}:{node.lineno} savefig to a path")
    assert not found, "write through compressor.format.files instead: " + ", ".join(found)


class _Crash(Exception):
    """A kill at the moment the data is being made durable."""


@pytest.fixture
def crash_on_fsync(monkeypatch):
    """Every file write fails at its fsync, as a kill there would end it: the earlier file
    must be there, whole, and nothing half-written under the final name."""

    def fsync(fd):
        raise _Crash("killed while writing")

    monkeypatch.setattr(os, "fsync", fsync)


def _write_old(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"the previous, complete result\n")
    return path.read_bytes()


def _intact(path: Path, old: bytes | None) -> None:
    if old is None:
        assert not path.exists(), f"{path} appeared although its write was cut short"
    else:
        assert path.read_bytes() == old, f"{path} was replaced by a write that never finished"
    assert not [
        p
        for p in path.parent.iterdir()
        if not p.name.startswith(".") and p != path and p.name.startswith(path.name)
    ], list(path.parent.iterdir())


def test_small_runs_json_is_atomic(tmp_path, monkeypatch, crash_on_fsync):
    from recipes import small_runs

    monkeypatch.setattr(small_runs, "run_all", lambda cfg: {"teacher fp32": 50.0})
    out = tmp_path / "results.json"
    old = _write_old(out)
    with pytest.raises(_Crash):
        small_runs.main(["--json", str(out), "--steps", "1"])
    _intact(out, old)


def test_benchmark_results_and_report_are_atomic(tmp_path, monkeypatch, crash_on_fsync):
    from benchmarks import common, report

    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    old = _write_old(tmp_path / "results" / "atomic_check.json")
    with pytest.raises(_Crash):
        common.write_result("atomic_check", {"figure": 1.0})
    _intact(tmp_path / "results" / "atomic_check.json", old)

    monkeypatch.setattr(report, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(report, "HERE", tmp_path)
    old = _write_old(tmp_path / "REPORT.md")
    with pytest.raises(_Crash):
        report.main()
    _intact(tmp_path / "REPORT.md", old)
    rows = [
        {
            "name": "teacher",
            "packed_bytes": None,
            "fp32_bytes": 1000,
            "bits": None,
            "accuracy": 80.0,
            "method": "teacher fp32",
        }
    ]
    old = _write_old(tmp_path / "cifar_accuracy_vs_bytes.png")
    with pytest.raises(_Crash):
        report._cifar_plot(rows)
    _intact(tmp_path / "cifar_accuracy_vs_bytes.png", old)


def test_experiment_result_json_is_atomic(tmp_path, monkeypatch):
    from recipes import cifar, experiments

    (tmp_path / "data" / "cifar10").mkdir(parents=True)
    monkeypatch.setattr(cifar, "run", lambda *args, **kwargs: [{"name": "teacher"}])
    recipe = experiments.load_recipe("cifar10")
    first = experiments.run_recipe(recipe, "cpu", tmp_path / "out", data_root=tmp_path / "data")
    saved = (tmp_path / "out" / "result.json").read_bytes()
    assert json.loads(saved)["rows"] == first["rows"]

    def fsync(fd):
        raise _Crash("killed while writing")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(_Crash):
        experiments.run_recipe(recipe, "cpu", tmp_path / "out", data_root=tmp_path / "data")
    _intact(tmp_path / "out" / "result.json", saved)


def test_translation_recipe_files_are_atomic(tmp_path, crash_on_fsync):
    work = tmp_path / "work"
    work.mkdir()
    # The deployable checkpoint without optimizer state: absent, never half there.
    source = work / "teacher_step_10.pt"
    torch.save(_onmt_checkpoint(), source)
    with pytest.raises(_Crash):
        translation.strip_optimizer(source, work / "teacher.pt")
    _intact(work / "teacher.pt", None)
    # The report and its plot.
    row = {
        "name": "teacher",
        "bytes": 1000,
        "bleu": 30.0,
        "compression": 1.0,
        "chrf": 50.0,
        "ppl_word": 10.0,
        "tokens_per_s": 100.0,
        "agreement_bleu": None,
        "extra": {},
    }
    scale = {
        "name": "t",
        "vocab_size": 10,
        "teacher_layers": 2,
        "hidden_size": 8,
        "teacher_steps": 1,
        "student_layers": 1,
        "student_steps": 1,
    }
    result = {
        "rows": [row],
        "scale": scale,
        "corpus": "c",
        "counts": {"train.src": 1, "test.src": 1},
    }
    old_png = _write_old(work / "bleu_vs_size.png")
    with pytest.raises(_Crash):
        translation.write_report(result, work)
    _intact(work / "bleu_vs_size.png", old_png)


def test_sentencepiece_models_are_atomic(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    train = {}
    for side in ("src", "tgt"):
        train[f"train.{side}"] = tmp_path / f"train.{side}"
        train[f"train.{side}"].write_text("".join(f"word{i} other{i % 7} x\n" for i in range(200)))
    scale = translation.TranslationScale(vocab_size=30, threads=1)

    def fsync(fd):
        raise _Crash("killed while writing")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(_Crash):
        translation.train_sentencepiece(train, scale, work)
    _intact(work / "spm.src.vocab", None)
    _intact(work / "spm.src.model", None)
    monkeypatch.undo()
    translation.train_sentencepiece(train, scale, work)  # the next run completes the step
    assert (work / "spm.tgt.model").stat().st_size > 0


def test_cifar_recipe_files_are_atomic_and_a_damaged_model_is_retrained(
    tmp_path, capsys, monkeypatch
):
    from recipes import cifar
    from recipes import small_runs as runs

    model = runs.tiny_cnn(4, 1)
    old = _write_old(tmp_path / "m.fp32.safetensors")

    def fsync(fd):
        raise _Crash("killed while writing")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(_Crash):
        cifar._fp32_bytes(model, tmp_path / "m.fp32.safetensors")
    _intact(tmp_path / "m.fp32.safetensors", old)
    monkeypatch.undo()
    # A kept model that does not load (cut short by an older version) is trained again.
    cfg = runs.SmallRunConfig(teacher_width=4, teacher_depth=1)
    _truncated(tmp_path / "teacher.pt")
    parameters = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "device"}
    (tmp_path / "teacher.parameters.json").write_text(json.dumps(parameters))
    models = cifar._Models(cfg, {}, tmp_path)
    trained = []
    monkeypatch.setattr(runs, "train_teacher", lambda data, cfg: trained.append(1) or model)
    assert models.get("teacher") is model and trained == [1]
    assert "teacher.pt does not load" in capsys.readouterr().out
    reloaded = cifar._Models(cfg, {}, tmp_path).get("teacher")
    assert torch.equal(reloaded[0].weight, model[0].weight) and trained == [1]
    # A kept model trained with other parameters (a longer run's teacher) is trained again.
    longer = cifar._Models(dataclasses.replace(cfg, steps=cfg.steps * 10), {}, tmp_path)
    assert longer.get("teacher") is model and trained == [1, 1]
    assert "teacher.pt was trained with other parameters" in capsys.readouterr().out


# ---- 10: one safe loader; shrink vision takes the references' checkpoints ---------------------


@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resnet18")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    references = {
        "model": model.state_dict(),
        "optimizer": None,
        "lr_scheduler": None,
        "epoch": 3,
        "args": argparse.Namespace(model="resnet18", lr=0.1, epochs=4),
    }
    torch.save(references, folder / "checkpoint.pth")
    torch.save(model.state_dict(), folder / "plain.pth")
    torch.save(torchvision.models.resnet34(num_classes=10).state_dict(), folder / "r34.pth")
    torch.save({"features.0.weight": torch.randn(4, 3, 3, 3)}, folder / "vgg_like.pth")
    torch.save({"a": torch.zeros(3)}, folder / "not_a_model.pth")
    torch.save(_onmt_checkpoint(), folder / "onmt.pt")
    (folder / "empty.pth").write_bytes(b"")
    (folder / "text.pth").write_text("hello\n")
    (folder / "a_folder").mkdir()
    return folder


def test_shrink_vision_takes_a_references_checkpoint_with_namespace_args(resnet18_files, tmp_path):
    """What vision_plugin.train and torchvision's references write: ``args`` is an
    argparse.Namespace. A fresh process: the allow-list is process-wide once anything set it."""
    source = resnet18_files / "checkpoint.pth"
    out = tmp_path / "student.pth"
    done = subprocess.run(
        [
            QDISTILL,
            "shrink",
            "vision",
            "--arch",
            "resnet18",
            "--checkpoint",
            source,
            "--blocks",
            "1,1,1,1",
            "-o",
            out,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    student = files.load_checkpoint(out)
    teacher = files.load_checkpoint(source)["model"]
    assert torch.equal(student["model"]["layer4.0.conv1.weight"], teacher["layer4.0.conv1.weight"])
    assert student["args"]["blocks"] == [1, 1, 1, 1]
    assert json.loads(done.stdout)["output"] == str(out)


def test_recipes_use_the_one_safe_loader():
    from recipes import shrink_onmt, shrink_vision

    assert shrink_onmt.load_checkpoint is files.load_checkpoint
    assert shrink_vision.load_checkpoint is files.load_checkpoint


# ---- 2: shrink never replaces its input, nor a file it did not write -------------------------


def _shrink(kind: str, source: Path, out: Path, *extra) -> list:
    if kind == "onmt":
        return ["shrink", "onmt", "--checkpoint", source, "--enc-layers", "1", "-o", out, *extra]
    return [
        "shrink",
        "vision",
        "--arch",
        "resnet18",
        "--checkpoint",
        source,
        "--blocks",
        "1,1,1,1",
        "-o",
        out,
        *extra,
    ]


def _source(kind: str, resnet18_files: Path, tmp_path: Path) -> Path:
    source = tmp_path / ("teacher.pt" if kind == "onmt" else "teacher.pth")
    if kind == "onmt":
        torch.save(_onmt_checkpoint(), source)
    else:
        source.write_bytes((resnet18_files / "checkpoint.pth").read_bytes())
    return source


@pytest.mark.parametrize("kind", ["onmt", "vision"])
@pytest.mark.parametrize("force", [False, True], ids=["", "force"])
@pytest.mark.parametrize("via", ["same", "symlink", "hardlink"])
def test_shrink_refuses_to_write_over_its_input(kind, force, via, resnet18_files, tmp_path, capsys):
    source = _source(kind, resnet18_files, tmp_path)
    before = source.read_bytes()
    out = source
    if via == "symlink":
        out = tmp_path / "link.pt"
        out.symlink_to(source)
    elif via == "hardlink":
        out = tmp_path / "hard.pt"
        os.link(source, out)
    code, _, err = _run_cli(capsys, *_shrink(kind, source, out, *(["--force"] if force else [])))
    assert "is also an input" in _one_line_error(code, err)
    assert source.read_bytes() == before


@pytest.mark.parametrize("kind", ["onmt", "vision"])
def test_shrink_force_replaces_only_its_own_earlier_output(kind, resnet18_files, tmp_path, capsys):
    source = _source(kind, resnet18_files, tmp_path)
    users = tmp_path / "users_model.pt"
    torch.save(_onmt_checkpoint(), users)
    users_bytes = users.read_bytes()
    for extra in ([], ["--force"]):
        code, _, err = _run_cli(capsys, *_shrink(kind, source, users, *extra))
        line = _one_line_error(code, err)
        assert ("pass --force" in line) if not extra else ("not a file that" in line)
        assert users.read_bytes() == users_bytes
    out = tmp_path / "student.pt"
    code, _, err = _run_cli(capsys, *_shrink(kind, source, out))
    assert code == 0, err
    assert files.written_by(out) == "shrink"
    code, _, err = _run_cli(capsys, *_shrink(kind, source, out))
    assert "pass --force" in _one_line_error(code, err)
    first = out.stat().st_mtime_ns
    code, _, err = _run_cli(capsys, *_shrink(kind, source, out, "--force"))
    assert code == 0, err
    assert out.stat().st_mtime_ns >= first and files.written_by(out) == "shrink"


# ---- 11: bad input is a one-line error, exit 2 -----------------------------------------------

_VISION_BAD = [
    ("empty.pth", [], "is empty"),
    ("text.pth", [], "not a PyTorch checkpoint"),
    ("a_folder", [], "is a directory"),
    ("missing.pth", [], "does not exist"),
    ("not_a_model.pth", [], "not a torchvision ResNet"),
    ("vgg_like.pth", [], "not a torchvision ResNet"),
    ("onmt.pt", [], "not a torchvision ResNet"),
    ("r34.pth", [], "3,4,6,3 basic blocks per stage, not resnet18's 2,2,2,2"),
    ("plain.pth", ["--num-classes", "-3"], "--num-classes must be 1 or more, got -3"),
    ("plain.pth", ["--num-classes", "0"], "--num-classes must be 1 or more"),
]


@pytest.mark.parametrize("name, extra, message", _VISION_BAD)
def test_shrink_vision_bad_checkpoints(name, extra, message, resnet18_files, tmp_path, capsys):
    out = tmp_path / "student.pth"
    code, _, err = _run_cli(
        capsys,
        "shrink",
        "vision",
        "--arch",
        "resnet18",
        "--checkpoint",
        resnet18_files / name,
        "--blocks",
        "1,1,1,1",
        "-o",
        out,
        *extra,
    )
    assert message in _one_line_error(code, err)
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--blocks", "2,2"], "needs 4 values"),
        (["--blocks", "a,b,c,d"], "must be integers"),
        (["--blocks", "0,1,1,1"], "at least one block"),
        (["--blocks", "3,1,1,1"], "only 2"),
        (["--blocks", "1,1,1,1", "--select", "0/0/0/x"], "not 'first', 'even' or a list"),
        (["--layers", "3"], "is shrunk by blocks per stage"),
        (["--blocks", "1,1,1,1", "--layers", "3"], "not --layers"),
        (["--blocks", "1,1,1,1", "--arch", "resnet35"], "unknown --arch"),
    ],
)
def test_shrink_vision_bad_options(args, message, resnet18_files, tmp_path, capsys):
    out = tmp_path / "student.pth"
    arch = [] if "--arch" in args else ["--arch", "resnet18"]
    code, _, err = _run_cli(
        capsys,
        "shrink",
        "vision",
        *arch,
        "--checkpoint",
        resnet18_files / "plain.pth",
        *args,
        "-o",
        out,
    )
    assert message in _one_line_error(code, err)
    assert not out.exists()


def test_shrink_vgg_bad_input(resnet18_files, tmp_path, capsys):
    out = tmp_path / "student.pth"
    cmd = ["shrink", "vision", "--arch", "vgg11", "-o", out]
    for checkpoint, extra, message in (
        ("plain.pth", ["--layers", "3"], "not a torchvision VGG"),
        ("plain.pth", ["--layers", "3", "--num-classes", "-3"], "--num-classes must be 1"),
        ("plain.pth", ["--blocks", "1,1,1,1", "--layers", "3"], "not --blocks"),
    ):
        code, _, err = _run_cli(capsys, *cmd, "--checkpoint", resnet18_files / checkpoint, *extra)
        assert message in _one_line_error(code, err)
    assert not out.exists()


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("empty.pth", ["--enc-layers", "1"], "is empty"),
        ("text.pth", ["--enc-layers", "1"], "not a PyTorch checkpoint"),
        ("a_folder", ["--enc-layers", "1"], "is a directory"),
        ("plain.pth", ["--enc-layers", "1"], "not an OpenNMT-py checkpoint"),
        ("onmt.pt", ["--enc-layers", "0"], "--enc-layers must be 1 or more"),
        ("onmt.pt", ["--dec-layers", "-2"], "--dec-layers must be 1 or more"),
        ("onmt.pt", ["--enc-layers", "3"], "only 2"),
        ("onmt.pt", ["--enc-layers", "1", "--enc-select", "x"], "not 'first', 'even' or a list"),
        ("onmt.pt", ["--enc-layers", "1", "--enc-select", "1"], "keep layer 0"),
        ("onmt.pt", [], "nothing to shrink"),
    ],
)
def test_shrink_onmt_bad_input(name, args, message, resnet18_files, tmp_path, capsys):
    out = tmp_path / "student.pt"
    code, _, err = _run_cli(
        capsys, "shrink", "onmt", "--checkpoint", resnet18_files / name, *args, "-o", out
    )
    assert message in _one_line_error(code, err)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["onmt", "vision"])
def test_shrink_output_folders(kind, resnet18_files, tmp_path, capsys):
    source = _source(kind, resnet18_files, tmp_path)
    nested = tmp_path / "new" / "folder" / "student.pt"  # created, as pack does
    code, _, err = _run_cli(capsys, *_shrink(kind, source, nested))
    assert code == 0, err
    assert files.written_by(nested) == "shrink"
    code, _, err = _run_cli(capsys, *_shrink(kind, source, tmp_path / "new"))
    assert "is a directory" in _one_line_error(code, err)
    (tmp_path / "a_file").write_text("x")
    code, _, err = _run_cli(capsys, *_shrink(kind, source, tmp_path / "a_file" / "s.pt"))
    assert "is a file, not a folder" in _one_line_error(code, err)


def test_shrink_errors_through_the_installed_command(resnet18_files, tmp_path):
    done = subprocess.run(
        [
            QDISTILL,
            "shrink",
            "vision",
            "--arch",
            "resnet18",
            "--checkpoint",
            resnet18_files / "empty.pth",
            "--blocks",
            "1,1,1,1",
            "-o",
            tmp_path / "s.pth",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qdistill shrink: error: "), done.stderr
    assert "empty.pth is empty" in lines[0]


# ---- 11: the recipes ---------------------------------------------------------------------------


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: [\n", "is not valid YAML at line 2"),
        ("name: x\nengine: cifar\ndata: cifar10\nscales: 3\n", "scales must map"),
        ("name: x\nengine: cifar\ndata: cifar10\nscales: {cpu: 3}\n", "scales.cpu must be"),
        (
            "name: x\nengine: cifar\ndata: cifar10\nscales: {cpu: {steps: -3}}\n",
            "parameter steps: must be 0 or more, got -3",
        ),
        (
            "name: x\nengine: cifar\ndata: cifar10\nscales: {cpu: {steps: abc}}\n",
            "parameter steps: must be an integer",
        ),
        (
            "name: x\nengine: cifar\ndata: cifar10\nscales: {cpu: {lr: 1e-3}}\n",
            "parameter lr: must be a number (write 0.001",
        ),
        (
            "name: x\nengine: cifar\ndata: cifar10\nscales: {cpu: {device: gpu}}\n",
            "parameter device: must be a torch device",
        ),
        (
            "name: x\nengine: cifar\ndata: cifar10\nscales: {cpu: {alpha: 2}}\n",
            "parameter alpha: must be from 0 to 1",
        ),
        (
            "name: x\nengine: translation\ndata: toy\nscales: {cpu: {bits: 3}}\n",
            "parameter bits: must be a list of integers",
        ),
        (
            "name: x\nengine: translation\ndata: toy\nscales: {cpu: {bits: [4, 16]}}\n",
            "bit widths must be from 1 to 8",
        ),
        (
            "name: x\nengine: translation\ndata: toy\nscales: {cpu: {gpu: 1}}\n",
            "parameter gpu: must be true or false",
        ),
    ],
)
def test_bad_recipe_files(text, message, tmp_path, capsys):
    recipe = _recipe(tmp_path, text)
    code, _, err = _run_cli(capsys, "recipe", "run", recipe, "--output-dir", tmp_path / "out")
    assert message in _one_line_error(code, err, "recipe")
    assert not (tmp_path / "out").exists()


def test_recipe_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "data" / "cifar10").mkdir(parents=True)
    (tmp_path / "taken").write_text("the user's file\n")
    for output in ("taken", "taken/sub"):
        code, _, err = _run_cli(
            capsys,
            "recipe",
            "run",
            "cifar10",
            "--smoke",
            "--data-path",
            tmp_path / "data",
            "--output-dir",
            tmp_path / output,
        )
        assert "is a file, not a folder" in _one_line_error(code, err, "recipe")
    assert (tmp_path / "taken").read_text() == "the user's file\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the paper scale runs where a GPU is")
def test_paper_scale_without_a_gpu(tmp_path, capsys):
    (tmp_path / "data" / "cifar10").mkdir(parents=True)
    code, _, err = _run_cli(
        capsys,
        "recipe",
        "run",
        "cifar10",
        "--scale",
        "paper",
        "--data-path",
        tmp_path / "data",
        "--output-dir",
        tmp_path / "out",
    )
    assert "trains on a GPU and none is available" in _one_line_error(code, err, "recipe")
