"""The calibrated probe: ECE and reliability data, speaker-grouped folds, the calibration guard,
pickle-free storage that reproduces scikit-learn, and the command."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mmasr.config import validate
from mmasr.metrics.calibration import expected_calibration_error, reliability_table
from mmasr.probe.train import (_NODE_FIELDS, ProbeModel, _export_classifier, choose_calibration, speaker_folds,
                               train_probe)


def probe_cfg(**over) -> dict:
    return {**validate({})["probe"], **over}


def test_reliability_table_and_ece_by_hand():
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0.05, 0.15, 0.92, 0.97, 1.0, 0.55])
    t = reliability_table(y, p, 10)
    assert t["bin"].tolist() == [0, 1, 5, 9]  # empty bins are left out; 1.0 is in the last bin
    assert t["count"].tolist() == [1, 1, 1, 3]
    assert t["fraction_positive"].tolist() == [0, 0, 0, 1]
    np.testing.assert_allclose(t["mean_predicted"], [0.05, 0.15, 0.55, (0.92 + 0.97 + 1.0) / 3])
    expected = (0.05 + 0.15 + 0.55 + 3 * abs((0.92 + 0.97 + 1.0) / 3 - 1)) / 6
    assert expected_calibration_error(y, p, 10) == pytest.approx(expected)
    assert expected_calibration_error(np.array([0, 1]), np.array([0.0, 1.0]), 10) == 0.0
    with pytest.raises(ValueError):
        reliability_table(np.array([]), np.array([]), 10)


def test_folds_are_grouped_by_speaker_and_hold_both_classes():
    speakers = np.repeat([f"s{i}" for i in range(8)], 5)
    y = np.repeat([0, 1, 0, 1, 0, 1, 0, 1], 5)
    folds = speaker_folds(y, speakers, 3, seed=0)
    assert len(folds) == 3
    covered = np.concatenate([cal for _, cal in folds])
    assert sorted(covered) == list(range(40))  # each utterance calibrates exactly once
    for fit, cal in folds:
        assert not set(speakers[fit]) & set(speakers[cal])
        assert set(y[cal]) == {0, 1} and set(y[fit]) == {0, 1}
    # no more folds than the rarer class has speakers
    assert len(speaker_folds(y, speakers, 10, seed=0)) == 4
    # one speaker of a class: no grouped calibration possible
    y2 = np.array([0] * 5 + [1] * 35)
    assert speaker_folds(y2, speakers, 5, seed=0) == []


def test_calibration_guard_falls_back_from_isotonic_and_says_why():
    y = np.array([0] * 30 + [1] * 70)
    folds = [(np.arange(50), np.arange(50, 100))]
    assert choose_calibration("sigmoid", y, folds, 100) == ("sigmoid", None)
    assert choose_calibration("isotonic", y, folds, 30) == ("isotonic", None)
    method, why = choose_calibration("isotonic", y, folds, 31)
    assert method == "sigmoid" and "31" in why and "30" in why
    assert choose_calibration("isotonic", y, [], 1)[0] == "none"
    with pytest.raises(ValueError, match="sigmoid or isotonic"):
        choose_calibration("platt", y, folds, 1)


def synthetic(n_speakers: int = 12, per: int = 20, dim: int = 6, shift: float = 1.0, seed: int = 0):
    """Utterance embeddings whose mean depends on the speaker's group (with speaker offsets and noise)."""
    rng = np.random.default_rng(seed)
    rows, emb = [], {}
    for s in range(n_speakers):
        group = "impaired" if s % 2 else "control"
        offset = rng.normal(scale=0.5, size=dim)
        split = "test" if s >= n_speakers - 4 else ("dev" if s >= n_speakers - 6 else "train")
        for i in range(per):
            uid = f"S{s:02d}_{i:03d}"
            emb[uid] = (offset + rng.normal(size=dim) + (shift if group == "impaired" else 0.0)).astype(np.float32)
            rows.append({"utt_id": uid, "speaker": f"S{s:02d}", "group": group, "split": split})
    return emb, pd.DataFrame(rows)


@pytest.mark.parametrize("over", [{}, {"classifier": "hgb", "hgb_max_iter": 20},
                                  {"calibration": "isotonic", "isotonic_min_class": 10}])
