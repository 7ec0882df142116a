import jiwer
import numpy as np
import pandas as pd
import pytest

from mmasr.config import validate
from mmasr.metrics.intervals import (paired_bootstrap_ci, paired_bootstrap_draws, speaker_bootstrap_ci,
                                     speaker_bootstrap_draws, wer_diff_interval)
from mmasr.metrics.wer import count_errors, gap_closed, pooled_cer, pooled_wer
from mmasr.metrics.verdict import VERDICTS, picture_verdict
from mmasr.rescoring.fusion import (alpha_grid, best_alpha_index, choose, fixed_alpha_choice, fuse,
                                    lambda_grid, log_linear_choices, log_linear_grid, masked_softmax, oracle_choice,
                                    other_scorings, picture_derangement, run_fusion, take, to_arrays)

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


def _toy(n_per_split=6, n_speakers=2):
    """dev and test utterances where the ASR top choice is the wrong noun and CLIP knows better."""
    man, nb = [], []
    for split in ("dev", "test"):
        for i in range(n_per_split):
            utt = f"{split}{i}"
            man.append({"utt_id": utt, "split": split, "text": "a red bear", "speaker": f"{split}-s{i % n_speakers}",
                        "group": "impaired" if i % 2 else "control", "image_id": "img"})
            wrong_first = i % 3 != 0
            hyps = [("a red pear", -0.10, 0.20), ("a red bear", -0.15, 0.30)] if wrong_first else \
                   [("a red bear", -0.10, 0.30), ("a red pear", -0.15, 0.20)]
            for rank, (text, asr, cos) in enumerate(hyps):
                nb.append({"utt_id": utt, "rank": rank, "text": text, "asr_score": asr, "clip_cos": cos,
                           "n_tokens": 4, "sum_logprob": 4 * asr})
    return pd.DataFrame(nb), pd.DataFrame(man)


NOUNS = ("bear", "pear", "goat", "boat")


def _pictured_toy(n_per_split=12, n_speakers=4, no_picture=()):
    """Each utterance describes one of four pictures ("a red <noun>"); Whisper prefers a wrong noun on
    two utterances in three, CLIP embeddings are one-hot per noun, so the right picture fixes every
    error and another picture can only mislead. Returns (nbest, manifest, (images, texts))."""
    eye = np.eye(len(NOUNS), dtype=np.float32)
    images = {noun: eye[k] for k, noun in enumerate(NOUNS)}
    texts = {f"a red {noun}": eye[k] for k, noun in enumerate(NOUNS)}
    man, nb = [], []
    for split in ("dev", "test"):
        for i in range(n_per_split):
            utt, noun = f"{split}{i:02d}", NOUNS[i % len(NOUNS)]
            other = NOUNS[(i + 1) % len(NOUNS)]
            pic = None if utt in no_picture else noun
            man.append({"utt_id": utt, "split": split, "text": f"a red {noun}", "speaker": f"{split}-s{i % n_speakers}",
                        "group": "impaired" if i % 2 else "control", "image_id": pic})
            order = [other, noun] if i % 3 else [noun, other]
            for rank, word in enumerate(order):
                text = f"a red {word}"
                nb.append({"utt_id": utt, "rank": rank, "text": text, "asr_score": -0.10 - 0.05 * rank,
                           "n_tokens": 4, "sum_logprob": 4 * (-0.10 - 0.05 * rank), "clip_text": text, "clip_cos": float(texts[text] @ images[pic]) if pic else np.nan})
    return pd.DataFrame(nb), pd.DataFrame(man), (images, texts)


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
    nb = pd.DataFrame({"utt_id": ["u", "u"], "rank": [0, 1], "text": ["A red bear!", "um a red pear"],
                       "asr_score": [-0.1, -0.2], "clip_cos": [None, None]})
    arr = to_arrays(nb, pd.Series({"u": "A Red Bear."}), TEXT)
    assert arr.texts[0].tolist() == ["a red bear", "a red pear"]
    assert arr.errors[0].tolist() == [0, 1]


