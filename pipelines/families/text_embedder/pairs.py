"""Pair data of the text embedder: rows ``(text, text_b)`` with a similarity score in ``label``
(``data.options.pair_column`` names the second text column, ``data.label_column`` the score).

A pair's output row is its two embeddings side by side (``2 * dim``); its score is Spearman's
rank correlation of the pairs' cosine with their scores (``spearman``), plus a binary view every
``Evaluation`` carries (pairs above the median score are ``similar``; predicted ``similar`` when
their cosine is above the median cosine). Training: InfoNCE over the pairs whose score reaches
``data.options.positive_score`` (every pair when it is None), the other pairs of the batch as
negatives, both directions.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.families.text_embedder.retrieval import unit


def read_pairs(path: Path, cfg, role: str, pair_column: str | int):
    """``text``, ``text_b`` and a float ``label`` (the score); DataError naming file and row."""
    import pandas as pd

    from pipelines.data import DataError, column, read_frame

    df = read_frame(path, cfg, role)
    a = column(df, cfg.text_column, "text_column", path)
    b = column(df, pair_column, "options.pair_column", path)
    raw = column(df, cfg.label_column, "label_column", path)
    score = pd.to_numeric(raw, errors="coerce")
    bad = np.flatnonzero(score.isna().to_numpy())
    if len(bad):
        raise DataError(f"data.label_column: {path.name} row {int(bad[0]) + 1}: the pair score "
                        f"{raw.iloc[bad[0]]!r} is not a number")
    return pd.DataFrame({"text": a.values, "text_b": b.values, "label": score.astype(float)})


def is_pairs(inputs: list[Any]) -> bool:
    return bool(inputs) and isinstance(inputs[0], tuple)


def embed_pairs(embed: Callable[[list[str]], np.ndarray], pairs: list[tuple[str, str]]):
    """(N, 2*dim): each pair's two embeddings side by side."""
    flat = embed([t for pair in pairs for t in pair])
    return np.concatenate([flat[0::2], flat[1::2]], axis=1)


def scores(truth: list[str], outputs: np.ndarray) -> tuple[dict[str, float], list[str],
                                                          list[str], list[float]]:
    """(metrics, true binary labels, predicted binary labels, confidences) of pair outputs."""
    from scipy.stats import spearmanr

    dim = outputs.shape[1] // 2
    cos = np.sum(unit(outputs[:, :dim]) * unit(outputs[:, dim:]), axis=1)
    y = np.array([float(t) for t in truth])
    rho = float(spearmanr(cos, y).statistic) if len(y) > 1 and np.ptp(y) > 0 else 0.0
    true = ["similar" if v > np.median(y) else "dissimilar" for v in y]
    pred = ["similar" if c > np.median(cos) else "dissimilar" for c in cos]
    return ({"spearman": 0.0 if np.isnan(rho) else rho, "mean_pair_cosine": float(cos.mean())},
            true, pred, [float((c + 1) / 2) for c in cos])


def info_nce(za, zb, temperature: float):
    """Symmetric InfoNCE of unit vectors: row i of ``za`` belongs with row i of ``zb``."""
    import torch

    logits = za @ zb.T / temperature
    target = torch.arange(len(za), device=za.device)
    ce = torch.nn.functional.cross_entropy
    return (ce(logits, target) + ce(logits.T, target)) / 2
