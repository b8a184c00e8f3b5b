"""OpenNMT's LossCompute with the distillation term added."""

from __future__ import annotations

from compressor.training.distillation import (
    DistillationTerms,
    combine_terms,
    distillation_terms,
)
from onmt_plugin.student import teacher_targets


def distillation_loss_class(base: type) -> type:
    """A subclass of OpenNMT's ``LossCompute``: in training, the summed loss becomes
    ``(1 - alpha) * CE + alpha * T^2 * KL(teacher || student)`` over non-pad target positions;
    validation and statistics keep OpenNMT's cross-entropy of the quantized student."""

    class DistillLossCompute(base):
        @classmethod
        def from_opts(cls, opt, model, vocab, train=True):
            loss = super().from_opts(opt, model, vocab, train=train)
            loss.qdistill = getattr(model, "_qdistill", None) if train else None
            loss.captured = None
            if loss.qdistill is not None:
                # Keep the student logits OpenNMT's own loss computes, instead of running the
                # full-vocabulary generator a second time for the distillation term.
                loss.generator.register_forward_hook(loss._capture)
            return loss

        def _capture(self, module, inputs, output):
            if self.captured is not None and not self.captured:
                self.captured.append(output)

        def forward(self, batch, output, attns, trunc_start=0, trunc_size=None):
            state = getattr(self, "qdistill", None)
            if state is None or self.copy_attn:
                return super().forward(batch, output, attns, trunc_start, trunc_size)
            self.captured = []
            try:
                loss, stats = super().forward(batch, output, attns, trunc_start, trunc_size)
                student = self.captured[0]
            finally:
                self.captured = None
            if trunc_size is None:
                trunc_size = batch["tgt"].size(1) - trunc_start
            end = trunc_start + trunc_size
            target = batch["tgt"][:, trunc_start + self.tgt_shift_index : end, 0]
            target = target.reshape(-1)
            keep = target != self.padding_idx  # pad positions count in neither term
            teacher = teacher_targets(state, batch, end, keep)
            settings = state.settings
            # OpenNMT's own loss is the hard term (summed CE, with its label smoothing); the
            # soft term is computed on rows already selected: no target, so the
            # vocabulary-wide logits are not masked and copied a second time.
            soft = distillation_terms(
                student[keep], teacher, None, settings.temperature, hard=False
            ).soft
            terms = DistillationTerms(hard=loss, soft=soft, count=int(keep.sum()))
            return combine_terms(terms, settings.alpha, reduction="sum"), stats

    DistillLossCompute.__name__ = DistillLossCompute.__qualname__ = "DistillLossCompute"
    return DistillLossCompute