def test_probe_metrics_and_a_stored_model_that_reproduces_scikit_learn(over):
    emb, manifest = synthetic()
    cfg = probe_cfg(calibration_check=False, **over)  # each method as asked (the check is tested below)
    metrics, reliability, model = train_probe(emb, manifest, cfg, seed=0)
    for key in ("accuracy", "auc", "brier", "ece_uncalibrated", "ece_calibrated", "calibration_method"):
        assert key in metrics
    assert metrics["calibration_method"] == cfg["calibration"] and metrics["calibration_fallback"] is None
    assert metrics["auc"] > 0.7 and 0 <= metrics["brier"] < 0.25
    assert metrics["n_train_speakers"] == 8 and metrics["n_eval_speakers"] == 4 and metrics["n_folds"] == 4
    assert list(reliability.columns) == ["calibration", "bin", "mean_predicted", "fraction_positive", "count"]
    for name in ("uncalibrated", "calibrated"):
        assert reliability.loc[reliability["calibration"] == name, "count"].sum() == 80
    # the JSON round trip predicts exactly what scikit-learn's objects predict (checked inside too)
    stored = ProbeModel(json.loads(json.dumps(model)))
    X = np.stack([emb[u] for u in sorted(manifest.loc[manifest["split"] == "test", "utt_id"])])
    p = stored.predict_proba(X)
    y = (manifest.sort_values("utt_id").query("split == 'test'")["group"] == "impaired").to_numpy()
    assert ((p >= 0.5) == y).mean() == pytest.approx(metrics["accuracy"])
    assert expected_calibration_error(y, p, cfg["n_bins"]) == pytest.approx(metrics["ece_calibrated"])
    assert expected_calibration_error(y, stored.predict_proba(X, calibrated=False), cfg["n_bins"]) == pytest.approx(
        metrics["ece_uncalibrated"])