def test_truncated_beams_are_compared_only_with_each_other():
    """mmasr.rescoring.nbest never stores a truncated beam beside a finished one; an utterance whose beams were all
    cut at the same budget is re-ranked like any other (prefixes of one length, compared with each other)."""
    nb = pd.DataFrame({"utt_id": ["u", "u", "v", "v"], "rank": [0, 1, 0, 1],
                       "text": ["a red bear a red", "a red pear a red", "a red bear", "a red pear"],
                       "asr_score": [-0.1, -0.2, -0.1, -0.2], "clip_cos": [0.1, 0.9, 0.1, 0.9],
                       "complete": [False, False, True, True]})
    arr = to_arrays(nb, pd.Series({"u": "a red pear", "v": "a red pear"}), TEXT)
    assert np.isfinite(arr.clip).all()
    picks = choose(fuse(arr.asr, arr.clip, arr.valid, np.array([0.0, 1.0]), tau=100.0))
    assert picks.tolist() == [[0, 0], [1, 1]]


# ---------------------------------------------------------------- speaker-level intervals

def _one_speaker_gain(n_speakers_per_group=3, n_utts=20):
    """Six speakers in two groups, five words an utterance; one impaired speaker carries the whole gain
    (3 errors to 0 on every utterance), everyone else has the same errors either way."""
    speakers, groups, asr, fused = [], [], [], []
    for g in ("control", "impaired"):
        for k in range(n_speakers_per_group):
            for _ in range(n_utts):
                speakers.append(f"{g}{k}")
                groups.append(g)
                winner = g == "impaired" and k == 0
                asr.append(3 if winner else 1)
                fused.append(0 if winner else 1)
    return (np.array(asr), np.array(fused), np.full(len(asr), 5), np.array(speakers), np.array(groups))


def test_one_speakers_gain_is_not_significant_at_speaker_level():
    asr, fused, words, speakers, groups = _one_speaker_gain()
    utt_low, utt_high = paired_bootstrap_ci(asr, fused, words, 2000, seed=0)
    spk_low, spk_high = speaker_bootstrap_ci(asr, fused, words, speakers, groups, 2000, seed=0)
    assert utt_low < utt_high < 0  # resampling utterances: a clear gain
    assert spk_low < 0 <= spk_high  # resampling speakers: the one speaker may be left out, so 0 is inside
    ci = wer_diff_interval(asr, fused, words, speakers, groups, 2000, seed=0)
    assert ci["level"] == "speaker" and (ci["low"], ci["high"]) == (spk_low, spk_high)
    assert (ci["low_utt"], ci["high_utt"]) == (utt_low, utt_high)


def test_speaker_level_needs_two_speakers_in_every_group():
    asr, fused, words, speakers, groups = _one_speaker_gain(n_speakers_per_group=1)
    ci = wer_diff_interval(asr, fused, words, speakers, groups, 500, seed=0)
    assert ci["level"] == "utterance" and (ci["low"], ci["high"]) == (ci["low_utt"], ci["high_utt"])


def test_speaker_bootstrap_matches_a_naive_two_stage_resampling():
    """The multinomial-weight shortcut against drawing speakers, then utterances, one resample at a time."""
    rng = np.random.default_rng(3)
    speakers = np.repeat(["a", "b", "c", "d", "e"], [3, 8, 5, 12, 2])
    groups = np.where(np.isin(speakers, ["a", "b"]), "g1", "g2")
    words = rng.integers(2, 9, len(speakers))
    err_a, err_b = rng.integers(0, 4, len(speakers)), rng.integers(0, 4, len(speakers))
    fast = speaker_bootstrap_ci(err_a, err_b, words, speakers, groups, 4000, seed=0)
    diffs = []
    for _ in range(4000):
        idx = []
        for g in ("g1", "g2"):
            members = np.unique(speakers[groups == g])
            for spk in rng.choice(members, len(members)):
                own = np.flatnonzero(speakers == spk)
                idx.extend(rng.choice(own, len(own)))
        diffs.append((err_b[idx].sum() - err_a[idx].sum()) / words[idx].sum())
    naive = np.percentile(diffs, [2.5, 97.5])
    np.testing.assert_allclose(fast, naive, atol=0.03)
    assert speaker_bootstrap_ci(err_a, err_b, words, speakers, groups, 500, seed=7) == \
        speaker_bootstrap_ci(err_a, err_b, words, speakers, groups, 500, seed=7)
    assert speaker_bootstrap_ci(err_a, err_a, words, speakers, None, 500, seed=7) == (0.0, 0.0)


