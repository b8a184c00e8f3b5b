"""Quantization math on tensors: bucketed grids, rounding, non-uniform points, LSQ steps, and
the record of how a tensor was quantized. Imports torch and nothing else of qdistill."""
