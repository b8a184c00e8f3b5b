"""Turning the model ``onmt_train`` built into a quantized student with a frozen teacher."""

from __future__ import annotations

from dataclasses import dataclass
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


def load_teacher(settings: QuantDistillSettings, opt, vocabs, device_id, build, train_single):  # noqa: ANN001, ANN201
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


def prepare_student(model, opt, vocabs, checkpoint, device_id, settings, build, train_single):  # noqa: ANN001, ANN201
    """Quantize the student in place (before any optimizer exists) and attach the teacher."""
    teacher = load_teacher(settings, opt, vocabs, device_id, build, train_single)
    compressor.quantize_(model, settings.quant_config())
    if checkpoint is not None and "qdistill" in checkpoint:
        saved = checkpoint["qdistill"]
        compressor.load_shadow_state_dict(model, saved["shadow"])
        compressor.api.copy_into_(model, saved.get("quantizer_state") or {})
    device = next(model.parameters()).device
    model.__dict__["_qdistill"] = DistillState(teacher.to(device), settings)
    return model


@torch.no_grad()
def teacher_logits(state: DistillState, batch: dict, target_len: int) -> torch.Tensor:
    """The teacher's logits on the batch the student just saw, for its first ``target_len``
    target positions, flattened like the student's scores."""
    output, _ = state.teacher(batch["src"], batch["tgt"], batch["srclen"], with_align=False)
    output = output[:, :target_len, :].contiguous()
    return state.teacher.generator(output.view(-1, output.size(2)))
