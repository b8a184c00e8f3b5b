"""The ``onmt_train`` options of quantized distillation, and their validated settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass

METHODS = ("uniform", "nonuniform", "differentiable")


def add_options(parser) -> None:  # noqa: ANN001
    """Add the options to an OpenNMT (configargparse) parser; names avoid OpenNMT's own
    ``--bucket_size`` (data batching)."""
    group = parser.add_argument_group("Quantized distillation (qdistill)")
    group.add(
        "--quantized_distill",
        "-quantized_distill",
        action="store_true",
        help="Train a low-bit student by quantized distillation from --teacher_model.",
    )
    group.add(
        "--teacher_model",
        "-teacher_model",
        default=None,
        help="Checkpoint of the full-precision teacher (same vocabularies).",
    )
    group.add("--quant_bits", "-quant_bits", type=int, default=4, help="Bits per weight (1-8).")
    group.add(
        "--quant_bucket_size",
        "-quant_bucket_size",
        type=int,
        default=256,
        help="Consecutive weights sharing one min/max scaling.",
    )
    group.add(
        "--quant_method",
        "-quant_method",
        default="uniform",
        choices=METHODS,
        help="Uniform levels, fixed non-uniform points, or learned (differentiable) points.",
    )
    group.add(
        "--quant_rounding",
        "-quant_rounding",
        default="nearest",
        choices=("nearest", "stochastic"),
        help="Rounding of the uniform quantizer.",
    )
    group.add(
        "--quant_keep_first_last",
        "-quant_keep_first_last",
        action="store_true",
        help="Leave the first and the last quantizable layer in full precision.",
    )
    group.add(
        "--distill_temperature",
        "-distill_temperature",
        type=float,
        default=1.0,
        help="Softmax temperature of the distillation term (paper: 1 for translation).",
    )
    group.add("--distill_alpha", "-distill_alpha", type=float, default=0.7,
              help="Weight of the distillation term; 1 - alpha weighs the CE.")  # fmt: skip
    group.add(
        "--distill_topk",
        "-distill_topk",
        type=int,
        default=0,
        help="Distil from the teacher's K largest logits per target token (the other classes "
        "merged into one), computed the first time a training example is seen and kept in "
        "memory (about 8*K+4 bytes per target token), so the teacher runs once per example "
        "instead of once per batch. An approximation. 0 (default): the full teacher, exactly.",
    )


UNSUPPORTED = (
    ("copy_attn", lambda v: bool(v), "-copy_attn (copy attention)"),
    ("lora_layers", lambda v: bool(v), "LoRA (-lora_layers)"),
    ("lora_embedding", lambda v: bool(v), "LoRA (-lora_embedding)"),
    ("quant_layers", lambda v: bool(v), "bitsandbytes -quant_layers"),
    ("optim", lambda v: v == "sparseadam", "-optim sparseadam"),
    ("save_format", lambda v: v == "safetensors", "-save_format safetensors"),
)


def _samples_subwords(opt, side: str) -> bool:  # noqa: ANN001
    """Whether OpenNMT's subword transforms draw a different segmentation each epoch."""
    nbest = getattr(opt, f"{side}_subword_nbest", 1) or 1
    alpha = getattr(opt, f"{side}_subword_alpha", 0) or 0
    return nbest not in (0, 1) or alpha > 0


@dataclass(frozen=True)
class QuantDistillSettings:
    teacher_model: str
    bits: int
    bucket_size: int
    method: str
    rounding: str
    keep_first_last: bool
    temperature: float
    alpha: float
    topk: int = 0

    @classmethod
    def from_opt(cls, opt) -> QuantDistillSettings:  # noqa: ANN001
        """Validate the options; raises ValueError with a one-line message."""
        for name, unsupported, label in UNSUPPORTED:
            if unsupported(getattr(opt, name, None)):
                raise ValueError(f"--quantized_distill does not support {label} yet; remove it")
        teacher = getattr(opt, "teacher_model", None)
        if not teacher:
            raise ValueError("--quantized_distill needs --teacher_model PATH")
        if not 1 <= opt.quant_bits <= 8:
            raise ValueError(f"--quant_bits must be from 1 to 8, got {opt.quant_bits}")
        if opt.quant_bucket_size <= 0:
            raise ValueError(f"--quant_bucket_size must be positive, got {opt.quant_bucket_size}")
        if not opt.distill_temperature > 0:
            raise ValueError(f"--distill_temperature must be > 0, got {opt.distill_temperature}")
        if not 0 <= opt.distill_alpha <= 1:
            raise ValueError(f"--distill_alpha must be in [0, 1], got {opt.distill_alpha}")
        topk = getattr(opt, "distill_topk", 0)
        if topk < 0:
            raise ValueError(f"--distill_topk must be 0 (exact) or a positive K, got {topk}")
        if topk and any(_samples_subwords(opt, side) for side in ("src", "tgt")):
            raise ValueError(
                "--distill_topk caches the teacher per example, so it needs the same subwords "
                "every epoch: remove subword sampling (-*_subword_nbest/-*_subword_alpha)"
            )
        if opt.quant_rounding == "stochastic" and opt.quant_method != "uniform":
            raise ValueError("--quant_rounding stochastic needs --quant_method uniform")
        return cls(
            teacher_model=teacher,
            bits=opt.quant_bits,
            bucket_size=opt.quant_bucket_size,
            method=opt.quant_method,
            rounding=opt.quant_rounding,
            keep_first_last=opt.quant_keep_first_last,
            temperature=opt.distill_temperature,
            alpha=opt.distill_alpha,
            topk=topk,
        )

    def quant_config(self):  # noqa: ANN201
        import compressor

        return compressor.QuantConfig(
            bits=self.bits,
            bucket_size=self.bucket_size,
            method=self.method,
            rounding=self.rounding,
            keep_first_last=self.keep_first_last,
        )

    def to_dict(self) -> dict:
        return asdict(self)
