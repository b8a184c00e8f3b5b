"""``onmt_translate -model student.qd`` on the int4 kernel.

After OpenNMT-py builds a model from a packed file (``onmt.model_builder.load_test_model``),
a student trained on the int4 kernel grid (``onmt_train -quant_grid int4_kernel``) is put on
the int4 runtime: its Linear layers, the encoder's ``nn.LSTM`` and the decoder's ``nn.LSTMCell``
stack multiply with the packed 4-bit codes on PyTorch's int4 kernel, and its embeddings look
their rows up from the codes (:func:`compressor.to_int4_runtime_`); the weights are exactly
those it was trained and evaluated with, the activations of those layers are bf16.

``QDISTILL_RUNTIME`` chooses: ``auto`` (default: int4 when the file holds kernel-grid weights
and this PyTorch has the kernel, else fp32), ``int4`` (int4, or a one-line error) or ``fp32``
(the decoded weights, as every other model). The path taken is logged as one line,
``qdistill: runtime int4 (...)`` or ``qdistill: runtime fp32 (...)``, which ``qdistill
onmt-eval`` reads.
"""

from __future__ import annotations

import os

from compressor.format.files import CheckpointError


class RuntimeChoiceError(CheckpointError):
    """``QDISTILL_RUNTIME`` asks for something this model or machine cannot do (reported by
    ``onmt_translate`` as one line, as a file that is not a model is)."""


def apply(model, model_path: str | os.PathLike | None) -> str:
    """Put ``model`` (just loaded from ``model_path``) on the runtime ``QDISTILL_RUNTIME``
    chooses; logs which, and why; returns "int4" or "fp32"."""
    from compressor.runtime.int4 import run_packed_on_int4_

    try:
        path, message = run_packed_on_int4_(model, model_path)
    except ValueError as exc:
        raise RuntimeChoiceError(str(exc)) from None
    _log(f"qdistill: {message}")
    return path


def _log(message: str) -> None:
    try:
        from onmt.utils.logging import logger

        logger.info(message)
    except ImportError:  # used outside OpenNMT
        print(message, flush=True)


def wrap_load_test_model(original):
    """``onmt.model_builder.load_test_model`` that puts the model on the chosen runtime."""

    def load_test_model(opt, device_id=0, model_path=None):
        vocabs, model, model_opt = original(opt, device_id, model_path)
        apply(model, model_path if model_path is not None else opt.models[0])
        return vocabs, model, model_opt

    return load_test_model
