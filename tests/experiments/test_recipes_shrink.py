"""Depth shrinking of real torchvision and OpenNMT-py teachers, through the API and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from conftest import BIN
from torch import nn

from compressor.format.files import load_checkpoint
from recipes.shrink_onmt import shrink_onmt_checkpoint, shrink_onmt_file
from recipes.shrink_vision import shrink_resnet, shrink_sequential, shrink_vgg, vgg_student


def test_resnet34_to_2222_is_resnet18_and_copies_selected_blocks():
    teacher = torchvision.models.resnet34(num_classes=10).eval()
    student, summary = shrink_resnet(teacher, "resnet34", [2, 2, 2, 2], select="even")
    assert summary["kept"] == [[0, 2], [0, 3], [0, 5], [0, 2]]
    resnet18 = torchvision.models.resnet18(num_classes=10)
    resnet18.load_state_dict(student.state_dict())  # exactly resnet18's architecture
    assert torch.equal(student.layer3[1].conv1.weight, teacher.layer3[5].conv1.weight)
    assert torch.equal(student.fc.weight, teacher.fc.weight)
    assert student.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_cifar_stem_and_num_classes():
    teacher = torchvision.models.resnet18(num_classes=10)
    student, _ = shrink_resnet(teacher, "resnet18", [1, 1, 1, 1], num_classes=7, cifar_stem=True)
    assert student.conv1.kernel_size == (3, 3) and isinstance(student.maxpool, nn.Identity)
    assert student(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize(
    "blocks, select, message",
    [
        ([3, 5, 6, 3], "first", "only 4"),
        ([2, 0, 2, 2], "first", "at least one block"),
        ([2, 2, 2, 2], "0,1/0,9/0,1/0,1", "out of range"),
        ([2, 2], "first", "needs 4 values"),
    ],
)
def test_impossible_resnet_requests(blocks, select, message):
    teacher = torchvision.models.resnet34(num_classes=10)
    with pytest.raises(ValueError, match=message):
        shrink_resnet(teacher, "resnet34", blocks, select=select)


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture"):
        shrink_resnet({}, "resnet35", [1, 1, 1, 1])


def test_vgg_features_keep_chaining_convs_only():
    features = torchvision.models.vgg11(num_classes=10).features
    # vgg11 convs: 3-64, 64-128, 128-256, 256-256, 256-512, 512-512, 512-512, 512-512
    shrunk, summary = shrink_sequential(features, 6, "0,1,2,4,6,7")
    assert summary["kept"] == [0, 1, 2, 4, 6, 7]
    assert shrunk(torch.randn(1, 3, 32, 32)).shape[1] == 512
    with pytest.raises(ValueError, match="channels chain"):
        shrink_sequential(features, 3, "0,2,7")


def test_vgg_student_from_the_teachers_conv_layers_reloads_and_runs(tmp_path):
    teacher = torchvision.models.vgg11_bn(num_classes=10)
    student, summary = shrink_vgg(teacher.state_dict(), "vgg11_bn", 6, "0,1,2,4,6,7")
    assert summary["conv_layers"] == [8, 6] and summary["num_classes"] == 10
    convs = [m for m in student.features if isinstance(m, torch.nn.Conv2d)]
    teacher_convs = [m for m in teacher.features if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 6 and torch.equal(convs[3].weight, teacher_convs[4].weight)
    assert torch.equal(student.classifier[6].weight, teacher.classifier[6].weight)
    student.eval()  # a training-mode forward would move the BatchNorm statistics
    assert student(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # The CLI writes a references checkpoint; vgg_student rebuilds the architecture to load it.
    path, out = tmp_path / "vgg.pth", tmp_path / "student.pth"
    torch.save({"model": teacher.state_dict()}, path)
    cmd = [BIN / "qdistill", "shrink", "vision", "--arch", "vgg11_bn", "--checkpoint", path]
    done = subprocess.run(
        [*cmd, "--layers", "6", "--select", "0,1,2,4,6,7", "-o", out],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    checkpoint = torch.load(out, weights_only=True)
    rebuilt = vgg_student("vgg11_bn", checkpoint["args"]["kept"], num_classes=10)
    rebuilt.load_state_dict(checkpoint["model"])
    rebuilt.eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(rebuilt(x), student(x))
    for extra, message in (
        (["--layers", "3", "--select", "0,2,7"], "channels chain"),
        (["--blocks", "2,2,2,2"], "pass --layers N"),
    ):
        bad_out = tmp_path / "bad.pth"
        bad = subprocess.run([*cmd, *extra, "-o", bad_out], capture_output=True, text=True)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr
        assert not bad_out.exists()


def test_cli_writes_references_checkpoint_and_reports_errors(tmp_path):
    teacher = tmp_path / "teacher.pth"
    torch.save({"model": torchvision.models.resnet34(num_classes=10).state_dict()}, teacher)
    out = tmp_path / "student.pth"
    cmd = [BIN / "qdistill", "shrink", "vision", "--arch", "resnet34", "--checkpoint", teacher]
    done = subprocess.run([*cmd, "--blocks", "2,2,2,2", "-o", out], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert '"kept": [[0, 1], [0, 1], [0, 1], [0, 1]]' in done.stdout
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["epoch"] == 0 and checkpoint["args"]["blocks"] == [2, 2, 2, 2]
    bad = subprocess.run([*cmd, "--blocks", "4,4,6,3", "-o", out], capture_output=True, text=True)
    assert bad.returncode == 2 and "only 3" in bad.stderr and "Traceback" not in bad.stderr


def test_shrunk_student_starts_with_lower_loss_than_random(cifar10_dir):
    import numpy as np

    from vision_plugin.models import cifar_stem_

    torch.manual_seed(0)
    data = np.load(cifar10_dir / "train.npz")
    x = torch.tensor(data["images"][:1024]).permute(0, 3, 1, 2).float() / 255 - 0.5
    x = nn.functional.avg_pool2d(x, 2)  # 16x16: keeps the teacher's training to seconds
    y = torch.tensor(data["labels"][:1024])
    teacher = cifar_stem_(torchvision.models.resnet18(num_classes=10))
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-3)
    for step in range(20):
        batch = slice(64 * (step % 12), 64 * (step % 12) + 64)
        loss = nn.functional.cross_entropy(teacher(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    student, _ = shrink_resnet(teacher, "resnet18", [1, 1, 1, 1], cifar_stem=True)
    random_student, _ = shrink_resnet(
        torchvision.models.resnet18(num_classes=10), "resnet18", [1, 1, 1, 1], cifar_stem=True
    )
    held_out_x, held_out_y = x[768:], y[768:]
    with torch.no_grad():  # batch statistics: the teacher's running ones are barely warmed up
        shrunk_loss = nn.functional.cross_entropy(student.train()(held_out_x), held_out_y)
        random_loss = nn.functional.cross_entropy(random_student.train()(held_out_x), held_out_y)
    print(f"initial loss: shrunk {shrunk_loss:.3f}, random {random_loss:.3f}")
    assert shrunk_loss < random_loss - 0.1


# ---- OpenNMT-py -------------------------------------------------------------------------------

STOCK_TRANSLATE = (
    "import argparse, torch; torch.serialization.add_safe_globals([argparse.Namespace]); "
    "from onmt.bin.translate import main; main()"
)
STOCK_TRAIN = STOCK_TRANSLATE.replace("translate", "train")


def _run(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QDISTILL_ONMT_PLUGIN": "0"}
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        raise AssertionError(f"{args[:3]} failed:\n{done.stderr[-3000:]}")
    return done


def _config(folder: Path, kind: str) -> Path:
    model = (
        {"encoder_type": "rnn", "decoder_type": "rnn", "rnn_type": "LSTM"}
        if kind == "lstm"
        else {
            "encoder_type": "transformer",
            "decoder_type": "transformer",
            "heads": 2,
            "transformer_ff": 32,
            "position_encoding": True,
        }
    )
    config = {
        "src_vocab": "vocab.src",
        "tgt_vocab": "vocab.tgt",
        "src_vocab_size": 300,
        "tgt_vocab_size": 300,
        "data": {"corpus_1": {"path_src": "src-train.txt", "path_tgt": "tgt-train.txt"}},
        "layers": 2,
        "hidden_size": 16,
        "word_vec_size": 16,
        "batch_size": 16,
        "batch_type": "sents",
        "save_checkpoint_steps": 6,
        "train_steps": 6,
        "report_every": 3,
        "seed": 1,
        "num_workers": 0,
        **model,
    }
    path = folder / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def onmt_teachers(tmp_path_factory):
    from conftest import data_path

    toy = data_path("toy-ende")
    folder = tmp_path_factory.mktemp("shrink_onmt")
    for name, lines in (("src-train", 200), ("tgt-train", 200), ("src-val", 5)):
        text = (toy / f"{name}.txt").read_text().splitlines()[:lines]
        (folder / f"{name}.txt").write_text("\n".join(text) + "\n")
    config = yaml.safe_load(_config(folder, "lstm").read_text())
    (folder / "vocab.yaml").write_text(yaml.safe_dump({**config, "save_data": "v"}))
    _run([BIN / "onmt_build_vocab", "-config", "vocab.yaml", "-n_sample", "200"], folder)
    for kind in ("lstm", "transformer"):
        _run([BIN / "onmt_train", "-config", _config(folder, kind), "-save_model", kind], folder)
    return folder


@pytest.mark.parametrize("kind", ["lstm", "transformer"])
def test_shrunk_onmt_translates_and_trains_from(onmt_teachers, kind):
    folder = onmt_teachers
    teacher = load_checkpoint(folder / f"{kind}_step_6.pt")
    shrunk, summary = shrink_onmt_checkpoint(teacher, enc_layers=1, dec_layers=1, dec_select="0")
    assert summary["encoder_layers"] == [2, 1] and "optim" not in shrunk
    assert shrunk["opt"].enc_layers == 1 and shrunk["opt"].dec_layers == 1
    assert len(shrunk["model"]) < len(teacher["model"])
    student = f"{kind}_student.pt"
    done = subprocess.run(
        [
            BIN / "qdistill",
            "shrink",
            "onmt",
            "--checkpoint",
            f"{kind}_step_6.pt",
            "--enc-layers",
            "1",
            "--dec-layers",
            "1",
            "-o",
            student,
        ],
        cwd=folder,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    out = f"{kind}_pred.txt"
    _run(
        [
            sys.executable,
            "-c",
            STOCK_TRANSLATE,
            "-model",
            student,
            "-src",
            "src-val.txt",
            "-output",
            out,
            "-max_length",
            "10",
        ],
        folder,
    )
    assert len((folder / out).read_text().splitlines()) == 5
    _run(
        [
            sys.executable,
            "-c",
            STOCK_TRAIN,
            "-config",
            f"{kind}.yaml",
            "-save_model",
            f"{kind}_ft",
            "-train_from",
            student,
            "-train_steps",
            "9",
            "-save_checkpoint_steps",
            "9",
            "-reset_optim",
            "all",
        ],
        folder,
    )
    trained = load_checkpoint(folder / f"{kind}_ft_step_9.pt")
    assert trained["opt"].enc_layers == 1


def test_onmt_errors(onmt_teachers, tmp_path):
    with pytest.raises(ValueError, match="only 2"):
        shrink_onmt_file(onmt_teachers / "lstm_step_6.pt", tmp_path / "x.pt", enc_layers=3)
    with pytest.raises(ValueError, match="out of range"):
        shrink_onmt_file(
            onmt_teachers / "lstm_step_6.pt", tmp_path / "x.pt", dec_layers=1, dec_select="5"
        )
