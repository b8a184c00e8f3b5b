"""BatchNorm folded into the convolution before it: one tensor less per layer to store, for
inference.

In eval mode a BatchNorm after a convolution is a per-channel affine map of the convolution's
output, ``y * s + (beta - mean * s)`` with ``s = gamma / sqrt(var + eps)``; folding it scales
the convolution's weight by ``s`` per output channel and moves the shift into its bias. The
folded model computes what the original computes in eval mode (up to fp32 rounding), with
four per-channel tensors and a counter less per BatchNorm in its state dict, which is what a
small-tensor model's packed file is mostly made of. Fold before :func:`quantize_`, so that the
quantized weights are the folded ones.
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorm_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(convolution name, BatchNorm name)`` for every BatchNorm with running statistics
    whose only input is the output of a convolution that nothing else reads, each module
    called once. Found from the data flow that ``torch.fx`` traces: of the whole model, or,
    where a forward does not trace, of each child separately (pairs that span a forward
    which does not trace are left out)."""
    pairs: list[tuple[str, str]] = []
    _find_pairs(model, "", pairs)
    return pairs


def _find_pairs(module: nn.Module, prefix: str, pairs: list[tuple[str, str]]) -> None:
    if not any(True for _ in module.children()):
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = fx.Tracer().trace(module)
    except Exception:  # any forward that fx cannot trace (data-dependent control flow, ...)
        for name, child in module.named_children():
            _find_pairs(child, f"{prefix}{name}.", pairs)
        return
    calls = [n for n in graph.nodes if n.op == "call_module"]
    modules = {n.target: module.get_submodule(n.target) for n in calls}
    times_called = Counter(id(modules[n.target]) for n in calls)
    for node in calls:
        norm = modules[node.target]
        if not isinstance(norm, _NORMS) or norm.running_mean is None or not node.args:
            continue
        source = node.args[0]
        if (
            len(node.args) != 1
            or node.kwargs
            or not isinstance(source, fx.Node)
            or source.op != "call_module"
            or len(source.users) != 1
        ):
            continue
        conv = modules[source.target]
        if (
            isinstance(conv, _CONVS)
            and conv.out_channels == norm.num_features
            and times_called[id(conv)] == times_called[id(norm)] == 1
        ):
            pairs.append((f"{prefix}{source.target}", f"{prefix}{node.target}"))


@torch.no_grad()
def fold_batchnorm_(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a convolution into it, in place: the
    convolution's weight is scaled per output channel, its bias created or updated, and the
    BatchNorm replaced by ``nn.Identity``. Returns ``model``.

    The folded model computes in eval mode what the original computes in eval mode: it is
    for inference (post-training quantization, packing), not for further training. Pairs are
    those of :func:`batchnorm_pairs`; other BatchNorms (before a convolution, as in DenseNet's
    pre-activation layers, or after an addition) stay as they are. Fold before
    :func:`compressor.quantize_`; a fresh model folded the same way loads the folded model's
    state dict."""
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ValueError("the model is quantized; fold its BatchNorms before quantize_")
    pairs = batchnorm_pairs(model)
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for conv_name, norm_name in pairs:
        conv = model.get_submodule(conv_name)
        norm = model.get_submodule(norm_name)
        if uses[id(conv.weight)] != 1 or (conv.bias is not None and uses[id(conv.bias)] != 1):
            continue  # a weight shared with another layer cannot take this layer's scaling
        _fold(conv, norm)
        parent_name, _, child = norm_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, nn.Identity())
    return model


def _fold(conv: nn.Module, norm: nn.Module) -> None:
    weight = conv.weight
    scale = (norm.running_var.double() + norm.eps).rsqrt()
    shift = -norm.running_mean.double() * scale
    if norm.weight is not None:
        scale = scale * norm.weight.double()
        shift = shift * norm.weight.double()
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    bias = shift if conv.bias is None else conv.bias.double() * scale + shift
    shape = (-1,) + (1,) * (weight.dim() - 1)
    weight.copy_(weight.double() * scale.reshape(shape))
    if conv.bias is None:
        conv.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=weight.requires_grad)
    else:
        conv.bias.copy_(bias)
