"""Bucket size against accuracy and bytes: what each 4-bit file pays for its per-bucket
offset and scale (two fp32 numbers a bucket), on the CIFAR-10 recipe's distilled student.

Post-training 4-bit quantization (no training, so every bucket size sees the same weights)
with buckets of 64 to 1,024 weights and one per tensor; accuracy on the test set, bytes of the
bit-packed and the entropy-coded (rANS) file against the fp32 file. Reuses the student that
``bench_cifar`` trained (or trains it: about 10 minutes).

    python -m benchmarks.bench_bucket [--rerun]
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import asdict

from safetensors.torch import save as safetensors_bytes

import compressor
from benchmarks.bench_cifar import WORK
from benchmarks.common import load_result, write_result
from compressor.format.files import atomic_write_bytes
from compressor.format.packed import entropy_ans_available
from recipes import cifar
from recipes import small_runs as runs
from recipes.experiments import load_recipe

BUCKETS = (64, 128, 256, 512, 1024, None)
BITS = 4


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rerun", action="store_true", help="ignore the cached result")
    args = parser.parse_args(argv)
    cfg = runs.SmallRunConfig(**load_recipe("cifar10").parameters("cpu"))
    cached = load_result("bucket")
    if not args.rerun and cached is not None and cached["config"] == asdict(cfg):
        print("bucket sizes: cached", flush=True)
        return cached
    data = runs.load_cifar10(
        runs.data_root(), cfg.train_images, cfg.test_images, cfg.seed, cfg.device
    )
    student = cifar.trained_model(cfg, data, WORK, "student_fp32_distilled")
    fp32 = WORK / "student_fp32_distilled.safetensors"  # the file the student ships as in fp32
    state = {k: v.contiguous().cpu() for k, v in student.state_dict().items()}
    atomic_write_bytes(fp32, safetensors_bytes(state))
    rows = []
    for bucket in BUCKETS:
        model = copy.deepcopy(student)
        compressor.quantize_(model, compressor.QuantConfig(bits=BITS, bucket_size=bucket))
        model = compressor.materialize_(model).cpu()
        name = f"pm{BITS}_bucket{bucket or 'tensor'}"
        packed = compressor.save_packed(model, WORK / f"{name}.qd")
        ans = (
            compressor.save_packed(model, WORK / f"{name}.ans.qd", entropy="ans")
            if entropy_ans_available()
            else None
        )
        row = {
            "bucket_size": bucket,
            "accuracy": runs.accuracy(model.to(cfg.device), data),
            "packed_bytes": packed,
            "packed_bytes_ans": ans,
        }
        print(
            f"  bucket {bucket or 'tensor':>6}: {row['accuracy']:.2f}%  {packed:,} bytes",
            flush=True,
        )
        rows.append(row)
    result = {
        "what": f"PM {BITS}-bit of the CIFAR-10 recipe's distilled student, by bucket size",
        "bits": BITS,
        "fp32_accuracy": runs.accuracy(student, data),
        "fp32_bytes": fp32.stat().st_size,
        "rows": rows,
        "config": asdict(cfg),
    }
    write_result("bucket", result)
    return result


if __name__ == "__main__":
    main()
