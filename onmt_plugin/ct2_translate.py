"""Translate a file with a CTranslate2 model directory, speaking ``onmt_translate``'s language.

``qdistill onmt-eval`` scores every model by running ``onmt_translate`` in a subprocess and
reading its log. A CTranslate2 export (``qdistill onmt-export-ct2``) is a directory that
``onmt_translate`` cannot load, so for those ``onmt-eval`` runs this module instead, with the
same flags (``-model -src -output -tgt -beam_size -batch_size -max_length`` and OpenNMT's
sentencepiece transform, ``-transforms sentencepiece -src_subword_model -tgt_subword_model``)
and the same log lines (``Tokens per second``, ``GOLD SCORE``), so that BLEU, chrF, gold
perplexity, tokens/s and peak memory are measured the same way for both engines. Threads: the
``OMP_NUM_THREADS`` of the environment, as for ``onmt_translate``.

    python -m onmt_plugin.ct2_translate -model DIR -src test.de -output hyp.en [-tgt test.en]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

MODEL_FILE = "model.bin"


def is_ct2_model(path: str | os.PathLike) -> bool:
    """A CTranslate2 model directory (what ``qdistill onmt-export-ct2`` writes)."""
    return (Path(path) / MODEL_FILE).is_file()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-model", required=True, help="CTranslate2 model directory")
    p.add_argument("-src", required=True)
    p.add_argument("-output", required=True)
    p.add_argument("-tgt", help="references to score in teacher-forcing mode (GOLD SCORE)")
    p.add_argument("-beam_size", type=int, default=5)
    p.add_argument("-batch_size", type=int, default=30)
    p.add_argument("-max_length", type=int, default=250)  # onmt_translate's default
    p.add_argument("-transforms", nargs="*", default=[])
    p.add_argument("-src_subword_model")
    p.add_argument("-tgt_subword_model")
    # accepted for onmt_translate compatibility: the CPU, and the time is always reported
    p.add_argument("-gpu", type=int, default=-1)
    p.add_argument("-report_time", action="store_true")
    return p


def _check(args: argparse.Namespace) -> None:
    """Every user mistake this command can see before it loads anything, as a UsageError."""
    from compressor.cli import UsageError

    inputs = {Path(p).resolve() for p in (args.src, args.tgt) if p}
    if Path(args.output).resolve() in inputs:
        raise UsageError(f"-output {args.output} is also an input; choose another file")
    if args.gpu != -1:
        raise UsageError("ct2_translate runs on the CPU only (-gpu -1)")
    if not is_ct2_model(args.model):
        raise UsageError(
            f"-model {args.model} is not a CTranslate2 model directory (no {MODEL_FILE}); "
            "write one with qdistill onmt-export-ct2"
        )
    files = {"-src": args.src, "-tgt": args.tgt}
    if "sentencepiece" in args.transforms:
        files |= {"-src_subword_model": args.src_subword_model}
        files |= {"-tgt_subword_model": args.tgt_subword_model}
    for flag, path in files.items():
        if path is None and flag != "-tgt":
            raise UsageError(f"-transforms sentencepiece needs {flag}")
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{flag} {path}: no such file")
    if args.tgt:
        count = {flag: len(_lines(files[flag])) for flag in ("-src", "-tgt")}
        if count["-src"] != count["-tgt"]:
            raise UsageError(
                f"-src has {count['-src']} lines but -tgt {count['-tgt']}; "
                "they must align line by line"
            )


def _lines(path: str) -> list[str]:
    return Path(path).read_text(encoding="utf-8").splitlines()


def main(argv: list[str] | None = None) -> int:
    from compressor.cli import UsageError
    from compressor.format.files import OutputError

    args = _parser().parse_args(argv)
    try:
        _check(args)
        return _translate(args)
    except (UsageError, OutputError) as exc:
        print(f"ct2_translate: error: {exc}", file=sys.stderr)
        return 2


def _translate(args: argparse.Namespace) -> int:
    import ctranslate2

    from compressor.cli import UsageError
    from compressor.format.files import atomic_write_text

    pieces = "sentencepiece" in args.transforms
    if pieces:
        import sentencepiece

        src_sp = sentencepiece.SentencePieceProcessor(model_file=args.src_subword_model)
        tgt_sp = sentencepiece.SentencePieceProcessor(model_file=args.tgt_subword_model)
    try:
        translator = ctranslate2.Translator(
            args.model,
            device="cpu",
            inter_threads=1,
            intra_threads=int(os.environ.get("OMP_NUM_THREADS", "0")),
        )
    except (RuntimeError, ValueError) as exc:  # a damaged or foreign model.bin
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"-model {args.model}: CTranslate2 cannot load it ({reason})") from None
    lines = _lines(args.src)
    sources = [src_sp.encode(line, out_type=str) if pieces else line.split() for line in lines]
    start = time.perf_counter()
    results = translator.translate_batch(
        sources,
        beam_size=args.beam_size,
        max_batch_size=args.batch_size,
        max_decoding_length=args.max_length,
    )
    seconds = time.perf_counter() - start
    hypotheses = [r.hypotheses[0] for r in results]
    text = [tgt_sp.decode(h) if pieces else " ".join(h) for h in hypotheses]
    atomic_write_text(args.output, "".join(f"{line}\n" for line in text))
    tokens = sum(len(h) for h in hypotheses)
    print(f"Total translation time (s): {seconds:.1f}")
    print(f"Tokens per second: {tokens / max(seconds, 1e-9):.1f}")
    if args.tgt:
        refs = _lines(args.tgt)
        targets = [tgt_sp.encode(r, out_type=str) if pieces else r.split() for r in refs]
        scored = translator.score_batch(sources, targets, max_batch_size=args.batch_size)
        # onmt_translate's figure: the mean over sentences of each one's total log-probability
        mean = sum(sum(s.log_probs) for s in scored) / max(len(scored), 1)
        print(f"GOLD SCORE: {mean:.4f}, GOLD PPL: - NB SENTENCES: {len(scored)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
