"""qdistill's compression core, in layers that import one way (each only from those above it
in this list): ``quantization`` (tensor math), ``surgery`` (quantizers on a model's weights),
``format`` (packed files, atomic writes, safe loading), ``runtime`` (inference on the stored
int4 codes), ``training`` (distillation algorithms), ``cli`` (the ``qdistill`` command).
Depends on torch and numpy only; this module re-exports the public API."""

from compressor.format.files import (
    CheckpointError,
    load_checkpoint,
)
from compressor.format.packed import (
    PackedFormatError,
    is_packed,
    load_packed,
    packed_info,
    write_packed,
)
from compressor.quantization.grids import (
    KERNEL_GROUP_SIZES,
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
from compressor.quantization.lsq import (
    lsq_quantize,
)
from compressor.quantization.record import (
    QuantRecord,
    QuantSpec,
)
from compressor.runtime.int4 import (
    RuntimeReport,
    has_kernel_grid,
    int4_kernel_available,
    resident_bytes,
    run_packed_on_int4_,
    runtime_report,
    to_int4_runtime_,
)
from compressor.surgery.activations import (
    activation_quantizers,
    insert_activation_quantizers,
)
from compressor.surgery.config import (
    QuantConfig,
)
from compressor.surgery.fold import (
    batchnorm_pairs,
    fold_batchnorm_,
)
from compressor.surgery.quantize import (
    cached,
    load_shadow_state_dict,
    materialize_,
    quantization_record,
    quantization_specs,
    quantize_,
    quantize_once,
    quantize_state_dict,
    quantized_state_dict,
    quantized_tensors,
    shadow_state_dict,
)
from compressor.surgery.quantizers import (
    DifferentiableQuantizer,
    Int4KernelQuantizer,
    LsqActivationQuantizer,
    LsqWeightQuantizer,
    NonUniformQuantizer,
    UniformQuantizer,
    WeightQuantizer,
)
from compressor.surgery.selection import (
    is_layer_weight,
    quantizable_weights,
    register_weights,
)
from compressor.surgery.size import (
    SizeReport,
    size_report,
)
from compressor.training.bit_allocation import (
    allocate_bits,
    effective_bits,
    share_points,
    weight_importance,
    weight_sizes,
)
from compressor.training.differentiable import (
    constrain_points_,
    differentiable_quantization,
    freeze_shadow_weights_,
    keep_points_constrained,
    point_parameters,
)
from compressor.training.distillation import (
    TopKLogits,
    distillation_loss,
)
from compressor.training.finish import (
    finish_,
    pack_and_materialize_,
    save_packed,
)
from compressor.training.qkd import (
    QKDSchedule,
    qkd_train,
)
from compressor.training.quantized_distillation import quantized_distillation
from compressor.training.step import DistillConfig, distill_step, freeze_

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "BucketCodes",
    "Int4KernelQuantizer",
    "KERNEL_GROUP_SIZES",
    "RuntimeReport",
    "has_kernel_grid",
    "int4_kernel_available",
    "resident_bytes",
    "run_packed_on_int4_",
    "runtime_report",
    "to_int4_runtime_",
    "CheckpointError",
    "DifferentiableQuantizer",
    "DistillConfig",
    "LsqActivationQuantizer",
    "LsqWeightQuantizer",
    "NonUniformQuantizer",
    "PackedFormatError",
    "QKDSchedule",
    "QuantConfig",
    "QuantRecord",
    "QuantSpec",
    "SizeReport",
    "TopKLogits",
    "UniformQuantizer",
    "WeightQuantizer",
    "activation_quantizers",
    "allocate_bits",
    "batchnorm_pairs",
    "cached",
    "quantize_once",
    "pack_and_materialize_",
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
    "fold_batchnorm_",
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
    "quantization_record",
    "quantization_specs",
    "quantize_",
    "quantize_state_dict",
    "register_weights",
    "is_layer_weight",
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
    "write_packed",
]
