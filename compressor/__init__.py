"""qdistill's compression core: bucketed quantizers, quantization parametrizations,
distillation and packed model files. Depends on torch and numpy only."""

__version__ = "0.1.0"

from compressor.activations import (  # noqa: E402
    activation_quantizers,
    insert_activation_quantizers,
)
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
from compressor.bit_allocation import (  # noqa: E402
    allocate_bits,
    effective_bits,
    share_points,
    weight_importance,
    weight_sizes,
)
from compressor.files import (  # noqa: E402
    CheckpointError,
    load_checkpoint,
)
from compressor.config import (  # noqa: E402
    QuantConfig,
)
from compressor.differentiable import (  # noqa: E402
    DifferentiableQuantizer,
    constrain_points_,
    differentiable_quantization,
    freeze_shadow_weights_,
    keep_points_constrained,
    point_parameters,
)
from compressor.distillation import (  # noqa: E402
    TopKLogits,
    distillation_loss,
)
from compressor.lsq import (  # noqa: E402
    LsqActivationQuantizer,
    LsqWeightQuantizer,
    lsq_quantize,
)
from compressor.packed import (  # noqa: E402
    PackedFormatError,
    is_packed,
    load_packed,
    packed_info,
    save_packed,
)
from compressor.parametrizations import (  # noqa: E402
    NonUniformQuantizer,
    UniformQuantizer,
    WeightQuantizer,
)
from compressor.qkd import (  # noqa: E402
    QKDSchedule,
    qkd_train,
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
from compressor.report import (  # noqa: E402
    SizeReport,
    size_report,
)
from compressor.spec import (  # noqa: E402
    QuantSpec,
)
from compressor.training import (  # noqa: E402
    DistillConfig,
    distill_step,
    finish_,
    freeze_,
    quantized_distillation,
)

__all__ = [
    "__version__",
    "BucketCodes",
    "CheckpointError",
    "DifferentiableQuantizer",
    "DistillConfig",
    "LsqActivationQuantizer",
    "LsqWeightQuantizer",
    "NonUniformQuantizer",
    "PackedFormatError",
    "QKDSchedule",
    "QuantConfig",
    "QuantSpec",
    "SizeReport",
    "TopKLogits",
    "UniformQuantizer",
    "WeightQuantizer",
    "activation_quantizers",
    "allocate_bits",
    "cached",
    "constrain_points_",
    "decode_nonuniform",
    "decode_uniform",
    "differentiable_quantization",
    "distill_step",
    "distillation_loss",
    "effective_bits",
    "encode_nonuniform",
    "encode_uniform",
    "finish_",
    "freeze_",
    "freeze_shadow_weights_",
    "insert_activation_quantizers",
    "keep_points_constrained",
    "load_checkpoint",
    "is_packed",
    "load_packed",
    "load_shadow_state_dict",
    "lsq_quantize",
    "materialize_",
    "packed_info",
    "point_parameters",
    "qkd_train",
    "quantile_points",
    "quantizable_weights",
    "quantization_specs",
    "quantize_",
    "quantize_nonuniform",
    "quantize_tensor",
    "quantized_distillation",
    "quantized_state_dict",
    "quantized_tensors",
    "save_packed",
    "shadow_state_dict",
    "share_points",
    "size_report",
    "uniform_points",
    "weight_importance",
    "weight_sizes",
]
