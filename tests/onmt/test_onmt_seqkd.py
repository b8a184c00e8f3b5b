"""`qdistill onmt-seqkd` (issue 19) with the real ``onmt_translate`` and ``onmt_train`` on tiny
data: a teacher trained with OpenNMT's sentencepiece transform translates a small corpus in
chunks; a kill keeps the finished chunks and the rerun does not translate them again; the output
is detokenized plain text, one line per source line; a 4-bit student trains on it with
word-level distillation on top; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import BIN, data_path, run_command

from compressor.cli import main
from compressor.format.files import load_checkpoint
from onmt_plugin.seqkd import choose, is_our_output, split_lines

CHUNK = 11
MARK = "a line the rerun must keep"


def _train_teacher(folder: Path) -> None:
    """A 30-step RNN on 400 short toy en-de pairs through OpenNMT's sentencepiece transform
    (a word-level sentencepiece model: pieces a 30-step model already strings into words).
    ``bucket_size`` is small: OpenNMT's default would segment 262,144 examples before step 1."""
    import sentencepiece

    toy = data_path("toy-ende")
    src = (toy / "src-train.txt").read_text(encoding="utf-8").splitlines()
    tgt = (toy / "tgt-train.txt").read_text(encoding="utf-8").splitlines()
    pairs = [(s, t) for s, t in zip(src, tgt) if len(s.split()) <= 12 and len(t.split()) <= 12]
    pairs = pairs[:400]
    (folder / "src-train.txt").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    (folder / "tgt-train.txt").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
    (folder / "spm.txt").write_text("".join(s + "\n" + t + "\n" for s, t in pairs), "utf-8")
    spm = {"input": str(folder / "spm.txt"), "model_prefix": str(folder / "spm")}
    sentencepiece.SentencePieceTrainer.train(
        **spm, vocab_size=1000, model_type="word", minloglevel=2
    )
    config = {
        "src_vocab": "vocab.src",
        "tgt_vocab": "vocab.tgt",
        "save_data": "vocab",
        "src_vocab_size": 1200,
        "tgt_vocab_size": 1200,
        "overwrite": True,
        "data": {"corpus_1": {"path_src": "src-train.txt", "path_tgt": "tgt-train.txt"}},
        "transforms": ["sentencepiece"],
        "src_subword_model": "spm.model",
        "tgt_subword_model": "spm.model",
        "encoder_type": "rnn",
        "decoder_type": "rnn",
        "layers": 1,
        "hidden_size": 32,
        "word_vec_size": 32,
        "batch_size": 32,
        "batch_type": "sents",
        "bucket_size": 256,
        "optim": "adam",
        "learning_rate": 0.01,
        "train_steps": 30,
        "save_checkpoint_steps": 30,
        "seed": 1,
        "num_workers": 0,
    }
    (folder / "c.yaml").write_text(yaml.safe_dump(config))
    done = run_command([BIN / "onmt_build_vocab", "-config", "c.yaml", "-n_sample", 400], folder)
    assert done.returncode == 0, done.stderr[-2000:]
    done = run_command([BIN / "onmt_train", "-config", "c.yaml", "-save_model", "m"], folder)
    assert done.returncode == 0, done.stderr[-2000:]


def _corpus_lines(folder: Path) -> list[str]:
    """21 training sources with one empty line among them: chunks of 11 and 10 lines."""
    lines = (folder / "src-train.txt").read_text(encoding="utf-8").splitlines()[:20]
    return [*lines[:7], "", *lines[7:]]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("onmt_seqkd")
    _train_teacher(folder)
    (folder / "train.src").write_text("\n".join(_corpus_lines(folder)) + "\n", encoding="utf-8")
    return folder


def _seqkd(folder: Path, *extra: object, output: str = "out/train.seqkd.en") -> list[str]:
    """The command's arguments. No subword flags: the teacher's sentencepiece model is found
    through its checkpoint's options (``spm.model``, beside the teacher)."""
    flags = ["--teacher", folder / "m_step_30.pt", "--src", folder / "train.src"]
    flags += ["-o", folder / output, "--chunk-lines", CHUNK, "--beam-size", 2]
    flags += ["--max-length", 8, "--batch-size", 8]
    return ["onmt-seqkd", *map(str, [*flags, *extra])]


