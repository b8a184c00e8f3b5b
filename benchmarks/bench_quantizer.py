"""Quantizer throughput: `quantize_tensor` on a 16M-element fp32 tensor (4 bits, bucket 256)
as a ratio to `x.clone()` of the same tensor, timed in the same run.

    python -m benchmarks.bench_quantizer
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import ratio, timings, write_result
from compressor.quantization import grids as quantizers


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=16 * 1024 * 1024)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--bucket-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)

    x = torch.randn(args.numel, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    quantizers.quantize_tensor(x, args.bits, args.bucket_size)  # compiles the fused kernel once
    first_call_s = time.perf_counter() - start

    def quantize() -> torch.Tensor:
        return quantizers.quantize_tensor(x, args.bits, args.bucket_size)

    clone = timings(lambda: x.clone(), args.repeats)
    fused = timings(quantize, args.repeats)
    threshold = quantizers.FUSED_MIN_NUMEL
    quantizers.FUSED_MIN_NUMEL = args.numel + 1  # the eager path, for comparison
    try:
        eager = timings(quantize, args.repeats)
    finally:
        quantizers.FUSED_MIN_NUMEL = threshold
    result = {
        "config": vars(args),
        "first_call_s": first_call_s,
        "clone": clone,
        "fused": fused,
        "eager": eager,
        "fused_over_clone": ratio(fused, clone),
        "eager_over_clone": ratio(eager, clone),
        "goal": "fused path within 1.5x of clone",
    }
    path = write_result("quantizer", result)
    print("| path | median ms | ratio to clone (median, min-max) |")
    print("|---|---|---|")
    print(f"| clone | {clone['median_s'] * 1e3:.1f} | 1 |")
    for name in ("fused", "eager"):
        r = result[f"{name}_over_clone"]
        print(
            f"| {name} | {result[name]['median_s'] * 1e3:.1f} | "
            f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f}) |"
        )
    print(f"first call (includes compiling the fused kernel): {first_call_s:.1f} s; wrote {path}")
    return result


if __name__ == "__main__":
    main()
