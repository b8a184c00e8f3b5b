"""Training algorithms: the distillation loss, one distillation step, quantized distillation,
differentiable quantization, bit allocation and the QKD schedule."""
