"""Calibration metrics of binary probabilities: the reliability table (equal-width bins), the expected
calibration error, and accuracy / ROC AUC / Brier score beside it."""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["reliability_table", "expected_calibration_error", "binary_scores"]


def _bins(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bin of each probability in [0, 1]; 1.0 falls in the last bin."""
    return np.minimum((np.asarray(p, dtype=np.float64) * n_bins).astype(int), n_bins - 1)


def reliability_table(y: np.ndarray, p: np.ndarray, n_bins: int) -> pd.DataFrame:
    """Per non-empty equal-width bin: mean predicted probability, fraction of positives, count."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    if len(y) != len(p) or not len(y):
        raise ValueError("labels and probabilities must be non-empty and of equal length")
    b = _bins(p, n_bins)
    rows = [{"bin": int(k), "mean_predicted": float(p[b == k].mean()), "fraction_positive": float(y[b == k].mean()),
             "count": int((b == k).sum())} for k in np.unique(b)]
    return pd.DataFrame(rows, columns=["bin", "mean_predicted", "fraction_positive", "count"])


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int) -> float:
    """ECE of positive-class probabilities: sum over bins of (share of samples) x |mean p - fraction positive|."""
    t = reliability_table(y, p, n_bins)
    return float((t["count"] / t["count"].sum() * (t["mean_predicted"] - t["fraction_positive"]).abs()).sum())


def binary_scores(y: np.ndarray, p: np.ndarray, n_bins: int) -> dict:
    """Accuracy at 0.5, ROC AUC, Brier score and ECE (``n_bins`` equal-width bins) of positive-class
    probabilities ``p`` against 0/1 labels ``y``."""
    from sklearn.metrics import brier_score_loss, roc_auc_score

    return {"accuracy": float(((p >= 0.5).astype(int) == y).mean()), "auc": float(roc_auc_score(y, p)),
            "brier": float(brier_score_loss(y, p)), "ece": expected_calibration_error(y, p, n_bins)}
