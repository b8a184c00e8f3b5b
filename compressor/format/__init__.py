"""Files: the packed model format (bit packing, entropy coding), atomic writes and the safe
checkpoint loader. Builds on :mod:`compressor.quantization`; never imports the surgery."""