@pytest.fixture(scope="module")
def resumed(teacher):
    """Start, kill (the whole process group, SIGKILL) once the first chunk is written, check
    that other inputs are refused, then rerun to the end. The first chunk is marked before the
    rerun: the marked line in the output proves that the chunk was reused, not translated."""
    parts = teacher / "out" / "train.seqkd.en.parts"
    first = subprocess.Popen(
        [str(BIN / "qdistill"), *_seqkd(teacher)],
        cwd=teacher,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (parts / "chunk-000000.txt").exists():
            assert first.poll() is None, "onmt-seqkd ended before its first chunk was written"
            assert time.monotonic() < deadline, "no chunk after 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert not (teacher / "out" / "train.seqkd.en").exists()
    chunk = parts / "chunk-000000.txt"
    lines = split_lines(chunk.read_text(encoding="utf-8"))
    assert len(lines) == CHUNK
    chunk.write_text("\n".join([MARK, *lines[1:]]) + "\n", encoding="utf-8")

    other = io.StringIO()
    with contextlib.redirect_stderr(other):
        code = main(_seqkd(teacher, "--beam-size", 3))
    rerun = run_command([BIN / "qdistill", *_seqkd(teacher)], teacher)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    return teacher, (code, other.getvalue()), rerun


def test_a_rerun_after_a_kill_reuses_finished_chunks(resumed):
    folder, (code, error), rerun = resumed
    assert code == 2 and error.count("\n") == 1
    assert "--beam-size differs (2 there, 3 now)" in error
    assert "pass --force to discard them" in error
    assert "reusing 1 of 2 finished chunks (11 lines)" in rerun.stderr
    assert "translated 1 of 2 chunks" in rerun.stdout and "reused 1" in rerun.stdout
    output = (folder / "out" / "train.seqkd.en").read_text(encoding="utf-8").splitlines()
    assert output[0] == MARK  # chunk 0 came from the killed run, untouched
    manifest = json.loads((folder / "out" / "train.seqkd.en.parts" / "manifest.json").read_text())
    assert manifest["output"]["reused_chunks"] == 1
    assert manifest["output"]["translated_chunks"] == 1
    # Finished: only the record stays in the work folder.
    kept = {p.name for p in (folder / "out" / "train.seqkd.en.parts").iterdir()}
    assert kept <= {"manifest.json", ".lock"}


def test_output_is_plain_text_one_line_per_source_line(resumed):
    folder, _, _ = resumed
    source = (folder / "train.src").read_bytes().split(b"\n")
    raw = (folder / "out" / "train.seqkd.en").read_bytes()
    output = raw.decode("utf-8").split("\n")
    assert len(output) == len(source) == len(_corpus_lines(folder)) + 1  # and a final newline
    assert output[7] == "" and source[7] == b""
    translated = [line for i, line in enumerate(output[1:-1], 1) if i != 7]
    assert sum(bool(line.strip()) for line in translated) >= len(translated) // 2
    assert "\u2581" not in raw.decode("utf-8")  # OpenNMT's transform joined the pieces
    assert all(len(line.split()) <= 8 for line in output)  # --max-length 8


def test_student_trains_on_the_teacher_corpus_with_quantized_distillation(resumed):
    """Sequence-level plus word-level distillation: the teacher's output as the target side,
    the teacher's distribution on it as the soft target, a 4-bit student."""
    folder, _, _ = resumed
    config = yaml.safe_load((folder / "c.yaml").read_text())
    config["data"]["corpus_1"] = {"path_src": "train.src", "path_tgt": "out/train.seqkd.en"}
    config.update(train_steps=2, save_checkpoint_steps=2, batch_size=8)
    (folder / "student.yaml").write_text(yaml.safe_dump(config))
    done = run_command(
        [
            BIN / "onmt_train",
            "-config",
            "student.yaml",
            "-save_model",
            "student",
            "-quantized_distill",
            "-teacher_model",
            "m_step_30.pt",
            "-quant_bits",
            "4",
        ],
        folder,
        env={"QDISTILL_ONMT_PLUGIN": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = load_checkpoint(folder / "student_step_2.pt")["qdistill"]
    assert record["specs"] and all(s["bits"] == 4 for s in record["specs"].values())


def test_force_replaces_its_own_output_and_keep_better_uses_the_n_best(resumed, tmp_path, capsys):
    """A finished output (with its record) copied elsewhere: without --force it stays, with
    --force it is replaced, here by a --keep-better run whose threshold no teacher candidate
    reaches, so every translated line becomes the reference."""
    folder, _, _ = resumed
    output = tmp_path / "train.seqkd.en"
    output.write_bytes((folder / "out" / "train.seqkd.en").read_bytes())
    shutil.copytree(folder / "out" / "train.seqkd.en.parts", tmp_path / "train.seqkd.en.parts")
    assert is_our_output(output)
    assert main(_seqkd(folder, output=str(output))) == 2
    assert "exists; pass --force to replace it" in capsys.readouterr().err

    refs = (folder / "tgt-train.txt").read_text(encoding="utf-8").splitlines()[:20]
    refs = [*refs[:7], "", *refs[7:]]
    (tmp_path / "ref.txt").write_text("\n".join(refs) + "\n", encoding="utf-8")
    better = ["--keep-better", tmp_path / "ref.txt", "--keep-min-score", 101, "--chunk-lines", 100]
    assert main(_seqkd(folder, *better, "--force", output=str(output))) == 0
    assert "the reference for 20" in capsys.readouterr().out
    assert output.read_text(encoding="utf-8").splitlines() == refs
    assert is_our_output(output)

    output.write_text("edited by hand\n")  # no longer what onmt-seqkd wrote
    assert main(_seqkd(folder, "--force", output=str(output))) == 2
    assert "is not a file that qdistill onmt-seqkd wrote" in capsys.readouterr().err
    assert output.read_text() == "edited by hand\n"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("output_is_source", "is also an input"),
        ("missing_source", "cannot read --src"),
        ("binary_source", "is not UTF-8 text"),
        ("text_teacher", "is a text file, not a checkpoint"),
        ("bad_beam", "--beam-size must be a positive whole number, got 0"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(teacher, tmp_path, capsys, case, message):
    (tmp_path / "src.txt").write_text("ein Satz\n")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)))
    (tmp_path / "notes.pt").write_text("not a model\n")
    args = {"--teacher": str(teacher / "m_step_30.pt"), "--src": str(tmp_path / "src.txt")}
    args["-o"] = str(tmp_path / "out.en")
    extra: list[str] = []
    if case == "output_is_source":
        args["-o"] = args["--src"]
    elif case == "missing_source":
        args["--src"] = str(tmp_path / "absent.txt")
    elif case == "binary_source":
        args["--src"] = str(tmp_path / "binary.txt")
    elif case == "text_teacher":
        args["--teacher"] = str(tmp_path / "notes.pt")
    else:
        extra = ["--beam-size", "0"]
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["onmt-seqkd", *(x for pair in args.items() for x in pair), *extra])
    error = capsys.readouterr().err
    assert code == 2
    assert error.count("\n") == 1 and message in error, error
    assert error.startswith("qdistill onmt-seqkd: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_keep_better_picks_the_candidate_closest_to_the_reference():
    sources = ["ein Hund läuft", "", "eine Katze"]
    candidates = [
        "a cat sits",
        "a dog runs",  # sentence 0: the second candidate matches the reference
        "",
        "",
        "zzz",
        "qqq",  # sentence 2: both far from the reference
    ]
    refs = ["a dog runs", "ignored", "a cat"]
    chosen, counts = choose(sources, candidates, 2, refs, "chrf", 30.0)
    assert chosen == ["a dog runs", "", "a cat"]
    assert counts == {"teacher_best": 0, "other_candidate": 1, "reference": 1, "empty_source": 1}
    plain, _ = choose(sources, candidates, 2, None, "chrf", 0.0)
    assert plain == ["a cat sits", "", "zzz"]
    by_bleu, _ = choose(sources, candidates, 2, refs, "bleu", 0.0)
    assert by_bleu[0] == "a dog runs"


def test_subword_flags_are_shared_with_onmt_eval(tmp_path):
    """One helper builds the sentencepiece flags of onmt_translate for onmt-eval and onmt-seqkd."""
    from compressor.cli import UsageError
    from onmt_plugin.evaluate import subword_args

    model = tmp_path / "spm.model"
    model.write_bytes(b"x")
    assert subword_args(None, None) == []
    assert subword_args(str(model), str(model)) == [
        "-transforms",
        "sentencepiece",
        "-src_subword_model",
        str(model),
        "-tgt_subword_model",
        str(model),
    ]
    with pytest.raises(UsageError, match="give both"):
        subword_args(str(model), None)
    with pytest.raises(UsageError, match="does not exist"):
        subword_args(str(model), str(tmp_path / "absent.model"))
