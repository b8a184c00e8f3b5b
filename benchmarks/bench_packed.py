"""Packed-file speed and size for a 50M-parameter 4-bit model, as ratios to `torch.save` /
`torch.load` of its fp32 state dict, timed in the same run.

    python -m benchmarks.bench_packed [--params 50e6] [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

import compressor
from benchmarks.common import ratio, timings, write_result
from compressor.format.packed import packed_summary


def build_model(params: int, width: int = 2048) -> nn.Sequential:
    """Square bias-free linear layers of ``width`` adding up to about ``params`` weights, with
    heavy-tailed weights like trained ones (Student-t, 5 degrees of freedom): the uniform
    initialisation would leave entropy coding nothing to gain."""
    layers = max(1, round(params / (width * width)))
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.distributions.StudentT(5.0).sample(p.shape) * 0.02)
    return model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=50e6)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--bucket-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = build_model(int(args.params))
    fp32_state = {k: v.clone() for k, v in model.state_dict().items()}
    compressor.quantize_(
        model, compressor.QuantConfig(bits=args.bits, bucket_size=args.bucket_size)
    )
    compressor.materialize_(model)
    weights = sum(p.numel() for p in model.parameters())

    result: dict = {"config": {**vars(args), "weights": weights}}
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path, packed = Path(tmp) / "fp32.pt", Path(tmp) / "model.qd"
        result["torch_save"] = timings(lambda: torch.save(fp32_state, fp32_path), args.repeats)
        result["torch_load"] = timings(
            lambda: torch.load(fp32_path, weights_only=True), args.repeats
        )
        result["fp32_bytes"] = fp32_path.stat().st_size
        for entropy in (None, "huffman", "ans"):
            label = entropy or "bitpack"
            result[f"pack_{label}"] = timings(
                lambda e=entropy: compressor.save_packed(model, packed, entropy=e), args.repeats
            )
            result[f"unpack_{label}"] = timings(
                lambda: compressor.load_packed(packed), args.repeats
            )
            result[f"bytes_{label}"] = packed.stat().st_size
            for coder in packed_summary(packed)[1]:
                result[f"coder_{label}"] = {
                    "mean_bits_per_weight": coder.mean_bits,
                    "entropy_bits_per_weight": coder.entropy_bits,
                    "gap": coder.mean_bits - coder.entropy_bits,
                }
            state, _ = compressor.load_packed(packed)
            assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
            result[f"pack_{label}_over_save"] = ratio(result[f"pack_{label}"], result["torch_save"])
            result[f"unpack_{label}_over_load"] = ratio(
                result[f"unpack_{label}"], result["torch_load"]
            )
    result["goal"] = "unpack within 3x of the fp32 torch.load"
    path = write_result("packed", result)
    print(f"{weights / 1e6:.1f}M weights, {args.bits}-bit, bucket {args.bucket_size}")
    print("| coding | bytes | vs fp32 | pack / torch.save | unpack / torch.load |")
    print("|---|---|---|---|---|")
    for label in ("bitpack", "huffman", "ans"):
        p, u = result[f"pack_{label}_over_save"], result[f"unpack_{label}_over_load"]
        print(
            f"| {label} | {result[f'bytes_{label}']:,} | "
            f"{result['fp32_bytes'] / result[f'bytes_{label}']:.2f}x | "
            f"{p['median']:.2f} ({p['min']:.2f}-{p['max']:.2f}) | "
            f"{u['median']:.2f} ({u['min']:.2f}-{u['max']:.2f}) |"
        )
    for label in ("huffman", "ans"):
        c = result[f"coder_{label}"]
        print(
            f"{label}: {c['mean_bits_per_weight']:.4f} bits/weight, entropy "
            f"{c['entropy_bits_per_weight']:.4f} (gap {c['gap']:.4f})"
        )
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
