"""What the plugin changes in OpenNMT-py, applied as each module is imported.

- ``onmt.opts._add_quant_opts``: the quantized-distillation options join OpenNMT's own parser
  (CLI and YAML).
- ``onmt.train_single.build_model``: the student is quantized right after it is built, before
  the optimizer exists; the frozen teacher is loaded and checked against the student's
  vocabularies; a qdistill checkpoint given to ``-train_from`` restores the shadow weights.
  ``onmt.train_single.main``: in an ``onmt_train`` process (and the workers it spawns), a run
  that cannot start as asked is reported as one line, exit status 2, without a traceback.
- ``onmt.trainer.LossCompute``: adds the distillation term on non-pad target positions,
  summed as OpenNMT's own loss is (the trainer normalises); statistics (perplexity) stay those
  of the quantized student's cross-entropy. ``onmt.trainer.Trainer.validate``: the validation
  figures are logged as the quantized student's.
- ``onmt.models.model_saver``: every checkpoint ``ModelSaver._save`` writes appears complete or
  not at all (``model_saver.torch.save`` becomes an atomic write: temporary name, fsync,
  rename); a student's checkpoint holds the quantized values under OpenNMT's plain names
  (stock ``onmt_translate`` loads them) and the full-precision shadow weights under
  ``checkpoint["qdistill"]``; checkpoints pickle an ``argparse.Namespace``, which torch >= 2.6
  refuses to load by default, so it is allow-listed; ``load_checkpoint`` also takes the packed
  files ``qdistill pack`` writes (``onmt_translate -model student.qd``).
- ``onmt.model_builder.load_test_model``: a packed student trained on the int4 kernel grid
  runs on the int4 kernel (``QDISTILL_RUNTIME``; see :mod:`onmt_plugin.runtime`).
- ``onmt.bin.translate.main`` (the ``onmt_translate`` console entry): a file that is not a
  model is reported as one line, exit status 2.

Before patching, the OpenNMT-py version must be in :data:`SUPPORTED` and each module must have
every name the plugin patches or relies on (:data:`TARGETS`); otherwise that module is left
untouched (stock tools work as without the plugin) and a run that asks for quantized
distillation stops with a message that says why. Nothing here exits the process or raises
from an import.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from types import ModuleType

from onmt_plugin.options import QuantDistillSettings, add_options, named_options

SUPPORTED = ((3, 5), (3, 6))  # OpenNMT-py >= 3.5, < 3.6
SUPPORTED_TEXT = ">=3.5,<3.6"

# Per module: the names the plugin patches or relies on. All must be present for a
# quantized-distillation run; onmt.bin.translate is a convenience (its console entry only).
TARGETS: dict[str, tuple[str, ...]] = {
    "onmt.opts": ("_add_quant_opts",),
    "onmt.train_single": ("build_model", "main", "_get_model_opts"),
    "onmt.trainer": (
        "LossCompute",
        "LossCompute.from_opts",
        "LossCompute.forward",
        "Trainer.validate",
    ),
    "onmt.models.model_saver": ("ModelSaver._save", "load_checkpoint", "torch"),
}
OPTIONAL_TARGETS: dict[str, tuple[str, ...]] = {
    "onmt.bin.translate": ("main",),
    "onmt.model_builder": ("load_test_model",),
}

PATCHED = "patched"
_status: dict[str, str] = {}  # module name -> PATCHED, or why it was left untouched
_MARK = "_qdistill_patched"


class StartupError(ValueError):
    """A quantized-distillation run that cannot start as asked (a user mistake).

    Library callers get the exception; ``onmt_train`` prints it as one line, exit status 2."""


def onmt_version() -> str | None:
    """The version of the ``onmt`` package being imported: ``onmt.__version__`` is set at the
    end of ``onmt/__init__.py``, after it imports modules that we patch, so read the source."""
    onmt = sys.modules.get("onmt")
    version = getattr(onmt, "__version__", None)
    if version is None and getattr(onmt, "__file__", None):
        try:
            with open(onmt.__file__, encoding="utf-8") as handle:
                found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)", handle.read(), re.M)
            version = found.group(1) if found else None
        except OSError:
            pass
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version("OpenNMT-py")
        except Exception:  # not installed as a distribution
            return None
    return str(version)


def version_problem() -> str | None:
    version = onmt_version()
    numbers = tuple(int(n) for n in re.findall(r"\d+", version or "")[:3])
    low, high = SUPPORTED
    if not numbers or not low <= numbers < high:
        return f"OpenNMT-py {version or '(unknown version)'} is outside {SUPPORTED_TEXT}"
    return None


def _lookup(module: ModuleType, dotted: str) -> object:
    value: object = module
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def missing_targets(module: ModuleType, targets: tuple[str, ...] | None = None) -> list[str]:
    """The names of ``targets`` (by default the module's :data:`TARGETS`) it lacks."""
    import torch  # imported already: OpenNMT imports it first

    name = module.__name__
    targets = targets if targets is not None else {**TARGETS, **OPTIONAL_TARGETS}.get(name, ())
    missing: list[str] = []
    for target in targets:
        full = f"{name}.{target}"
        if any(full.startswith(f"{m}.") for m in missing):
            continue  # its class is missing already
        try:
            value = _lookup(module, target)
        except AttributeError:
            missing.append(full)
            continue
        if target == "torch" and not isinstance(value, _AtomicTorch) and value is not torch:
            missing.append(full)  # not the torch module
    return missing


def is_missing(full: str, missing: list[str]) -> bool:
    return any(full == m or full.startswith(f"{m}.") for m in missing)


def patch(module: ModuleType) -> None:
    """Patch one OpenNMT module just executed; never raises (stock tools must keep working)."""
    name = module.__name__
    if getattr(module, _MARK, False) or name not in _PATCHERS:
        return
    setattr(module, _MARK, True)
    problem = version_problem()
    if problem is None:
        missing = missing_targets(module)
        problem = f"{', '.join(missing)} missing" if missing else None
    if problem is not None:
        _status[name] = f"left untouched: {problem}"
        return
    try:
        _PATCHERS[name](module)
    except Exception as exc:  # a changed OpenNMT: leave it to work as it does without us
        _status[name] = f"left untouched: patching failed ({type(exc).__name__}: {exc})"
        return
    _status[name] = PATCHED


def status() -> dict[str, str]:
    """Each required module: :data:`PATCHED`, why it was left untouched, or "not imported"."""
    return {name: _status.get(name, "not imported") for name in (*TARGETS, *OPTIONAL_TARGETS)}


def import_targets() -> None:
    """Import every module with required targets (patching them, when the hook is active)."""
    import importlib

    for name in TARGETS:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a broken or renamed module
            _status.setdefault(name, f"cannot be imported ({type(exc).__name__}: {exc})")


def problems() -> list[str]:
    """Why a quantized-distillation run cannot work in this process (empty: it can)."""
    version = version_problem()
    if version is not None:
        return [version]
    found = []
    for name in TARGETS:
        state = _status.get(name)
        if state is None:
            found.append(f"{name} was imported before the plugin's hook, or not at all")
        elif state != PATCHED:
            found.append(f"{name} {state}")
    return found


def guard_train_run(argv: list[str] | None = None) -> None:
    """In an ``onmt_train`` process, before ``onmt.bin.train`` runs: a run that names
    qdistill options must get them. OpenNMT ignores options it does not know, so with the
    plugin switched off, or unable to patch this OpenNMT-py, such a run would train a plain
    fp32 model and exit 0: stop it with one line, exit status 2 (as argparse does)."""
    from onmt_plugin import switch as bootstrap

    named = named_options(sys.argv[1:] if argv is None else argv)
    if not named:
        return
    given = ", ".join(dict.fromkeys(how for _, how in named))
    if not bootstrap.enabled():
        reason = (
            f"the qdistill OpenNMT-py plugin is switched off ({bootstrap.ENV_SWITCH}=0), so "
            f"OpenNMT would ignore them: unset {bootstrap.ENV_SWITCH}, or run "
            "qdistill-onmt-train"
        )
    else:
        import_targets()
        found = problems()
        if not found:
            if any(option == "quantized_distill" for option, _ in named):
                return
            reason = "without -quantized_distill they have no effect: add it, or remove them"
        else:
            reason = (
                f"the qdistill plugin cannot patch this OpenNMT-py ({found[0]}), so OpenNMT "
                f"would ignore them; the plugin supports OpenNMT-py {SUPPORTED_TEXT} "
                "(see qdistill doctor)"
            )
    print(
        f"qdistill: error: this run names qdistill options ({given}) but {reason}",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(2)


def _report_at_console(exc: Exception) -> None:
    """At a console entry only: the error as one line, then exit status 2."""
    print(f"qdistill: error: {exc}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


def _patch_opts(opts: ModuleType) -> None:
    original = opts._add_quant_opts

    def _add_quant_opts(parser):
        original(parser)
        if problems() and "--train_steps" in getattr(parser, "_option_string_actions", {}):
            return  # onmt_train's parser stays stock when the plugin cannot work
        add_options(parser)

    opts._add_quant_opts = _add_quant_opts


def _patch_train_single(train_single: ModuleType) -> None:
    original = train_single.build_model
    original_main = train_single.main

    def build_model(model_opt, opt, vocabs, checkpoint, device_id):
        if not getattr(opt, "quantized_distill", False):
            return original(model_opt, opt, vocabs, checkpoint, device_id)
        from onmt_plugin.student import prepare_student

        try:
            settings = QuantDistillSettings.from_opt(opt)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        found = problems()
        if found:  # e.g. the loss could not be patched: the distillation term would be lost
            raise StartupError(
                f"the qdistill plugin cannot patch this OpenNMT-py ({found[0]}); "
                f"it supports OpenNMT-py {SUPPORTED_TEXT} (see qdistill doctor)"
            )
        if checkpoint is not None and "qdistill" not in checkpoint:
            # An fp32 checkpoint's optimizer state lists the parameters in another order.
            opt.reset_optim = "all"
        model = original(model_opt, opt, vocabs, checkpoint, device_id)
        try:
            model = prepare_student(
                model, opt, vocabs, checkpoint, device_id, settings, original, train_single
            )
        except StartupError:
            raise
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        _log_settings(settings)
        return model

    def main(opt, device_id):
        from compressor.format.files import CheckpointError
        from onmt_plugin.switch import CONSOLE_ENV

        try:
            return original_main(opt, device_id)
        except (StartupError, CheckpointError) as exc:
            if os.environ.get(CONSOLE_ENV) != "onmt_train":
                raise
            _report_at_console(exc)

    train_single.build_model = build_model
    train_single.main = main


def _log_settings(settings: QuantDistillSettings) -> None:
    from onmt.utils.logging import logger

    rounding = f", {settings.rounding} rounding" if settings.method == "uniform" else ""
    kept = ", first and last layers kept in fp32" if settings.keep_first_last else ""
    grid = " on the int4 kernel grid" if settings.grid == "int4_kernel" else ""
    top_k = (
        f"the teacher's top-{settings.topk} logits (cached per example)"
        if settings.topk
        else "the teacher's full distribution (exact)"
    )
    logger.info(
        f"qdistill: quantized distillation active: {settings.bits}-bit {settings.method} "
        f"quantization{grid}, buckets of {settings.bucket_size} weights{rounding}{kept}; teacher "
        f"{settings.teacher_model}; temperature {settings.temperature:g}, alpha "
        f"{settings.alpha:g}; distilling from {top_k}. Checkpoints hold the quantized "
        "student; validation figures are the quantized student's."
    )


def _patch_trainer(trainer: ModuleType) -> None:
    from onmt_plugin.loss import distillation_loss_class

    validate = trainer.Trainer.validate

    def validate_quantized(self, valid_iter, moving_average=None):
        stats = validate(self, valid_iter, moving_average=moving_average)
        state = getattr(self.model, "_qdistill", None)
        if state is not None and stats is not None:
            from onmt.utils.logging import logger

            settings = state.settings
            logger.info(
                f"qdistill: validation of the quantized student ({settings.bits}-bit "
                f"{settings.method}): perplexity {stats.ppl():g}, accuracy "
                f"{stats.accuracy():g}"
            )
        return stats

    trainer.LossCompute = distillation_loss_class(trainer.LossCompute)
    trainer.Trainer.validate = validate_quantized


class _Saving:
    model = None  # the model ModelSaver._save is saving, while it runs


class _AtomicTorch:
    """``torch`` as ``onmt.models.model_saver`` sees it: everything is torch's own, except that
    ``save`` to a path writes atomically and, for a qdistill student, writes the quantized
    checkpoint (plain names, shadow weights under ``checkpoint["qdistill"]``) directly."""

    def __init__(self, torch: ModuleType) -> None:
        self._torch = torch

    def __getattr__(self, name: str) -> object:
        return getattr(self._torch, name)

    def save(self, obj, f, *args, **kwargs):
        if args or kwargs or not isinstance(f, (str, os.PathLike)):
            return self._torch.save(obj, f, *args, **kwargs)
        from compressor.format.files import atomic_save

        model = _Saving.model
        if getattr(model, "_qdistill", None) is not None and isinstance(obj, dict):
            from onmt_plugin.checkpoint import quantized_checkpoint

            obj = quantized_checkpoint(obj, model)
        atomic_save(obj, f)


def _patch_model_saver(model_saver: ModuleType) -> None:
    import torch

    torch.serialization.add_safe_globals([argparse.Namespace])
    saver = model_saver.ModelSaver
    original = saver._save

    def _save(self, step, model):
        _Saving.model = model
        try:
            ckpt_path, model_path = original(self, step, model)
        finally:
            _Saving.model = None
        state = getattr(model, "_qdistill", None)
        if ckpt_path and state is not None and state.settings.topk:
            from onmt.utils.logging import logger

            served = state.top_k_hits / max(state.top_k_hits + state.top_k_misses, 1)
            logger.info(
                f"qdistill: teacher top-{state.settings.topk} cache holds "
                f"{len(state.top_k_cache)} examples; {served:.0%} of batches served from it"
            )
        return ckpt_path, model_path

    load_checkpoint = model_saver.load_checkpoint

    def load_packed_or_checkpoint(ckpt_path):
        from compressor.format.files import CheckpointError
        from compressor.format.packed import is_packed

        if ckpt_path and is_packed(ckpt_path):
            from onmt_plugin.packing import load

            try:
                return load(ckpt_path)
            except ValueError as exc:
                raise CheckpointError(f"{ckpt_path}: {exc}") from None
        if ckpt_path and str(ckpt_path).endswith(".qd"):
            if not os.path.isfile(ckpt_path):
                raise CheckpointError(f"no such file: {ckpt_path}")
            raise CheckpointError(
                f"{ckpt_path} is not a packed file that qdistill wrote (wrong file, or truncated?)"
            )
        return load_checkpoint(ckpt_path)

    model_saver.torch = _AtomicTorch(model_saver.torch)
    saver._save = _save
    # onmt.model_builder imports this name after this module has run, so it sees the wrapper.
    model_saver.load_checkpoint = load_packed_or_checkpoint


def _patch_translate(translate: ModuleType) -> None:
    original = translate.main

    def main(*args, **kwargs):
        from compressor.format.files import CheckpointError

        try:
            return original(*args, **kwargs)
        except (StartupError, CheckpointError) as exc:
            _report_at_console(exc)

    translate.main = main


def _patch_model_builder(model_builder: ModuleType) -> None:
    from onmt_plugin.runtime import wrap_load_test_model

    # onmt.translate.translator looks this name up on the module at each call.
    model_builder.load_test_model = wrap_load_test_model(model_builder.load_test_model)


_PATCHERS = {
    "onmt.opts": _patch_opts,
    "onmt.train_single": _patch_train_single,
    "onmt.trainer": _patch_trainer,
    "onmt.models.model_saver": _patch_model_saver,
    "onmt.bin.translate": _patch_translate,
    "onmt.model_builder": _patch_model_builder,
}
