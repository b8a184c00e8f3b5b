"""4-bit packed size of every torchvision classifier (random init, 10 classes) against its fp32
state dict as ``torch.save`` writes it; and with BatchNorm folded into the convolution before
it (``compressor.fold_batchnorm_``), the fix for models made of many small tensors. Every
packed file is reloaded into a fresh model of the same builder (folded alike), which must
compute exactly what the quantized model computed; every layer weight must be quantized.

    python -m benchmarks.bench_torchvision [--bits 4] [--bucket-size 256] [--models NAME ...]

Results accumulate in ``results/torchvision_sizes.json`` (a builder already measured with the
same settings is skipped unless ``--force``), rendered to ``torchvision_sizes.md``.
"""

from __future__ import annotations

import argparse
import gc
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import compressor
from benchmarks.common import load_result, write_result
from compressor.format.files import atomic_save, atomic_write_text
from compressor.quantization.record import QuantSpec
from compressor.surgery.quantize import packable_state

NAME = "torchvision_sizes"
MARKDOWN = Path(__file__).resolve().parent / f"{NAME}.md"


@dataclass(frozen=True)
class Family:
    smallest: str  # its builder with the fewest parameters (at 10 classes)
    side: int  # the smallest input side it runs at, given ``small`` (at least 32)
    small: dict = field(default_factory=dict)  # builder arguments for that small input


# The side is torchvision's min_size, raised to 32 where smaller. Swin's min_size of 224 is
# that of its pretrained weights: a random-init Swin pads its windows and runs at 32. ViT runs
# at 32 when built for it (its image_size argument); MaxViT's 7x7 partitions need 224.
FAMILIES = {
    "alexnet": Family("alexnet", 63),
    "convnext": Family("convnext_tiny", 32),
    "densenet": Family("densenet121", 32),
    "efficientnet": Family("efficientnet_b0", 32),
    "efficientnet_v2": Family("efficientnet_v2_s", 33),
    "googlenet": Family("googlenet", 32),
    "inception": Family("inception_v3", 75),
    "maxvit": Family("maxvit_t", 224),
    "mnasnet": Family("mnasnet0_5", 32),
    "mobilenet_v2": Family("mobilenet_v2", 32),
    "mobilenet_v3": Family("mobilenet_v3_small", 32),
    "regnet": Family("regnet_y_400mf", 32),
    "resnet": Family("resnet18", 32),
    "resnext": Family("resnext50_32x4d", 32),
    "shufflenet_v2": Family("shufflenet_v2_x0_5", 32),
    "squeezenet": Family("squeezenet1_1", 32),
    "swin": Family("swin_t", 32),
    "swin_v2": Family("swin_v2_t", 32),
    "vgg": Family("vgg11", 32),
    "vit": Family("vit_b_16", 32, {"image_size": 32}),
    "wide_resnet": Family("wide_resnet50_2", 32),
}
# The benchmark builds every model with its default arguments: ViT then needs its 224.
_DEFAULT_SIDE = {"vit": 224}
_FAMILY = re.compile("^(" + "|".join(sorted(FAMILIES, key=len, reverse=True)) + ")")


def family_of(builder: str) -> str | None:
    """The family of a torchvision builder (``vgg11_bn`` -> ``vgg``), None if unknown."""
    found = _FAMILY.match(builder)
    return found.group(1) if found else None


def layer_weights(model: nn.Module) -> set[str]:
    """Issue 17's layer weights: parameters named ``weight`` or ``*_weight`` with 2+ dims."""
    return {
        name
        for name, p in model.named_parameters()
        if re.search(r"(^|\.|_)weight$", name) and p.dim() >= 2
    }


def build(builder: str, seed: int, **kwargs: object) -> nn.Module:
    import torchvision.models

    torch.manual_seed(seed)
    return torchvision.models.get_model(builder, num_classes=10, **kwargs).eval()


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _with_vectors_at(bits: int, model: nn.Module, path: Path) -> int:
    """Size of the packed file with every 1-D floating-point tensor that is not quantized
    (biases, norms, running statistics) also quantized, at ``bits`` bits (bucket 256)."""
    tensors, specs, codes = packable_state(model)
    for name, value in tensors.items():
        if name not in specs and value.is_floating_point() and value.dim() == 1:
            specs[name] = QuantSpec("uniform", bits, 256)
            tensors[name] = specs[name].quantize(value)
    return compressor.write_packed(tensors, path, specs=specs, codes=codes)


