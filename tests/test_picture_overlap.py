"""fusion.json's test WER for seen and unseen pictures (mmasr.rescoring.picture_overlap)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mmasr.rescoring.fusion import run_fusion
from mmasr.rescoring.picture_overlap import picture_overlap_metrics, picture_seen_mask
from tests.test_fusion import FUSION, TEXT, _pictured_toy


def test_seen_and_unseen_pictures_are_scored_apart():
    meta = pd.DataFrame({"utt_id": ["t1", "t2", "a", "b", "c", "d"],
                         "split": ["train", "train", "test", "test", "test", "test"],
                         "image_id": ["p1", "p2", "p1", "p3", None, "p2"]}).set_index("utt_id")
    ids = ["a", "b", "c", "d"]
    seen, unseen = picture_seen_mask(meta, ids)
    assert seen.tolist() == [True, False, False, True] and unseen.tolist() == [False, True, False, False]
    errors = {"asr": np.array([1, 2, 5, 0]), "fused": np.array([0, 1, 5, 0])}
    m = picture_overlap_metrics(meta, ids, errors, np.array([4, 4, 4, 6]))
    assert m["test_n_picture_in_train"] == 2 and m["test_n_picture_not_in_train"] == 1
    assert m["test_wer_asr_picture_in_train"] == pytest.approx(1 / 10)
    assert m["test_wer_asr_picture_not_in_train"] == pytest.approx(2 / 4)
    assert m["test_wer_fused_picture_in_train"] == 0.0 and m["test_wer_fused_picture_not_in_train"] == 0.25
    only_seen = picture_overlap_metrics(meta, ["a", "d"], errors, np.array([4, 6]))
    assert only_seen == {"test_n_picture_in_train": 2, "test_n_picture_not_in_train": 0}  # one part: no split WERs


def test_run_fusion_reports_seen_and_unseen_pictures_when_both_exist():
    nb, man, emb = _pictured_toy()
    train = pd.DataFrame([{"utt_id": f"tr{i}", "split": "train", "text": f"a red {n}", "speaker": "tr",
                           "group": "control", "image_id": n} for i, n in enumerate(("bear", "pear"))])
    _, m, _, _ = run_fusion(nb, pd.concat([man, train], ignore_index=True), FUSION, TEXT, seed=0, embeddings=emb)
    assert m["test_n_picture_in_train"] == m["test_n_picture_not_in_train"] == 6  # bear/pear vs goat/boat
    for system in ("asr", "fused"):
        assert 0 <= m[f"test_wer_{system}_picture_in_train"] <= 1 and 0 <= m[f"test_wer_{system}_picture_not_in_train"] <= 1
    weighted = (m["test_wer_asr_picture_in_train"] + m["test_wer_asr_picture_not_in_train"]) / 2  # equal ref words
    assert weighted == pytest.approx(m["test_wer_asr"])
    _, m0, _, _ = run_fusion(nb, man, FUSION, TEXT, seed=0, embeddings=emb)  # no train pictures: all unseen
    assert m0["test_n_picture_in_train"] == 0 and "test_wer_asr_picture_in_train" not in m0
