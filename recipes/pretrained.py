"""Reproduce the translator that ships with qdistill (``onmt_plugin/pretrained/
multi30k_de_en_lstm``): train it with the ``multi30k`` recipe's CPU-scale settings, store it in
fp16 and measure what it scores, before and after that conversion.

    python -m recipes.pretrained [--data-path ../shared/data/multi30k] [--work runs/teacher]
                                 [--output onmt_plugin/pretrained/multi30k_de_en_lstm]

Steps (each skipped when its output exists; training resumes from its last checkpoint):
the whole Multi30k training set (29,000 pairs), a unigram sentencepiece model of 4,000 pieces
per language, OpenNMT's vocabularies, a 2-layer bidirectional-encoder LSTM (hidden 256) trained
3,000 steps of 2,048 tokens with the stock ``onmt_train`` (Adam, lr 0.002, dropout 0.2, seed 1),
then the export (``onmt_plugin.pretrained.export``) and ``qdistill onmt-eval`` of the fp32
checkpoint and of the shipped fp16 weights on test_2016_flickr, greedy and beam 5. The figures
land in ``card.json`` beside the weights, with the BLEU of the first 100 test sentences that a
test checks the shipped model still reproduces. Training took 94 minutes on 2 shared CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from compressor.format.files import atomic_write_json, atomic_write_text
from onmt_plugin import pretrained
from recipes.environment import environment
from recipes.experiments import load_recipe
from recipes.translation import (
    Corpus,
    TranslationScale,
    base_config,
    build_vocab,
    onmt_eval,
    prepare_data,
    strip_optimizer,
    train,
    train_sentencepiece,
)

SUBSET = 100  # test sentences whose BLEU a test reproduces with the shipped weights


def cpu_scale() -> TranslationScale:
    """The ``multi30k`` recipe's ``cpu`` scale (the teacher's half of it)."""
    params = load_recipe("multi30k").parameters("cpu")
    fields = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in params.items()
        if k in TranslationScale.__dataclass_fields__
    }
    return TranslationScale(**{**fields, "name": "cpu"})


def train_teacher(data: Path, work: Path, scale: TranslationScale) -> Path:
    """The fp32 teacher checkpoint (no optimizer), with spm.* and vocab.* beside it."""
    work.mkdir(parents=True, exist_ok=True)
    files = prepare_data(Corpus(data, "de", "en"), scale, work / "data")
    train_sentencepiece(files, scale, work)
    config = base_config(files, scale, work)
    build_vocab(config, work, scale.threads)
    config = {**config, "layers": scale.teacher_layers, "keep_checkpoint": 2}
    checkpoint = train(config, work, "teacher", scale.teacher_steps, scale.threads)
    return strip_optimizer(checkpoint, work / "teacher.pt")


def evaluate(models: dict[str, Path], work: Path, beam: int, count: int | None = None) -> dict:
    """``qdistill onmt-eval`` rows by model name, on the first ``count`` test sentences."""
    src, ref = work / "data" / "test.src", work / "data" / "test.tgt"
    if count is not None:
        for path in (src, ref):
            lines = path.read_text(encoding="utf-8").splitlines()[:count]
            atomic_write_text(work / f"{path.name}.{count}", "\n".join(lines) + "\n")
        src, ref = work / f"test.src.{count}", work / f"test.tgt.{count}"
    result = work / f"eval.beam{beam}.{count or 'all'}.json"
    if not result.exists():
        onmt_eval(models, {"test.src": src, "test.tgt": ref}, work, result, beam, baseline=None)
    return {row["name"]: row for row in json.loads(result.read_text())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(os.environ.get("QDISTILL_DATA", "../shared/data")) / "multi30k"
    parser.add_argument("--data-path", type=Path, default=default_data)
    parser.add_argument("--work", type=Path, default=Path("runs/multi30k_teacher"))
    parser.add_argument("--output", type=Path, default=pretrained.MULTI30K_DE_EN)
    args = parser.parse_args(argv)
    scale = cpu_scale()
    teacher = train_teacher(args.data_path, args.work, scale)
    pretrained.export(teacher, args.output, args.work)
    shipped = args.work / "teacher_fp16.pt"
    if not shipped.exists():
        pretrained.write_checkpoint(args.output, shipped)
    models = {"fp32": teacher, "fp16": shipped}
    beam5, greedy = evaluate(models, args.work, 5), evaluate(models, args.work, 1)
    subset = evaluate({"fp16": shipped}, args.work, 1, SUBSET)["fp16"]
    weights = args.output / pretrained.WEIGHTS

    def scores(row: dict) -> dict:
        return {k: round(row[k], 4) for k in ("bleu", "chrf", "ppl_word")}

    card = {
        "description": (
            f"2-layer LSTM de-en (hidden {scale.hidden_size}), {scale.teacher_steps} steps on "
            f"Multi30k, {beam5['fp16']['bleu']:.2f} BLEU beam 5 on test_2016_flickr"
        ),
        "data": "Multi30k task 1 de-en: all 29,000 training pairs, val for validation",
        "recipe": "multi30k, scale cpu (recipes/configs/multi30k.yaml), teacher only",
        "command": "python -m recipes.pretrained",
        "train_steps": scale.teacher_steps,
        "vocab_size": scale.vocab_size,
        "hidden_size": scale.hidden_size,
        "layers": scale.teacher_layers,
        "test": "test_2016_flickr, 1,000 sentences, sacrebleu on detokenized output",
        "beam5": {"fp32": scores(beam5["fp32"]), "fp16": scores(beam5["fp16"])},
        "greedy": {"fp32": scores(greedy["fp32"]), "fp16": scores(greedy["fp16"])},
        "fp16_bleu_change": {
            "beam5": round(beam5["fp16"]["bleu"] - beam5["fp32"]["bleu"], 4),
            "greedy": round(greedy["fp16"]["bleu"] - greedy["fp32"]["bleu"], 4),
        },
        "subset": {"sentences": SUBSET, "beam": 1, "bleu": round(subset["bleu"], 4)},
        "bytes": {
            "fp32_checkpoint": teacher.stat().st_size,
            "shipped_folder": sum(p.stat().st_size for p in args.output.iterdir()),
            "weights_fp16": weights.stat().st_size,
        },
        "bleu_signature": beam5["fp16"]["extra"]["bleu_signature"],
        "environment": environment(),
    }
    atomic_write_json(args.output / pretrained.CARD, card)
    print(json.dumps({k: card[k] for k in ("beam5", "greedy", "fp16_bleu_change")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