def test_run_fusion_reports_the_speaker_level_interval_with_enough_speakers():
    nb, man = _toy(n_per_split=12, n_speakers=4)  # 2 speakers per group on test
    _, m, _, _ = run_fusion(nb, man, FUSION, TEXT, seed=0)
    assert m["test_wer_diff_ci_level"] == "speaker"
    assert {"test_wer_diff_ci_low_utt", "test_wer_diff_ci_high_utt"} <= set(m)
    assert m["test_wer_diff_ci_level_impaired"] == "speaker"
    assert m["test_wer_diff_ci_low_impaired"] <= m["test_wer_diff_impaired"] <= m["test_wer_diff_ci_high_impaired"]
    _, m1, _, _ = run_fusion(*_toy(), FUSION, TEXT, seed=0)  # one test speaker per group
    assert m1["test_wer_diff_ci_level"] == "utterance"
    assert (m1["test_wer_diff_ci_low"], m1["test_wer_diff_ci_high"]) == \
        (m1["test_wer_diff_ci_low_utt"], m1["test_wer_diff_ci_high_utt"])


# ---------------------------------------------------------------- ASR-only and oracle off the grid

def test_asr_only_and_oracle_do_not_depend_on_the_grid():
    nb, man = _toy()
    _, full, _, _ = run_fusion(nb, man, FUSION, TEXT, seed=0)
    grid, late, _, _ = run_fusion(nb, man, {**FUSION, "alpha_start": 0.3}, TEXT, seed=0)
    assert grid["alpha"].min() == pytest.approx(0.3)
    # at α = 0.3 the picture already fixes every error, so the grid's first α is not "ASR only"
    assert grid.loc[(grid["split"] == "test") & np.isclose(grid["alpha"], 0.3), "wer"].item() == 0.0
    for key in ("test_wer_asr", "dev_wer_asr", "test_wer_oracle", "dev_wer_oracle", "test_S_asr", "test_wer_alpha1"):
        assert late[key] == full[key], key
    assert late["test_wer_asr"] == pytest.approx(4 / 18) and late["test_wer_alpha1"] == 0.0


# ---------------------------------------------------------------- the picture-swap control

def test_picture_derangement_never_gives_an_utterance_its_own_picture():
    rng = np.random.default_rng(0)
    for ids in (np.array(list("aabbccdd")), np.array(list("aaaabbcd")), np.array(["x", "y"]), np.arange(7)):
        for _ in range(50):
            perm = picture_derangement(ids, rng)
            assert sorted(perm) == list(range(len(ids))) and not np.any(ids[perm] == ids)
    assert picture_derangement(np.array(list("aaab")), rng) is None  # one picture for more than half
    assert picture_derangement(np.array(["a"]), rng) is None


def test_swapped_pictures_undo_the_gain():
    nb, man, emb = _pictured_toy()
    _, m, _, per = run_fusion(nb, man, {**FUSION, "swap_permutations": 3}, TEXT, seed=0, embeddings=emb)
    assert m["test_wer_fused"] == 0.0 < m["test_wer_asr"] < m["test_wer_fused_swapped"]
    assert m["test_swap_permutations"] == 3
    swap_diff = m["test_wer_fused_swapped"] - m["test_wer_asr"]
    assert m["test_wer_fused_swapped_ci_low"] <= swap_diff <= m["test_wer_fused_swapped_ci_high"]
    assert m["test_wer_fused_swapped_ci_high"] > 0 and m["test_wer_diff_ci_high"] < 0
    assert {"test_wer_fused_swapped_impaired", "test_wer_fused_swapped_ci_low_control"} <= set(m)
    assert "wer_fused_swapped" in per.columns
    _, again, _, _ = run_fusion(nb, man, {**FUSION, "swap_permutations": 3}, TEXT, seed=0, embeddings=emb)
    assert again == m  # seeded


