"""Classification metrics and the plots logged to MLflow (family-agnostic: labels by name)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Every metric here is "higher is better"; the promotion gate relies on it.
METRICS = ("accuracy", "f1_macro", "precision_macro", "recall_macro")


@dataclass
class Evaluation:
    metrics: dict[str, float]          # accuracy, f1_macro, ... and per-class precision/recall
    confusion: np.ndarray
    labels: list[str]
    predictions: list[str]
    confidences: list[float]


def evaluate_predictions(
    y_true: list[str], probs: np.ndarray, model_labels: list[str], labels: list[str]
) -> Evaluation:
    """Score predicted probabilities (columns in ``model_labels`` order) against true names.

    ``labels`` is the data set's label order (for per-class metrics and the confusion matrix); a
    model whose label names differ from the data's simply scores its predictions by name.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    idx = probs.argmax(axis=1)
    y_pred = [model_labels[i] for i in idx]
    conf = probs.max(axis=1).tolist()
    all_labels = labels + [lab for lab in dict.fromkeys(y_pred) if lab not in labels]
    p, r, f, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average="macro", zero_division=0
    )
    metrics = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_macro": float(f),
        "precision_macro": float(p),
        "recall_macro": float(r),
    }
    pc, rc, _, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    for lab, pv, rv in zip(labels, pc, rc, strict=True):
        metrics[f"precision.{_safe(lab)}"] = float(pv)
        metrics[f"recall.{_safe(lab)}"] = float(rv)
    cm = confusion_matrix(y_true, y_pred, labels=all_labels)
    return Evaluation(metrics, cm, all_labels, y_pred, conf)


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def confusion_figure(ev: Evaluation, title: str = "Confusion matrix (test)"):
    import matplotlib

    matplotlib.use("Agg")
    from sklearn.metrics import ConfusionMatrixDisplay

    disp = ConfusionMatrixDisplay(ev.confusion, display_labels=ev.labels)
    disp.plot(cmap="Blues", colorbar=False)
    disp.ax_.set_title(title)
    disp.figure_.tight_layout()
    return disp.figure_
