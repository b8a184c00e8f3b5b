"""Translation experiments end to end with the stock OpenNMT-py tools and the qdistill plugin.

One function, :func:`run`, takes a parallel corpus (train/valid/test, plain or gzipped text)
through the steps a user would type: sentencepiece subwords (OpenNMT's own ``sentencepiece``
transform, so translations come out detokenized), ``onmt_build_vocab``, a full-precision LSTM
or transformer teacher (``onmt_train``), a shallower student started from the teacher's layers
(``qdistill shrink onmt``) and trained by ``onmt_train --quantized_distill``, the post-training
quantized teacher (``qdistill onmt-quantize``, the paper's PM baseline), packed files
(``qdistill pack``) and ``qdistill onmt-eval`` of every model on the test set (a transformer's
4-bit student also exported to CTranslate2 int8, ``qdistill onmt-export-ct2``). With ``seqkd``
the teacher also translates the training source (``qdistill onmt-seqkd``) and two more 4-bit
students learn from those translations (sequence-level distillation, Kim and Rush 2016).

Every step writes its output under ``work_dir`` atomically and is skipped when the output is
there; an interrupted ``onmt_train`` continues from its last checkpoint. The Multi30k demo
(``onmt_plugin.demo``) and the experiment recipes run this at their own scales.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from compressor.format.files import (
    CheckpointError,
    atomic_save,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
)
from compressor.format.packed import entropy_ans_available

BIN = Path(sys.executable).parent
SPLITS = ("train", "valid", "test")
_PROGRESS = re.compile(r"Step \d+/|Validation (perplexity|accuracy)|error|Error")


class CorpusError(ValueError):
    """A parallel corpus whose files do not pair up; the message says which."""


@dataclass(frozen=True)
class TranslationScale:
    """How big one run is: data, model and schedule. The defaults are the demo's."""

    name: str = "demo"
    train_pairs: int | None = None  # None: every pair of the training files
    test_pairs: int | None = None
    vocab_size: int = 2000
    # "lstm": bidirectional LSTM encoder, input-feeding LSTM decoder; "transformer": OpenNMT's
    # transformer (sinusoidal positions, label smoothing 0.1, Glorot initialisation)
    model: str = "lstm"
    hidden_size: int = 256  # the LSTM's units, or the transformer's d_model
    heads: int = 4  # transformer only
    transformer_ff: int = 1024  # transformer only: the feed-forward width
    teacher_layers: int = 2  # on each side
    student_layers: int = 1  # encoder layers of the students (and decoder layers, unless:)
    student_dec_layers: int | None = None  # e.g. 1 for a deep-encoder, shallow-decoder student
    teacher_steps: int = 700
    student_steps: int = 500
    batch_tokens: int = 2048
    learning_rate: float = 0.002  # Adam's; the peak, after warm-up, when warmup_steps is set
    # 0: a constant learning rate; else a linear warm-up over these steps, then decay with the
    # inverse square root of the step (OpenNMT's "noam" schedule, which transformers need)
    warmup_steps: int = 0
    # the students' warm-up (they start from trained layers: a shorter one); None: warmup_steps
    student_warmup_steps: int | None = None
    dropout: float = 0.2
    bits: tuple[int, ...] = (4,)  # quantized distillation students
    pm_bits: tuple[int, ...] = (4,)  # post-training quantized teachers
    dq_bits: tuple[int, ...] = ()  # differentiable quantization (learned points) students
    # 4-bit quantized distillation students distilled from the teacher's cached top-k logits
    # (-distill_topk K), to measure what that approximation costs in BLEU
    top_k: tuple[int, ...] = ()
    fp32_student: bool = False  # also the shallow student in full precision, labels only
    bucket_size: int = 256
    # "int4_kernel": the quantized-distillation students train on the int4 kernel's grid, so
    # that onmt_translate runs them on that kernel (onmt-eval then times both paths)
    quant_grid: str = "minmax"
    distill_alpha: float = 0.7
    distill_temperature: float = 1.0
    # sequence-level distillation: the teacher translates the training source with this beam
    # (qdistill onmt-seqkd) and two 4-bit students train on its translations like student_qd4,
    # student_seqkd4 on those alone (-distill_alpha 0), student_seqkd4_wkd with word-level
    # distillation on top (distill_alpha, Kim and Rush's best setting)
    seqkd: bool = False
    seqkd_beam: int = 5
    # with seqkd: the teacher, student_qd4 and the seqkd students are also decoded with this
    # beam (BLEU and chrF beside the greedy ones); 1: greedy only
    eval_beam: int = 5
    threads: int = 2
    gpu: bool = False  # train on GPU 0 (evaluation stays on the CPU, where students deploy)
    seed: int = 1

    @property
    def student_depth(self) -> tuple[int, int]:
        """The students' (encoder, decoder) layers."""
        dec = self.student_layers if self.student_dec_layers is None else self.student_dec_layers
        return self.student_layers, dec


