"""A calibrated probe: what do frozen speech-encoder layers know about the speaker?

Each utterance becomes one vector, the pooled hidden states of the audio encoder's quartile layers
concatenated (seed 004; :mod:`mmasr.models.layers`), cached once (``mmasr layer-embeddings``). A classifier
(standardised logistic regression, or histogram gradient boosting) predicts a two-class manifest
label, by default ``group`` (impaired vs control). Its probabilities are calibrated with
scikit-learn's ``CalibratedClassifierCV`` in folds **grouped by speaker** (no speaker in both the
part a fold's classifier is fitted on and the part its calibrator is fitted on) and stratified by
the label. Each training utterance gets an out-of-fold score from a classifier that never saw its
speaker, and one calibrator is fitted on all of them (``ensemble=False``): with few speakers the
calibrator gets every held-out prediction, and it learns how confident the classifier should be on
*new* speakers; the classifier it sits on is the one fitted on all training data. ``sigmoid``
(Platt) is the default; ``isotonic`` is used only when the smallest class has
``probe.isotonic_min_class`` samples (isotonic regression over-fits small calibration sets;
scikit-learn's guide suggests well over a thousand), otherwise sigmoid is used and the fallback is
logged and recorded. A calibrator can also hurt: Platt scaling cannot output 0 or 1, so on
perfectly separated classes it makes right answers less confident. With ``probe.calibration_check``
the whole fit-then-calibrate procedure is first repeated in the speaker-grouped folds of the
training speakers (:func:`calibration_check`); when calibrating raises the held-out Brier score
there, the classifier's own probabilities are kept, and that fallback is logged and recorded too.

Everything is evaluated on held-out speakers (``probe.eval_split``): accuracy at 0.5, ROC AUC (also at the
speaker level, :func:`speaker_auc`, and with a speaker-bootstrap interval, :func:`speaker_bootstrap_auc`: the
held-out speakers are few, and their utterances are not independent), Brier score and expected calibration error (equal-width bins, ``sum_b n_b / N |mean p_b - frac
positive_b|``; :mod:`mmasr.metrics.calibration`) of the uncalibrated and the calibrated
probabilities, and the reliability-diagram data of both.

The fitted probe is stored as plain JSON (:func:`export_probe`): scaler statistics and coefficients,
or the boosted trees' split thresholds and leaf values, plus each fold's calibrator. No pickle: it
is read back by :class:`ProbeModel`, a small numpy re-implementation that reproduces scikit-learn's
``predict_proba`` (a test checks it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mmasr.metrics.calibration import binary_scores, reliability_table

log = logging.getLogger(__name__)

__all__ = [
    "speaker_folds",
    "choose_calibration",
    "make_classifier",
    "export_probe",
    "ProbeModel",
    "probe_data",
    "speaker_auc",
    "speaker_bootstrap_auc",
    "train_probe",
    "baseline_summary",
]

FORMAT = "mmasr.probe.train/1"
RELIABILITY_COLUMNS = ["calibration", "bin", "mean_predicted", "fraction_positive", "count"]


# --------------------------------------------------------------------------------------------
# Calibration folds
# --------------------------------------------------------------------------------------------


def speaker_folds(y: np.ndarray, speakers: np.ndarray, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit, calibrate) index pairs, grouped by speaker and stratified by label
    (``StratifiedGroupKFold``); at most as many folds as the rarer class has speakers. Empty when
    that is below 2 (no grouped calibration is possible). Every calibration part holds both classes."""
    from sklearn.model_selection import StratifiedGroupKFold

    y, speakers = np.asarray(y), np.asarray(speakers)
    per_class = [len(set(speakers[y == c])) for c in np.unique(y)]
    k = min([n_folds, *per_class]) if len(per_class) == 2 else 0
    if k < 2:
        return []
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = [(fit, cal) for fit, cal in splitter.split(np.zeros(len(y)), y, speakers)]
    for fit, cal in folds:
        if set(speakers[fit]) & set(speakers[cal]):
            raise AssertionError("a speaker is in both parts of a calibration fold")
        if len(np.unique(y[cal])) < 2 or len(np.unique(y[fit])) < 2:
            raise ValueError("a calibration fold lacks one class: use fewer probe.folds")
    return folds