def _header_bytes(path: Path) -> int:
    with path.open("rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _pack_and_reload(
    model: nn.Module,
    builder: str,
    kwargs: dict,
    x: torch.Tensor,
    config: compressor.QuantConfig,
    fold: bool,
    tmp: Path,
) -> dict:
    """Quantize ``model``, pack it, reload the file into a fresh model; what it cost."""
    expected = layer_weights(model)
    compressor.quantize_(model, config)
    specs = compressor.quantization_specs(model)
    with torch.no_grad():
        out = model(x)
    path = tmp / "model.qd"
    row = {
        "unquantized_layer_weights": sorted(expected - set(specs)),
        "quantized_tensors": len(specs),
        "packed_bytes": compressor.save_packed(model, path),
        "header_bytes": _header_bytes(path),
        "packed_bytes_vectors8": _with_vectors_at(8, model, tmp / "vectors8.qd"),
    }
    del model
    gc.collect()
    state, _ = compressor.load_packed(path)
    fresh = build(builder, 1, **kwargs)
    if fold:
        compressor.fold_batchnorm_(fresh)
    fresh.load_state_dict(state)
    with torch.no_grad():
        row["exact_reload"] = bool(torch.equal(fresh(x), out))
    return row


def measure(builder: str, config: compressor.QuantConfig) -> dict:
    """One builder: parameters, fp32 bytes, packed bytes as it is and with BatchNorm folded."""
    family = family_of(builder)
    kwargs: dict = {}
    side = _DEFAULT_SIDE.get(family, FAMILIES[family].side)
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    row: dict = {"family": family, "input_side": side}
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        model = build(builder, 0, **kwargs)
        row["parameters"] = sum(p.numel() for p in model.parameters())
        atomic_save(model.state_dict(), tmp / "fp32.pt")  # the fp32 size it is compared with
        row["fp32_bytes"] = (tmp / "fp32.pt").stat().st_size
        (tmp / "fp32.pt").unlink()
        row["batchnorms"] = _batchnorms(model)
        with torch.no_grad():
            reference = model(x)
        row["plain"] = _pack_and_reload(model, builder, kwargs, x, config, False, tmp)
        gc.collect()

        model = compressor.fold_batchnorm_(build(builder, 0, **kwargs))
        row["batchnorms_folded"] = row["batchnorms"] - _batchnorms(model)
        with torch.no_grad():
            difference = (model(x) - reference).abs().max().item()
        row["fold_max_relative_difference"] = difference / max(reference.abs().max().item(), 1e-30)
        row["folded"] = _pack_and_reload(model, builder, kwargs, x, config, True, tmp)
        gc.collect()
    for variant in ("plain", "folded"):
        for key in ("packed_bytes", "packed_bytes_vectors8"):
            ratio_key = key.replace("packed_bytes", "ratio")
            row[variant][ratio_key] = row["fp32_bytes"] / row[variant][key]
    row["ratio"] = row["plain"]["ratio"]
    row["ratio_folded"] = row["folded"]["ratio"]
    row["seconds"] = time.perf_counter() - start
    return row