MODELS = ("lstm", "transformer")


def depth_options(enc: int, dec: int) -> dict:
    """OpenNMT-py's depth options (its ``layers`` sets both sides and overrides the other two)."""
    return {"layers": enc} if enc == dec else {"layers": -1, "enc_layers": enc, "dec_layers": dec}


def describe(model: str, hidden_size: int, enc: int, dec: int) -> str:
    """``2-layer LSTM (256 units)`` or ``3+1-layer transformer (d_model 256)``, for progress
    lines and reports."""
    depth = f"{enc}" if enc == dec else f"{enc}+{dec}"
    if model == "transformer":
        return f"{depth}-layer transformer (d_model {hidden_size})"
    return f"{depth}-layer LSTM ({hidden_size} units)"


@dataclass(frozen=True)
class Corpus:
    """Where a parallel corpus lives: file names per split, with ``{lang}`` (de, en, ...) or
    ``{side}`` (src, tgt) in them; a ``.gz`` twin is read too. A corpus without a test split
    (OpenNMT's toy en-de set has no test references) holds out the last training pairs."""

    directory: Path
    src_lang: str
    tgt_lang: str
    names: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "train": ("train.{lang}",),
            "valid": ("val.{lang}", "valid.{lang}"),
            "test": ("test.{lang}", "test_2016_flickr.{lang}"),
        }
    )

    def path(self, split: str, side: str) -> Path:
        lang = self.src_lang if side == "src" else self.tgt_lang
        for pattern in self.names[split]:
            name = pattern.format(lang=lang, side=side)
            for candidate in (f"{name}.gz", name):
                if (self.directory / candidate).is_file():
                    return self.directory / candidate
        wanted = self.names[split][0].format(lang=lang, side=side)
        raise FileNotFoundError(
            f"no {split} file {wanted}[.gz] in {self.directory}; give a folder with the "
            f"train, validation and test files of {self.src_lang}-{self.tgt_lang}"
        )


def _read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle]


def prepare_data(corpus: Corpus, scale: TranslationScale, data_dir: Path) -> dict[str, Path]:
    """Plain-text copies of the splits: the first ``train_pairs`` training pairs and the first
    ``test_pairs`` test pairs (held out from the end of the training files if the corpus has no
    test split)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    files = {
        f"{split}.{side}": data_dir / f"{split}.{side}"
        for split in SPLITS
        for side in ("src", "tgt")
    }
    if all(p.exists() for p in files.values()):
        return files
    lines = {}
    for side in ("src", "tgt"):
        train = _read_lines(corpus.path("train", side))
        if corpus.names["test"]:
            test = _read_lines(corpus.path("test", side))[: scale.test_pairs]
        else:
            held_out = scale.test_pairs or 500
            train, test = train[:-held_out], train[-held_out:]
        lines[f"train.{side}"] = train[: scale.train_pairs]
        lines[f"valid.{side}"] = _read_lines(corpus.path("valid", side))
        lines[f"test.{side}"] = test
    for split in SPLITS:
        if len(lines[f"{split}.src"]) != len(lines[f"{split}.tgt"]):
            raise CorpusError(
                f"{split}: the source and target files of {corpus.directory} have different "
                f"line counts ({len(lines[f'{split}.src'])} and {len(lines[f'{split}.tgt'])})"
            )
    for key, path in files.items():
        atomic_write_text(path, "\n".join(lines[key]) + "\n")
    return files


def train_sentencepiece(files: Mapping[str, Path], scale: TranslationScale, work: Path) -> None:
    """One unigram sentencepiece model per language, trained on the training split."""
    import sentencepiece

    for side in ("src", "tgt"):
        model = work / f"spm.{side}.model"
        if model.exists():
            continue
        # sentencepiece writes PREFIX.model and PREFIX.vocab itself: train under a partial
        # name, then copy them into place atomically, the model (which marks the step done)
        # last.
        prefix = work / f".spm.{side}.partial"
        sentencepiece.SentencePieceTrainer.train(
            input=str(files[f"train.{side}"]),
            model_prefix=str(prefix),
            vocab_size=scale.vocab_size,
            character_coverage=1.0,
            num_threads=scale.threads,
            minloglevel=2,
        )
        for suffix, target in ((".vocab", work / f"spm.{side}.vocab"), (".model", model)):
            partial = prefix.with_name(prefix.name + suffix)
            atomic_write_bytes(target, partial.read_bytes())
            partial.unlink()


def base_config(files: Mapping[str, Path], scale: TranslationScale, work: Path) -> dict:
    """The OpenNMT-py options every model of the run shares (data, subwords, architecture,
    schedule); the depth is each model's own (:func:`depth_options`)."""
    if scale.model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {scale.model!r}")
    placement = {"world_size": 1, "gpu_ranks": [0]} if scale.gpu else {}
    config = {
        **placement,
        "src_vocab": str(work / "vocab.src"),
        "tgt_vocab": str(work / "vocab.tgt"),
        "src_vocab_size": scale.vocab_size + 100,
        "tgt_vocab_size": scale.vocab_size + 100,
        "transforms": ["sentencepiece"],
        "src_subword_model": str(work / "spm.src.model"),
        "tgt_subword_model": str(work / "spm.tgt.model"),
        "data": {
            "corpus_1": {"path_src": str(files["train.src"]), "path_tgt": str(files["train.tgt"])},
            "valid": {"path_src": str(files["valid.src"]), "path_tgt": str(files["valid.tgt"])},
        },
        "encoder_type": "brnn",
        "decoder_type": "rnn",
        "rnn_type": "LSTM",
        "hidden_size": scale.hidden_size,
        "word_vec_size": scale.hidden_size,
        "batch_type": "tokens",
        "batch_size": scale.batch_tokens,
        "valid_batch_size": 64,
        "bucket_size": 4096,
        "optim": "adam",
        "learning_rate": scale.learning_rate,
        "dropout": scale.dropout,
        "report_every": 50,
        "seed": scale.seed,
        "num_workers": 0,
    }
    if scale.model == "transformer":
        config.update(
            encoder_type="transformer",
            decoder_type="transformer",
            position_encoding=True,
            heads=scale.heads,
            transformer_ff=scale.transformer_ff,
            attention_dropout=scale.dropout,
            label_smoothing=0.1,
            param_init=0.0,
            param_init_glorot=True,
            adam_beta2=0.998,
            normalization="tokens",
        )
        del config["rnn_type"]
    return {**config, **schedule_options(scale, scale.warmup_steps)}


