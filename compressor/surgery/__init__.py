"""Model surgery: put quantizers on a model's weights (``quantize_``), take them off
(``materialize_``), and read what they did. Builds on :mod:`compressor.quantization`."""