def render(result: dict) -> str:
    """The Markdown table of ``result``."""
    cfg = result["config"]
    env = result.get("environment", {})
    lines = [
        f"# torchvision classifiers at {cfg['bits']} bits\n",
        f"Every builder of `torchvision.models.list_models(module=torchvision.models)` "
        f"(torchvision {env.get('torchvision')}, torch {env.get('torch')}), random init, "
        f"10 classes; uniform {cfg['bits']}-bit quantization with buckets of "
        f"{cfg['bucket_size']} on every layer weight (`compressor.quantize_`), packed with "
        "`compressor.save_packed`. *fp32* is the state dict as `torch.save` writes it. "
        "*folded*: `compressor.fold_batchnorm_(model)` before `quantize_`, BatchNorm merged "
        "into the convolution before it (for inference). *+8-bit vectors*: the folded model "
        "with its remaining 1-D tensors (biases, norms) also stored at 8 bits, for comparison. "
        "Each packed file reloads into a fresh model of the same builder, which computes "
        "exactly the quantized model's output (checked for every row). Produced by "
        "`python -m benchmarks.bench_torchvision`.\n",
        "| builder | parameters | fp32 bytes | packed bytes | smaller | BatchNorms folded "
        "| packed bytes, folded | smaller, folded | smaller, folded +8-bit vectors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for builder, r in sorted(result["builders"].items()):
        folded = r["folded"]
        lines.append(
            f"| {builder} | {r['parameters']:,} | {r['fp32_bytes']:,} | "
            f"{r['plain']['packed_bytes']:,} | {r['ratio']:.2f}x | "
            f"{r['batchnorms_folded']} of {r['batchnorms']} | {folded['packed_bytes']:,} | "
            f"{r['ratio_folded']:.2f}x | {folded['ratio_vectors8']:.2f}x |"
        )
    failures = [
        b
        for b, r in result["builders"].items()
        for v in ("plain", "folded")
        if not r[v]["exact_reload"] or r[v]["unquantized_layer_weights"]
    ]
    lines.append("")
    lines.append(
        "Every layer weight quantized and every reload exact."
        if not failures
        else f"**Not fully covered or not exact:** {', '.join(sorted(set(failures)))}."
    )
    small = sorted(
        (r["folded"]["header_bytes"] / r["folded"]["packed_bytes"], b)
        for b, r in result["builders"].items()
        if r["ratio_folded"] < 7.2
    )
    if small:
        lines.append(
            "Below 7.2x after folding, the share of the file that is its header (each "
            "tensor's name, shape and settings as JSON; the rest of the gap is tensors kept in "
            "fp32: biases, norms, BatchNorms that follow no convolution): "
            + ", ".join(f"{b} {100 * share:.1f}%" for share, b in reversed(small))
            + "."
        )
    smallest: dict[str, str] = {}
    for builder, r in result["builders"].items():
        best = smallest.get(r["family"])
        if best is None or r["parameters"] < result["builders"][best]["parameters"]:
            smallest[r["family"]] = builder
    wrong = [f"{f}: {b}" for f, b in sorted(smallest.items()) if b != FAMILIES[f].smallest]
    lines.append(
        "The smallest builder of each family, which `tests/test_torchvision_coverage.py` runs: "
        + (", ".join(smallest[f] for f in sorted(smallest)) if not wrong else "")
        + (f"**not the one the tests run:** {', '.join(wrong)}" if wrong else ".")
    )
    lines.append(
        f"\nMachine: {env.get('processor')}, {env.get('cpu_count')} cores, "
        f"{env.get('torch_threads')} torch thread(s); commit `{(env.get('commit') or '')[:10]}`."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--bucket-size", type=int, default=256)
    parser.add_argument("--models", nargs="*", help="builders to measure (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--force", action="store_true", help="measure again those already done")
    args = parser.parse_args(argv)
    import torchvision.models

    torch.set_num_threads(args.threads)
    config = compressor.QuantConfig(bits=args.bits, bucket_size=args.bucket_size)
    settings = {"bits": args.bits, "bucket_size": args.bucket_size, "num_classes": 10}
    last = load_result(NAME) or {}
    done = last.get("builders", {}) if last.get("config") == settings else {}
    builders = args.models or torchvision.models.list_models(module=torchvision.models)
    unknown = [b for b in builders if family_of(b) is None]
    if unknown:
        parser.error(f"builders of no known family: {unknown}")
    result = {"config": settings, "builders": done}
    for builder in builders:
        if builder in done and not args.force:
            continue
        result["builders"][builder] = row = measure(builder, config)
        print(
            f"{builder}: {row['parameters']:,} parameters, {row['ratio']:.2f}x, folded "
            f"{row['ratio_folded']:.2f}x, exact {row['plain']['exact_reload']}/"
            f"{row['folded']['exact_reload']} ({row['seconds']:.0f} s)",
            flush=True,
        )
        write_result(NAME, result)
        gc.collect()
    result = load_result(NAME) or result
    atomic_write_text(MARKDOWN, render(result))
    print(f"wrote {MARKDOWN}")
    return result


if __name__ == "__main__":
    main()