def test_utterances_without_a_picture_stay_asr_only_in_the_swap():
    nb, man, emb = _pictured_toy(no_picture={f"test{i:02d}" for i in range(1, 12, 3)})
    _, m, _, _ = run_fusion(nb, man, FUSION, TEXT, seed=0, embeddings=emb)
    # the picture-less test utterances are exactly the ones Whisper gets wrong and nothing can fix
    assert m["n_no_image"] == 4 and m["test_wer_fused"] == m["test_wer_asr"] * 4 / 8
    assert m["test_wer_fused_swapped"] >= m["test_wer_fused"]


def test_swap_is_reported_as_none_when_impossible_and_refuses_stale_caches():
    nb, man, emb = _pictured_toy()
    one_picture = man.assign(image_id="bear")
    nb_one = nb.assign(clip_cos=[float(emb[1][t] @ emb[0]["bear"]) for t in nb["clip_text"]])
    _, m, _, _ = run_fusion(nb_one, one_picture, FUSION, TEXT, seed=0, embeddings=emb)
    assert m["test_wer_fused_swapped"] is None and m["test_swap_permutations"] == 0
    _, m, _, _ = run_fusion(nb, man, FUSION, TEXT, seed=0)  # no caches given
    assert m["test_wer_fused_swapped"] is None
    stale = ({**emb[0], "bear": emb[0]["pear"]}, emb[1])
    with pytest.raises(ValueError, match="stale"):
        run_fusion(nb, man, FUSION, TEXT, seed=0, embeddings=stale)


# ---------------------------------------------------------------- CER and unnormalised WER

def test_cer_and_raw_wer():
    assert pooled_cer(["abcd", ""], ["abxd", "zz"]) == pytest.approx(3 / 4)
    assert pooled_cer(["a red bear"], ["a red pear"]) == pytest.approx(jiwer.cer("a red bear", "a red pear"))
    nb = to_arrays(pd.DataFrame({"utt_id": ["u", "u"], "rank": [0, 1], "text": ["Well a red pear", "well, a red bear."],
                                 "asr_score": [-0.1, -0.2]}), pd.Series({"u": "Well, a red bear."}), TEXT)
    out = other_scorings(nb, ["Well, a red bear."], {"asr": np.array([0]), "fused": np.array([1])}, TEXT)
    assert out["test_cer_fused"] == 0.0 and out["test_cer_asr"] == pytest.approx(1 / len("well a red bear"))
    assert out["test_wer_fused_raw"] == 0.0  # lower-cased only: punctuation and "well" are words here
    assert out["test_wer_asr_raw"] == pytest.approx(2 / 4)  # "well" vs "well,", "pear" vs "bear."


def test_headline_wers_under_the_other_normaliser():
    """fusion.json's _seed_norm (seed 000's normaliser: fillers such as "well"/"like" dropped, repeats collapsed)
    or _whisper_norm keys, for the same picks; the oracle is the best hypothesis under that scoring."""
    from mmasr.data.text import SEED_000_TEXT
    from mmasr.rescoring.fusion import other_normaliser_wers

    table = pd.DataFrame({"utt_id": ["u"] * 3, "rank": [0, 1, 2], "asr_score": [-0.1, -0.2, -0.3],
                          "text": ["I like the red pear", "i like the the red bear", "Well, I like a red bear."]})
    ref = "Well, I like the red bear."
    picks = {"asr": np.array([0]), "fused": np.array([1])}
    nb = to_arrays(table, pd.Series({"u": ref}), TEXT)
    assert nb.errors[0].tolist() == [2, 2, 1] and nb.ref_words.tolist() == [6]  # whisper_english: all words count
    out = other_normaliser_wers(nb, [ref], picks, TEXT)
    # seed 000: ref "i the red bear"; hyps "i the red pear", "i the red bear", "i a red bear"
    assert out == {"test_wer_asr_seed_norm": pytest.approx(1 / 4), "test_wer_fused_seed_norm": 0.0,
                   "test_wer_oracle_seed_norm": 0.0}
    seed = {**TEXT, **SEED_000_TEXT}
    out = other_normaliser_wers(to_arrays(table, pd.Series({"u": ref}), seed), [ref], picks, seed)
    assert out == {"test_wer_asr_whisper_norm": pytest.approx(2 / 6), "test_wer_fused_whisper_norm": pytest.approx(2 / 6),
                   "test_wer_oracle_whisper_norm": pytest.approx(1 / 6)}


