"""A packed OpenNMT-py transformer (issue 18, item 4): its sinusoidal position encodings (the
``pe`` buffers, max_len x d_model fp32 on each side) are left out of the file and rebuilt by
OpenNMT-py's own constructor at load, only where that rebuild is bit-exact; ``qdistill
inspect`` says so; ``onmt_translate -model x.qd`` translates exactly as the unpacked quantized
checkpoint; and a transformer student trained on the int4 kernel grid runs on the int4 runtime
(issue 16)."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BIN, data_path

import compressor
from compressor.format.packed import load_packed, packed_info
from onmt_plugin import packing

PE = ("encoder.embeddings.make_embedding.pe.pe", "decoder.embeddings.make_embedding.pe.pe")
DIM = 32  # the smallest width whose rows are whole groups of the int4 kernel (32)


def _run(args, cwd, runtime: str | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QDISTILL_ONMT_PLUGIN": "1"}
    if runtime is not None:
        env["QDISTILL_RUNTIME"] = runtime
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600
    )
    if done.returncode != 0:
        raise AssertionError(f"{args[:2]} failed:\n{done.stderr[-3000:]}")
    return done


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A 2+2-layer transformer teacher (10 steps) and a 1+1-layer 4-bit student distilled from
    it on the int4 kernel grid in groups of 32 (10 steps), both packed."""
    folder = tmp_path_factory.mktemp("onmt_transformer")
    toy = data_path("toy-ende")
    for name, lines in (("src-train", 300), ("tgt-train", 300), ("src-val", 12), ("tgt-val", 12)):
        text = (toy / f"{name}.txt").read_text().splitlines()[:lines]
        (folder / f"{name}.txt").write_text("\n".join(text) + "\n")
    config = {
        "src_vocab": "vocab.src",
        "tgt_vocab": "vocab.tgt",
        "src_vocab_size": 300,
        "tgt_vocab_size": 300,
        "save_data": "vocab",
        "overwrite": True,
        "data": {
            "corpus_1": {"path_src": "src-train.txt", "path_tgt": "tgt-train.txt"},
            "valid": {"path_src": "src-val.txt", "path_tgt": "tgt-val.txt"},
        },
        "encoder_type": "transformer",
        "decoder_type": "transformer",
        "position_encoding": True,
        "hidden_size": DIM,
        "word_vec_size": DIM,
        "heads": 2,
        "transformer_ff": 2 * DIM,
        "batch_size": 16,
        "batch_type": "sents",
        "train_steps": 10,
        "save_checkpoint_steps": 10,
        "valid_steps": 10,
        "seed": 1,
        "num_workers": 0,
    }
    (folder / "c.yaml").write_text(yaml.safe_dump(config))
    _run([BIN / "onmt_build_vocab", "-config", "c.yaml", "-n_sample", "300"], folder)
    _run(
        [BIN / "onmt_train", "-config", "c.yaml", "-layers", "2", "-save_model", "teacher"], folder
    )
    student = [BIN / "onmt_train", "-config", "c.yaml", "-layers", "1", "-save_model", "student"]
    quantized = ["-quantized_distill", "-teacher_model", "teacher_step_10.pt"]
    kernel = ["-quant_grid", "int4_kernel", "-quant_bucket_size", "32"]
    distill = _run([*student, *quantized, *kernel], folder)
    assert "int4 kernel grid" in distill.stderr + distill.stdout
    _run([BIN / "qdistill", "pack", "student_step_10.pt", "-o", "student.qd"], folder)
    _run([BIN / "qdistill", "pack", "teacher_step_10.pt", "-o", "teacher.qd"], folder)
    return folder


def _checkpoint(path: Path) -> dict:
    torch.serialization.add_safe_globals([argparse.Namespace])
    return torch.load(path, weights_only=True)


