"""What the plugin changes in OpenNMT-py 3.5.1, applied as each module is imported.

- ``onmt.opts``: the quantized-distillation options join OpenNMT's own parser (CLI and YAML).
- ``onmt.train_single.build_model``: the student is quantized right after it is built, before
  the optimizer exists; the frozen teacher is loaded and checked against the student's
  vocabularies; a qdistill checkpoint given to ``-train_from`` restores the shadow weights.
- ``onmt.trainer.LossCompute``: adds the distillation term on non-pad target positions,
  summed as OpenNMT's own loss is (the trainer normalises); statistics (perplexity) stay those
  of the quantized student's cross-entropy.
- ``onmt.models.model_saver``: checkpoints hold the quantized values under OpenNMT's plain
  names (stock ``onmt_translate`` loads them), the full-precision shadow weights travel under
  ``checkpoint["qdistill"]``; checkpoints pickle an ``argparse.Namespace``, which torch >= 2.6
  refuses to load by default, so it is allow-listed; ``load_checkpoint`` also takes the packed
  files ``qdistill pack`` writes, so ``onmt_translate -model student.qd`` works.
"""

from __future__ import annotations

import argparse
import os
import sys
from types import ModuleType

from onmt_plugin.options import QuantDistillSettings, add_options

_PATCHED = "_qdistill_patched"


def patch(module: ModuleType) -> None:
    if getattr(module, _PATCHED, False):
        return
    setattr(module, _PATCHED, True)
    if module.__name__ == "onmt.opts":
        _patch_opts(module)
    elif module.__name__ == "onmt.train_single":
        _patch_train_single(module)
    elif module.__name__ == "onmt.trainer":
        _patch_trainer(module)
    elif module.__name__ == "onmt.models.model_saver":
        _patch_model_saver(module)


def fail(message: str) -> None:
    """A user mistake found at start-up: one line, exit code 2, no traceback."""
    print(f"qdistill: error: {message}", file=sys.stderr, flush=True)
    os._exit(2)  # also ends spawned OpenNMT workers without their own traceback


def _patch_opts(opts: ModuleType) -> None:
    original = opts._add_quant_opts

    def _add_quant_opts(parser):  # noqa: ANN001, ANN202
        original(parser)
        add_options(parser)

    opts._add_quant_opts = _add_quant_opts


def _patch_train_single(train_single: ModuleType) -> None:
    original = train_single.build_model

    def build_model(model_opt, opt, vocabs, checkpoint, device_id):  # noqa: ANN001, ANN202
        if not getattr(opt, "quantized_distill", False):
            return original(model_opt, opt, vocabs, checkpoint, device_id)
        from onmt_plugin.student import prepare_student

        try:
            settings = QuantDistillSettings.from_opt(opt)
        except ValueError as exc:
            fail(str(exc))
        if checkpoint is not None and "qdistill" not in checkpoint:
            # An fp32 checkpoint's optimizer state lists the parameters in another order.
            opt.reset_optim = "all"
        model = original(model_opt, opt, vocabs, checkpoint, device_id)
        try:
            return prepare_student(
                model, opt, vocabs, checkpoint, device_id, settings, original, train_single
            )
        except ValueError as exc:
            fail(str(exc))

    train_single.build_model = build_model


def _patch_trainer(trainer: ModuleType) -> None:
    from onmt_plugin.loss import distillation_loss_class

    trainer.LossCompute = distillation_loss_class(trainer.LossCompute)


def _patch_model_saver(model_saver: ModuleType) -> None:
    import torch

    torch.serialization.add_safe_globals([argparse.Namespace])
    saver = model_saver.ModelSaver
    original = saver._save

    def _save(self, step, model):  # noqa: ANN001, ANN202
        ckpt_path, model_path = original(self, step, model)
        if ckpt_path and getattr(model, "_qdistill", None) is not None:
            from onmt_plugin.checkpoint import rewrite_checkpoint

            rewrite_checkpoint(ckpt_path, model)
            state = model._qdistill
            if state.settings.topk:
                from onmt.utils.logging import logger

                served = state.top_k_hits / max(state.top_k_hits + state.top_k_misses, 1)
                logger.info(
                    f"qdistill: teacher top-{state.settings.topk} cache holds "
                    f"{len(state.top_k_cache)} examples; {served:.0%} of batches served from it"
                )
        return ckpt_path, model_path

    saver._save = _save

    load_checkpoint = model_saver.load_checkpoint

    def load_packed_or_checkpoint(ckpt_path):  # noqa: ANN001, ANN202
        from compressor.format.packed import is_packed

        if ckpt_path and is_packed(ckpt_path):
            from onmt_plugin.packing import load

            try:
                return load(ckpt_path)
            except ValueError as exc:
                fail(str(exc))
        return load_checkpoint(ckpt_path)

    # onmt.model_builder imports this name after this module has run, so it sees the wrapper.
    model_saver.load_checkpoint = load_packed_or_checkpoint
