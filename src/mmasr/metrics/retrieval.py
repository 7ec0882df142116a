"""Retrieval metrics: pure functions over a (queries, candidates) similarity matrix and a relevance
matrix of the same shape. Ties are ordered against the model (an irrelevant candidate scoring the same
as a relevant one ranks first), so a collapsed model scores at or below chance, never above; the demo
CLIP's monitoring R@1 (:func:`retrieval_r1`) takes the first candidate instead."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["first_relevant_rank", "retrieval_metrics", "recall_curve", "chance_recall", "retrieval_r1"]


def _check(sim: np.ndarray, relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sim, relevant = np.asarray(sim, dtype=np.float64), np.asarray(relevant, dtype=bool)
    if sim.ndim != 2 or sim.shape != relevant.shape or sim.size == 0:
        raise ValueError(f"similarity {sim.shape} and relevance {relevant.shape} must be the same non-empty "
                         "(queries, candidates) shape")
    if not relevant.any(axis=1).all():
        raise ValueError("every query needs at least one relevant candidate")
    return sim, relevant


def first_relevant_rank(sim: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """1-based rank of each query's best relevant candidate; irrelevant candidates that tie with it
    rank first (ties count against the model)."""
    sim, relevant = _check(sim, relevant)
    best = np.where(relevant, sim, -np.inf).max(axis=1)
    return 1 + ((sim >= best[:, None]) & ~relevant).sum(axis=1)


def retrieval_metrics(sim: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = (1, 5, 10),
                      map_k: int = 10) -> dict:
    """R@k (share of queries with a relevant candidate in the top k), mAP@``map_k`` (precision at
    each relevant hit in the top ``map_k``, summed and divided by ``min(n_relevant, map_k)``),
    and the mean and median rank of the first relevant candidate. ``sim`` and ``relevant`` are
    (queries, candidates); ties are ordered against the model."""
    sim, relevant = _check(sim, relevant)
    ranks = first_relevant_rank(sim, relevant)
    order = np.lexsort((relevant.astype(np.int8), -sim), axis=-1)  # by score, an irrelevant tie first
    top = np.take_along_axis(relevant, order, axis=1)[:, :map_k]
    precision = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1)
    ap = (precision * top).sum(axis=1) / np.minimum(relevant.sum(axis=1), map_k)
    out = {f"r{k}": float((ranks <= k).mean()) for k in ks}
    out.update({f"map{map_k}": float(ap.mean()), "mean_rank": float(ranks.mean()),
                "median_rank": float(np.median(ranks))})
    return out


def recall_curve(sim: np.ndarray, relevant: np.ndarray, max_k: int) -> list[float]:
    """R@k for k = 1..max_k."""
    ranks = first_relevant_rank(sim, relevant)
    return [float((ranks <= k).mean()) for k in range(1, max_k + 1)]


def chance_recall(relevant: np.ndarray, k: int) -> float:
    """Expected R@k of a random ranking: per query ``1 - C(N - m, k) / C(N, k)`` for m relevant
    among N candidates, averaged over queries."""
    relevant = np.asarray(relevant, dtype=bool)
    n = relevant.shape[1]
    out = []
    for m in relevant.sum(axis=1):
        miss = 1.0
        for i in range(min(k, n)):
            miss *= max(0, n - int(m) - i) / (n - i)
        out.append(1.0 - miss)
    return float(np.mean(out))


def retrieval_r1(similarity: np.ndarray, match: np.ndarray) -> tuple[float, float]:
    """Caption->picture R@1 and its chance level. ``similarity`` and ``match`` are (captions,
    pictures); ``match[i, j]`` says picture ``j`` is a correct answer for caption ``i``. Ties go to
    the first picture. Chance = mean share of correct pictures per caption."""
    similarity = np.asarray(similarity)
    match = np.asarray(match, dtype=bool)
    if similarity.shape != match.shape or similarity.shape[0] == 0:
        raise ValueError("similarity and match must have the same non-empty (captions, pictures) shape")
    top = np.argmax(similarity, axis=1)
    r1 = float(match[np.arange(len(top)), top].mean())
    chance = float((match.sum(axis=1) / match.shape[1]).mean())
    return r1, chance