def test_the_position_encodings_are_left_out_and_inspect_says_why(folder):
    pe_bytes = 2 * 5000 * DIM * 4
    rows = {r.name: r for r in packed_info(folder / "student.qd")}
    for name in PE:
        assert rows[name].coding == "rebuilt" and rows[name].stored_bytes == 0
        assert "PositionalEncoding" in rows[name].rebuilt
    # Before, the two buffers alone (1.28 MB) made the file as big as the fp32 model.
    size = (folder / "student.qd").stat().st_size
    assert size * 20 < pe_bytes, size
    teacher = folder / "teacher.qd"
    assert teacher.stat().st_size * 10 < (folder / "teacher_step_10.pt").stat().st_size

    shown = _run([BIN / "qdistill", "inspect", "student.qd"], folder).stdout
    assert f"left out of the file, rebuilt at load: 2 tensors, {pe_bytes:,} bytes" in shown
    for name in PE:
        assert f"  {name} [5000, 1, {DIM}] float32: sinusoidal position encoding" in shown


def test_the_rebuilt_encodings_are_the_stored_ones_bit_for_bit(folder):
    stored = _checkpoint(folder / "student_step_10.pt")["model"]
    state, metadata = load_packed(folder / "student.qd")
    assert all(state[name].is_meta for name in PE)
    rebuilt = packing.load(folder / "student.qd")["model"]
    for name in PE:
        assert torch.equal(rebuilt[name], stored[name])


def test_an_encoding_the_rebuild_does_not_reproduce_is_stored(folder):
    """Only a bit-exact rebuild is dropped: one changed value keeps that buffer in the file."""
    checkpoint = _checkpoint(folder / "teacher_step_10.pt")
    changed = checkpoint["model"][PE[0]]
    changed[7, 0, 3] = torch.nextafter(changed[7, 0, 3], torch.tensor(2.0))
    torch.save(checkpoint, folder / "changed.pt")
    state, metadata = packing.from_checkpoint(checkpoint)
    assert list(packing.rebuilt_at_load(state, metadata)) == [PE[1]]
    _run([BIN / "qdistill", "pack", "changed.pt", "-o", "changed.qd"], folder)
    rows = {r.name: r for r in packed_info(folder / "changed.qd")}
    assert rows[PE[0]].coding == "raw" and rows[PE[1]].coding == "rebuilt"
    assert torch.equal(packing.load(folder / "changed.qd")["model"][PE[0]], changed)


def _translate(folder: Path, model: str, out: str, runtime: str | None = None):
    args = [BIN / "onmt_translate", "-model", model, "-src", "src-val.txt", "-output", out]
    return _run([*args, "-gpu", "-1", "-beam_size", "3"], folder, runtime)


@pytest.fixture(scope="module")
def fp32_translation(folder) -> list[str]:
    """The packed student's translations on the fp32 path (its decoded weights)."""
    done = _translate(folder, "student.qd", "fp32.txt", runtime="fp32")
    assert "qdistill: runtime fp32 (QDISTILL_RUNTIME=fp32)" in done.stderr
    return (folder / "fp32.txt").read_text().splitlines()


def test_onmt_translate_of_the_packed_file_matches_the_checkpoint(folder, fp32_translation):
    _translate(folder, "student_step_10.pt", "checkpoint.txt")
    assert (folder / "checkpoint.txt").read_text().splitlines() == fp32_translation
    assert len(fp32_translation) == 12


@pytest.mark.skipif(
    not compressor.int4_kernel_available(), reason="this PyTorch has no CPU int4 kernel"
)
def test_the_transformer_student_runs_on_the_int4_runtime(folder, fp32_translation):
    done = _translate(folder, "student.qd", "int4.txt")
    assert "qdistill: runtime int4 (modules:" in done.stderr
    int4 = (folder / "int4.txt").read_text().splitlines()
    assert len(int4) == len(fp32_translation)
    # bf16 activations may change a near-tie in the search, rarely: most sentences agree.
    assert sum(a == b for a, b in zip(int4, fp32_translation)) >= 9
