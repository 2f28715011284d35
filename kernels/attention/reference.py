"""The plain numpy oracle of masked multi-head self-attention.

What every form of the fused attention kernel (the ONNX rewrite in rewrite.py,
ONNX Runtime's com.microsoft ops, later CPU/GPU kernels) is tested against.
"""

from __future__ import annotations

import numpy as np

# The additive value BERT-family exports give a padded key (transformers' classic mask).
MASK_FILTER_VALUE = -10000.0


def attention(x: np.ndarray, weights: tuple[np.ndarray, np.ndarray, np.ndarray],
              biases: tuple[np.ndarray, np.ndarray, np.ndarray], mask: np.ndarray, num_heads: int,
              scale: float | None = None, mask_filter_value: float = MASK_FILTER_VALUE) -> np.ndarray:
    """Self-attention of x [B, S, hidden] -> context [B, S, width], before the output projection.

    weights are (Wq, Wk, Wv), each [hidden, width] (width = num_heads * head_size, which may be
    below hidden when heads were pruned); mask is [B, S] with 1 for a real token and 0 for padding.
    A padded key adds mask_filter_value to its score, as (1 - mask) * mask_filter_value.
    """
    x = x.astype(np.float64)
    batch, seq, _ = x.shape
    q, k, v = (x @ w.astype(np.float64) + b.astype(np.float64) for w, b in zip(weights, biases))
    width = q.shape[-1]
    if width % num_heads:
        raise ValueError(f"width {width} is not a multiple of num_heads {num_heads}")
    head_size = width // num_heads
    if scale is None:
        scale = 1.0 / np.sqrt(head_size)

    def heads(t: np.ndarray) -> np.ndarray:  # [B, S, width] -> [B, H, S, D]
        return t.reshape(batch, seq, num_heads, head_size).transpose(0, 2, 1, 3)

    scores = heads(q) @ heads(k).transpose(0, 1, 3, 2) * scale
    scores = scores + (1.0 - mask.astype(np.float64))[:, None, None, :] * mask_filter_value
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs = probs / probs.sum(axis=-1, keepdims=True)
    context = probs @ heads(v)  # [B, H, S, D]
    return context.transpose(0, 2, 1, 3).reshape(batch, seq, width).astype(np.float32)