def schedule_options(scale: TranslationScale, warmup_steps: int) -> dict:
    """The learning-rate schedule: constant, or OpenNMT's noam (``learning_rate * d_model^-0.5
    * min(step^-0.5, step * warmup^-1.5)``) scaled so that its peak, at the end of the
    warm-up, is the scale's learning rate."""
    if not warmup_steps:
        return {"learning_rate": scale.learning_rate, "decay_method": "none"}
    return {
        "decay_method": "noam",
        "warmup_steps": warmup_steps,
        "learning_rate": scale.learning_rate * (scale.hidden_size * warmup_steps) ** 0.5,
    }


def build_vocab(config: dict, work: Path, threads: int) -> None:
    """OpenNMT's vocabulary files ``vocab.{src,tgt}`` in ``work`` (skipped when there)."""
    if (work / "vocab.tgt").exists():
        return
    # onmt_build_vocab writes its files itself: into partial names, copied into place
    # atomically afterwards, vocab.tgt (which marks the step done) last.
    partial = {side: work / f".vocab.partial.{side}" for side in ("src", "tgt")}
    vocab_config = work / "vocab.yaml"
    atomic_write_text(
        vocab_config,
        yaml.safe_dump(
            {
                **config,
                "save_data": str(work / "vocab"),
                "overwrite": True,
                "src_vocab": str(partial["src"]),
                "tgt_vocab": str(partial["tgt"]),
            }
        ),
    )
    _run(
        [BIN / "onmt_build_vocab", "-config", vocab_config, "-n_sample", "-1"],
        work / "vocab.log",
        threads,
        echo=False,
    )
    for side in ("src", "tgt"):
        atomic_write_bytes(work / f"vocab.{side}", partial[side].read_bytes())
        partial[side].unlink()


