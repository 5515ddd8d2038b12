"""Scores of embeddings a user of them trusts (pure numpy): same-label retrieval of test texts
against the training split as the index, and agreement of a variant's vectors with fp32's.

- ``knn_accuracy``: the majority label of the ``k`` nearest index texts (cosine; ties to the
  label with the larger summed similarity) equals the query's label;
- ``recall_at_k``: at least one of the ``k`` nearest has the query's label (Recall@K of metric
  learning);
- ``precision_at_k``: the share of the ``k`` nearest that have the query's label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METRIC_NAMES = ("knn_accuracy", "recall_at_k", "precision_at_k")


@dataclass(frozen=True)
class Retrieval:
    """kNN retrieval of the queries: the scores, and per query the voted label and its share."""

    metrics: dict[str, float]
    predicted: list[str]
    confidence: list[float]


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn(queries: np.ndarray, truth: list[str], index: np.ndarray, index_labels: list[str],
        k: int, chunk: int = 1024) -> Retrieval:
    """Cosine kNN of ``queries`` (labels ``truth``) in ``index`` (labels ``index_labels``)."""
    if len(index) == 0 or len(queries) != len(truth):
        raise ValueError(f"knn needs an index and one label per query ({len(index)} index rows, "
                         f"{len(queries)} queries, {len(truth)} labels)")
    k = max(1, min(int(k), len(index)))
    q, ix = unit(queries), unit(index)
    names = np.asarray(index_labels, dtype=object)
    hits, recall, precision, predicted, confidence = [], [], [], [], []
    for s in range(0, len(q), chunk):
        sims = q[s:s + chunk] @ ix.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        for row, nn in enumerate(top):
            labs, sim = names[nn], sims[row, nn]
            votes: dict[str, tuple[int, float]] = {}
            for lab, v in zip(labs, sim, strict=True):
                n, total = votes.get(lab, (0, 0.0))
                votes[lab] = (n + 1, total + float(v))
            best = max(votes, key=lambda lab: votes[lab])
            want = truth[s + row]
            predicted.append(str(best))
            confidence.append(votes[best][0] / k)
            hits.append(best == want)
            same = int(np.sum(labs == want))
            recall.append(same > 0)
            precision.append(same / k)
    return Retrieval({"knn_accuracy": float(np.mean(hits)), "recall_at_k": float(np.mean(recall)),
                      "precision_at_k": float(np.mean(precision))}, predicted, confidence)


def agreement(outputs: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Cosine of each variant vector with fp32's: mean (``agreement_with_fp32``, the variant
    table's column, and ``mean_cosine_vs_fp32``, the gate's floor) and minimum."""
    cos = np.sum(unit(outputs) * unit(reference), axis=1)
    return {"agreement_with_fp32": float(cos.mean()), "mean_cosine_vs_fp32": float(cos.mean()),
            "min_cosine_vs_fp32": float(cos.min()),
            "max_abs_diff_vs_fp32": float(np.abs(outputs - reference).max())}