def test_the_hgb_export_still_finds_the_scikit_learn_internals_it_reads():
    """No public scikit-learn API exposes a fitted HistGradientBoostingClassifier's trees, so the export
    (``probe.train._export_classifier``) reads the private ``_predictors`` (per iteration a list of one
    TreePredictor, whose ``nodes`` record array holds the split features, thresholds, missing-value
    direction, children and leaf values) and ``_baseline_prediction`` (the initial raw score). This
    pins that layout, so a scikit-learn upgrade that changes it fails here by name."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 3))
    X[::7, 1] = np.nan  # a missing value takes the branch missing_go_to_left says
    y = (X[:, 0] + rng.normal(scale=0.5, size=80) > 0).astype(int)
    est = HistGradientBoostingClassifier(max_iter=5, max_leaf_nodes=4, early_stopping=False, random_state=0).fit(X, y)
    internals = "scikit-learn's HistGradientBoostingClassifier internals changed"
    assert isinstance(getattr(est, "_predictors", None), list), f"{internals}: no _predictors list"
    assert len(est._predictors) == est.n_iter_ and all(len(it) == 1 for it in est._predictors), \
        f"{internals}: _predictors is not one tree per iteration"
    names = est._predictors[0][0].nodes.dtype.names or ()
    assert set(_NODE_FIELDS) <= set(names), f"{internals}: TreePredictor.nodes lacks {set(_NODE_FIELDS) - set(names)}"
    assert np.size(getattr(est, "_baseline_prediction", None)) == 1, f"{internals}: _baseline_prediction is not one value"
    spec = _export_classifier(est)
    stored = ProbeModel({"folds": [], "uncalibrated": spec})
    np.testing.assert_allclose(stored.predict_proba(X, calibrated=False), est.predict_proba(X)[:, 1], rtol=0, atol=1e-12,
                               err_msg=f"{internals}: the exported trees no longer reproduce predict_proba")


def test_calibration_check_keeps_a_calibrator_that_helps_new_speakers():
    # many noisy features and weak regularisation: an over-confident classifier, which Platt scaling tempers
    emb, manifest = synthetic(dim=40, shift=0.5, per=30)
    metrics, _, model = train_probe(emb, manifest, probe_cfg(C_grid=[], C=100.0), seed=0)
    assert metrics["calibration_method"] == "sigmoid" and metrics["calibration_fallback"] is None
    assert metrics["calibration_check_brier_calibrated"] < metrics["calibration_check_brier_uncalibrated"]
    assert metrics["ece_calibrated"] < metrics["ece_uncalibrated"]
    assert model["calibration_method"] == "sigmoid" and model["folds"]


def test_calibration_check_drops_a_calibrator_that_hurts_and_says_why():
    # perfectly separated groups: the classifier is right and sure; Platt scaling could only pull it towards 0.5
    emb, manifest = synthetic(shift=8.0)
    metrics, reliability, model = train_probe(emb, manifest, probe_cfg(), seed=0)
    assert metrics["auc"] == 1.0 and metrics["calibration_requested"] == "sigmoid"
    assert metrics["calibration_method"] == "none" and "Brier" in metrics["calibration_fallback"]
    assert metrics["calibration_check_brier_calibrated"] > metrics["calibration_check_brier_uncalibrated"]
    assert metrics["ece_calibrated"] == metrics["ece_uncalibrated"] and metrics["brier"] == metrics["brier_uncalibrated"]
    assert model["calibration_method"] == "none" and model["folds"] == []
    X = np.stack([emb[u] for u in sorted(manifest.loc[manifest["split"] == "test", "utt_id"])])
    stored = ProbeModel(model)
    np.testing.assert_array_equal(stored.predict_proba(X), stored.predict_proba(X, calibrated=False))
    # without the check the calibrator is used, and it is indeed worse on the held-out speakers
    unchecked, _, _ = train_probe(emb, manifest, probe_cfg(calibration_check=False), seed=0)
    assert unchecked["calibration_method"] == "sigmoid" and unchecked["calibration_check_brier_calibrated"] is None
    assert unchecked["brier"] > metrics["brier"]


def test_isotonic_request_with_too_few_samples_is_recorded():
    emb, manifest = synthetic()
    metrics, _, model = train_probe(emb, manifest, probe_cfg(calibration="isotonic", calibration_check=False), seed=0)
    assert metrics["calibration_method"] == "sigmoid" and metrics["calibration_requested"] == "isotonic"
    assert "isotonic_min_class" in metrics["calibration_fallback"]
    assert model["calibration_method"] == "sigmoid"


def test_probe_refuses_unusable_labels_and_splits():
    emb, manifest = synthetic()
    three = manifest.assign(group=np.where(manifest["speaker"] == "S00", "other", manifest["group"]))
    with pytest.raises(ValueError, match="exactly two classes"):
        train_probe(emb, three, probe_cfg(), 0)
    with pytest.raises(ValueError, match="not a manifest column"):
        train_probe(emb, manifest, probe_cfg(label="age"), 0)
    with pytest.raises(ValueError, match="hold out speakers"):
        train_probe(emb, manifest, probe_cfg(train_splits=["train", "test"]), 0)
    with pytest.raises(ValueError, match="no layer embedding"):
        train_probe({k: v for k, v in emb.items() if not k.startswith("S11")}, manifest, probe_cfg(), 0)


def test_train_probe_command_writes_json_only(tmp_path):
    from mmasr.cli import main
    from mmasr.rescoring.clip import save_embeddings

    import soundfile as sf

    emb, manifest = synthetic(per=6)
    ids = sorted(emb)
    save_embeddings(tmp_path / "emb.npz", ids, np.stack([emb[i] for i in ids]),
                    {"audio_encoder": "x", "audio_revision": "r", "audio_layers": [1, 2]})
    rng = np.random.default_rng(0)
    paths = []
    for uid, group in zip(manifest["utt_id"], manifest["group"]):  # impaired: longer and noisier
        seconds, noise = (1.0, 0.05) if group == "impaired" else (0.5, 0.005)
        t = np.arange(int(seconds * 16000)) / 16000
        paths.append(str(tmp_path / f"{uid}.wav"))
        sf.write(paths[-1], (0.5 * np.sin(2 * np.pi * 300 * t) + noise * rng.standard_normal(len(t))).astype(np.float32),
                 16000)
    manifest.assign(audio_path=paths, text="a red bear").to_parquet(tmp_path / "manifest.parquet")
    out = {k: tmp_path / v for k, v in (("metrics", "probe.json"), ("reliability", "rel.csv"), ("model", "m/probe.json"))}
    assert main(["train-probe", "--embeddings", str(tmp_path / "emb.npz"), "--manifest", str(tmp_path / "manifest.parquet"),
                 *[a for k, v in out.items() for a in (f"--{k}", str(v))]]) == 0
    metrics = json.loads(out["metrics"].read_text())
    assert metrics["probe_audio_layers"] == [1, 2] and "params_hash" in metrics
    assert metrics["baseline_features"] == ["duration_s", "speech_rate_wps", "rms_dbfs", "snr_db", "spectral_centroid_hz"]
    assert metrics["baseline_auc"] == 1.0 and metrics["baseline_speaker_auc"] == 1.0  # the channel gives it away
    for key in ("speaker_auc", "auc_ci_low", "auc_ci_high", "baseline_accuracy", "baseline_auc_ci_low"):
        assert key in metrics
    model = json.loads(out["model"].read_text())
    assert model["format"] == "mmasr.probe.train/1" and model["uncalibrated"]["kind"] == "logreg"
    assert pd.read_csv(out["reliability"])["calibration"].unique().tolist() == ["uncalibrated", "calibrated"]


# ---------------------------------------------------------------- the trivial baseline and speaker-level AUC

from mmasr.probe.baseline import BASELINE_FEATURES, baseline_features, signal_features  # noqa: E402
from mmasr.probe.train import speaker_auc, speaker_bootstrap_auc  # noqa: E402


def test_signal_features_of_a_tone_and_of_noise_then_tone():
    sr = 16000
    t = np.arange(2 * sr) / sr
    tone = 0.5 * np.sin(2 * np.pi * 1000 * t)
    f = dict(zip(BASELINE_FEATURES, signal_features(tone, sr, "a red bear")))
    assert f["duration_s"] == 2.0 and f["speech_rate_wps"] == 1.5
    assert f["rms_dbfs"] == pytest.approx(20 * np.log10(0.5 / np.sqrt(2)), abs=1e-3)  # -9.03 dB
    assert f["snr_db"] == pytest.approx(0.0, abs=0.01)  # every frame as loud as every other
    assert f["spectral_centroid_hz"] == pytest.approx(1000, abs=5)
    noise = 0.01 * np.random.default_rng(0).standard_normal(sr)
    f = dict(zip(BASELINE_FEATURES, signal_features(np.concatenate([noise, tone[:sr]]), sr, None)))
    assert f["speech_rate_wps"] == 0.0
    assert f["snr_db"] == pytest.approx(10 * np.log10(0.125 / 1e-4), abs=0.5)  # tone power / noise power: 31 dB
    assert 1000 < f["spectral_centroid_hz"] < 1500  # white noise pulls the centroid up a little
    short = signal_features(np.ones(10), sr, "x")  # shorter than a frame: padded, still finite
    assert np.isfinite(short).all()
    with pytest.raises(ValueError, match="non-empty mono"):
        signal_features(np.zeros(0), sr, "x")


def test_baseline_features_read_every_manifest_row():
    manifest = pd.DataFrame({"utt_id": ["a", "b"], "audio_path": ["pa", "pb"], "text": ["one two", None]})
    audio = {"pa": np.full(16000, 0.1), "pb": np.full(8000, 0.1)}
    feats = baseline_features(manifest, audio.__getitem__)
    assert sorted(feats) == ["a", "b"] and feats["a"][:2].tolist() == [1.0, 2.0] and feats["b"][:2].tolist() == [0.5, 0.0]


def test_speaker_level_auc_and_its_bootstrap_interval():
    speakers = np.array(["A", "A", "B", "B", "C", "C", "D", "D"])
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.2, 0.6, 0.6, 0.5, 0.5, 0.1, 0.1])
    # speakers' means: A 0.55, B 0.6 (positive) vs C 0.5, D 0.1: every positive speaker above every negative
    assert speaker_auc(y, p, speakers) == 1.0
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y, p) < 1.0  # utterance level: A's 0.2 is below C's 0.5
    assert speaker_auc(y, np.array([0.1, 0.1, 0.9, 0.9, 0.5, 0.5, 0.2, 0.2]), speakers) == 0.5
    assert speaker_auc(np.array([1, 0, 1, 1, 0, 0, 0, 0]), p, speakers) is None  # A has both labels
    low, high = speaker_bootstrap_auc(y, p, speakers, 300, seed=0)
    assert 0.0 <= low <= roc_auc_score(y, p) <= high <= 1.0 and low < high
    assert speaker_bootstrap_auc(y, p, speakers, 300, seed=0) == (low, high)  # seeded
    # the vectorised resamples are roc_auc_score on the drawn speakers' utterances, draw for draw
    g = np.random.default_rng(5)
    spk = np.array([f"S{i:02d}" for i in range(12)])
    many_spk, many_y = np.repeat(spk, 3), np.repeat([0] * 6 + [1] * 6, 3)
    many_p = np.round(g.random(36) * 0.6 + 0.4 * many_y, 2)  # ties happen (two decimals)
    rng = np.random.default_rng(0)
    neg, pos = (members[rng.integers(0, 6, size=(300, 6))] for members in (spk[:6], spk[6:]))  # class 0 first
    brute = [roc_auc_score(*(np.concatenate([a[many_spk == d] for d in np.concatenate([neg[r], pos[r]])])
                             for a in (many_y, many_p))) for r in range(300)]
    for level in (0.95, 0.5):
        tail = (1 - level) / 2 * 100
        assert speaker_bootstrap_auc(many_y, many_p, many_spk, 300, 0, level) == pytest.approx(
            tuple(np.percentile(brute, [tail, 100 - tail])), abs=1e-12)
    perfect = speaker_bootstrap_auc(y, y.astype(float), speakers, 50, seed=0)
    assert perfect == (1.0, 1.0)
    assert speaker_bootstrap_auc(y, p, speakers, 0, seed=0) == (None, None)


def test_probe_reports_speaker_level_auc_beside_the_utterance_auc():
    emb, manifest = synthetic()
    metrics, _, _ = train_probe(emb, manifest, probe_cfg(calibration_check=False), seed=0)
    assert metrics["n_eval_speakers_positive"] == metrics["n_eval_speakers_negative"] == 2
    assert metrics["speaker_auc"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # 2 x 2 speakers: four pairs
    assert metrics["auc_ci_low"] <= metrics["auc"] <= metrics["auc_ci_high"]
