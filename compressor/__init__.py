"""qdistill's compression core: bucketed quantizers, quantization parametrizations,
distillation and packed model files. Depends on torch and numpy only."""

__version__ = "0.1.0"

from compressor.api import (  # noqa: E402
    cached,
    load_shadow_state_dict,
    materialize_,
    quantizable_weights,
    quantization_specs,
    quantize_,
    quantized_state_dict,
    quantized_tensors,
    shadow_state_dict,
)
from compressor.config import QuantConfig  # noqa: E402
from compressor.parametrizations import (  # noqa: E402
    NonUniformQuantizer,
    UniformQuantizer,
    WeightQuantizer,
)
from compressor.quantizers import (  # noqa: E402
    BucketCodes,
    decode_nonuniform,
    decode_uniform,
    encode_nonuniform,
    encode_uniform,
    quantile_points,
    quantize_nonuniform,
    quantize_tensor,
    uniform_points,
)
from compressor.report import SizeReport, size_report  # noqa: E402
from compressor.spec import QuantSpec  # noqa: E402

__all__ = [
    "__version__",
    "BucketCodes",
    "NonUniformQuantizer",
    "QuantConfig",
    "QuantSpec",
    "SizeReport",
    "UniformQuantizer",
    "WeightQuantizer",
    "cached",
    "decode_nonuniform",
    "decode_uniform",
    "encode_nonuniform",
    "encode_uniform",
    "load_shadow_state_dict",
    "materialize_",
    "quantile_points",
    "quantizable_weights",
    "quantization_specs",
    "quantize_",
    "quantize_nonuniform",
    "quantize_tensor",
    "quantized_state_dict",
    "quantized_tensors",
    "shadow_state_dict",
    "size_report",
    "uniform_points",
]

from compressor.packed import (  # noqa: E402
    PackedFormatError,
    load_packed,
    packed_info,
    save_packed,
)

__all__ += ["PackedFormatError", "load_packed", "packed_info", "save_packed"]

from compressor.activations import activation_quantizers, insert_activation_quantizers  # noqa: E402
from compressor.bit_allocation import (  # noqa: E402
    allocate_bits,
    effective_bits,
    share_points,
    weight_importance,
)
from compressor.differentiable import (  # noqa: E402
    DifferentiableQuantizer,
    constrain_points_,
    differentiable_quantization,
    freeze_shadow_weights_,
    keep_points_constrained,
    point_parameters,
)
from compressor.distillation import distillation_loss  # noqa: E402
from compressor.lsq import LsqActivationQuantizer, LsqWeightQuantizer, lsq_quantize  # noqa: E402
from compressor.qkd import QKDSchedule, qkd_train  # noqa: E402
from compressor.training import (  # noqa: E402
    DistillConfig,
    distill_step,
    finish_,
    freeze_,
    quantized_distillation,
)

__all__ += [
    "DifferentiableQuantizer",
    "DistillConfig",
    "LsqActivationQuantizer",
    "LsqWeightQuantizer",
    "QKDSchedule",
    "activation_quantizers",
    "allocate_bits",
    "constrain_points_",
    "differentiable_quantization",
    "distill_step",
    "distillation_loss",
    "effective_bits",
    "finish_",
    "freeze_",
    "freeze_shadow_weights_",
    "insert_activation_quantizers",
    "keep_points_constrained",
    "lsq_quantize",
    "point_parameters",
    "qkd_train",
    "quantized_distillation",
    "share_points",
    "weight_importance",
]

from compressor.checkpoints import CheckpointError, load_checkpoint  # noqa: E402

__all__ += ["CheckpointError", "load_checkpoint"]
