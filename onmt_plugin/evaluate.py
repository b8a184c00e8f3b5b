"""`qdistill onmt-eval`: score OpenNMT-py checkpoints (fp32, quantized) or hypothesis files.

Translation and teacher-forced scoring run the stock ``onmt_translate`` in a subprocess, so the
numbers are those of the model, vocabulary and transforms stored in the checkpoint. Metrics:

- BLEU and chrF: sacrebleu corpus scores against the references, with sacrebleu's signature.
- gold perplexity: ``onmt_translate -tgt REF`` scores the references in teacher-forcing mode;
  ``ppl_word`` = exp(-sum of gold log-probs / (words of REF + one end of sentence per line)),
  words being whitespace-separated. The sum is over whatever units the model predicts (words or
  subwords), so the figure is a per-word perplexity that models with different subword
  vocabularies share; on pre-tokenized, word-level data it is the usual token perplexity.
- subwords: ``--src-subword-model``/``--tgt-subword-model`` (sentencepiece) run OpenNMT's own
  ``sentencepiece`` transform, which also detokenizes the output, so BLEU and chrF are computed
  on plain text against plain references, as sacrebleu expects.
- size: bytes of the file on disk; ``compression`` = baseline bytes / bytes (``--baseline NAME``).
- speed: hypothesis tokens (whitespace) per second of the translation subprocess wall time
  (includes model loading, so it is a lower bound); ``decode_tokens_per_s`` is OpenNMT's own
  figure (``-report_time``: predicted tokens per second of translation, loading excluded).
- path and memory: ``runtime`` is "int4" when the model ran on the int4 kernel (a packed
  student trained on the kernel grid, see ``onmt_plugin.runtime``), else "fp32";
  ``peak_rss_mib`` is the translation process's peak resident memory. ``--fp32 NAME`` runs
  that model on the fp32 path (``QDISTILL_RUNTIME=fp32``), so one table can compare both.
- CTranslate2: a model that is a CTranslate2 directory (``qdistill onmt-export-ct2``) is
  translated and scored by :mod:`onmt_plugin.ct2_translate` with the same flags and log lines
  instead; its size is the directory's bytes and its ``runtime`` "ct2".
- agreement with ``--teacher NAME``: sacrebleu BLEU of the model's hypotheses with the teacher's
  hypotheses as the reference (100 = identical output).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from compressor.format.files import atomic_write_json, check_output
from onmt_plugin.ct2_translate import is_ct2_model
from onmt_plugin.export_ct2 import directory_bytes

# OpenNMT-py 3.5 ends a run with -tgt by the mean gold score per sentence and the count.
_GOLD = re.compile(r"GOLD SCORE: (-?[0-9.]+(?:e[-+]?\d+)?), GOLD PPL: \S+ NB SENTENCES: (\d+)")
_SPEED = re.compile(r"Tokens per second: ([0-9.]+)")
_RUNTIME = re.compile(r"qdistill: runtime (int4|fp32)")


@dataclass
class EvalRow:
    """Metrics of one model (or hypothesis file)."""

    name: str
    path: str
    bytes: int | None = None
    compression: float | None = None
    bleu: float | None = None
    chrf: float | None = None
    ppl_word: float | None = None
    tokens_per_s: float | None = None
    agreement_bleu: float | None = None
    extra: dict = field(default_factory=dict)
    decode_tokens_per_s: float | None = None
    runtime: str | None = None
    peak_rss_mib: float | None = None


def _read_lines(path: str | os.PathLike) -> list[str]:
    from compressor.cli import UsageError

    try:
        with open(path, encoding="utf-8") as handle:
            return [line.rstrip("\n") for line in handle]
    except OSError as error:
        raise UsageError(
            f"cannot read {path}: {error.strerror}; give an existing text file"
        ) from None
    except UnicodeDecodeError:
        raise UsageError(
            f"{path} is not UTF-8 text (a binary file?); give a text file, one sentence a line"
        ) from None


def is_eval_json(path: Path) -> bool:
    """Whether ``path`` holds metrics that ``onmt-eval --json`` wrote (a list of its rows)."""
    rows = json.loads(path.read_text(encoding="utf-8"))
    keys = set(EvalRow.__dataclass_fields__)
    first = {
        "name",
        "path",
        "bytes",
        "compression",
        "bleu",
        "chrf",
        "ppl_word",
        "tokens_per_s",
        "agreement_bleu",
        "extra",
    }  # what every version wrote
    return isinstance(rows, list) and all(
        isinstance(r, dict) and first <= set(r) <= keys for r in rows
    )


def score_lines(hyps: list[str], refs: list[str]) -> tuple[float, float, str, str]:
    """Corpus BLEU and chrF of hyps against refs, with sacrebleu signatures."""
    import sacrebleu

    from compressor.cli import UsageError

    if len(hyps) != len(refs):
        raise UsageError(
            f"{len(hyps)} hypotheses but {len(refs)} references; the files must align line by line"
        )
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    b = bleu.corpus_score(hyps, [refs])
    c = chrf.corpus_score(hyps, [refs])
    return b.score, c.score, str(bleu.get_signature()), str(chrf.get_signature())


def subword_args(src_model: str | None, tgt_model: str | None) -> list[str]:
    """``onmt_translate`` flags that run OpenNMT's own sentencepiece transform: it segments the
    source and detokenizes the output, so hypotheses are plain text. Both models or neither."""
    from compressor.cli import UsageError

    if bool(src_model) != bool(tgt_model):
        raise UsageError("give both --src-subword-model and --tgt-subword-model, or neither")
    if not src_model:
        return []
    for model in (src_model, tgt_model):
        if not os.path.isfile(model):
            raise UsageError(f"subword model {model} does not exist")
    return [
        "-transforms",
        "sentencepiece",
        "-src_subword_model",
        src_model,
        "-tgt_subword_model",
        tgt_model,
    ]


def translator_command(model: str | os.PathLike) -> list[str]:
    """The program that translates ``model``: the stock ``onmt_translate`` for a checkpoint or
    packed file, :mod:`onmt_plugin.ct2_translate` (same flags, same log) for a CTranslate2
    model directory."""
    if is_ct2_model(model):
        return [sys.executable, "-m", "onmt_plugin.ct2_translate"]
    exe = shutil.which("onmt_translate", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "onmt.bin.translate"]


def translate(
    model: str,
    src: str,
    out: str,
    gold: str | None,
    extra: list[str],
    env: dict[str, str] | None = None,
    usage: dict | None = None,
) -> tuple[float, str]:
    """Run stock onmt_translate; returns (wall seconds, log text). ``usage``, if given,
    receives the process's peak resident memory (``peak_rss_mib``)."""
    from compressor.cli import UsageError

    cmd = [*translator_command(model), "-model", model, "-src", src, "-output", out, *extra]
    if gold:
        cmd += ["-tgt", gold]
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
        )
        _, status, rusage = os.wait4(proc.pid, 0)  # this child's own peak memory
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read()
    if usage is not None:
        usage["peak_rss_mib"] = rusage.ru_maxrss / 1024  # Linux: KiB
    if proc.returncode != 0:
        last = (text.strip().splitlines() or ["(no output)"])[-1]
        raise UsageError(f"onmt_translate failed on {model}: {last}")
    return seconds, text