def choose_calibration(requested: str, y: np.ndarray, folds: list, min_class: int) -> tuple[str, str | None]:
    """The calibration method to use and, when it differs from ``requested``, why.

    The calibrator is fitted on the out-of-fold scores of all of ``y``: ``isotonic`` needs at least
    ``min_class`` samples of its smallest class, else ``sigmoid``; without folds (fewer than two
    speakers of a class) nothing can be calibrated: ``none``."""
    y = np.asarray(y)
    if requested not in ("sigmoid", "isotonic"):
        raise ValueError(f"probe.calibration must be sigmoid or isotonic, got {requested!r}")
    if not folds:
        return "none", "fewer than 2 speakers of a class to fit: no speaker-grouped calibration folds"
    if requested == "isotonic":
        smallest = int(np.bincount(y, minlength=2).min())
        if smallest < min_class:
            return "sigmoid", (f"isotonic needs >= {min_class} samples of the smallest class (probe.isotonic_min_class), "
                               f"the training data has {smallest}: sigmoid used instead")
    return requested, None


def fit_calibrated(base, X: np.ndarray, y: np.ndarray, folds: list, method: str):
    """``base`` (unfitted) calibrated with ``method`` on its out-of-fold scores over ``folds``
    (one calibrator on all of them, on top of the classifier fitted on all of ``X``)."""
    from sklearn.base import clone
    from sklearn.calibration import CalibratedClassifierCV

    return CalibratedClassifierCV(clone(base), method=method, cv=folds, ensemble=False).fit(X, y)


def calibration_check(base, X: np.ndarray, y: np.ndarray, speakers: np.ndarray, folds: list, method: str,
                      n_folds: int, seed: int) -> dict[str, float] | None:
    """Does calibrating help on speakers neither the classifier nor the calibrator has seen?

    The whole fit-then-calibrate procedure is repeated inside each speaker-grouped fold of the
    training speakers (the calibrator in inner folds grouped by speaker, as on the full data), and
    the held-out fold's probabilities with and without the calibrator are pooled: their Brier
    scores (a proper scoring rule, unlike the binned ECE). None when some fold has too few speakers
    per class for inner folds."""
    from sklearn.base import clone
    from sklearn.metrics import brier_score_loss

    raw, cal, truth = [], [], []
    for fit, held in folds:
        inner = speaker_folds(y[fit], speakers[fit], n_folds, seed)
        if not inner:
            return None
        raw.append(clone(base).fit(X[fit], y[fit]).predict_proba(X[held])[:, 1])
        cal.append(fit_calibrated(base, X[fit], y[fit], inner, method).predict_proba(X[held])[:, 1])
        truth.append(y[held])
    truth = np.concatenate(truth)
    return {"brier_uncalibrated": float(brier_score_loss(truth, np.concatenate(raw))),
            "brier_calibrated": float(brier_score_loss(truth, np.concatenate(cal)))}


# --------------------------------------------------------------------------------------------
# Classifier, export and a pickle-free re-implementation
# --------------------------------------------------------------------------------------------


def make_classifier(cfg: dict, seed: int):
    """The unfitted classifier of ``probe.classifier``."""
    if cfg["classifier"] == "logreg":
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), LogisticRegression(C=cfg["C"], max_iter=cfg["max_iter"]))
    if cfg["classifier"] == "hgb":
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(max_iter=cfg["hgb_max_iter"], learning_rate=cfg["hgb_learning_rate"],
                                              max_leaf_nodes=cfg["hgb_max_leaf_nodes"], early_stopping=False,
                                              random_state=seed)
    raise ValueError(f"probe.classifier must be logreg or hgb, got {cfg['classifier']!r}")


def select_c(X: np.ndarray, y: np.ndarray, folds: list, cfg: dict, seed: int) -> float:
    """The logistic-regression C of ``probe.C_grid`` with the lowest out-of-fold log-loss over the
    speaker-grouped folds of the training speakers (the held-out speakers are never looked at);
    ties go to the stronger regularisation (smaller C)."""
    from sklearn.metrics import log_loss
    from sklearn.model_selection import cross_val_predict

    losses = {}
    for c in sorted(cfg["C_grid"]):
        p = cross_val_predict(make_classifier({**cfg, "C": c}, seed), X, y, cv=folds, method="predict_proba")[:, 1]
        losses[c] = log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1])
    best = min(losses, key=lambda c: (round(losses[c], 12), c))
    log.info("probe: C=%g chosen by speaker-grouped cross-validation log-loss (%s)", best,
             ", ".join(f"{c:g}: {v:.4f}" for c, v in losses.items()))
    return float(best)


_NODE_FIELDS = ("feature_idx", "num_threshold", "missing_go_to_left", "left", "right", "is_leaf", "value")


