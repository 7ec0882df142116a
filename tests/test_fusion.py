import jiwer
import numpy as np
import pandas as pd
import pytest

from mmasr.config import validate
from mmasr.fusion import (alpha_grid, best_alpha_index, choose, count_errors, fuse, gap_closed, masked_softmax,
                          oracle_choice, paired_bootstrap_ci, pooled_wer, run_fusion, to_arrays)

P = validate({})
FUSION, TEXT = P["fusion"], P["text"]


def test_masked_softmax_ignores_padding_and_is_stable():
    x = np.array([[1000.0, 999.0, 0.0], [1.0, 2.0, 3.0]])
    mask = np.array([[True, True, False], [False, False, False]])
    p = masked_softmax(x, mask)
    np.testing.assert_allclose(p[0], [1 / (1 + np.e ** -1), 1 - 1 / (1 + np.e ** -1), 0.0])
    assert np.all(p[1] == 0)


def test_bear_pear_flip_alpha_zero_is_asr_and_one_is_clip():
    # ASR prefers "a red pear" a little; the picture shows a bear.
    asr = np.array([[-0.10, -0.15]])
    clip = np.array([[0.20, 0.30]])  # cosine of (pear, bear) with the picture
    valid = np.ones_like(asr, bool)
    fused = fuse(asr, clip, valid, np.array([0.0, 0.5, 1.0]), tau=100.0)
    assert choose(fused).tolist() == [[0], [1], [1]]
    np.testing.assert_allclose(fused[0, 0], masked_softmax(asr, valid)[0])
    np.testing.assert_allclose(fused[2, 0], masked_softmax(100 * clip, valid)[0])


def test_utterance_without_picture_stays_asr_only():
    asr = np.array([[-0.1, -0.2], [-0.1, -0.2]])
    clip = np.array([[0.1, 0.9], [np.nan, np.nan]])
    fused = fuse(asr, clip, np.ones_like(asr, bool), np.array([1.0]), tau=100.0)
    assert choose(fused).tolist() == [[1, 0]]


def test_pooled_wer_matches_jiwer_corpus_wer():
    refs = ["a red bear", "two green goats", "three blue cups", "a pea"]
    hyps = ["a red pear", "two goats", "three blue blue cups", ""]
    sub, dele, ins, words = count_errors(refs, hyps)
    assert pooled_wer(sub + dele + ins, words) == pytest.approx(jiwer.wer(refs, hyps))
    assert (sub.tolist(), dele.tolist(), ins.tolist()) == ([1, 0, 0, 0], [0, 1, 0, 2], [0, 0, 1, 0])
    assert pooled_wer(np.array([1, 1]), np.array([1, 9])) == pytest.approx(0.2)  # pooled, not mean of 1.0 and 0.11


def test_empty_reference_counts_insertions():
    sub, dele, ins, words = count_errors(["", "a bear"], ["um bear", "a bear"])
    assert ins.tolist() == [2, 0] and words.tolist() == [0, 2]


def test_ties_pick_smallest_alpha_and_grid_is_inclusive():
    assert best_alpha_index(np.array([0.3, 0.2, 0.2, 0.25])) == 1
    grid = alpha_grid(FUSION)
    assert grid[0] == 0.0 and grid[-1] == 1.0 and len(grid) == 21


def test_oracle_and_gap():
    errors = np.array([[2, 0, 1], [1, 1, 0]])
    valid = np.array([[True, True, True], [True, True, False]])
    assert oracle_choice(errors, valid).tolist() == [1, 0]
    assert gap_closed(0.3, 0.2, 0.1) == pytest.approx(0.5)
    assert gap_closed(0.1, 0.1, 0.1) is None


def test_paired_bootstrap_interval_brackets_a_clear_improvement():
    rng = np.random.default_rng(0)
    words = np.full(200, 3)
    base = rng.integers(0, 3, 200)
    better = np.maximum(0, base - 1)
    low, high = paired_bootstrap_ci(base, better, words, 2000, seed=1)
    diff = pooled_wer(better, words) - pooled_wer(base, words)
    assert low < diff < high < 0
    assert paired_bootstrap_ci(base, base, words, 500, seed=1) == (0.0, 0.0)


def _toy(n_per_split=6):
    """dev and test utterances where the ASR top choice is the wrong noun and CLIP knows better."""
    man, nb = [], []
    for split in ("dev", "test"):
        for i in range(n_per_split):
            utt = f"{split}{i}"
            man.append({"utt_id": utt, "split": split, "text": "a red bear", "speaker": f"{split}-s{i % 2}",
                        "group": "impaired" if i % 2 else "control", "image_id": "img"})
            wrong_first = i % 3 != 0
            hyps = [("a red pear", -0.10, 0.20), ("a red bear", -0.15, 0.30)] if wrong_first else \
                   [("a red bear", -0.10, 0.30), ("a red pear", -0.15, 0.20)]
            for rank, (text, asr, cos) in enumerate(hyps):
                nb.append({"utt_id": utt, "rank": rank, "text": text, "asr_score": asr, "clip_cos": cos})
    return pd.DataFrame(nb), pd.DataFrame(man)


