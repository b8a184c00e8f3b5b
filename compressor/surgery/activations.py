"""Activation quantization for QKD: a learned-step quantizer at the input of each quantized
layer, attached with a forward pre-hook so that the layer's own code is untouched.

LSQ (Esser et al. 2020, see :mod:`compressor.quantization.lsq`) is the quantizer: one learned
step per layer, initialised from the first batch, unsigned levels ``[0, 2^b - 1]`` for inputs
that are never negative (after a ReLU) and signed levels ``[-2^(b-1), 2^(b-1) - 1]``
otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.quantization.grids import check_bits
from compressor.surgery.quantizers import LsqActivationQuantizer


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    if not args or not torch.is_tensor(args[0]) or not args[0].is_floating_point():
        return args
    return (module.input_quantizer(args[0]), *args[1:])


def activation_quantizers(model: nn.Module) -> list[LsqActivationQuantizer]:
    """Every activation quantizer inserted into ``model``."""
    return [m for m in model.modules() if isinstance(m, LsqActivationQuantizer)]


def insert_activation_quantizers(
    quantized_modules: list[tuple[str, nn.Module]], act_bits: int
) -> list[str]:
    """Quantize the input of each given layer with an :class:`LsqActivationQuantizer`
    (a submodule ``input_quantizer`` and a forward pre-hook). Embeddings (integer inputs) and
    recurrent layers (sequence objects) are left alone. Returns the names of the layers."""
    check_bits(act_bits, "act_bits")
    done = []
    for name, module in quantized_modules:
        if isinstance(module, nn.Embedding | nn.RNNBase | nn.RNNCellBase):
            continue
        if hasattr(module, "input_quantizer"):
            continue
        module.add_module("input_quantizer", LsqActivationQuantizer(act_bits))
        module.register_forward_pre_hook(_quantize_input)
        done.append(name)
    return done
