"""The OpenNMT-py plugin's start-up hook can be trusted: every install route installs it (and
pip removes it), it costs nothing in processes that never import OpenNMT, a run that asks for
qdistill options never silently trains without them (hook off, or an OpenNMT-py it cannot
patch), ``qdistill doctor`` says what is going on, and library paths raise instead of exiting.
Real subprocesses, real wheels and a throwaway virtual environment; no training here (see
tests/test_onmt_plugin.py for the runs of onmt_train that train)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import BIN, ROOT

from onmt_plugin import install, switch
from onmt_plugin.options import CONFIG_OPTION, OPTIONS, named_options

PYTHON = sys.executable


def _env(plugin: str | None = "1", **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != switch.CONSOLE_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    if plugin is None:
        env.pop(switch.ENV_SWITCH, None)
    else:
        env[switch.ENV_SWITCH] = plugin
    return env


def _run(args, cwd, env, timeout=300):
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    """The run failed as a user mistake should: exit 2, one ``qdistill: error`` line, no
    traceback."""
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("qdistill: error")]
    assert len(errors) == 1, done.stderr[-3000:]
    return errors[0]


def _config(folder: Path, **extra) -> Path:
    """A config of a run that would train for a while on files that do not exist: a run the
    guard lets through fails on its data (exit 1), not silently."""
    config = {
        "src_vocab": "missing.src",
        "tgt_vocab": "missing.tgt",
        "data": {"corpus_1": {"path_src": "missing-src.txt", "path_tgt": "missing-tgt.txt"}},
        "save_model": str(folder / "run"),
        "train_steps": 10,
        **extra,
    }
    path = folder / f"c{len(list(folder.glob('c*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# -- 4a: every install route installs the start-up file; pip uninstall removes it ------------


def _source_copy(folder: Path) -> Path:
    """What a wheel is built from (the packages' Python files, no data)."""
    source = folder / "src"
    source.mkdir()
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("compressor", "onmt_plugin"):
        (source / package).mkdir()
        for module in (ROOT / package).glob("*.py"):
            shutil.copy(module, source / package / module.name)
    return source


def _wheel_record(wheel: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as archive:
        record = next(n for n in archive.namelist() if n.endswith(".dist-info/RECORD"))
        listed = {line.split(",")[0] for line in archive.read(record).decode().splitlines()}
        return {n: archive.read(n) for n in archive.namelist() if n in listed}


def test_every_install_route_installs_the_start_up_file_and_uninstall_removes_it(tmp_path):
    source = _source_copy(tmp_path)
    wheels = tmp_path / "wheels"
    # `pip install .` and a wheel: pip builds the wheel with this backend.
    done = _run(
        [
            PYTHON,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            source,
            "-w",
            wheels,
        ],
        tmp_path,
        _env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # `pip install -e .`: the editable wheel (PEP 660) pip asks the backend for.
    build_editable = (
        "import os, sys; from setuptools import build_meta; os.chdir(sys.argv[1]); "
        "print(build_meta.build_editable(sys.argv[2]))"
    )
    done = _run([PYTHON, "-c", build_editable, source, wheels / "editable"], tmp_path, _env())
    assert done.returncode == 0, done.stderr[-3000:]
    regular = next(wheels.glob("qdistill-*.whl"))
    editable = next((wheels / "editable").glob("qdistill-*.whl"))
    for wheel in (regular, editable):
        files = _wheel_record(wheel)
        assert files.get(install.PTH_NAME) == install.PTH_LINE.encode(), wheel.name
    # Installed into a throwaway environment (no torch needed: the hook imports nothing).
    venv = tmp_path / "venv"
    done = _run([PYTHON, "-m", "venv", "--without-pip", venv], tmp_path, _env())
    assert done.returncode == 0, done.stderr
    python = venv / "bin" / "python"
    site = Path(
        _run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            tmp_path,
            _env(),
        ).stdout.strip()
    )
    pip = [PYTHON, "-m", "pip", "--python", python]
    show_hooks = "import sys; print([type(f).__name__ for f in sys.meta_path])"
    for wheel in (regular, editable):
        done = _run([*pip, "install", "--no-deps", "--no-index", "-q", wheel], tmp_path, _env())
        assert done.returncode == 0, done.stderr[-3000:]
        assert (site / install.PTH_NAME).read_text() == install.PTH_LINE, wheel.name
        hooks = _run([python, "-c", show_hooks], tmp_path, _env()).stdout
        assert hooks.count("qdistill_onmt_hook") == 1, hooks
        done = _run([*pip, "uninstall", "-y", "-q", "qdistill"], tmp_path, _env())
        assert done.returncode == 0, done.stderr[-3000:]
        assert not (site / install.PTH_NAME).exists(), wheel.name
        assert "qdistill_onmt_hook" not in _run([python, "-c", show_hooks], tmp_path, _env()).stdout


def test_install_module_reports_the_installed_start_up_file():
    done = _run([PYTHON, "-m", "onmt_plugin.install"], ROOT, _env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("installed: ") and install.PTH_NAME in done.stdout


# -- 12: the start-up file costs nothing until OpenNMT is imported ----------------------------

_MODULES = "import sys, json; print(json.dumps(sorted(sys.modules)))"


def test_start_up_file_imports_nothing_until_onmt_is_imported(tmp_path):
    import json

    on = _run([PYTHON, "-c", _MODULES], tmp_path, _env("1"))
    off = _run([PYTHON, "-c", _MODULES], tmp_path, _env("0"))
    assert on.returncode == off.returncode == 0, on.stderr + off.stderr
    # The same modules with the switch on as off: the start-up line imported nothing.
    assert json.loads(on.stdout) == json.loads(off.stdout)
    assert not [m for m in json.loads(on.stdout) if m.startswith("onmt")]
    hooks = "import sys; print(sum(hasattr(f, '_qdistill_onmt_hook') for f in sys.meta_path))"
    assert _run([PYTHON, "-c", hooks], tmp_path, _env("1")).stdout.strip() == "1"
    assert _run([PYTHON, "-c", hooks], tmp_path, _env("0")).stdout.strip() == "0"
    # The first onmt import hands over to the bootstrap (an empty onmt package here).
    (tmp_path / "onmt").mkdir()
    (tmp_path / "onmt" / "__init__.py").write_text("")
    first = "import sys, onmt; print(sorted(m for m in sys.modules if 'onmt' in m))"
    done = _run([PYTHON, "-c", first], tmp_path, _env("1", PYTHONPATH=str(tmp_path)))
    expected = "['onmt', 'onmt_plugin', 'onmt_plugin.bootstrap', 'onmt_plugin.switch']"
    assert done.stdout.strip() == expected, done


def test_start_up_line_runs_in_well_under_two_milliseconds(tmp_path):
    # What every Python process of the environment pays: site reads the line and executes it.
    script = textwrap.dedent(f"""
        import os, sys, time
        line = {install.PTH_LINE!r}
        sys.meta_path[:] = [f for f in sys.meta_path if not hasattr(f, "_qdistill_onmt_hook")]
        start = time.perf_counter()
        exec(line)
        print(time.perf_counter() - start)
    """)
    times = [float(_run([PYTHON, "-c", script], tmp_path, _env("1")).stdout) for _ in range(3)]
    assert min(times) < 0.002, times


# -- 4b: the plugin off, a run that names qdistill options stops ------------------------------


def test_named_options_follow_argparse_abbreviations_and_the_config_yaml(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"quant_bits": 2, "teacher_model": "t.pt", "layers": 2}))
    argv = ["-config", str(config), "-quantized_dist", "--distill_a=0.5", "-quant_", "-te", "x"]
    assert named_options(argv) == [
        ("quantized_distill", "-quantized_dist"),
        ("distill_alpha", "--distill_a"),
        ("quant_bits", f"quant_bits in {config}"),
        ("teacher_model", f"teacher_model in {config}"),
    ]
    assert named_options(["-conf", str(config)])[0][0] == "quant_bits"
    assert named_options(["-layers", "2", "-distill_alpha", "-0.5"]) == [
        ("distill_alpha", "-distill_alpha")
    ]


def test_abbreviation_table_matches_opennmt_parser():
    """Each option's shortest abbreviation is one character more than the longest prefix it
    shares with an OpenNMT-py option (shorter ones are OpenNMT's, or ambiguous)."""
    script = (
        "from onmt.utils.parse import ArgumentParser; from onmt.opts import train_opts; "
        "p = ArgumentParser(); train_opts(p); "
        "print(' '.join(s.lstrip('-') for a in p._actions for s in a.option_strings))"
    )
    done = _run([PYTHON, "-c", script], ROOT, _env("0"))
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = set(done.stdout.split())
    for option, shortest in [*OPTIONS.items(), CONFIG_OPTION]:
        others = theirs - {option}
        shared = max(len(os.path.commonprefix([option, other])) for other in others)
        assert shortest == shared + 1, option


@pytest.mark.parametrize(
    "how",
    ["command line", "abbreviation", "config yaml", "python -m onmt.bin.train"],
)
def test_switched_off_plugin_refuses_a_run_that_names_qdistill_options(tmp_path, how):
    args = [BIN / "onmt_train", "-config"]
    if how == "command line":
        args += [_config(tmp_path), "-quantized_distill", "-teacher_model", "t.pt"]
    elif how == "abbreviation":
        args += [_config(tmp_path), "-quantized_dist", "--quant_b=2"]
    elif how == "config yaml":
        args += [_config(tmp_path, quantized_distill=True, teacher_model="t.pt", quant_bits=2)]
    else:
        args = [PYTHON, "-m", "onmt.bin.train", "-config", _config(tmp_path), "-quantized_distill"]
    error = _one_error_line(_run(args, tmp_path, _env("0")))
    assert "switched off (QDISTILL_ONMT_PLUGIN=0)" in error, error
    assert "quant" in error and not list(tmp_path.glob("run*"))


def test_switched_off_plugin_leaves_a_plain_run_alone(tmp_path):
    # No qdistill option: OpenNMT runs as without the plugin (here: fails on its data itself).
    done = _run([BIN / "onmt_train", "-config", _config(tmp_path)], tmp_path, _env("0"))
    assert done.returncode != 0 and "qdistill" not in done.stderr, done.stderr[-2000:]


def test_qdistill_options_without_quantized_distill_are_refused(tmp_path):
    done = _run(
        [BIN / "onmt_train", "-config", _config(tmp_path), "-quant_bits", "2"], tmp_path, _env("1")
    )
    error = _one_error_line(done)
    assert "-quant_bits" in error and "without -quantized_distill" in error, error


# -- 5: an OpenNMT-py the plugin cannot patch ------------------------------------------------


def _fake_onmt(folder: Path, variant: str) -> Path:
    """A copy of the installed OpenNMT-py, changed as a later release might be."""
    import importlib.util

    installed = Path(importlib.util.find_spec("onmt").origin).parent  # found, not imported
    root = folder / "fake"
    shutil.copytree(installed, root / "onmt", ignore=shutil.ignore_patterns("__pycache__"))
    if variant == "newer version":
        init = root / "onmt" / "__init__.py"
        init.write_text(init.read_text().replace('__version__ = "3.5.1"', '__version__ = "3.6.0"'))
    elif variant == "opts renamed":
        opts = root / "onmt" / "opts.py"
        opts.write_text(opts.read_text().replace("_add_quant_opts", "_add_quantization_opts"))
    elif variant == "loss renamed":
        trainer = root / "onmt" / "trainer.py"
        trainer.write_text(re.sub(r"\bLossCompute\b", "TrainLossCompute", trainer.read_text()))
        loss = root / "onmt" / "utils" / "loss.py"
        loss.write_text(loss.read_text() + "\nTrainLossCompute = LossCompute\n")
    return root


@pytest.mark.parametrize(
    "variant, reason",
    [
        ("newer version", "OpenNMT-py 3.6.0 is outside >=3.5,<3.6"),
        ("opts renamed", "onmt.opts._add_quant_opts missing"),
        ("loss renamed", "onmt.trainer.LossCompute missing"),
    ],
)
def test_an_opennmt_it_cannot_patch_keeps_working_and_refuses_qdistill_runs(
    tmp_path, variant, reason
):
    env = _env("1", PYTHONPATH=str(_fake_onmt(tmp_path, variant)))
    # Stock tools work untouched: the options parse, without ours.
    shown = _run([BIN / "onmt_train", "-h"], tmp_path, env)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "-train_steps" in shown.stdout and "-quantized_distill" not in shown.stdout
    # A run that asks for quantized distillation stops and says why.
    args = [
        BIN / "onmt_train",
        "-config",
        _config(tmp_path),
        "-quantized_distill",
        "-teacher_model",
        "t.pt",
        "-quant_bits",
        "2",
    ]
    error = _one_error_line(_run(args, tmp_path, env))
    assert "cannot patch this OpenNMT-py" in error and reason in error, error
    assert ">=3.5,<3.6" in error


# -- 4c: qdistill doctor ---------------------------------------------------------------------


def test_doctor_reports_the_hook_the_opennmt_version_and_what_was_patched(tmp_path):
    done = _run([BIN / "qdistill", "doctor"], tmp_path, _env("1"))
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    report = done.stdout
    assert f"start-up file: {install.installed()[0]}" in report
    assert "hook active in this process: yes" in report
    assert "OpenNMT-py: 3.5.1 (supported; the plugin supports >=3.5,<3.6)" in report
    for module in ("onmt.opts", "onmt.train_single", "onmt.trainer", "onmt.models.model_saver"):
        assert f"  {module}: patched; " in report, report
    assert "onmt_train -quantized_distill: ready" in report
    off = _run([BIN / "qdistill", "doctor"], tmp_path, _env("0"))
    assert off.returncode == 1 and "switch: off (QDISTILL_ONMT_PLUGIN=0)" in off.stdout
    assert "will NOT work here" in off.stdout


def test_doctor_names_a_missing_patch_target(tmp_path):
    env = _env("1", PYTHONPATH=str(_fake_onmt(tmp_path, "loss renamed")))
    done = _run([BIN / "qdistill", "doctor"], tmp_path, env)
    assert done.returncode == 1, done.stdout + done.stderr[-2000:]
    assert "onmt.trainer: left untouched: onmt.trainer.LossCompute missing" in done.stdout
    assert "LossCompute MISSING" in done.stdout and "onmt.opts: patched" in done.stdout


# -- 6: library paths raise; only console entries exit ----------------------------------------


def test_plugin_library_code_never_exits_the_process():
    for path in (ROOT / "onmt_plugin").glob("*.py"):
        source = path.read_text()
        assert "os._exit" not in source, path.name
        body = source.split('if __name__ == "__main__":')[0]
        assert "sys.exit(" not in body, path.name


def test_load_checkpoint_of_a_wrong_qd_file_raises_and_the_host_lives_on(tmp_path):
    import torch

    from compressor import save_packed

    save_packed({"w": torch.zeros(4)}, tmp_path / "vision.qd")  # packed, not an OpenNMT model
    (tmp_path / "text.qd").write_text("not a packed file\n")
    truncated = (tmp_path / "vision.qd").read_bytes()
    (tmp_path / "truncated.qd").write_bytes(truncated[: len(truncated) - 8])
    script = textwrap.dedent("""
        import sys
        import onmt.models.model_saver as model_saver
        for name in sys.argv[1:]:
            try:
                model_saver.load_checkpoint(name)
            except ValueError as exc:
                print("raised", type(exc).__name__, str(exc).splitlines()[0])
            finally:
                print("finally", name)
        print("host alive")
    """)
    names = ["vision.qd", "text.qd", "truncated.qd"]
    done = _run([PYTHON, "-c", script, *names], tmp_path, _env("1"))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == "host alive" and [f"finally {n}" for n in names] == lines[1:-1:2]
    raised = lines[0:-1:2]
    assert all(line.startswith("raised CheckpointError") for line in raised), raised
    assert "not of an OpenNMT-py model" in raised[0]
    assert "not a packed file that qdistill wrote" in raised[1]


def test_onmt_translate_reports_a_wrong_qd_model_in_one_line(tmp_path):
    (tmp_path / "text.qd").write_text("not a packed file\n")
    (tmp_path / "src.txt").write_text("ein test\n")
    args = [BIN / "onmt_translate", "-model", "text.qd", "-src", "src.txt", "-output", "o.txt"]
    error = _one_error_line(_run(args, tmp_path, _env("1")))
    assert "text.qd is not a packed file that qdistill wrote" in error, error


def test_build_model_raises_for_a_bad_run_when_called_as_a_library(tmp_path):
    script = textwrap.dedent("""
        import argparse
        import onmt.train_single as train_single
        from onmt_plugin.hooks import StartupError
        opt = argparse.Namespace(quantized_distill=True, teacher_model="t.pt", quant_bits=9,
            quant_bucket_size=256, quant_method="uniform", quant_rounding="nearest",
            quant_keep_first_last=False, distill_temperature=1.0, distill_alpha=0.5,
            distill_topk=0)
        try:
            train_single.build_model(None, opt, None, None, -1)
        except StartupError as exc:
            print("raised:", exc)
        finally:
            print("finally")
    """)
    done = _run([PYTHON, "-c", script], tmp_path, _env("1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [
        "raised: --quant_bits must be from 1 to 8 (a whole number), got 9",
        "finally",
    ]
