"""Turning the model ``onmt_train`` built into a quantized student with a frozen teacher."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import compressor
from onmt_plugin.options import QuantDistillSettings


@dataclass
class DistillState:
    """Attached to the student (as a plain attribute, outside its state dict)."""

    teacher: nn.Module
    settings: QuantDistillSettings
    # --distill_topk: (corpus id, line) -> the teacher's top-k logits, their classes (int32)
    # and the log-normalizer of its full softmax, per target token of that example.
    top_k_cache: dict = field(default_factory=dict)
    top_k_hits: int = 0  # batches served from the cache
    top_k_misses: int = 0  # batches the teacher ran on


def load_teacher(settings: QuantDistillSettings, opt, vocabs, device_id, build, train_single):
    """The teacher checkpoint, built with OpenNMT's own builder, frozen; its vocabularies
    must equal the student's."""
    from onmt.inputters.inputter import dict_to_vocabs, vocabs_to_dict
    from onmt.models.model_saver import load_checkpoint

    path = Path(settings.teacher_model)
    if not path.is_file():
        raise ValueError(f"--teacher_model {path} does not exist")
    try:
        checkpoint = load_checkpoint(str(path))
    except Exception as exc:
        raise ValueError(
            f"--teacher_model {path} is not a readable OpenNMT checkpoint ({exc})"
        ) from None
    if not isinstance(checkpoint, dict) or "vocab" not in checkpoint or "model" not in checkpoint:
        raise ValueError(f"--teacher_model {path} is not an OpenNMT-py checkpoint")
    student_vocab = vocabs_to_dict(vocabs)
    for side in ("src", "tgt"):
        theirs, ours = checkpoint["vocab"].get(side) or [], student_vocab.get(side) or []
        if theirs != ours:
            raise ValueError(
                f"teacher and student {side} vocabularies differ ({len(theirs)} vs {len(ours)} "
                f"tokens): build the student with the teacher's vocabulary (-src_vocab/-tgt_vocab)"
            )
    model_opt = train_single._get_model_opts(opt, checkpoint=checkpoint)
    teacher = build(model_opt, opt, dict_to_vocabs(checkpoint["vocab"]), checkpoint, device_id)
    return compressor.freeze_(teacher)


def prepare_student(model, opt, vocabs, checkpoint, device_id, settings, build, train_single):
    """Quantize the student in place (before any optimizer exists) and attach the teacher."""
    teacher = load_teacher(settings, opt, vocabs, device_id, build, train_single)
    compressor.quantize_(model, settings.quant_config())
    if checkpoint is not None and "qdistill" in checkpoint:
        saved = checkpoint["qdistill"]
        compressor.load_shadow_state_dict(model, saved["shadow"])
        compressor.surgery.quantize.copy_into_(model, saved.get("quantizer_state") or {})
    device = next(model.parameters()).device
    model.__dict__["_qdistill"] = DistillState(teacher.to(device), settings)
    _quantize_once_per_forward(model)
    return model


def _quantize_once_per_forward(model: nn.Module) -> None:
    """OpenNMT's input-feeding RNN decoder runs its LSTM cell once per target position, and
    each run would quantize the cell's weights again: quantize each weight once per forward."""
    forward = model.forward

    def cached_forward(*args, **kwargs):
        with compressor.quantize_once():
            return forward(*args, **kwargs)

    model.forward = cached_forward


@torch.no_grad()
def teacher_logits(
    state: DistillState, batch: dict, target_len: int, keep: torch.Tensor
) -> torch.Tensor:
    """The teacher's logits on the batch the student just saw, at the positions ``keep``
    selects among its first ``target_len`` target positions flattened like the student's
    scores. The full-vocabulary generator, most of the teacher's cost, skips the padding."""
    output, _ = state.teacher(batch["src"], batch["tgt"], batch["srclen"], with_align=False)
    output = output[:, :target_len, :].reshape(-1, output.size(2))[: keep.numel()]
    return state.teacher.generator(output[keep])


def teacher_targets(
    state: DistillState, batch: dict, target_len: int, keep: torch.Tensor
) -> torch.Tensor | compressor.TopKLogits:
    """What the student distils from at the ``keep`` positions: the teacher's logits, or with
    ``--distill_topk K`` its top K, taken from the cache when every example of the batch has
    been seen (OpenNMT names each by corpus id and line number) and computed otherwise."""
    k = state.settings.topk
    if not k:
        return teacher_logits(state, batch, target_len, keep)
    names = list(zip(batch.get("cid") or [], batch.get("cid_line_number") or []))
    counts = keep.view(len(batch["srclen"]), -1).sum(dim=1).tolist()
    cached = [state.top_k_cache.get(name) for name in names]
    if len(names) == len(counts) and all(
        c is not None and len(c[0]) == n for c, n in zip(cached, counts)
    ):
        state.top_k_hits += 1
        values, classes, normalizers = (
            torch.cat([c[i] for c in cached]).to(keep.device) for i in range(3)
        )
        return compressor.TopKLogits(values, classes, normalizers, state.settings.temperature)
    state.top_k_misses += 1
    logits = teacher_logits(state, batch, target_len, keep)
    top = compressor.TopKLogits.of(logits, k, temperature=state.settings.temperature)
    if len(names) == len(counts):
        values = top.values.float().cpu().split(counts)
        classes = top.indices.to(torch.int32).cpu().split(counts)
        normalizers = top.log_normalizer.cpu().split(counts)
        state.top_k_cache.update(zip(names, zip(values, classes, normalizers)))
    return top