def test_fusion_json_has_the_issue_15_keys():
    nb, man, emb = _pictured_toy()
    _, m, _, _ = run_fusion(nb, man, FUSION, TEXT, seed=0, embeddings=emb)
    assert {"test_wer_alpha1", "test_wer_fused_swapped", "test_wer_fused_swapped_ci_low",
            "test_wer_fused_swapped_ci_high", "test_wer_diff_ci_low_utt", "test_wer_diff_ci_high_utt",
            "test_cer_asr", "test_cer_fused", "test_wer_asr_raw", "test_wer_fused_raw",
            "test_wer_asr_seed_norm", "test_wer_fused_seed_norm", "test_wer_oracle_seed_norm"} <= set(m)


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


def test_a_hypothesis_that_normalises_to_nothing_scores_as_deletions():
    nb = pd.DataFrame({"utt_id": ["u", "u"], "rank": [0, 1], "text": ["Um, uh!", "a red bear"],
                       "asr_score": [-0.1, -0.2], "clip_cos": [0.2, 0.3]})
    arr = to_arrays(nb, pd.Series({"u": "A red bear."}), TEXT)
    assert arr.texts[0].tolist() == ["", "a red bear"] and arr.valid[0].all()
    assert (arr.sub[0, 0], arr.dele[0, 0], arr.ins[0, 0]) == (0, 3, 0) and arr.errors[0, 1] == 0


# ---------------------------------------------------------------- the log-linear form (issue 27)

def _random_toy(seed=7, n_per_split=16, n_speakers=8):
    """A seeded toy with irregular scores (three hypotheses an utterance, random ASR, CLIP and LM scores)."""
    rng = np.random.default_rng(seed)
    man, nb = [], []
    for split in ("dev", "test"):
        for i in range(n_per_split):
            utt, noun = f"{split}{i:02d}", NOUNS[i % 4]
            man.append({"utt_id": utt, "split": split, "text": f"a red {noun}", "speaker": f"{split}-s{i % n_speakers}",
                        "group": "impaired" if i % 2 else "control", "image_id": noun})
            words = [noun, NOUNS[(i + 1) % 4], NOUNS[(i + 2) % 4]]
            rng.shuffle(words)
            asr = np.sort(rng.normal(-0.3, 0.1, 3))[::-1]
            for rank, word in enumerate(words):
                n_tok = 4 + rank % 2
                nb.append({"utt_id": utt, "rank": rank, "text": f"a red {word}", "asr_score": float(asr[rank]),
                           "n_tokens": n_tok, "sum_logprob": float(asr[rank]) * n_tok,
                           "clip_cos": float(0.25 + 0.02 * (word == noun) + rng.normal(0, 0.01)),
                           "lm_score": float(rng.normal(-2, 0.5)), "lm_logprob": float(rng.normal(-8, 2))})
    return pd.DataFrame(nb), pd.DataFrame(man)


def test_seed_form_is_unchanged_against_a_pinned_example():
    """Values from main at 1a90f6d (before the log-linear form) on the same toy: the seed form reproduces them, and
    under the log-linear headline the seed form's systems are still reported beside it."""
    nb, man = _random_toy()
    grid, m, _, _ = run_fusion(nb, man, {**FUSION, "form": "seed"}, TEXT, seed=0)
    pinned = {"best_alpha": 0.15, "dev_wer_fused": 0.0625, "test_wer_asr": 0.25, "test_wer_fused": 1 / 12,
              "test_wer_diff_ci_low": -0.25, "test_wer_diff_ci_high": -1 / 12, "test_wer_asr_lm": 0.25,
              "test_wer_asr_clip_lm": 1 / 24, "test_wer_asr_clip_lm_ci_low": -7 / 24, "test_wer_fused_impaired": 1 / 24}
    for key, value in pinned.items():
        assert m[key] == pytest.approx(value, abs=1e-12), key
    assert m["weights_asr_lm"] == pytest.approx([0.7, 0.0, 0.3]) and m["weights_asr_clip_lm"] == pytest.approx([0.2, 0.65, 0.15])
    assert m["fusion_form"] == "seed" and m["test_wer_fused_seed_form"] == m["test_wer_fused"]
    assert m["weights_fused_seed_form"] == {"alpha": 0.15}
    _, ll, _, _ = run_fusion(nb, man, FUSION, TEXT, seed=0)
    assert ll["fusion_form"] == "log_linear" and ll["test_wer_fused_seed_form"] == pytest.approx(1 / 12)
    assert ll["best_alpha"] == 0.15 and ll["test_wer_fused"] == ll["test_wer_fused_log_linear_form"]
    assert m["test_wer_fused_log_linear_form"] == ll["test_wer_fused"]  # both forms in every run
    assert set(ll["weights_asr_clip_lm_log_linear_form"]) == {"lambda_clip", "lambda_lm", "beta"}
    for form in ("seed", "log_linear"):
        for group in ("impaired", "control"):
            assert ll[f"test_wer_asr_clip_lm_{form}_form_diff_ci_low_{group}"] <= ll[
                f"test_wer_asr_clip_lm_{form}_form_diff_ci_high_{group}"]


