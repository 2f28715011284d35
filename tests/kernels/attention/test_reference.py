"""The numpy oracle of masked multi-head attention against a plain torch computation."""

import numpy as np
import pytest
import torch

from compress.kernels.attention.reference import attention


def torch_attention(x, weights, biases, mask, num_heads):
    """The computation written out in torch, the way BERT's eager attention does it."""
    x = torch.from_numpy(x).double()
    q, k, v = (x @ torch.from_numpy(w).double() + torch.from_numpy(b).double() for w, b in zip(weights, biases))
    batch, seq, width = q.shape
    size = width // num_heads

    def split(t):
        return t.view(batch, seq, num_heads, size).transpose(1, 2)

    additive = (1.0 - torch.from_numpy(mask).double())[:, None, None, :] * -10000.0
    scores = split(q) @ split(k).transpose(-1, -2) / size ** 0.5 + additive
    context = torch.softmax(scores, dim=-1) @ split(v)
    return context.transpose(1, 2).reshape(batch, seq, width).numpy()


def make_case(hidden: int, heads: int, head_size: int, seed: int = 0):
    rs = np.random.RandomState(seed)
    batch, seq, width = 3, 7, heads * head_size
    x = rs.randn(batch, seq, hidden).astype(np.float32)
    weights = tuple((rs.randn(hidden, width) * 0.5).astype(np.float32) for _ in range(3))
    biases = tuple((rs.randn(width) * 0.1).astype(np.float32) for _ in range(3))
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[1, 4:] = 0  # ragged padding
    mask[2, 2:] = 0
    return x, weights, biases, mask


@pytest.mark.parametrize("hidden,heads,head_size", [(32, 4, 8), (32, 3, 8)])  # full width, and head-pruned (24 < 32)
def test_oracle_matches_torch(hidden, heads, head_size):
    x, weights, biases, mask = make_case(hidden, heads, head_size)
    got = attention(x, weights, biases, mask, heads)
    assert got.shape == (3, 7, heads * head_size)
    np.testing.assert_allclose(got, torch_attention(x, weights, biases, mask, heads), atol=1e-5)


def test_padded_keys_do_not_contribute():
    x, weights, biases, mask = make_case(32, 4, 8)
    changed = x.copy()
    changed[1, 4:] = 100.0  # whatever sits at padded positions
    a = attention(x, weights, biases, mask, 4)
    b = attention(changed, weights, biases, mask, 4)
    np.testing.assert_allclose(a[1, :4], b[1, :4], atol=1e-5)
    assert not np.allclose(a[1, 4:], b[1, 4:])  # padded queries themselves do change


def test_width_must_split_into_heads():
    x, weights, biases, mask = make_case(32, 3, 8)
    with pytest.raises(ValueError, match="not a multiple of num_heads 5"):
        attention(x, weights, biases, mask, 5)