def _run(command: list, log: Path, threads: int, echo: bool = True) -> None:
    """Run a tool, keep its whole output in ``log`` and echo its progress lines."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    with open(log, "a", encoding="utf-8") as record:
        record.write(f"$ {' '.join(map(str, command))}\n")
        proc = subprocess.Popen(
            [str(c) for c in command],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            record.write(line)
            if echo and _PROGRESS.search(line):
                print(f"    {line.rstrip().split(' INFO] ')[-1]}", flush=True)
        if proc.wait() != 0:
            raise RuntimeError(f"{Path(command[0]).name} failed; see {log}")


def _checkpoint_error(path: Path) -> str | None:
    """Why ``path`` is not a checkpoint to continue from (None if it is one)."""
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as exc:
        return str(exc)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        return f"{path}: not an OpenNMT-py checkpoint (no 'model')"
    return None


def _last_checkpoint(work: Path, prefix: str, steps: int) -> tuple[int, Path] | None:
    """The newest ``{prefix}_step_N.pt`` up to ``steps`` that loads; each newer one that does
    not (a write cut short by a kill, a full disk) is skipped with one line saying so."""
    found = sorted(
        (
            (int(m.group(1)), p)
            for p in work.glob(f"{prefix}_step_*.pt")
            if (m := re.fullmatch(rf"{re.escape(prefix)}_step_(\d+)\.pt", p.name))
            and int(m.group(1)) <= steps
        ),
        reverse=True,
    )
    for step, path in found:
        error = _checkpoint_error(path)
        if error is None:
            return step, path
        print(f"    skipping {path.name}, it does not load ({error})", flush=True)
    return None


def train(
    config: dict, work: Path, prefix: str, steps: int, threads: int, extra: Iterable[str] = ()
) -> Path:
    """``onmt_train`` to ``steps``, continuing from the newest ``{prefix}_step_N.pt`` that
    loads (one that does not is skipped and reported, and training falls back to the one
    before it)."""
    final = work / f"{prefix}_step_{steps}.pt"
    last = _last_checkpoint(work, prefix, steps)
    if last is not None and last[0] == steps:
        return final
    config = {
        **config,
        "save_model": str(work / prefix),
        "train_steps": steps,
        "save_checkpoint_steps": max(50, steps // 4),
        "valid_steps": max(50, steps // 2),
        "keep_checkpoint": 2,
    }
    path = work / f"{prefix}.yaml"
    atomic_write_text(path, yaml.safe_dump(config))
    args = list(extra)
    if last is not None:
        print(f"    resuming {prefix} from step {last[0]}", flush=True)
        if "-train_from" in args:  # the initial weights give way to our own checkpoint
            i = args.index("-train_from")
            del args[i : i + 2]
        args = [a for a in args if a not in ("-reset_optim", "all")]
        args += ["-train_from", str(last[1])]
    _run([BIN / "onmt_train", "-config", path, *args], work / f"{prefix}.log", threads)
    if _checkpoint_error(final) is not None:
        raise RuntimeError(f"onmt_train did not write a loadable {final}; see {prefix}.log")
    return final


def strip_optimizer(source: Path, target: Path) -> Path:
    """The checkpoint without its optimizer state: what a user deploys (and what a
    compression ratio should be measured against)."""
    if not target.exists():
        checkpoint = load_checkpoint(source)
        checkpoint.pop("optim", None)
        checkpoint.pop("qdistill", None)
        atomic_save(checkpoint, target)
    return target


def distill_options(
    scale: TranslationScale,
    teacher: Path,
    bits: int,
    method: str = "uniform",
    alpha: float | None = None,
    top_k: int = 0,
    grid: str = "minmax",
) -> list[str]:
    """The plugin's ``onmt_train`` options of one quantized-distillation student; ``alpha``
    defaults to the scale's ``distill_alpha``."""
    return [
        "-quantized_distill",
        "-teacher_model",
        str(teacher),
        "-quant_bits",
        str(bits),
        "-quant_method",
        method,
        "-quant_bucket_size",
        str(scale.bucket_size),
        "-distill_alpha",
        str(scale.distill_alpha if alpha is None else alpha),
        "-distill_topk",
        str(top_k),
        "-distill_temperature",
        str(scale.distill_temperature),
        "-quant_grid",
        grid,
    ]


def translate_corpus(
    teacher: Path, files: Mapping[str, Path], scale: TranslationScale, work: Path
) -> dict:
    """The teacher's beam-search translations of the training source, ``data/train.seqkd.tgt``
    (``qdistill onmt-seqkd``, which resumes chunk by chunk after a kill), and what they cost,
    kept in ``seqkd.json`` (written last: it marks the step done)."""
    from onmt_plugin.seqkd import MANIFEST, work_folder

    target = work / "data" / "train.seqkd.tgt"
    record_path = work / "seqkd.json"
    if record_path.exists() and target.exists():
        return json.loads(record_path.read_text())
    started = time.perf_counter()
    if not target.exists():  # else finished by a run killed before it wrote the record
        _qdistill(
            "onmt-seqkd",
            "--teacher",
            teacher,
            "--src",
            files["train.src"],
            "-o",
            target,
            "--beam-size",
            scale.seqkd_beam,
            "--threads",
            scale.threads,
            "--src-subword-model",
            work / "spm.src.model",
            "--tgt-subword-model",
            work / "spm.tgt.model",
        )
    wall = time.perf_counter() - started
    output = json.loads((work_folder(target) / MANIFEST).read_text())["output"]
    record = {
        "path": str(target),
        "beam_size": scale.seqkd_beam,
        "lines": output["lines"],
        # onmt_translate's time on the chunks this run translated (a resumed run reuses some)
        "seconds": output["translate_seconds"],
        "translated_chunks": output["translated_chunks"],
        "reused_chunks": output["reused_chunks"],
        "wall_seconds": round(wall, 1),
    }
    atomic_write_json(record_path, record)
    return record


