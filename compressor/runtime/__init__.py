"""Inference on the stored codes: modules that keep 4-bit weights packed in memory and multiply
with PyTorch's int4 kernel (:func:`compressor.to_int4_runtime_`). Builds on
:mod:`compressor.surgery` (a model's quantization record) and :mod:`compressor.format` (a
packed file's codes)."""
