"""The ``onmt_train`` options of quantized distillation, and their validated settings."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from compressor.quantization.grids import check_bits

METHODS = ("uniform", "nonuniform", "differentiable")

# Each option, with the shortest abbreviation argparse resolves to it beside OpenNMT-py 3.5.1's
# own options (one more character than the longest prefix shared with one of them: -quant_
# is also -quant_layers/-quant_type, -te is also -tensorboard, -d is also -data);
# tests/test_onmt_trust.py checks the table against OpenNMT's parser.
OPTIONS = {
    "quantized_distill": 6,
    "teacher_model": 3,
    "quant_bits": 7,
    "quant_bucket_size": 7,
    "quant_method": 7,
    "quant_rounding": 7,
    "quant_keep_first_last": 7,
    "quant_grid": 7,
    "distill_temperature": 2,
    "distill_alpha": 2,
    "distill_topk": 2,
}
CONFIG_OPTION = ("config", 4)  # OpenNMT's -config YAML (-con is also -context_gate)


def add_options(parser) -> None:
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
        "--quant_grid",
        "-quant_grid",
        default="minmax",
        choices=("minmax", "int4_kernel"),
        help="int4_kernel: train on the grid of PyTorch's int4 matmul kernel (bf16 scale and "
        "zero per bucket), so that onmt_translate runs the packed student on that kernel with "
        "exactly the trained weights; needs -quant_bits 4, -quant_method uniform and "
        "-quant_bucket_size 32/64/128/256.",
    )
    group.add(
        "--distill_temperature",
        "-distill_temperature",
        type=float,
        default=1.0,
        help="Softmax temperature of the distillation term (paper: 1 for translation).",
    )
    group.add(
        "--distill_alpha",
        "-distill_alpha",
        type=float,
        default=0.7,
        help="Weight of the distillation term; 1 - alpha weighs the CE.",
    )
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


def _option_name(token: str) -> str | None:
    """The option a command-line token names: ``-x``, ``--x`` or ``--x=v`` gives ``x``."""
    if not token.startswith("-") or token in ("-", "--") or token[1:2].isdigit():
        return None
    return token.lstrip("-").split("=", 1)[0]


def _ours(name: str) -> str | None:
    """Our option that ``name`` spells out or abbreviates the way argparse accepts."""
    for option, shortest in OPTIONS.items():
        if option.startswith(name) and len(name) >= shortest:
            return option
    return None


def _config_files(argv: list[str]) -> list[str]:
    config, shortest = CONFIG_OPTION
    found = []
    for i, token in enumerate(argv):
        name = _option_name(token)
        if name is None or not (config.startswith(name) and len(name) >= shortest):
            continue
        if "=" in token:
            found.append(token.split("=", 1)[1])
        elif i + 1 < len(argv):
            found.append(argv[i + 1])
    return found


def named_options(argv: list[str]) -> list[tuple[str, str]]:
    """The qdistill options an ``onmt_train`` command line names, directly or as keys of its
    ``-config`` YAML file: ``(option, how it was given)`` pairs. Cheap: string tests, and the
    YAML (which OpenNMT reads anyway) only when there is one."""
    named = []
    for token in argv:
        if token == "--":
            break
        name = _option_name(token)
        option = _ours(name) if name else None
        if option is not None:
            named.append((option, token.split("=", 1)[0]))
    for path in _config_files(argv):
        if not os.path.isfile(path):
            continue  # OpenNMT says so itself
        try:
            import yaml

            with open(path, encoding="utf-8") as handle:
                config = yaml.safe_load(handle)
        except Exception:  # not YAML: OpenNMT says so itself
            continue
        for key in config if isinstance(config, dict) else ():
            option = _ours(str(key).lstrip("-"))
            if option is not None:
                named.append((option, f"{key} in {path}"))
    return named


UNSUPPORTED = (
    ("copy_attn", lambda v: bool(v), "-copy_attn (copy attention)"),
    ("lora_layers", lambda v: bool(v), "LoRA (-lora_layers)"),
    ("lora_embedding", lambda v: bool(v), "LoRA (-lora_embedding)"),
    ("quant_layers", lambda v: bool(v), "bitsandbytes -quant_layers"),
    ("optim", lambda v: v == "sparseadam", "-optim sparseadam"),
    ("save_format", lambda v: v == "safetensors", "-save_format safetensors"),
)


def _samples_subwords(opt, side: str) -> bool:
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
    grid: str = "minmax"

    @classmethod
    def from_opt(cls, opt) -> QuantDistillSettings:
        """Validate the options; raises ValueError with a one-line message."""
        for name, unsupported, label in UNSUPPORTED:
            if unsupported(getattr(opt, name, None)):
                raise ValueError(f"--quantized_distill does not support {label} yet; remove it")
        teacher = getattr(opt, "teacher_model", None)
        if not teacher:
            raise ValueError("--quantized_distill needs --teacher_model PATH")
        check_bits(opt.quant_bits, "--quant_bits")
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
        grid = getattr(opt, "quant_grid", "minmax")
        if grid == "int4_kernel":
            from compressor.quantization.grids import KERNEL_GROUP_SIZES

            if opt.quant_bits != 4 or opt.quant_method != "uniform":
                raise ValueError(
                    "--quant_grid int4_kernel needs --quant_bits 4 and --quant_method uniform"
                )
            if opt.quant_bucket_size not in KERNEL_GROUP_SIZES:
                sizes = "/".join(map(str, KERNEL_GROUP_SIZES))
                raise ValueError(
                    f"--quant_grid int4_kernel needs --quant_bucket_size {sizes} (the kernel's "
                    f"group sizes), got {opt.quant_bucket_size}"
                )
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
            grid=grid,
        )

    def quant_config(self):
        import compressor

        return compressor.QuantConfig(
            bits=self.bits,
            bucket_size=self.bucket_size,
            method=self.method,
            rounding=self.rounding,
            keep_first_last=self.keep_first_last,
            grid=self.grid,
        )

    def to_dict(self) -> dict:
        return asdict(self)
