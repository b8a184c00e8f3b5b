"""`qdistill onmt-seqkd`: the teacher's translations of a training source, for sequence-level
knowledge distillation (Kim and Rush, 2016).

A student trained on the teacher's beam-search output learns the teacher's mode instead of the
noisy references; word-level distillation (``onmt_train -quantized_distill``) on that corpus is
their best setting. Translation runs the stock ``onmt_translate`` in a subprocess, like
``onmt-eval``, with the teacher's sentencepiece models (OpenNMT's transform segments the source
and detokenizes the output), so the corpus is plain text, one line per source line.

Translating a training corpus takes long, so it is resumable: the source is cut into chunks of
``--chunk-lines`` lines, each translated by its own ``onmt_translate`` and written atomically to
``OUT.parts/chunk-NNNNNN.txt``. A kill loses at most the chunk in flight; a rerun with the same
inputs reuses every finished chunk (and says how many). ``OUT.parts/manifest.json`` records what
the chunks depend on (source and teacher by SHA-256, subword models, beam, n-best, chunk size);
a rerun with other inputs is refused, or with ``--force`` starts over. When all chunks are done,
the output is written atomically, the chunk files are removed and the manifest keeps the output's
SHA-256: that is how ``--force`` recognises an earlier output of this command.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from compressor.format.files import WRITTEN_BY, atomic_write_json, atomic_write_text, check_output

COMMAND = "qdistill onmt-seqkd"
MANIFEST = "manifest.json"
LOCK = ".lock"
MANIFEST_VERSION = 1
_CHUNK = re.compile(r"chunk-(\d{6})\.txt")
_TEMPORARY = re.compile(r"\..+\.tmp")  # our temporary files (atomic writes, chunk in flight)


@dataclass
class TextFile:
    """A text file read as OpenNMT-py reads a corpus: lines split at ``\\n`` only."""

    path: Path
    lines: list[str]
    sha256: str
    size: int


def split_lines(text: str) -> list[str]:
    """Lines of ``text`` as a binary reader splits them: at ``\\n`` only, so that a stray ``\\r``
    inside a line cannot shift the target side against the source that ``onmt_train`` reads."""
    if not text:
        return []
    return (text[:-1] if text.endswith("\n") else text).split("\n")


def read_text(path: str | os.PathLike, flag: str) -> TextFile:
    """A UTF-8 text file with its hash; a missing or binary file is a one-line UsageError."""
    from compressor.cli import UsageError

    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise UsageError(f"{flag} {path} is a directory; give a text file") from None
    except OSError as error:
        raise UsageError(f"cannot read {flag} {path}: {error.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise UsageError(
            f"{flag} {path} is not UTF-8 text (a binary file?); give a text file, one sentence "
            "a line"
        )
    return TextFile(path, split_lines(text), hashlib.sha256(data).hexdigest(), len(data))


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def work_folder(output: Path) -> Path:
    """Where the chunks of ``output`` live until it is complete (and its record after)."""
    return output.with_name(output.name + ".parts")


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest if this command wrote it, else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get(WRITTEN_BY) != COMMAND:
        return None
    return manifest


def is_our_folder(folder: Path) -> bool:
    """Whether ``folder`` holds only what this command writes there (or nothing): a user's
    folder that happens to have the name is never used, let alone cleaned."""
    names = [p.name for p in folder.iterdir()]
    if not names or names == [LOCK]:
        return True
    if read_manifest(folder) is None:
        return False
    return all(
        name in (MANIFEST, LOCK) or _CHUNK.fullmatch(name) or _TEMPORARY.fullmatch(name)
        for name in names
    ) and not any(p.is_dir() for p in folder.iterdir())


def is_our_output(output: Path) -> bool:
    """Whether ``output`` is a file that this command wrote there (its hash in the manifest)."""
    manifest = read_manifest(work_folder(output)) or {}
    return file_sha256(output) in (manifest.get("written_sha256") or [])


def difference(old: dict, new: dict) -> str | None:
    """What changed between the run that wrote the chunks and this one, in the user's terms."""
    what = {
        "source": "the --src file's content",
        "teacher": "the --teacher checkpoint",
        "src_subword_model": "--src-subword-model",
        "tgt_subword_model": "--tgt-subword-model",
        "beam_size": "--beam-size",
        "n_best": "the n-best list size (--keep-better translates with --beam-size candidates)",
        "max_length": "--max-length",
        "chunk_lines": "--chunk-lines",
        "version": "the qdistill version of the manifest",
    }
    for key, words in what.items():
        if old.get(key) != new.get(key):
            return f"{words} differs ({old.get(key)!r} there, {new.get(key)!r} now)"
    return None


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """One run per output at a time: two runs writing the same chunks would corrupt neither
    file (writes are atomic) but would waste hours and race on the manifest."""
    from compressor.cli import UsageError

    with open(folder / LOCK, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(
                f"{folder} is in use by another onmt-seqkd run; wait for it or stop it"
            ) from None
        yield


def chunk_path(folder: Path, index: int) -> Path:
    return folder / f"chunk-{index:06d}.txt"


def finished_chunk(folder: Path, index: int, expected_lines: int) -> bool:
    """A chunk file is complete if present (atomic writes) with the expected line count."""
    path = chunk_path(folder, index)
    if not path.is_file():
        return False
    return len(split_lines(path.read_text(encoding="utf-8"))) == expected_lines


def translate_chunk(
    folder: Path,
    index: int,
    lines: list[str],
    teacher: str,
    flags: list[str],
    n_best: int,
    env: dict[str, str] | None,
) -> None:
    """Translate one chunk with the stock ``onmt_translate`` and write its ``n_best`` lines per
    source line atomically. Blank source lines are not sent (they get blank candidates), so the
    line count can be checked exactly."""
    import secrets

    from compressor.cli import UsageError
    from onmt_plugin.evaluate import translate

    kept = [i for i, line in enumerate(lines) if line.strip()]
    result = [""] * (n_best * len(lines))
    if kept:
        # A fresh name per attempt: an onmt_translate orphaned by a kill may still be writing.
        token = secrets.token_hex(4)
        src = folder / f".chunk-{index:06d}.{token}.src.tmp"
        hyp = folder / f".chunk-{index:06d}.{token}.hyp.tmp"
        try:
            src.write_text("".join(lines[i] + "\n" for i in kept), encoding="utf-8")
            translate(teacher, str(src), str(hyp), None, [*flags, "-n_best", str(n_best)], env)
            hyps = split_lines(hyp.read_text(encoding="utf-8"))
        finally:
            src.unlink(missing_ok=True)
            hyp.unlink(missing_ok=True)
        if len(hyps) != n_best * len(kept):
            raise UsageError(
                f"onmt_translate wrote {len(hyps)} lines for the {len(kept)} sentences of chunk "
                f"{index} (expected {n_best} each); the chunk is not kept"
            )
        for position, line in enumerate(kept):
            result[n_best * line : n_best * (line + 1)] = hyps[
                n_best * position : n_best * (position + 1)
            ]
    atomic_write_text(chunk_path(folder, index), "".join(h + "\n" for h in result))


def choose(
    sources: list[str],
    candidates: list[str],
    n_best: int,
    refs: list[str] | None,
    metric: str,
    min_score: float,
) -> tuple[list[str], dict[str, int]]:
    """One target line per source line: the teacher's best, or with ``refs`` the candidate of
    the n-best list closest to the reference by sentence-level ``metric``, or the reference
    itself where even that one scores below ``min_score``. Returns the lines and counts."""
    counts = {"teacher_best": 0, "other_candidate": 0, "reference": 0, "empty_source": 0}
    scorer = None
    if refs is not None:
        import sacrebleu

        scorer = (
            sacrebleu.metrics.CHRF()
            if metric == "chrf"
            else sacrebleu.metrics.BLEU(effective_order=True)
        )
    chosen: list[str] = []
    for i, source in enumerate(sources):
        options = candidates[n_best * i : n_best * (i + 1)]
        if not source.strip():
            counts["empty_source"] += 1
            chosen.append("")
            continue
        if scorer is None or not refs[i].strip():
            counts["teacher_best"] += 1
            chosen.append(options[0])
            continue
        scores = [scorer.sentence_score(option, [refs[i]]).score for option in options]
        best = max(range(len(options)), key=lambda k: (scores[k], -k))  # ties: teacher's order
        if scores[best] < min_score:
            counts["reference"] += 1
            chosen.append(refs[i])
        else:
            counts["teacher_best" if best == 0 else "other_candidate"] += 1
            chosen.append(options[best])
    return chosen, counts


def teacher_subwords(checkpoint: dict, teacher: Path) -> tuple[str | None, str | None, str | None]:
    """The sentencepiece models the teacher was trained with (its saved options), if they can
    be found: as written, or beside the teacher, and a note for the user. OpenNMT's translator
    does not apply a model's training transforms by itself, and a teacher fed unsegmented text
    translates garbage."""
    from compressor.cli import UsageError

    opt = checkpoint.get("opt")
    transforms = list(getattr(opt, "transforms", None) or [])
    if "sentencepiece" not in transforms:
        other = sorted({"bpe", "onmt_tokenize"} & set(transforms))
        note = None  # pre-tokenized, word-level text: nothing to run
        if other:
            note = (
                f"note: the teacher was trained with the {', '.join(other)} transform, which "
                "onmt-seqkd does not run: give the source as the teacher's tokenized text; the "
                "output is in the teacher's target tokens"
            )
        return None, None, note
    found = []
    for side in ("src", "tgt"):
        written = getattr(opt, f"{side}_subword_model", None)
        places = [Path(written), teacher.parent / Path(written).name] if written else []
        path = next((p for p in places if p.is_file()), None)
        if path is None:
            raise UsageError(
                f"the teacher was trained with sentencepiece but its {side} model "
                f"({written}) is not found; give --src-subword-model and --tgt-subword-model"
            )
        found.append(str(path))
    return found[0], found[1], f"using the teacher's sentencepiece models {found[0]}, {found[1]}"


@dataclass
class Plan:
    """A run, checked before any work starts: a mistake costs a second, not an hour."""

    output: Path
    folder: Path
    source: TextFile
    teacher: Path
    flags: list[str]  # onmt_translate options
    refs: list[str] | None  # --keep-better
    n_best: int
    identity: dict  # what the chunks depend on; a rerun must match it to reuse them
    inputs: dict  # where they came from, for the record
    env: dict[str, str] | None
    note: str | None  # where the subword models came from, said once the checks have passed


def plan(args: argparse.Namespace) -> Plan:
    from compressor.cli import UsageError
    from onmt_plugin.evaluate import subword_args
    from onmt_plugin.export_ct2 import load_onmt_checkpoint

    for flag, value in (
        ("--beam-size", args.beam_size),
        ("--batch-size", args.batch_size),
        ("--chunk-lines", args.chunk_lines),
        ("--threads", args.threads),
        ("--max-length", args.max_length),
    ):
        if value is not None and value <= 0:
            raise UsageError(f"{flag} must be a positive whole number, got {value}")
    named = [args.src, args.teacher, args.src_subword_model, args.tgt_subword_model]
    named.append(args.keep_better)
    output = check_output(
        args.output, [p for p in named if p], force=args.force, ours=is_our_output, what=COMMAND
    )
    folder = work_folder(output)
    if folder.exists() and (not folder.is_dir() or not is_our_folder(folder)):
        raise UsageError(
            f"{folder} exists and is not the work folder of an earlier onmt-seqkd run to "
            f"{output}; remove it yourself or choose another -o"
        )
    source = read_text(args.src, "--src")
    if not source.lines:
        raise UsageError(f"--src {source.path} is empty; nothing to translate")
    teacher = Path(args.teacher)
    if not teacher.is_file():
        raise UsageError(f"--teacher {teacher} does not exist; give an OpenNMT-py checkpoint")
    src_spm, tgt_spm = args.src_subword_model, args.tgt_subword_model
    note = None
    if not src_spm and not tgt_spm:
        src_spm, tgt_spm, note = teacher_subwords(load_onmt_checkpoint(teacher), teacher)
    else:
        load_onmt_checkpoint(teacher)  # a file that is not a model: one line now, not later
    flags = ["-gpu", "-1", "-batch_size", str(args.batch_size), "-beam_size", str(args.beam_size)]
    if args.max_length:
        flags += ["-max_length", str(args.max_length)]
    flags += subword_args(src_spm, tgt_spm)
    refs = None
    if args.keep_better:
        refs = read_text(args.keep_better, "--keep-better").lines
        if len(refs) != len(source.lines):
            raise UsageError(
                f"--keep-better {args.keep_better} has {len(refs)} lines but --src has "
                f"{len(source.lines)}; the files must align line by line"
            )
    n_best = args.beam_size if refs is not None else 1
    identity = {
        "version": MANIFEST_VERSION,
        "source": source.sha256,
        "teacher": file_sha256(teacher),
        "src_subword_model": file_sha256(src_spm) if src_spm else None,
        "tgt_subword_model": file_sha256(tgt_spm) if tgt_spm else None,
        "beam_size": args.beam_size,
        "n_best": n_best,
        "max_length": args.max_length,
        "chunk_lines": args.chunk_lines,
    }
    inputs = {"source": str(source.path.resolve()), "teacher": str(teacher.resolve())}
    inputs.update(source_bytes=source.size, source_lines=len(source.lines))
    for side, model in (("src", src_spm), ("tgt", tgt_spm)):
        inputs[f"{side}_subword_model"] = str(Path(model).resolve()) if model else None
    if refs is not None:
        inputs["keep_better"] = str(Path(args.keep_better).resolve())
    threads = args.threads
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else None
    return Plan(output, folder, source, teacher, flags, refs, n_best, identity, inputs, env, note)


def start_manifest(plan: Plan, force: bool) -> dict:
    """Keep the chunks of an earlier run with the same inputs; refuse (or with ``force``
    discard) chunks made from other inputs. Returns the manifest, written."""
    from compressor.cli import UsageError

    folder = plan.folder
    manifest = read_manifest(folder)
    chunks = sorted(p for p in folder.iterdir() if _CHUNK.fullmatch(p.name))
    changed = difference(manifest.get("run") or {}, plan.identity) if manifest else None
    if chunks and changed:
        if not force:
            raise UsageError(
                f"{folder} holds {len(chunks)} chunks of a run with other inputs: {changed}; "
                "rerun with the same inputs to continue it, or pass --force to discard them"
            )
        print(f"discarding {len(chunks)} chunks of another run: {changed}", file=sys.stderr)
        for path in chunks:
            path.unlink()
    earlier = manifest or {}
    manifest = {
        WRITTEN_BY: COMMAND,
        "run": plan.identity,
        "inputs": plan.inputs,
        # What an earlier run wrote to -o stays claimable until this run replaces it.
        "written_sha256": earlier.get("written_sha256") or [],
        "output": earlier.get("output"),
    }
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def translate_missing(plan: Plan, chunks: list[list[str]]) -> tuple[int, int, float]:
    """Translate the chunks that are not finished yet, with a progress bar over lines.
    Returns (chunks translated, chunks reused, seconds)."""
    from tqdm import tqdm

    todo = [
        (index, lines)
        for index, lines in enumerate(chunks)
        if not finished_chunk(plan.folder, index, plan.n_best * len(lines))
    ]
    done_lines = len(plan.source.lines) - sum(len(lines) for _, lines in todo)
    reused = len(chunks) - len(todo)
    if reused:
        print(
            f"reusing {reused} of {len(chunks)} finished chunks ({done_lines} lines) "
            f"from {plan.folder}",
            file=sys.stderr,
        )
    start = time.perf_counter()
    with tqdm(
        total=len(plan.source.lines),
        initial=done_lines,
        unit="line",
        desc="onmt-seqkd",
        file=sys.stderr,
        mininterval=1,
    ) as progress:
        for index, lines in todo:
            teacher = str(plan.teacher)
            translate_chunk(plan.folder, index, lines, teacher, plan.flags, plan.n_best, plan.env)
            progress.update(len(lines))
    return len(todo), reused, time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    p = plan(args)
    size = args.chunk_lines
    chunks = [p.source.lines[i : i + size] for i in range(0, len(p.source.lines), size)]
    p.folder.mkdir(exist_ok=True)
    with locked(p.folder):
        manifest = start_manifest(p, args.force)
        if p.note:
            print(p.note, file=sys.stderr)
        translated, reused, seconds = translate_missing(p, chunks)
        candidates = []
        for index in range(len(chunks)):
            candidates += split_lines(chunk_path(p.folder, index).read_text(encoding="utf-8"))
        chosen, counts = choose(
            p.source.lines, candidates, p.n_best, p.refs, args.keep_metric, args.keep_min_score
        )
        if len(chosen) != len(p.source.lines):  # a broken invariant, not a user mistake
            raise RuntimeError(f"{len(chosen)} output lines for {len(p.source.lines)} source lines")
        text = "".join(line + "\n" for line in chosen)
        sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        manifest["written_sha256"] = [*manifest["written_sha256"][-1:], sha256]
        manifest["output"] = {
            "path": str(p.output.resolve()),
            "sha256": sha256,
            "lines": len(chosen),
            "choices": counts,
            "keep_metric": args.keep_metric if p.refs is not None else None,
            "keep_min_score": args.keep_min_score if p.refs is not None else None,
            "translated_chunks": translated,
            "reused_chunks": reused,
            "translate_seconds": round(seconds, 1),
        }
        # The record first, naming the old output and the new: whichever is on disk after a
        # kill, --force can claim it; a rerun still finds the chunks.
        atomic_write_json(p.folder / MANIFEST, manifest)
        atomic_write_text(p.output, text)
        for path in p.folder.iterdir():
            if _CHUNK.fullmatch(path.name) or _TEMPORARY.fullmatch(path.name):
                path.unlink(missing_ok=True)
    summary = f"wrote {p.output}: {len(chosen)} lines; translated {translated} of {len(chunks)}"
    summary += f" chunks in {seconds:.0f} s" + (f", reused {reused}" if reused else "")
    if p.refs is not None:
        summary += (
            f"; kept the teacher's best for {counts['teacher_best']}, another of its "
            f"{p.n_best} candidates for {counts['other_candidate']}, the reference for "
            f"{counts['reference']}"
        )
    empty = sum(1 for s, t in zip(p.source.lines, chosen) if s.strip() and not t.strip())
    if empty:
        summary += f"; {empty} non-empty source lines got an empty translation"
    print(summary)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "onmt-seqkd",
        help="translate a training source with an OpenNMT-py teacher (sequence-level "
        "distillation corpus), resumably",
        description="Translate a training source with the teacher and the stock onmt_translate, "
        "for sequence-level knowledge distillation (Kim and Rush, 2016): train the student on "
        "--src and the output (with -quantized_distill -teacher_model for word-level "
        "distillation on top). The output has one plain-text line per source line (empty for "
        "an empty source line). Work is kept in OUT.parts/ chunk by chunk: after a kill, the "
        "same command continues where it stopped.",
    )
    p.add_argument(
        "--teacher", required=True, help="the teacher's OpenNMT-py checkpoint (or packed file)"
    )
    p.add_argument("--src", required=True, help="training source, one sentence a line")
    p.add_argument("-o", "--output", required=True, help="the teacher's translations (target side)")
    p.add_argument("--beam-size", type=int, default=5, help="beam size (default: 5; 1 is greedy)")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch (default: 64)")
    p.add_argument(
        "--max-length",
        type=int,
        help="longest translation in target tokens (onmt_translate -max_length; default: "
        "OpenNMT's, 250): a bound on the runaway repetitions of a weak teacher",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads of onmt_translate (OMP_NUM_THREADS); default: the environment's",
    )
    p.add_argument(
        "--chunk-lines",
        type=int,
        default=1000,
        help="source lines per onmt_translate run: what a kill can lose, each run also loads "
        "the model once (default: 1000)",
    )
    p.add_argument(
        "--src-subword-model",
        help="sentencepiece model of the source side (default: the teacher's, if it was "
        "trained with the sentencepiece transform and the file is found)",
    )
    p.add_argument("--tgt-subword-model", help="sentencepiece model of the target side")
    p.add_argument(
        "--keep-better",
        metavar="REF",
        help="the references of --src (same line count): translate with an n-best list of "
        "--beam-size candidates and keep, per sentence, the candidate closest to the reference "
        "by sentence-level --keep-metric (Kim and Rush's sequence-level interpolation); where "
        "even that one scores below --keep-min-score, keep the reference line instead",
    )
    p.add_argument(
        "--keep-metric",
        choices=("chrf", "bleu"),
        default="chrf",
        help="sacrebleu sentence-level score for --keep-better (default: chrf; bleu uses "
        "effective order)",
    )
    p.add_argument(
        "--keep-min-score",
        type=float,
        default=0.0,
        help="with --keep-better: below this score (0-100) the reference replaces the "
        "teacher's output (default: 0, never)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an output that an earlier onmt-seqkd wrote, and discard chunks of a run "
        "with other inputs",
    )
    p.set_defaults(func=run)
