"""`make bench`: every benchmark (cached results are reused), then the report."""

from __future__ import annotations

from benchmarks import (
    bench_bucket,
    bench_cifar,
    bench_inference,
    bench_int4,
    bench_packed,
    bench_quantizer,
    bench_topk,
    bench_torchvision,
    bench_training_cost,
    bench_translation,
    report,
)


def main() -> None:
    bench_quantizer.main([])
    bench_packed.main([])
    bench_cifar.main(["--workers", "2"])  # two one-thread processes: the 2-core machine
    bench_bucket.main([])
    bench_translation.main([])  # main, long, seqkd and transformer (about 3 hours)
    bench_training_cost.main([])
    bench_topk.main([])
    bench_inference.main([])
    bench_torchvision.main([])
    bench_int4.main(["--transformer"])  # LSTM: its own CPU-scale teacher the first time (1.5 h)
    report.main()


if __name__ == "__main__":
    main()