def evaluate_model(
    name: str,
    path: str,
    src: str,
    refs_path: str,
    extra: list[str],
    workdir: Path,
    env: dict[str, str] | None = None,
) -> tuple[EvalRow, list[str]]:
    refs = _read_lines(refs_path)
    hyp_file = workdir / f"{name}.hyp"
    usage: dict = {}
    seconds, log = translate(path, src, str(hyp_file), None, [*extra, "-report_time"], env, usage)
    hyps = _read_lines(hyp_file)
    bleu, chrf, bsig, csig = score_lines(hyps, refs)
    ct2 = is_ct2_model(path)
    size = directory_bytes(Path(path)) if ct2 else os.path.getsize(path)
    row = EvalRow(name=name, path=path, bytes=size, bleu=bleu, chrf=chrf)
    row.extra["bleu_signature"], row.extra["chrf_signature"] = bsig, csig
    row.tokens_per_s = sum(len(h.split()) for h in hyps) / max(seconds, 1e-9)
    speed, runtime = _SPEED.search(log), _RUNTIME.search(log)
    row.decode_tokens_per_s = float(speed.group(1)) if speed else None
    row.runtime = "ct2" if ct2 else runtime.group(1) if runtime else "fp32"
    row.peak_rss_mib = usage.get("peak_rss_mib")
    _, gold_log = translate(path, src, str(workdir / f"{name}.gold"), refs_path, extra, env)
    match = _GOLD.search(gold_log)
    if match and int(match.group(2)) == len(refs):
        total = float(match.group(1)) * len(refs)
        words = sum(len(r.split()) + 1 for r in refs)
        row.ppl_word = math.exp(-total / words) if words else None
    return row, hyps


def render(rows: list[EvalRow]) -> str:
    def fmt(v: object, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    head = f"{'model':<22}{'bytes':>12}{'compr.':>8}{'BLEU':>7}{'chrF':>7}{'ppl/word':>9}{'tok/s':>9}{'agree':>7}{'path':>6}{'dec.tok/s':>10}{'RSS MiB':>9}"  # noqa: E501
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.name:<22}{fmt(r.bytes, 'd'):>12}{fmt(r.compression, '.2f'):>8}"
            f"{fmt(r.bleu, '.2f'):>7}"
            f"{fmt(r.chrf, '.2f'):>7}{fmt(r.ppl_word, '.2f'):>9}{fmt(r.tokens_per_s, '.1f'):>9}"
            f"{fmt(r.agreement_bleu, '.1f'):>7}{r.runtime or '-':>6}"
            f"{fmt(r.decode_tokens_per_s, '.1f'):>10}{fmt(r.peak_rss_mib, '.0f'):>9}"
        )
    return "\n".join(lines)


def _named(spec: str) -> tuple[str, str]:
    if "=" in spec:
        name, path = spec.split("=", 1)
        return name, path
    return Path(spec).stem, spec


