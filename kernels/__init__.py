"""Fused operator kernels, one folder per operator (installed as compress.kernels).

Each kernel folder holds its reference, ONNX rewrite, CPU and GPU kernels and tests.
"""