def _qdistill(*args: str) -> None:
    from compressor.cli import main

    code = main([str(a) for a in args])
    if code:
        raise RuntimeError(f"qdistill {args[0]} failed with exit code {code}")


def run(
    corpus: Corpus,
    scale: TranslationScale,
    work_dir: str | os.PathLike,
    teacher: str | os.PathLike | None = None,
) -> dict:
    """Run (or finish) the whole experiment; returns the evaluation rows and the scale.

    ``teacher``: an existing, trained OpenNMT-py checkpoint to compress instead of training
    one; its sentencepiece models and vocabularies (``spm.{src,tgt}.model``,
    ``vocab.{src,tgt}``) must lie beside it, and are used as they are."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    steps = 8
    existing = teacher

    print(f"[1/{steps}] data: {corpus.directory}", flush=True)
    files = prepare_data(corpus, scale, work / "data")
    counts = {k: len(v.read_text(encoding="utf-8").splitlines()) for k, v in files.items()}
    print(
        f"    {counts['train.src']:,} training pairs, {counts['valid.src']:,} validation, "
        f"{counts['test.src']:,} test",
        flush=True,
    )

    if teacher is not None:
        teacher = Path(teacher)
        print(f"[2/{steps}] sentencepiece and vocab of the existing teacher {teacher}")
        for name in ("spm.src.model", "spm.tgt.model", "vocab.src", "vocab.tgt"):
            if not (work / name).exists():
                if not (teacher.parent / name).is_file():
                    raise FileNotFoundError(f"{teacher.parent} lacks {name}, beside the teacher")
                atomic_write_bytes(work / name, (teacher.parent / name).read_bytes())
    else:
        print(f"[2/{steps}] sentencepiece ({scale.vocab_size} pieces per language) and vocab")
    train_sentencepiece(files, scale, work)
    config = base_config(files, scale, work)
    build_vocab(config, work, scale.threads)

    layers = scale.teacher_layers
    if teacher is not None:
        print(f"[3/{steps}] teacher: the existing {teacher} (not trained here)", flush=True)
    else:
        what = describe(scale.model, scale.hidden_size, layers, layers)
        print(f"[3/{steps}] teacher: {what}, {scale.teacher_steps} steps", flush=True)
        teacher_ckpt = train(
            {**config, **depth_options(layers, layers)},
            work,
            "teacher",
            scale.teacher_steps,
            scale.threads,
        )
        teacher = strip_optimizer(teacher_ckpt, work / "teacher.pt")

    print(f"[4/{steps}] student initialised from the teacher's first layers", flush=True)
    student_init = work / "student_init.pt"
    enc, dec = scale.student_depth
    if not student_init.exists():
        _qdistill(
            "shrink",
            "onmt",
            "--checkpoint",
            teacher,
            "-o",
            student_init,
            "--enc-layers",
            enc,
            "--dec-layers",
            dec,
        )

    models: dict[str, Path] = {"teacher": teacher}
    entropy_coded: dict[str, Path] = {}
    student_config = {**config, **depth_options(enc, dec)}
    if scale.student_warmup_steps is not None:
        student_config.update(schedule_options(scale, scale.student_warmup_steps))
    from_teacher = ["-train_from", str(student_init), "-reset_optim", "all"]
    if scale.fp32_student:
        print(f"[5/{steps}] student_fp32: labels only, {scale.student_steps} steps", flush=True)
        ckpt = train(
            student_config, work, "student_fp32", scale.student_steps, scale.threads, from_teacher
        )
        models["student_fp32"] = strip_optimizer(ckpt, work / "student_fp32.pt")
    students = [(f"student_qd{b}", b, "uniform") for b in scale.bits]
    students += [(f"student_dq{b}", b, "differentiable") for b in scale.dq_bits]
    students = [(name, bits, method, 0) for name, bits, method in students]
    students += [(f"student_qd4_top{k}", 4, "uniform", k) for k in scale.top_k]
    on_kernel: list[str] = []  # students trained on the int4 kernel grid
    for name, bits, method, top_k in students:
        grid = scale.quant_grid if bits == 4 and method == "uniform" else "minmax"
        if grid == "int4_kernel":
            on_kernel.append(name)
        cached = f", teacher's top-{top_k} logits cached" if top_k else ""
        print(
            f"[5/{steps}] {name}: {describe(scale.model, scale.hidden_size, enc, dec)} {bits}-bit "
            f"student, {method} "
            f"quantized distillation{cached}, {scale.student_steps} steps",
            flush=True,
        )
        distill = distill_options(scale, teacher, bits, method, top_k=top_k, grid=grid)
        ckpt = train(
            student_config, work, name, scale.student_steps, scale.threads, distill + from_teacher
        )
        models[name] = _pack(ckpt, work / f"{name}.qd", entropy_coded)

    seqkd_models: dict[str, Path] = {}
    seqkd = None
    if scale.seqkd:
        print(
            f"[5/{steps}] the teacher translates the {counts['train.src']:,} training sentences "
            f"(beam {scale.seqkd_beam}, qdistill onmt-seqkd)",
            flush=True,
        )
        seqkd = translate_corpus(teacher, files, scale, work)
        print(f"    {seqkd['lines']:,} lines, {seqkd['seconds']:.0f} s", flush=True)
        # the teacher's translations as the target side; validation stays on the references
        data = {**student_config["data"]}
        data["corpus_1"] = {**data["corpus_1"], "path_tgt": seqkd["path"]}
        seqkd_config = {**student_config, "data": data}
        for name, alpha in (("student_seqkd4", 0.0), ("student_seqkd4_wkd", scale.distill_alpha)):
            print(
                f"[5/{steps}] {name}: {describe(scale.model, scale.hidden_size, enc, dec)} 4-bit "
                f"student on the teacher's translations, distill_alpha {alpha:g}, "
                f"{scale.student_steps} steps",
                flush=True,
            )
            distill = distill_options(scale, teacher, 4, alpha=alpha, grid=scale.quant_grid)
            ckpt = train(
                seqkd_config, work, name, scale.student_steps, scale.threads, distill + from_teacher
            )
            seqkd_models[name] = _pack(ckpt, work / f"{name}.qd", entropy_coded)

    print(f"[6/{steps}] post-training quantization of the teacher (PM)", flush=True)
    for bits in scale.pm_bits:
        pm = work / f"teacher_pm{bits}.pt"
        if not pm.exists():
            _qdistill("onmt-quantize", teacher, "--bits", bits, "-o", pm)
        models[f"teacher_pm{bits}"] = _pack(pm, work / f"teacher_pm{bits}.qd", entropy_coded)

    if scale.model == "transformer" and "student_qd4" in models:
        # the deployment most OpenNMT-py users have: the 4-bit student exported to CTranslate2
        # with its own int8 re-quantization (onmt-eval translates it with CTranslate2)
        ct2 = work / "student_qd4.ct2_int8"
        if not ct2.exists():
            print(f"[6/{steps}] student_qd4 exported to CTranslate2 (int8)", flush=True)
            _qdistill("onmt-export-ct2", models["student_qd4"], "-o", ct2, "--quantization", "int8")
        models["student_qd4_ct2_int8"] = ct2

    print(f"[7/{steps}] onmt-eval on {counts['test.src']:,} test sentences", flush=True)
    fp32_paths = []  # each kernel-grid student once more, through the fp32 path
    for name in on_kernel:
        models[f"{name}_fp32path"] = models[name]
        fp32_paths.append(f"{name}_fp32path")
    models.update(seqkd_models)
    rows = evaluate(models, files, work, work / "eval.json", fp32_paths)
    for row in rows:
        if row["name"] in seqkd_models:
            row["seqkd"] = seqkd  # the corpus translation they were trained on
    if seqkd_models and scale.eval_beam > 1:
        beam = {k: v for k, v in models.items() if k in ("teacher", "student_qd4", *seqkd_models)}
        beam_json = work / f"eval_beam{scale.eval_beam}.json"
        by_name = {
            r["name"]: r for r in evaluate(beam, files, work, beam_json, beam=scale.eval_beam)
        }
        for row in rows:
            if row["name"] in by_name:
                row["beam_size"] = scale.eval_beam
                row["bleu_beam"] = by_name[row["name"]]["bleu"]
                row["chrf_beam"] = by_name[row["name"]]["chrf"]
    for row in rows:  # the same weights with their codes entropy-coded, where it could be done
        if row["name"] in entropy_coded:
            row["bytes_ans"] = entropy_coded[row["name"]].stat().st_size

    print(f"[8/{steps}] report", flush=True)
    result = {"scale": asdict(scale), "corpus": str(corpus.directory), "counts": counts}
    result["existing_teacher"] = None if existing is None else str(existing)
    result["rows"] = rows
    result["seqkd"] = seqkd
    write_report(result, work)
    return result


def evaluate(
    models: Mapping[str, Path],
    files: Mapping[str, Path],
    work: Path,
    result_json: Path,
    fp32: Sequence[str] = (),
    beam: int = 1,
) -> list[dict]:
    """The ``qdistill onmt-eval`` rows of ``models`` on the test set, kept in ``result_json``.
    Models that an evaluation already there lacks (added to the run after it, like the seqkd
    students of an earlier run) are evaluated on their own, with the teacher again as the
    baseline of sizes and the reference of agreement, into ``*_added.json``: the evaluation
    of the others is kept, not redone. ``fp32``: names run on the fp32 path."""
    if not result_json.exists():
        onmt_eval(models, files, work, result_json, beam, fp32)
    rows = json.loads(result_json.read_text())
    missing = [name for name in models if name not in {row["name"] for row in rows}]
    if missing:
        added = result_json.with_name(f"{result_json.stem}_added.json")
        done = json.loads(added.read_text()) if added.exists() else []
        if not set(missing) <= {row["name"] for row in done}:  # none yet, or of fewer models
            wanted = {"teacher": models["teacher"], **{name: models[name] for name in missing}}
            onmt_eval(wanted, files, work, added, beam, fp32, force=True)
            done = json.loads(added.read_text())
        rows += [row for row in done if row["name"] in missing]
    return rows


def onmt_eval(
    models: Mapping[str, Path],
    files: Mapping[str, Path],
    work: Path,
    result_json: Path,
    beam: int,
    fp32: Sequence[str] = (),
    baseline: str | None = "teacher",
    force: bool = False,
) -> None:
    """One ``qdistill onmt-eval`` run of ``models`` on ``files["test.src"]`` against
    ``files["test.tgt"]`` with the sentencepiece models in ``work``; ``baseline`` (a model
    name) is the size and speed baseline and the agreement reference."""
    fp32_flags = [flag for name in fp32 if name in models for flag in ("--fp32", name)]
    baseline_flags = ["--baseline", baseline, "--teacher", baseline] if baseline else []
    _qdistill(
        "onmt-eval",
        *(f"{name}={path}" for name, path in models.items()),
        *fp32_flags,
        *(["--force"] if force else []),
        "--src",
        files["test.src"],
        "--ref",
        files["test.tgt"],
        "--src-subword-model",
        work / "spm.src.model",
        "--tgt-subword-model",
        work / "spm.tgt.model",
        "--beam-size",
        beam,
        *baseline_flags,
        "--json",
        result_json,
    )


def _pack(checkpoint: Path, packed: Path, entropy_coded: dict[str, Path]) -> Path:
    """Pack a quantized checkpoint (once) and, where rANS is available, also with its codes
    entropy-coded, recorded in ``entropy_coded`` under the model's name."""
    if not packed.exists():
        _qdistill("pack", checkpoint, "-o", packed)
    if entropy_ans_available():
        coded = packed.with_suffix(".ans.qd")
        if not coded.exists():
            _qdistill("pack", checkpoint, "-o", coded, "--entropy", "ans")
        entropy_coded[packed.stem] = coded
    return packed