def run(args: argparse.Namespace) -> int:
    from compressor.cli import UsageError

    if not args.models and not args.hyp:
        raise UsageError("give at least one checkpoint (NAME=PATH) or --hyp FILE")
    if args.batch_size <= 0 or args.beam_size <= 0:
        raise UsageError("--batch-size and --beam-size must be positive")
    if args.json:
        # Checked before the evaluation, which may take long: every file named is an input.
        inputs = [args.ref, args.src, args.src_subword_model, args.tgt_subword_model]
        inputs += [_named(spec)[1] for spec in [*args.models, *(args.hyp or [])]]
        check_output(
            args.json,
            [p for p in inputs if p],
            force=args.force,
            ours=is_eval_json,
            what="qdistill onmt-eval --json",
        )
    refs = _read_lines(args.ref)
    if args.src is not None:
        _read_lines(args.src)
    rows: list[EvalRow] = []
    hyps_by_name: dict[str, list[str]] = {}
    extra = ["-gpu", "-1", "-batch_size", str(args.batch_size), "-beam_size", str(args.beam_size)]
    extra += subword_args(args.src_subword_model, args.tgt_subword_model)
    named = [_named(spec)[0] for spec in args.models]
    for name in args.fp32 or []:
        if name not in named:
            raise UsageError(f"--fp32 {name} is not a model named in this run ({', '.join(named)})")
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models:
            name, path = _named(spec)
            if os.path.isdir(path) and not is_ct2_model(path):
                raise UsageError(
                    f"{path} is a folder but not a CTranslate2 model directory (no model.bin); "
                    "give a .pt or .qd file, or a folder written by qdistill onmt-export-ct2"
                )
            if not (os.path.isfile(path) or is_ct2_model(path)):
                raise UsageError(
                    f"checkpoint {path} does not exist; give NAME=PATH of a .pt or .qd file or "
                    "a CTranslate2 model directory"
                )
            if args.src is None:
                raise UsageError("--src is required to translate checkpoints")
            env = {"QDISTILL_RUNTIME": "fp32"} if name in (args.fp32 or []) else None
            row, hyps = evaluate_model(name, path, args.src, args.ref, extra, Path(tmp), env)
            rows.append(row)
            hyps_by_name[name] = hyps
            print(f"evaluated {name}", file=sys.stderr)
    for hyp_path in args.hyp or []:
        name, path = _named(hyp_path)
        hyps = _read_lines(path)
        bleu, chrf, bsig, csig = score_lines(hyps, refs)
        row = EvalRow(name=name, path=path, bleu=bleu, chrf=chrf)
        row.extra["bleu_signature"], row.extra["chrf_signature"] = bsig, csig
        rows.append(row)
        hyps_by_name[name] = hyps
    by_name = {r.name: r for r in rows}
    if args.baseline:
        if args.baseline not in by_name or by_name[args.baseline].bytes is None:
            raise UsageError(f"--baseline {args.baseline} is not a checkpoint named in this run")
        for r in rows:
            if r.bytes:
                r.compression = by_name[args.baseline].bytes / r.bytes
    if args.teacher:
        if args.teacher not in hyps_by_name:
            raise UsageError(f"--teacher {args.teacher} is not a model named in this run")
        for r in rows:
            r.agreement_bleu, *_ = score_lines(hyps_by_name[r.name], hyps_by_name[args.teacher])
    print(render(rows))
    if rows and rows[0].extra.get("bleu_signature"):
        print(f"BLEU signature: {rows[0].extra['bleu_signature']}")
        print(f"chrF signature: {rows[0].extra['chrf_signature']}")
    if args.json:
        atomic_write_json(args.json, [asdict(r) for r in rows])
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "onmt-eval",
        help="BLEU, chrF, gold perplexity, size, speed and teacher agreement of OpenNMT-py models",
    )
    p.add_argument(
        "models",
        nargs="*",
        help="checkpoints (.pt, .qd) or CTranslate2 model directories as NAME=PATH (or PATH)",
    )
    p.add_argument("--src", help="source text file to translate")
    p.add_argument("--ref", required=True, help="reference text file")
    p.add_argument("--hyp", action="append", help="score a hypothesis file (NAME=PATH), repeatable")
    p.add_argument("--baseline", help="NAME whose file size is the compression baseline")
    p.add_argument("--teacher", help="NAME whose hypotheses define agreement (BLEU vs teacher)")
    p.add_argument("--json", help="write the metrics as JSON to this path")
    p.add_argument(
        "--force", action="store_true", help="replace the --json file of an earlier onmt-eval"
    )
    p.add_argument("--src-subword-model", help="sentencepiece model of the source side")
    p.add_argument("--tgt-subword-model", help="sentencepiece model of the target side")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--beam-size", type=int, default=1)
    p.add_argument(
        "--fp32",
        action="append",
        metavar="NAME",
        help="run the model of that NAME on the fp32 path even if it was trained on the int4 "
        "kernel grid (QDISTILL_RUNTIME=fp32), repeatable: list a student twice to compare",
    )
    p.set_defaults(func=run)