def _export_classifier(est) -> dict:
    """The numbers that define a fitted classifier's decision function, as JSON-able lists."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import Pipeline

    if isinstance(est, Pipeline):
        scaler, lr = est[0], est[-1]
        return {"kind": "logreg", "mean": scaler.mean_.tolist(), "scale": scaler.scale_.tolist(),
                "coef": lr.coef_[0].tolist(), "intercept": float(lr.intercept_[0])}
    if isinstance(est, HistGradientBoostingClassifier):
        if est.n_trees_per_iteration_ != 1 or getattr(est, "is_categorical_", None) is not None:
            raise ValueError("only binary, numeric-feature gradient boosting can be exported")
        trees = [{f: est_tree.nodes[f].tolist() for f in _NODE_FIELDS} for (est_tree,) in est._predictors]
        return {"kind": "hgb", "baseline": float(np.ravel(est._baseline_prediction)[0]), "trees": trees}
    raise ValueError(f"cannot export a {type(est).__name__}")


def _export_calibrator(cal) -> dict:
    from sklearn.isotonic import IsotonicRegression

    if isinstance(cal, IsotonicRegression):
        return {"kind": "isotonic", "x": cal.X_thresholds_.tolist(), "y": cal.y_thresholds_.tolist()}
    return {"kind": "sigmoid", "a": float(cal.a_), "b": float(cal.b_)}


def export_probe(uncalibrated, calibrated, method: str, meta: dict) -> dict:
    """JSON-able description of the fitted probe: the classifier fitted on all training data, and the
    calibrated classifier(s) with their calibrator (``calibrated`` may be None: ``none``)."""
    folds = []
    if calibrated is not None:
        for cc in calibrated.calibrated_classifiers_:
            (cal,) = cc.calibrators
            folds.append({"classifier": _export_classifier(cc.estimator), "calibrator": _export_calibrator(cal)})
    return {"format": FORMAT, **meta, "calibration_method": method, "uncalibrated": _export_classifier(uncalibrated),
            "folds": folds}


def _decision(spec: dict, X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if spec["kind"] == "logreg":
        return ((X - np.asarray(spec["mean"])) / np.asarray(spec["scale"])) @ np.asarray(spec["coef"]) + spec["intercept"]
    out = np.full(len(X), spec["baseline"])
    rows = np.arange(len(X))
    for tree in spec["trees"]:
        nodes = {f: np.asarray(v) for f, v in tree.items()}
        node = np.zeros(len(X), dtype=np.int64)
        while True:
            active = nodes["is_leaf"][node] == 0
            if not active.any():
                break
            x = X[rows, nodes["feature_idx"][node]]
            go_left = np.where(np.isnan(x), nodes["missing_go_to_left"][node] == 1, x <= nodes["num_threshold"][node])
            node = np.where(active, np.where(go_left, nodes["left"][node], nodes["right"][node]), node)
        out += nodes["value"][node]
    return out


def _calibrate(spec: dict, f: np.ndarray) -> np.ndarray:
    if spec["kind"] == "sigmoid":
        return 1.0 / (1.0 + np.exp(spec["a"] * f + spec["b"]))
    return np.interp(f, spec["x"], spec["y"])


@dataclass
class ProbeModel:
    """A stored probe (:func:`export_probe`) that predicts without scikit-learn objects or pickle."""

    spec: dict

    def predict_proba(self, X: np.ndarray, calibrated: bool = True) -> np.ndarray:
        """Probability of the positive class (calibrated: the mean over the calibrated classifiers)."""
        if calibrated and self.spec["folds"]:
            return np.mean([_calibrate(f["calibrator"], _decision(f["classifier"], X)) for f in self.spec["folds"]],
                           axis=0)
        return 1.0 / (1.0 + np.exp(-_decision(self.spec["uncalibrated"], X)))


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------


def probe_data(embeddings: dict[str, np.ndarray], manifest: pd.DataFrame, cfg: dict, splits) -> tuple:
    """(X, y, speakers, utt_ids) of the manifest rows in ``splits`` that have an embedding;
    y = 1 for ``cfg['positive']``."""
    label = cfg["label"]
    if label not in manifest.columns:
        raise ValueError(f"probe.label {label!r} is not a manifest column ({', '.join(manifest.columns)})")
    rows = manifest[manifest["split"].isin(list(splits)) & manifest[label].notna()].sort_values("utt_id")
    missing = [u for u in rows["utt_id"] if u not in embeddings]
    if missing:
        raise ValueError(f"{len(missing)} utterances have no layer embedding (e.g. {missing[0]}): rebuild the cache")
    X = np.stack([embeddings[u] for u in rows["utt_id"]]) if len(rows) else np.zeros((0, 0))
    y = (rows[label].astype(str) == str(cfg["positive"])).to_numpy().astype(int)
    return X, y, rows["speaker"].astype(str).to_numpy(), rows["utt_id"].tolist()


def _check_classes(manifest: pd.DataFrame, cfg: dict) -> list[str]:
    if cfg["label"] not in manifest.columns:
        raise ValueError(f"probe.label {cfg['label']!r} is not a manifest column ({', '.join(manifest.columns)})")
    classes = sorted(manifest[cfg["label"]].dropna().astype(str).unique())
    if len(classes) != 2 or str(cfg["positive"]) not in classes:
        raise ValueError(f"probe.label {cfg['label']!r} must have exactly two classes including probe.positive="
                         f"{cfg['positive']!r}; the manifest has {classes}")
    return classes


def speaker_auc(y: np.ndarray, p: np.ndarray, speakers: np.ndarray) -> float | None:
    """ROC AUC over speakers: each speaker's mean probability against its label. None when some speaker's
    utterances carry both labels (the label is then not a speaker trait) or one class has no speaker."""
    from sklearn.metrics import roc_auc_score

    df = pd.DataFrame({"y": np.asarray(y), "p": np.asarray(p, np.float64), "s": np.asarray(speakers)})
    per = df.groupby("s").agg(y_min=("y", "min"), y_max=("y", "max"), p=("p", "mean"))
    if (per["y_min"] != per["y_max"]).any() or per["y_min"].nunique() < 2:
        return None
    return float(roc_auc_score(per["y_min"], per["p"]))


def speaker_bootstrap_auc(y: np.ndarray, p: np.ndarray, speakers: np.ndarray, n_resamples: int, seed: int,
                          level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile interval of the utterance-level ROC AUC when speakers are resampled with replacement
    within each class (a speaker's class: its first utterance's label), all their utterances kept. (None,
    None) without resamples or when a class has no speaker.

    Vectorised over resamples: ``M[s, t]`` counts the (positive utterance of speaker s, negative utterance of
    speaker t) pairs ranked right, ties as 1/2 (the Mann-Whitney form of the AUC, as roc_auc_score); a
    resample that draws speaker s ``c_s`` times has AUC ``c·M·c / ((c·n_pos)(c·n_neg))``."""
    y, p, speakers = np.asarray(y), np.asarray(p, np.float64), np.asarray(speakers)
    spk_ids, first, inverse = np.unique(speakers, return_index=True, return_inverse=True)
    classes = [np.flatnonzero(y[first] == c) for c in (0, 1)]
    if n_resamples < 1 or any(len(c) == 0 for c in classes):
        return None, None
    n_spk, pos = len(spk_ids), y == 1
    pairs = np.zeros((n_spk, n_spk))
    for t in range(n_spk):
        neg_t = np.sort(p[(inverse == t) & ~pos])
        below = np.searchsorted(neg_t, p[pos], "left")
        ties = np.searchsorted(neg_t, p[pos], "right") - below
        pairs[:, t] = np.bincount(inverse[pos], weights=below + 0.5 * ties, minlength=n_spk)
    n_pos = np.bincount(inverse, weights=pos.astype(float), minlength=n_spk)
    n_neg = np.bincount(inverse, weights=(~pos).astype(float), minlength=n_spk)
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_resamples, n_spk))
    for members in classes:
        draws = members[rng.integers(0, len(members), size=(n_resamples, len(members)))]
        np.add.at(counts, (np.arange(n_resamples)[:, None], draws), 1)
    den = (counts @ n_pos) * (counts @ n_neg)
    aucs = np.einsum("rs,st,rt->r", counts, pairs, counts)[den > 0] / den[den > 0]
    if not len(aucs):
        return None, None
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(aucs, [tail, 100 - tail])
    return float(low), float(high)


