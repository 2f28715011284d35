import numpy as np
import pytest

from compress import evaluate
from compress.data import EvalSet


def test_spearman_matches_scipy_with_ties():
    scipy_stats = pytest.importorskip("scipy.stats")
    rs = np.random.RandomState(0)
    a, b = rs.randint(0, 5, 50), rs.randn(50)
    assert evaluate.spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic, abs=1e-12)


def test_score_perfect_and_reversed():
    emb = np.array([[1, 0], [1, 0.1], [1, 1], [0, 1]], dtype=np.float32)
    pairs = ((0, 1), (0, 2), (0, 3))
    assert evaluate.score(EvalSet("s", ("a", "b", "c", "d"), pairs, (3.0, 2.0, 1.0)), emb) == pytest.approx(1.0)
    assert evaluate.score(EvalSet("s", ("a", "b", "c", "d"), pairs, (1.0, 2.0, 3.0)), emb) == pytest.approx(-1.0)


def test_fidelity():
    rs = np.random.RandomState(0)
    t = rs.randn(100, 16)
    same = evaluate.fidelity(t * 3.0, t)
    assert same["cosine"] == pytest.approx(1.0) and same["top10_agreement"] == pytest.approx(1.0)
    noisy = evaluate.fidelity(t + rs.randn(100, 16), t)
    assert 0.3 < noisy["cosine"] < 0.9 and noisy["top10_agreement"] < 1.0


def test_retention():
    assert evaluate.retention({"a": 0.5, "b": 0.9}, {"a": 1.0, "b": 0.9}) == {"a": 0.5, "b": 1.0}
