"""The OpenNMT-py plugin with the real, stock OpenNMT-py 3.5.1 tools on a slice of the toy
en-de data: options, quantized distillation, checkpoints, resume, packing, PM, errors."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BIN

STOCK_TRANSLATE = (
    "import argparse, torch; torch.serialization.add_safe_globals([argparse.Namespace]); "
    "from onmt.bin.translate import main; main()"
)


def _env(plugin: bool = True) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "QDISTILL_ONMT_PLUGIN": "1" if plugin else "0"}


def _run(args, cwd, plugin=True, check=True):
    done = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, env=_env(plugin), timeout=600
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{args[:2]} failed:\n{done.stderr[-3000:]}")
    return done


def _config(folder: Path, layers: int = 1, **extra) -> Path:
    config = {
        "src_vocab": "vocab.src",
        "tgt_vocab": "vocab.tgt",
        "src_vocab_size": 500,
        "tgt_vocab_size": 500,
        "data": {
            "corpus_1": {"path_src": "src-train.txt", "path_tgt": "tgt-train.txt"},
            "valid": {"path_src": "src-val.txt", "path_tgt": "tgt-val.txt"},
        },
        "encoder_type": "rnn",
        "decoder_type": "rnn",
        "rnn_type": "LSTM",
        "layers": layers,
        "hidden_size": 32,
        "word_vec_size": 32,
        "batch_size": 16,
        "batch_type": "sents",
        "valid_steps": 10,
        "save_checkpoint_steps": 10,
        "train_steps": 10,
        "report_every": 5,
        "seed": 1,
        "num_workers": 0,
        **extra,
    }
    path = folder / f"config_{len(list(folder.glob('config_*')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, toy_ende_dir_module):
    """400 training pairs, a 500-word vocabulary and a 2-layer LSTM teacher (10 steps)."""
    folder = tmp_path_factory.mktemp("onmt")
    for name, lines in (("src-train", 400), ("tgt-train", 400), ("src-val", 30), ("tgt-val", 30)):
        text = (toy_ende_dir_module / f"{name}.txt").read_text().splitlines()[:lines]
        (folder / f"{name}.txt").write_text("\n".join(text) + "\n")
    vocab = dict(yaml.safe_load(_config(folder).read_text()), save_data="vocab", overwrite=True)
    (folder / "vocab.yaml").write_text(yaml.safe_dump(vocab))
    _run([BIN / "onmt_build_vocab", "-config", "vocab.yaml", "-n_sample", "400"], folder)
    _run(
        [BIN / "onmt_train", "-config", _config(folder, layers=2), "-save_model", "teacher"], folder
    )
    assert (folder / "teacher_step_10.pt").exists()
    return folder


@pytest.fixture(scope="module")
def toy_ende_dir_module():
    from conftest import data_path

    return data_path("toy-ende")


def _load(path: Path) -> dict:
    torch.serialization.add_safe_globals([argparse.Namespace])
    return torch.load(path, map_location="cpu", weights_only=True)


def _distil(corpus: Path, name: str, *extra: str, config: Path | None = None):
    args = [
        BIN / "onmt_train",
        "-config",
        config or _config(corpus),
        "-save_model",
        name,
        "-quantized_distill",
        "-teacher_model",
        "teacher_step_10.pt",
        *extra,
    ]
    return _run(args, corpus)


def test_options_appear_in_stock_onmt_train_help(corpus):
    shown = _run([BIN / "onmt_train", "-h"], corpus).stdout
    for option in (
        "--quantized_distill",
        "--teacher_model",
        "--quant_bits",
        "--quant_bucket_size",
        "--quant_method",
        "--quant_rounding",
        "--quant_keep_first_last",
        "--distill_temperature",
        "--distill_alpha",
    ):
        assert option in shown, option
    hidden = _run([BIN / "onmt_train", "-h"], corpus, plugin=False).stdout
    assert "--quantized_distill" not in hidden


def test_lstm_student_checkpoint_is_quantized_and_stock_translate_runs_it(corpus):
    _distil(corpus, "lstm", "-quant_bits", "3", "-quant_bucket_size", "64")
    checkpoint = _load(corpus / "lstm_step_10.pt")
    record = checkpoint["qdistill"]
    assert record["specs"] and all(s["bits"] == 3 for s in record["specs"].values())
    plain = {
        **checkpoint["model"],
        **{f"generator.{k}": v for k, v in checkpoint["generator"].items()},
    }
    assert not any("parametrizations" in k for k in plain)
    for name in record["specs"]:
        values = plain[name].reshape(-1)
        assert all(b.unique().numel() <= 8 for b in values.split(64)), name
        assert not torch.equal(record["shadow"][name], plain[name])
    # Stock OpenNMT translation, the plugin off, gives exactly what it gives with the plugin on.
    base = ["-model", "lstm_step_10.pt", "-src", "src-val.txt", "-max_length", "8", "-seed", "1"]
    _run([sys.executable, "-c", STOCK_TRANSLATE, *base, "-output", "off.txt"], corpus, plugin=False)
    _run([BIN / "onmt_translate", *base, "-output", "on.txt"], corpus)
    off, on = (corpus / "off.txt").read_text(), (corpus / "on.txt").read_text()
    assert off == on and len(off.splitlines()) == 30


def test_top_k_teacher_cache_serves_later_epochs(corpus):
    # 400 pairs in batches of 16 sentences: 25 batches an epoch, so 60 steps see each example
    # two or three times; from the second epoch on, the teacher's top-k comes from the cache.
    done = _distil(
        corpus,
        "topk",
        "-quant_bits",
        "4",
        "-distill_topk",
        "5",
        "-train_steps",
        "60",
        "-save_checkpoint_steps",
        "60",
    )
    line = re.search(r"teacher top-5 cache holds (\d+) examples; (\d+)% of batches", done.stderr)
    assert line, done.stderr[-2000:]
    examples, served = int(line.group(1)), int(line.group(2))
    assert 300 <= examples <= 400 and 30 <= served <= 70, line.group(0)
    checkpoint = _load(corpus / "topk_step_60.pt")
    assert (
        checkpoint["qdistill"]["specs"]
        and torch.isfinite(checkpoint["model"]["decoder.rnn.layers.0.weight_ih"]).all()
    )


def test_resume_restores_the_shadow_weights(corpus):
    _distil(corpus, "first", "-quant_bits", "4")
    # A fresh optimizer with a zero learning rate leaves the weights where the resume put them.
    resume = ["-train_from", "first_step_10.pt", "-train_steps", "12", "-save_checkpoint_steps"]
    _distil(corpus, "resumed", *resume, "12", "-reset_optim", "all", "-learning_rate", "0")
    before = _load(corpus / "first_step_10.pt")["qdistill"]["shadow"]
    after = _load(corpus / "resumed_step_12.pt")["qdistill"]["shadow"]
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture(scope="module")
def transformer(corpus) -> Path:
    """A 4-bit transformer student with a tied generator, distilled from the LSTM teacher."""
    config = _config(
        corpus,
        encoder_type="transformer",
        decoder_type="transformer",
        heads=2,
        transformer_ff=64,
        position_encoding=True,
        share_decoder_embeddings=True,
    )
    _distil(corpus, "transformer", "-quant_bits", "4", "-quant_method", "nonuniform", config=config)
    return corpus / "transformer_step_10.pt"


def test_transformer_student_with_tied_generator_and_packing(corpus, transformer, tmp_path):
    checkpoint = _load(corpus / "transformer_step_10.pt")
    state = {
        **checkpoint["model"],
        **{f"generator.{k}": v for k, v in checkpoint["generator"].items()},
    }
    assert torch.equal(
        state["generator.weight"], state["decoder.embeddings.make_embedding.emb_luts.0.weight"]
    )
    # `qdistill pack` keeps the recorded grids bit for bit, with the vocabulary and options.
    done = _run(
        [BIN / "qdistill", "pack", "transformer_step_10.pt", "-o", tmp_path / "t.qd"], corpus
    )
    assert "smaller than transformer_step_10.pt" in done.stdout
    from compressor import load_packed

    loaded, metadata = load_packed(tmp_path / "t.qd")
    assert metadata["checkpoint_format"] == "onmt" and metadata["onmt"]["vocab"]["src"]
    # The position encodings are left out, to be rebuilt at load: placeholders here.
    rebuilt = {k for k, v in loaded.items() if v.is_meta}
    assert rebuilt == {f"{side}.embeddings.make_embedding.pe.pe" for side in ("encoder", "decoder")}
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k not in rebuilt)
    size = (tmp_path / "t.qd").stat().st_size
    specs = checkpoint["qdistill"]["specs"]
    kept = sum(
        v.numel() * v.element_size()
        for k, v in state.items()
        if k not in specs and k not in rebuilt
    )
    quantized = sum(state[k].numel() * 4 for k in specs if k != "generator.weight")  # tied
    # 4-bit codes: 1/8 of fp32, plus per-bucket scales; the vocabulary and options as JSON.
    assert size < kept + 0.3 * quantized + len(json.dumps(metadata))
    # onmt_translate (plugin on) takes the packed file as a model and translates identically;
    # `qdistill unpack` gives back a checkpoint that the stock tool loads with the plugin off.
    base = ["-src", "src-val.txt", "-max_length", "8", "-seed", "1"]
    _run(
        [BIN / "onmt_translate", "-model", "transformer_step_10.pt", *base, "-output", "pt.txt"],
        corpus,
    )
    _run([BIN / "onmt_translate", "-model", tmp_path / "t.qd", *base, "-output", "qd.txt"], corpus)
    _run([BIN / "qdistill", "unpack", tmp_path / "t.qd", "-o", tmp_path / "u.pt"], corpus)
    _run(
        [
            sys.executable,
            "-c",
            STOCK_TRANSLATE,
            "-model",
            tmp_path / "u.pt",
            *base,
            "-output",
            "unpacked.txt",
        ],
        corpus,
        plugin=False,
    )
    reference = (corpus / "pt.txt").read_text()
    assert len(reference.splitlines()) == 30
    assert (corpus / "qd.txt").read_text() == reference == (corpus / "unpacked.txt").read_text()


def test_ctranslate2_export_scores_like_onmt_translate(corpus, transformer, tmp_path):
    ctranslate2 = pytest.importorskip("ctranslate2")
    _run([BIN / "qdistill", "pack", transformer, "-o", tmp_path / "t.qd"], corpus)
    for source, folder in ((transformer, "from_pt"), (tmp_path / "t.qd", "from_qd")):
        done = _run([BIN / "qdistill", "onmt-export-ct2", source, "-o", tmp_path / folder], corpus)
        assert "CTranslate2 model, float32 weights" in done.stdout
    # The packed file decodes to the checkpoint's values, so both exports are the same bytes.
    exported = (tmp_path / "from_pt" / "model.bin").read_bytes()
    assert exported == (tmp_path / "from_qd" / "model.bin").read_bytes()
    # Teacher-forced log-likelihood of the references: CTranslate2 against onmt_translate's
    # GOLD SCORE (the mean over sentences of each sentence's total log-probability).
    gold = _run(
        [
            BIN / "onmt_translate",
            "-model",
            transformer,
            "-src",
            "src-val.txt",
            "-tgt",
            "tgt-val.txt",
            "-beam_size",
            "1",
            "-max_length",
            "8",
            "-output",
            tmp_path / "gold.txt",
        ],
        corpus,
    )
    onmt_score = float(re.search(r"GOLD SCORE: (-?[\d.]+)", gold.stderr).group(1))
    sources = [line.split() for line in (corpus / "src-val.txt").read_text().splitlines()]
    targets = [line.split() for line in (corpus / "tgt-val.txt").read_text().splitlines()]
    translator = ctranslate2.Translator(str(tmp_path / "from_qd"), device="cpu", intra_threads=1)
    scored = translator.score_batch(sources, targets)
    ct2_score = sum(sum(result.log_probs) for result in scored) / len(scored)
    assert ct2_score == pytest.approx(onmt_score, rel=1e-4)
    hypotheses = translator.translate_batch(sources, beam_size=1, max_decoding_length=8)
    assert len(hypotheses) == 30 and all(h.hypotheses[0] for h in hypotheses)
    # onmt-eval takes the directory as a model: translated and scored by CTranslate2 with the
    # same flags, its size the directory's bytes, its gold perplexity that of onmt_translate.
    _run(
        [
            BIN / "qdistill",
            "onmt-eval",
            f"onmt={transformer}",
            f"ct2={tmp_path / 'from_qd'}",
            "--src",
            "src-val.txt",
            "--ref",
            "tgt-val.txt",
            "--teacher",
            "onmt",
            "--json",
            tmp_path / "eval.json",
        ],
        corpus,
    )
    rows = {r["name"]: r for r in json.loads((tmp_path / "eval.json").read_text())}
    assert (rows["onmt"]["runtime"], rows["ct2"]["runtime"]) == ("fp32", "ct2")
    assert rows["ct2"]["bytes"] == sum(
        f.stat().st_size for f in (tmp_path / "from_qd").iterdir() if f.is_file()
    )
    assert rows["ct2"]["ppl_word"] == pytest.approx(rows["onmt"]["ppl_word"], rel=1e-3)
    assert rows["ct2"]["decode_tokens_per_s"] > 0 and rows["ct2"]["agreement_bleu"] is not None


def test_ctranslate2_export_errors_are_one_line(corpus, transformer, tmp_path):
    pytest.importorskip("ctranslate2")
    for args, message in (
        (
            ["teacher_step_10.pt", "-o", tmp_path / "rnn"],
            "transformer models only, this one is rnn",
        ),
        (["missing.pt", "-o", tmp_path / "m"], "no such file: missing.pt"),
        (["src-val.txt", "-o", tmp_path / "txt"], "not a PyTorch checkpoint"),
        ([transformer, "-o", corpus], "contains the input"),
    ):
        done = _run([BIN / "qdistill", "onmt-export-ct2", *args], corpus, check=False)
        assert done.returncode == 2, done.stderr
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "rnn").exists()


def test_differentiable_mode_learns_points_that_pack_exactly(corpus, tmp_path):
    _distil(
        corpus,
        "points",
        "-quant_bits",
        "2",
        "-quant_method",
        "differentiable",
        "-learning_rate",
        "0.05",
    )
    record = _load(corpus / "points_step_10.pt")["qdistill"]
    learned = [s["points"] for s in record["specs"].values()]
    assert learned and all(s["method"] == "nonuniform" for s in record["specs"].values())
    assert all(p == sorted(p) and p[0] >= 0 and p[-1] <= 1 for p in learned)
    # The same run with a zero learning rate keeps the initial points (the same seed builds
    # the same student): training moved them.
    _distil(
        corpus,
        "still",
        "-quant_bits",
        "2",
        "-quant_method",
        "differentiable",
        "-learning_rate",
        "0",
    )
    still = _load(corpus / "still_step_10.pt")["qdistill"]["specs"]
    initial = [s["points"] for s in still.values()]
    assert len(initial) == len(learned) and initial != learned
    # The saved values lie on the learned grids: packing verifies every tensor bit for bit.
    _run([BIN / "qdistill", "pack", "points_step_10.pt", "-o", tmp_path / "p.qd"], corpus)


def test_post_training_quantization_of_a_teacher(corpus):
    done = _run(
        [BIN / "qdistill", "onmt-quantize", "teacher_step_10.pt", "--bits", "2", "-o", "pm.pt"],
        corpus,
    )
    assert "quantized to 2 bits" in done.stdout
    quantized = _load(corpus / "pm.pt")
    weight = quantized["model"]["encoder.rnn.weight_ih_l0"]
    assert all(b.unique().numel() <= 4 for b in weight.reshape(-1).split(256))
    _run(
        [
            sys.executable,
            "-c",
            STOCK_TRANSLATE,
            "-model",
            "pm.pt",
            "-src",
            "src-val.txt",
            "-output",
            "pm.txt",
            "-max_length",
            "5",
        ],
        corpus,
        plugin=False,
    )
    assert len((corpus / "pm.txt").read_text().splitlines()) == 30


@pytest.mark.parametrize(
    "extra, message",
    [
        (["-teacher_model", "missing.pt"], "--teacher_model missing.pt does not exist"),
        (["-quant_bits", "9"], "--quant_bits must be from 1 to 8"),
        (["-distill_topk", "-1"], "--distill_topk must be 0 (exact) or a positive K"),
        (["-distill_topk", "4", "-src_subword_alpha", "0.1"], "same subwords every epoch"),
        (["-copy_attn"], "does not support -copy_attn"),
        (["-src_vocab_size", "100", "-tgt_vocab_size", "100"], "vocabularies differ"),
    ],
)
def test_start_up_errors_are_one_line(corpus, extra, message):
    args = [
        BIN / "onmt_train",
        "-config",
        _config(corpus),
        "-save_model",
        "bad",
        "-quantized_distill",
        "-teacher_model",
        "teacher_step_10.pt",
        *extra,
    ]
    done = _run(args, corpus, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("qdistill: error")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in done.stderr
    assert not list(corpus.glob("bad_step_*.pt"))


def test_quantized_run_logs_its_settings_once_and_labels_validation(corpus):
    settings = "-quant_bits 3 -quant_bucket_size 32 -distill_temperature 2 -distill_alpha 0.5"
    done = _distil(corpus, "logged", *settings.split(), "-distill_topk", "4")
    active = [line for line in done.stderr.splitlines() if "quantized distillation active" in line]
    assert len(active) == 1, done.stderr[-3000:]
    for shown in (
        "3-bit uniform quantization",
        "buckets of 32 weights",
        "nearest rounding",
        "teacher teacher_step_10.pt",
        "temperature 2",
        "alpha 0.5",
        "top-4 logits",
    ):
        assert shown in active[0], active[0]
    ours = re.findall(
        r"qdistill: validation of the quantized student \(3-bit uniform\): "
        r"perplexity (\S+), accuracy (\S+)",
        done.stderr,
    )
    theirs = re.findall(r"Validation perplexity: (\S+)", done.stderr)
    accuracy = re.findall(r"Validation accuracy: (\S+)", done.stderr)
    assert len(ours) == 1 and ours == list(zip(theirs, accuracy)), done.stderr[-3000:]


def _kill_at_first_checkpoint(corpus: Path, name: str, *extra: str) -> list[Path]:
    """Run onmt_train saving a 20 MB checkpoint every step, and SIGKILL it the moment a
    checkpoint name appears: before, OpenNMT's torch.save was then still writing that file."""
    config = _config(
        corpus,
        hidden_size=256,
        word_vec_size=256,
        save_checkpoint_steps=1,
        train_steps=30,
        valid_steps=1000,
    )
    args = [BIN / "onmt_train", "-config", config, "-save_model", name, *extra]
    log = corpus / f"{name}.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(args, cwd=corpus, env=_env(), stdout=stderr, stderr=stderr)
        deadline = time.monotonic() + 300
        try:
            while process.poll() is None and time.monotonic() < deadline:
                if any(e.name.startswith(f"{name}_step_") for e in os.scandir(corpus)):
                    os.kill(process.pid, signal.SIGKILL)
                    break
                time.sleep(0.0005)
        finally:
            if process.poll() is None and time.monotonic() >= deadline:
                process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    return sorted(corpus.glob(f"{name}_step_*.pt"))


@pytest.mark.parametrize("quantized", [False, True], ids=["plain", "quantized"])
def test_kill_during_a_checkpoint_write_leaves_only_complete_checkpoints(corpus, quantized):
    from compressor.format.files import load_checkpoint

    name = "killed_student" if quantized else "killed_plain"
    extra = ["-quantized_distill", "-teacher_model", "teacher_step_10.pt", "-quant_bits", "4"]
    saved = _kill_at_first_checkpoint(corpus, name, *(extra if quantized else []))
    assert saved
    for path in saved:
        checkpoint = load_checkpoint(path)  # complete, or it would not be there
        assert {"model", "generator", "vocab", "opt", "optim"} <= checkpoint.keys()
        # A student's checkpoint is the quantized one from the start, never OpenNMT's draft.
        assert ("qdistill" in checkpoint) == quantized