BASELINE_KEYS = ("accuracy", "auc", "brier", "speaker_auc", "auc_ci_low", "auc_ci_high", "calibration_method", "C")


def baseline_summary(metrics: dict, features: tuple[str, ...]) -> dict:
    """probe.json's ``baseline_*`` keys: the same probe on plain signal features (:mod:`mmasr.probe.baseline`)."""
    return {**{f"baseline_{k}": metrics[k] for k in BASELINE_KEYS}, "baseline_features": list(features)}


def train_probe(embeddings: dict[str, np.ndarray], manifest: pd.DataFrame, cfg: dict, seed: int,
                meta: dict | None = None) -> tuple[dict, pd.DataFrame, dict]:
    """Fit, calibrate and evaluate the probe; returns (metrics, reliability table, exported model)."""
    from sklearn.base import clone

    classes = _check_classes(manifest, cfg)
    if cfg["eval_split"] in cfg["train_splits"]:
        raise ValueError(f"probe.eval_split {cfg['eval_split']!r} is also a training split: it must hold out speakers")
    X, y, spk, _ = probe_data(embeddings, manifest, cfg, cfg["train_splits"])
    Xt, yt, spk_t, _ = probe_data(embeddings, manifest, cfg, [cfg["eval_split"]])
    for name, labels in (("training", y), ("evaluation", yt)):
        if len(np.unique(labels)) < 2:
            raise ValueError(f"the {name} utterances of the probe hold only one class of {cfg['label']!r}")
    folds = speaker_folds(y, spk, cfg["folds"], seed)
    if cfg["classifier"] == "logreg" and cfg["C_grid"] and folds:
        cfg = {**cfg, "C": select_c(X, y, folds, cfg, seed)}
    base = make_classifier(cfg, seed)
    uncalibrated = clone(base).fit(X, y)
    method, fallback = choose_calibration(cfg["calibration"], y, folds, cfg["isotonic_min_class"])
    check = None
    if method != "none" and cfg["calibration_check"]:
        check = calibration_check(base, X, y, spk, folds, method, cfg["folds"], seed)
        if check is not None and check["brier_calibrated"] > check["brier_uncalibrated"]:
            method, fallback = "none", (
                f"{method} calibration made the cross-validated Brier score on unseen training speakers worse "
                f"({check['brier_uncalibrated']:.3g} -> {check['brier_calibrated']:.3g}): the classifier's own "
                "probabilities are kept (probe.calibration_check)")
    if fallback:
        log.warning("probe calibration: %s", fallback)
    calibrated = fit_calibrated(base, X, y, folds, method) if method != "none" else None
    log.info("probe: %s on %d utterances (%d speakers), %s calibration in %d speaker-grouped folds; "
             "evaluated on %d utterances (%d held-out speakers)", cfg["classifier"], len(y), len(set(spk)), method,
             len(folds), len(yt), len(set(spk_t)))

    p_uncal = uncalibrated.predict_proba(Xt)[:, 1]
    p_cal = calibrated.predict_proba(Xt)[:, 1] if calibrated is not None else p_uncal
    before, after = binary_scores(yt, p_uncal, cfg["n_bins"]), binary_scores(yt, p_cal, cfg["n_bins"])
    metrics = {"accuracy": after["accuracy"], "auc": after["auc"], "brier": after["brier"],
               "ece_uncalibrated": before["ece"], "ece_calibrated": after["ece"], "calibration_method": method,
               "calibration_requested": cfg["calibration"], "calibration_fallback": fallback,
               "calibration_check_brier_uncalibrated": (check or {}).get("brier_uncalibrated"),
               "calibration_check_brier_calibrated": (check or {}).get("brier_calibrated"),
               "accuracy_uncalibrated": before["accuracy"], "auc_uncalibrated": before["auc"],
               "brier_uncalibrated": before["brier"], "n_folds": len(folds), "classifier": cfg["classifier"],
               "label": cfg["label"], "positive": str(cfg["positive"]), "classes": classes,
               "n_train_utts": int(len(y)), "n_train_speakers": int(len(set(spk))), "n_eval_utts": int(len(yt)),
               "n_eval_speakers": int(len(set(spk_t))), "eval_positive_fraction": float(yt.mean()),
               "n_features": int(X.shape[1]), "C": cfg["C"] if cfg["classifier"] == "logreg" else None}
    low, high = speaker_bootstrap_auc(yt, p_cal, spk_t, cfg["bootstrap_resamples"], seed)
    metrics.update(speaker_auc=speaker_auc(yt, p_cal, spk_t), auc_ci_low=low, auc_ci_high=high,
                   n_eval_speakers_positive=int(len(set(spk_t[yt == 1]))),
                   n_eval_speakers_negative=int(len(set(spk_t[yt == 0]))))
    tables = [reliability_table(yt, p, cfg["n_bins"]).assign(calibration=name)
              for name, p in (("uncalibrated", p_uncal), ("calibrated", p_cal))]
    reliability = pd.concat(tables, ignore_index=True)[RELIABILITY_COLUMNS]
    model = export_probe(uncalibrated, calibrated, method,
                         {**(meta or {}), "label": cfg["label"], "positive": str(cfg["positive"]), "classes": classes,
                          "classifier": cfg["classifier"], "n_features": int(X.shape[1])})
    stored = ProbeModel(model)
    worst = max(float(np.abs(stored.predict_proba(Xt) - p_cal).max()),
                float(np.abs(stored.predict_proba(Xt, calibrated=False) - p_uncal).max()))
    if worst > 1e-6:
        raise RuntimeError(f"the exported probe does not reproduce scikit-learn's probabilities (max diff {worst:.2e})")
    return metrics, reliability, model
