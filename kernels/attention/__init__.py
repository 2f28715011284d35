"""Fused multi-head self-attention: the numpy oracle (reference.py) and the ONNX
rewrite that puts ONNX Runtime's com.microsoft attention ops into exported
encoders (rewrite.py, used by the fuse stage)."""