def seqkd_notes(seqkd: dict | None, scale: Mapping, beam: int | None) -> list[str]:
    """What the sequence-level distillation rows are and what the teacher's translations of
    the training source cost (a paragraph of the report; none without them)."""
    if not seqkd:
        return []
    resumed = f", {seqkd['reused_chunks']} chunks reused" if seqkd.get("reused_chunks") else ""
    beam_note = (
        f" BLEU/chrF beam {beam}: the same models decoded with beam search of size {beam}."
        if beam
        else ""
    )
    return [
        "student_seqkd4*: sequence-level distillation (Kim and Rush, 2016). The teacher "
        f"translated the {seqkd['lines']:,} training sentences with beam {seqkd['beam_size']} "
        f"(`qdistill onmt-seqkd`) in {seqkd['seconds']:,.0f} s{resumed}; 4-bit students, "
        "started and trained like student_qd4, learned from those translations instead of the "
        "references: student_seqkd4 from them alone (distill_alpha 0), student_seqkd4_wkd with "
        f"word-level distillation on top (distill_alpha {scale['distill_alpha']:g})." + beam_note,
        "",
    ]


def write_report(result: dict, work: Path) -> None:
    """``report.md`` (the table, the scale, the signatures) and ``bleu_vs_size.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for row in rows:
        marker = {"teacher": "s", "student_fp32": "D"}.get(
            row["name"], "^" if "pm" in row["name"] else "o"
        )
        ax.scatter(row["bytes"], row["bleu"], marker=marker, s=50)
        ax.annotate(
            row["name"],
            (row["bytes"], row["bleu"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_xlabel("file size (bytes, log scale)")
    ax.set_ylabel("BLEU (sacrebleu)")
    ax.set_title(f"{Path(result['corpus']).name}: BLEU against file size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(work / "bleu_vs_size.png", "wb") as handle:
        fig.savefig(handle, dpi=120, format="png")
    plt.close(fig)

    scale, counts = result["scale"], result["counts"]
    if result.get("existing_teacher"):
        about = [
            f"Teacher: the existing, trained checkpoint {result['existing_teacher']} (not "
            f"trained here). Students: {scale['student_layers']}-layer, started from the "
            f"teacher's first layers, {scale['student_steps']} steps on "
            f"{counts['train.src']:,} training pairs; {counts['test.src']:,} test sentences, "
            "greedy decoding, CPU. path: int4 = the packed 4-bit codes multiplied by PyTorch's "
            "int4 kernel, fp32 = the weights decoded to fp32 (the same values).",
        ]
    else:
        model, hidden = scale.get("model", "lstm"), scale["hidden_size"]
        enc = scale["student_layers"]
        dec = enc if scale.get("student_dec_layers") is None else scale["student_dec_layers"]
        teacher = describe(model, hidden, scale["teacher_layers"], scale["teacher_layers"])
        about = [
            f"Scale: {counts['train.src']:,} training pairs, sentencepiece "
            f"{scale['vocab_size']} pieces per language, {teacher} teacher "
            f"({scale['teacher_steps']} steps), {describe(model, hidden, enc, dec)} students "
            f"({scale['student_steps']} steps), "
            f"{counts['test.src']:,} test sentences, greedy decoding, CPU. This is a short run: "
            "compare the models with each other, not with published Multi30k results. At this "
            "scale the teacher is far from converged, and the students continue training from "
            "its layers, so a student can score above its teacher.",
        ]
    beam = next((row["beam_size"] for row in rows if row.get("beam_size")), None)
    beam_head = f" BLEU beam {beam} | chrF beam {beam} |" if beam else ""
    lines = [
        f"# Quantized distillation on {Path(result['corpus']).name} ({scale['name']} scale)",
        "",
        *about,
        "",
        "| model | file bytes | compression | BLEU | chrF |" + beam_head + " ppl/word "
        "| agreement | path | decoding tokens/s | peak RSS MiB |",
        "|---|---:|---:|---:|---:|" + "---:|" * (2 if beam else 0) + "---:|---:|---|---:|---:|",
    ]

    def cell(value: object, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for row in rows:
        beam_cells = (
            f"| {cell(row.get('bleu_beam'), '.2f')} | {cell(row.get('chrf_beam'), '.2f')} "
            if beam
            else ""
        )
        lines.append(
            f"| {row['name']} | {row['bytes']:,} | {cell(row['compression'], '.2f')}x "
            f"| {cell(row['bleu'], '.2f')} | {cell(row['chrf'], '.2f')} {beam_cells}"
            f"| {cell(row['ppl_word'], '.2f')} | {cell(row['agreement_bleu'], '.1f')} "
            f"| {row.get('runtime', 'fp32')} | {cell(row.get('decode_tokens_per_s'), '.0f')} "
            f"| {cell(row.get('peak_rss_mib'), '.0f')} |"
        )
    signature = rows[0]["extra"].get("bleu_signature", "")
    lines += [
        "",
        "teacher (and student_fp32): fp32 checkpoints without optimizer state; student_qd*: "
        "packed quantized-distillation students; student_dq*: packed students with learned "
        "(differentiable) points; teacher_pm*: packed post-training quantized teacher. "
        "ppl/word: perplexity of the references per word (whitespace-separated, plus one end of "
        "sentence per line). Agreement: BLEU of a model's output against the teacher's output.",
        "",
        *seqkd_notes(result.get("seqkd"), scale, beam),
        *(
            f"{row['name']} with its codes entropy-coded (`qdistill pack --entropy ans`, the "
            f"same weights): {row['bytes_ans']:,} bytes"
            for row in rows
            if row.get("bytes_ans")
        ),
        "",
        f"BLEU signature: `{signature}`",
        "",
        "![BLEU against file size](bleu_vs_size.png)",
        "",
    ]
    atomic_write_text(work / "report.md", "\n".join(lines))
