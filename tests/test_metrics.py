"""mmasr.metrics: the functions that had no direct test where they lived before (the per-group WER table,
the fewest speakers per group, the probe's score summary). The other metrics are tested beside their
users: WER/CER and the intervals in test_fusion.py, retrieval in test_clap.py, calibration in test_probe.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mmasr.metrics.calibration import binary_scores
from mmasr.metrics.intervals import min_speakers_per_group
from mmasr.metrics.wer import group_wer_table


def test_group_wer_table_pools_per_group_then_per_speaker_in_sorted_order():
    labels = pd.DataFrame({"group": ["b", "a", "b", "a"], "speaker": ["S2", "S1", "S3", "S1"]},
                          index=["u1", "u2", "u3", "u4"])  # any index: rows follow the arrays' order
    words = np.array([4, 2, 0, 4])
    err_x, err_y = np.array([1, 1, 0, 2]), np.array([0, 0, 0, 4])
    rows = group_wer_table(labels, words, {"wer_x": err_x, "wer_y": err_y}, {"S": err_x})
    assert [(r["level"], r["name"]) for r in rows] == [("group", "a"), ("group", "b"), ("speaker", "S1"),
                                                       ("speaker", "S2"), ("speaker", "S3")]
    assert list(rows[0]) == ["level", "name", "n_utts", "ref_words", "wer_x", "wer_y", "S"]
    a = rows[0]
    assert (a["n_utts"], a["ref_words"], a["S"]) == (2, 6, 3)
    assert a["wer_x"] == pytest.approx(3 / 6) and a["wer_y"] == pytest.approx(4 / 6)  # pooled, not a mean of WERs
    assert rows[4]["ref_words"] == 0 and rows[4]["wer_x"] == 0.0  # no reference words: WER 0
    assert all(type(r[k]) is int for r in rows for k in ("n_utts", "ref_words", "S"))
    assert group_wer_table(labels, words, {"wer": err_x}, levels=("speaker",))[0]["name"] == "S1"
    assert group_wer_table(labels.iloc[:0], words[:0], {"wer": err_x[:0]}) == []


def test_min_speakers_per_group():
    assert min_speakers_per_group(np.array(["a", "a", "b", "c"]), np.array(["g1", "g1", "g1", "g2"])) == 1
    assert min_speakers_per_group(np.array(["a", "b", "c", "d"]), np.array(["g1", "g1", "g2", "g2"])) == 2
    assert min_speakers_per_group(np.array([]), np.array([])) == 0


def test_binary_scores_by_hand():
    y, p = np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.4, 0.9])
    s = binary_scores(y, p, 10)
    assert s["accuracy"] == pytest.approx(0.5)
    assert s["auc"] == pytest.approx(3 / 4)  # 3 of the 4 positive-negative pairs ordered right
    assert s["brier"] == pytest.approx((0.01 + 0.36 + 0.36 + 0.01) / 4)
    assert s["ece"] == pytest.approx((0.1 + 0.6 + 0.6 + 0.1) / 4)  # one sample per bin
