"""Quality: task metrics per eval set, fidelity to the teacher, and retention.

Retention = metric(artifact) / metric(teacher) per eval set; fidelity = mean
cosine between artifact and teacher embeddings of held-out inputs, plus top-10
neighbour agreement. Both are computed on artifacts as their runtime runs them.
"""

from __future__ import annotations

import numpy as np

from compress.data import EvalSet


def rank(values: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (what Spearman's rho needs)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_vals = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    ra, rb = rank(np.asarray(a, np.float64)), rank(np.asarray(b, np.float64))
    ra -= ra.mean()
    rb -= rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom else 0.0


def score(eval_set: EvalSet, embeddings: np.ndarray) -> float:
    """Spearman between the cosine of each pair and the human score."""
    pairs = np.asarray(eval_set.pairs)
    a, b = embeddings[pairs[:, 0]], embeddings[pairs[:, 1]]
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return spearman(cos, eval_set.human)


def run(encoder, eval_sets: list[EvalSet], heldout: list[str]) -> tuple[dict[str, float], np.ndarray]:
    """(metric per eval set, held-out embeddings) for one encoder."""
    metrics = {s.name: score(s, encoder.embed(list(s.texts))) for s in eval_sets}
    return metrics, encoder.embed(heldout)


def fidelity(student: np.ndarray, teacher: np.ndarray, k: int = 10) -> dict[str, float]:
    """Mean cosine of paired embeddings, and the share of each input's k nearest
    held-out neighbours that the student and the teacher agree on."""
    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    s, t = unit(student.astype(np.float64)), unit(teacher.astype(np.float64))
    cosine = float((s * t).sum(1).mean())
    key = f"top{k}_agreement"
    k = min(k, len(s) - 1)
    if k < 1:
        return {"cosine": cosine, key: float("nan")}

    def neighbours(x):
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    ns, nt = neighbours(s), neighbours(t)
    agree = np.mean([len(set(a) & set(b)) / k for a, b in zip(ns, nt)])
    return {"cosine": cosine, key: float(agree)}


def retention(metrics: dict[str, float], teacher: dict[str, float]) -> dict[str, float]:
    return {name: (metrics[name] / teacher[name] if teacher[name] else float("nan"))
            for name in teacher if name in metrics}