def test_run_fusion_tunes_on_dev_and_reports_test():
    nb, man = _toy()
    grid, metrics, changed, per_speaker = run_fusion(nb, man, FUSION, TEXT, seed=0)
    assert set(grid["split"]) == {"dev", "test"} and len(grid) == 2 * 21
    assert metrics["test_wer_asr"] == pytest.approx(4 / 18)
    assert metrics["test_wer_fused"] == 0.0 and metrics["test_wer_oracle"] == 0.0
    assert 0 < metrics["best_alpha"] < 1
    assert metrics["test_gap_closed"] == pytest.approx(1.0)
    for a_wer in grid.loc[grid["split"] == "test", "wer"]:
        assert metrics["test_wer_oracle"] <= a_wer
    assert set(changed["before"]) == {"a red pear"} and set(changed["after"]) == {"a red bear"}
    assert {"test_wer_asr_impaired", "test_wer_fused_control"} <= set(metrics)
    assert set(per_speaker["level"]) == {"group", "speaker"}


def test_alpha_is_chosen_on_dev_only():
    nb, man = _toy()
    _, base, _, _ = run_fusion(nb, man, FUSION, TEXT, seed=0)
    # Make CLIP useless on test only: the choice of alpha must not move.
    flipped = nb.copy()
    test_rows = flipped["utt_id"].str.startswith("test")
    flipped.loc[test_rows, "clip_cos"] = 0.25 - (flipped.loc[test_rows, "clip_cos"] - 0.25)
    _, moved, _, _ = run_fusion(flipped, man, FUSION, TEXT, seed=0)
    assert moved["best_alpha"] == base["best_alpha"]
    assert moved["test_wer_fused"] > base["test_wer_fused"]


def test_missing_split_is_a_clear_error():
    nb, man = _toy()
    with pytest.raises(ValueError, match="no n-best hypotheses for the dev split"):
        run_fusion(nb[nb["utt_id"].str.startswith("test")], man, FUSION, TEXT, seed=0)


def test_to_arrays_normalises_both_sides():
    nb = pd.DataFrame({"utt_id": ["u", "u"], "rank": [0, 1], "text": ["A red, red bear!", "um a red pear"],
                       "asr_score": [-0.1, -0.2], "clip_cos": [None, None]})
    arr = to_arrays(nb, pd.Series({"u": "A Red Bear."}), TEXT)
    assert arr.texts[0].tolist() == ["a red bear", "a red pear"]
    assert arr.errors[0].tolist() == [0, 1]


def test_a_corpus_without_pictures_fuses_to_asr_only_and_says_so():
    """TORGO has no pictures: every clip_cos is missing; fusion is ASR-only, the grid flat, nothing divides by zero."""
    nb, man = _toy()
    nb["clip_cos"] = np.nan
    man["image_id"] = None
    grid, metrics, changed, per_speaker = run_fusion(nb, man, FUSION, TEXT, seed=0)
    assert metrics["n_no_image"] == metrics["n_test_utts"] == 6 and metrics["n_dev_no_image"] == 6
    assert metrics["test_wer_fused"] == metrics["test_wer_asr"] == pytest.approx(4 / 18)
    assert metrics["best_alpha"] == 0.0 and metrics["test_wer_diff"] == 0.0
    assert (metrics["test_wer_diff_ci_low"], metrics["test_wer_diff_ci_high"]) == (0.0, 0.0)
    assert metrics["fusion_skipped"] and "no test utterance has a picture" in metrics["fusion_skip_reason"]
    for split in ("dev", "test"):
        assert grid.loc[grid["split"] == split, "wer"].nunique() == 1  # the α grid is flat
    assert np.isfinite(grid["wer"]).all() and changed.empty
    assert np.isfinite(per_speaker[["wer_asr", "wer_fused", "wer_oracle"]].to_numpy(float)).all()


def test_pictures_in_test_only_keep_alpha_at_zero_and_say_why():
    nb, man = _toy()
    nb.loc[nb["utt_id"].str.startswith("dev"), "clip_cos"] = np.nan
    _, metrics, _, _ = run_fusion(nb, man, FUSION, TEXT, seed=0)
    assert metrics["n_no_image"] == 0 and metrics["n_dev_no_image"] == 6 and metrics["best_alpha"] == 0.0
    assert metrics["fusion_skipped"] and "no dev utterance has a picture" in metrics["fusion_skip_reason"]
    assert metrics["test_wer_fused"] == metrics["test_wer_asr"]


def test_a_mixed_corpus_is_not_marked_skipped():
    nb, man = _toy()
    nb.loc[nb["utt_id"].isin(["test0", "dev1"]), "clip_cos"] = np.nan
    _, metrics, _, _ = run_fusion(nb, man, FUSION, TEXT, seed=0)
    assert metrics["n_no_image"] == 1 and metrics["n_dev_no_image"] == 1
    assert not metrics["fusion_skipped"] and metrics["fusion_skip_reason"] is None
    assert metrics["best_alpha"] > 0