def test_lambda_and_beta_grids():
    lambdas = lambda_grid({"lambda_start": 0.01, "lambda_stop": 10.0, "lambda_num": 4})
    assert lambdas.tolist() == [0.0, 0.01, 0.1, 1.0, 10.0]
    grid = log_linear_grid(lambdas, [1.0, -0.5, 0.0], with_lm=False)
    assert grid.shape == (15, 3) and (grid[:, 1] == 0).all()
    assert grid[:3].tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, -0.5], [0.0, 0.0, 1.0]]  # simplest first: |β| ascending
    with_lm = log_linear_grid(lambdas, [0.0], with_lm=True)
    assert with_lm.shape == (25, 3) and (with_lm[:5, 1] == 0).all() and with_lm[5].tolist() == [0.0, 0.01, 0.0]


def test_log_linear_at_zero_weights_picks_the_best_total_logprob_not_rank_0():
    # rank 0 by the length-normalised score (-0.2 a token over 6 tokens) loses on total log-probability (-1.2 < -0.6)
    nb = pd.DataFrame({"utt_id": ["u", "u", "v", "v"], "rank": [0, 1, 0, 1],
                       "text": ["a red bear on a hill", "a red bear", "a goat", "a boat"],
                       "n_tokens": [6, 2, 3, 3], "sum_logprob": [-1.2, -0.6, -0.3, -0.9],
                       "asr_score": [-0.2, -0.3, -0.1, -0.3], "clip_cos": [0.3, 0.2, np.nan, np.nan]})
    arr = to_arrays(nb, pd.Series({"u": "a red bear", "v": "a goat"}), TEXT)
    zero = np.zeros((1, 3))
    got = log_linear_choices(arr.total, arr.clip, arr.lm_total, arr.length, arr.valid, zero, 100.0)[0]
    assert got.tolist() == [1, 0] == np.argmax(np.where(arr.valid, arr.total, -np.inf), axis=1).tolist()
    assert fixed_alpha_choice(arr, 0.0, 100.0).tolist() == [0, 0]  # ASR-only stays rank 0
    # a length bonus of 0.2 a token ties them (-1.2 + 1.2 = -0.6 + 0.4 + 0.2); the better ASR rank wins ties
    assert log_linear_choices(arr.total, arr.clip, arr.lm_total, arr.length, arr.valid, np.array([[0, 0, 0.2]]),
                              100.0)[0, 0] == 0
    # the CLIP term moves u (it has a picture) and nothing moves v (no cosines: the term is 0 across the list)
    w = np.array([[0.01, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert log_linear_choices(arr.total, arr.clip, arr.lm_total, arr.length, arr.valid, w, 100.0).tolist() == [[1, 0], [0, 0]]
    # chunked in memory: the same choices whatever the chunk
    big = log_linear_grid(lambda_grid(FUSION), FUSION["beta_grid"], with_lm=True)
    full = log_linear_choices(arr.total, arr.clip, arr.lm_total, arr.length, arr.valid, big, 100.0)
    assert np.array_equal(full, log_linear_choices(arr.total, arr.clip, arr.lm_total, arr.length, arr.valid, big,
                                                   100.0, max_cells=7))


def test_run_fusion_log_linear_with_zero_grids_is_the_total_logprob_argmax():
    nb, man = _random_toy()
    cfg = {**FUSION, "lambda_num": 1, "lambda_start": 1e-9, "lambda_stop": 1e-9, "beta_grid": [0.0]}
    _, m, _, _ = run_fusion(nb.assign(clip_cos=np.nan), man.assign(image_id=None), cfg, TEXT, seed=0)
    meta = man.set_index("utt_id")
    test = to_arrays(nb[nb["utt_id"].str.startswith("test")], meta["text"], TEXT)
    best_total = np.argmax(np.where(test.valid, test.total, -np.inf), axis=1)
    assert m["test_wer_fused"] == pytest.approx(pooled_wer(take(test.errors, best_total), test.ref_words))
    assert m["test_wer_asr"] == pytest.approx(pooled_wer(test.errors[:, 0], test.ref_words))
    assert m["weights_fused_log_linear_form"] == {"lambda_clip": 0.0, "lambda_lm": 0.0, "beta": 0.0}
    assert m["fusion_skipped"] and "total log-probability" in m["fusion_skip_reason"]


def test_log_linear_weights_are_chosen_on_dev_only():
    nb, man = _random_toy()
    _, base, _, _ = run_fusion(nb, man, FUSION, TEXT, seed=0)
    moved_nb = nb.copy()
    test_rows = moved_nb["utt_id"].str.startswith("test")
    rng = np.random.default_rng(1)
    for col in ("clip_cos", "sum_logprob", "lm_logprob", "asr_score", "lm_score"):
        moved_nb.loc[test_rows, col] = moved_nb.loc[test_rows, col] + rng.normal(0, 0.5, int(test_rows.sum()))
    _, moved, _, _ = run_fusion(moved_nb, man, FUSION, TEXT, seed=0)
    for form in ("log_linear", "seed"):
        for name in ("fused", "asr_lm", "asr_clip_lm"):
            assert moved[f"weights_{name}_{form}_form"] == base[f"weights_{name}_{form}_form"]
            assert moved[f"dev_wer_{name}_{form}_form"] == base[f"dev_wer_{name}_{form}_form"]
    assert any(moved[f"test_wer_{n}_{f}_form"] != base[f"test_wer_{n}_{f}_form"]
               for n in ("fused", "asr_lm", "asr_clip_lm") for f in ("log_linear", "seed"))


def test_log_linear_without_total_logprob_is_a_clear_error_and_null_under_seed():
    nb, man = _toy()
    nb = nb.drop(columns=["sum_logprob", "n_tokens"])
    with pytest.raises(ValueError, match="sum_logprob.*fusion.form: seed"):
        run_fusion(nb, man, FUSION, TEXT, seed=0)
    _, m, _, _ = run_fusion(nb, man, {**FUSION, "form": "seed"}, TEXT, seed=0)
    assert m["test_wer_fused_log_linear_form"] is None and "sum_logprob" in m["log_linear_skip_reason"]
    assert m["test_wer_fused"] == 0.0
    with pytest.raises(ValueError, match="form"):
        validate({"fusion": {"form": "linear"}})
    with pytest.raises(ValueError, match="lambda_stop"):
        validate({"fusion": {"lambda_start": 1.0, "lambda_stop": 0.1}})


# ---------------------------------------------------------------- the picture verdict and speakers (issue 27)

def test_the_same_resamples_pair_every_difference():
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(0, 3, 40) for _ in range(3))
    c = c + 0.5  # a mean over permutations need not be whole
    words, spk, grp = rng.integers(2, 6, 40), np.repeat(np.arange(8), 5), np.repeat([0, 1], 20)
    ab, ac, cb = (speaker_bootstrap_draws(x, y, words, spk, grp, 300, 4) for x, y in ((a, b), (a, c), (c, b)))
    np.testing.assert_allclose(ab - ac, cb, atol=1e-12)
    ab, ac, cb = (paired_bootstrap_draws(x, y, words, 300, 4) for x, y in ((a, b), (a, c), (c, b)))
    np.testing.assert_allclose(ab - ac, cb, atol=1e-12)


def test_picture_verdict_rules():
    assert picture_verdict((-0.1, -0.02), (-0.05, -0.01))[0] == "picture_helps"
    code, sentence = picture_verdict((-0.1, -0.02), (-0.03, 0.01))
    assert code == "text_prior" and sentence.startswith("CLIP's text prior helps, the picture does not")
    assert picture_verdict((-0.1, -0.02), None)[0] == "no_control"
    assert picture_verdict((-0.1, 0.0), (-0.05, -0.01))[0] == "not_shown"  # an interval touching 0 is not below it
    assert "right picture does beat a wrong one" in picture_verdict((-0.1, 0.0), (-0.05, -0.01))[1]
    assert picture_verdict((0.01, 0.05), (0.0, 0.1)) == ("not_shown", VERDICTS["not_shown"])
    assert picture_verdict((None, None), (-0.05, -0.01))[0] == "not_shown"


def _text_prior_toy(n_per_split=12, n_speakers=4):
    """CLIP prefers the right transcript whatever the picture: the wrong hypotheses are the right noun with an
    inserted "the", and their text embeddings lack the "fluent" direction every picture shares; so a swapped picture
    picks the right transcript as well as the own one does."""
    dim = len(NOUNS) + 1
    def vec(noun, fluent):
        v = np.zeros(dim, np.float32)
        v[NOUNS.index(noun)] = 0.6 if fluent else 1.0
        v[-1] = 0.8 if fluent else 0.0
        return v
    images = {noun: vec(noun, True) for noun in NOUNS}
    texts = {**{f"a red {n}": vec(n, True) for n in NOUNS}, **{f"a red {n} the": vec(n, False) for n in NOUNS}}
    man, nb = [], []
    for split in ("dev", "test"):
        for i in range(n_per_split):
            utt, noun = f"{split}{i:02d}", NOUNS[i % len(NOUNS)]
            man.append({"utt_id": utt, "split": split, "text": f"a red {noun}", "speaker": f"{split}-s{i % n_speakers}",
                        "group": "impaired" if i % 2 else "control", "image_id": noun})
            right, wrong = f"a red {noun}", f"a red {noun} the"
            for rank, text in enumerate([wrong, right] if i % 3 else [right, wrong]):
                nb.append({"utt_id": utt, "rank": rank, "text": text, "asr_score": -0.10 - 0.05 * rank, "n_tokens": 4,
                           "sum_logprob": 4 * (-0.10 - 0.05 * rank), "clip_text": text,
                           "clip_cos": float(texts[text] @ images[noun])})
    return pd.DataFrame(nb), pd.DataFrame(man), (images, texts)


@pytest.mark.parametrize("form", ["log_linear", "seed"])
def test_verdict_separates_the_picture_from_clips_text_prior(form):
    cfg = {**FUSION, "form": form, "swap_permutations": 3}
    nb, man, emb = _pictured_toy()  # CLIP needs the right picture
    _, m, _, _ = run_fusion(nb, man, cfg, TEXT, seed=0, embeddings=emb)
    assert m["test_wer_diff_ci_high"] < 0 and m["test_wer_fused_vs_swapped_ci_high"] < 0
    assert m["picture_verdict"] == "picture_helps"
    assert m["test_wer_fused_vs_swapped"] == pytest.approx(m["test_wer_fused"] - m["test_wer_fused_swapped"])
    assert m["test_wer_fused_vs_swapped_ci_low"] <= m["test_wer_fused_vs_swapped"]
    for group in ("impaired", "control"):
        assert m[f"test_wer_fused_vs_swapped_ci_low_{group}"] <= m[f"test_wer_fused_vs_swapped_ci_high_{group}"] < 0
    nb, man, emb = _text_prior_toy()  # CLIP prefers the fluent transcript with any picture
    _, m, _, _ = run_fusion(nb, man, cfg, TEXT, seed=0, embeddings=emb)
    assert m["test_wer_fused"] == 0.0 < m["test_wer_asr"] and m["test_wer_diff_ci_high"] < 0
    assert m["test_wer_fused_swapped"] == 0.0 and m["test_wer_fused_vs_swapped_ci_high"] >= 0
    assert m["picture_verdict"] == "text_prior"


def test_speakers_are_counted_beside_every_interval():
    nb, man, emb = _pictured_toy()
    _, m, _, _ = run_fusion(nb, man, FUSION, TEXT, seed=0, embeddings=emb)
    assert m["test_n_speakers"] == 4 and m["test_n_speakers_impaired"] == m["test_n_speakers_control"] == 2
