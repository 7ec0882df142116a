import pandas as pd
import pytest

from mmasr.config import validate
from mmasr.split import assign_splits, n_for, random_speaker_splits, split_summary


def corpus(n_impaired=8, n_control=8, utts=3, preset=None):
    rows = []
    for group, prefix, n in (("impaired", "F", n_impaired), ("control", "FC", n_control)):
        for i in range(n):
            for j in range(utts):
                rows.append({"utt_id": f"{prefix}{i:02d}_{j}", "speaker": f"{prefix}{i:02d}", "group": group,
                             "duration_s": 1.0, "split": preset})
    return pd.DataFrame(rows)


CFG = validate({})["split"]


def test_default_split_is_speaker_disjoint_stratified_and_deterministic():
    utts = corpus()
    out = assign_splits(utts, CFG, seed=13)
    per_speaker = out.groupby("speaker")["split"].nunique()
    assert (per_speaker == 1).all()  # no speaker in two splits
    speakers = out.drop_duplicates("speaker")
    counts = speakers.groupby(["split", "group"]).size().to_dict()
    assert counts == {("dev", "control"): 1, ("dev", "impaired"): 1, ("test", "control"): 2,
                      ("test", "impaired"): 2, ("train", "control"): 5, ("train", "impaired"): 5}
    assert out.equals(assign_splits(utts, CFG, seed=13))
    others = [assign_splits(utts, CFG, seed=s) for s in range(5)]
    assert any(not o["split"].equals(out["split"]) for o in others)  # the seed matters


def test_small_corpus_still_gets_both_groups_in_every_split():
    out = assign_splits(corpus(3, 3), CFG, seed=0)
    speakers = out.drop_duplicates("speaker")
    for name in ("train", "dev", "test"):
        assert set(speakers.loc[speakers["split"] == name, "group"]) == {"impaired", "control"}


def test_tiny_corpus_keeps_training_speakers():
    for n in (1, 2):
        out = assign_splits(corpus(n, n), CFG, seed=0)
        assert (out["split"] == "train").any()


def test_n_for():
    assert n_for(0.25, 16, 2) == 4
    assert n_for(0.15, 16, 2) == 2
    assert n_for(0.0, 16, 2) == 0
    assert n_for(0.25, 2, 2) == 0


def test_explicit_speaker_lists_override():
    cfg = {**CFG, "speakers": {"train": [], "dev": ["F01"], "test": ["FC00", "F02"]}}
    out = assign_splits(corpus(), cfg, seed=0).drop_duplicates("speaker").set_index("speaker")["split"]
    assert out["F01"] == "dev" and out["FC00"] == "test" and out["F02"] == "test"
    assert (out.drop(["F01", "FC00", "F02"]) == "train").all()


def test_explicit_lists_with_unknown_or_repeated_speakers_fail():
    with pytest.raises(ValueError, match="split.speakers.test names unknown speaker"):
        assign_splits(corpus(), {**CFG, "speakers": {"train": [], "dev": [], "test": ["nobody"]}}, seed=0)
    with pytest.raises(ValueError, match="listed in split.speakers.dev and .test"):
        assign_splits(corpus(), {**CFG, "speakers": {"train": [], "dev": ["F01"], "test": ["F01"]}}, seed=0)


def test_leave_one_speaker_out():
    out = assign_splits(corpus(), {**CFG, "holdout_speaker": "F03"}, seed=0)
    assert set(out.loc[out["split"] == "test", "speaker"]) == {"F03"}
    assert (out["split"] == "dev").any()
    with pytest.raises(ValueError, match="holdout_speaker 'X' is not a speaker"):
        assign_splits(corpus(), {**CFG, "holdout_speaker": "X"}, seed=0)


def test_manifest_splits_are_kept_but_must_be_speaker_disjoint():
    utts = corpus(2, 2, preset="train")
    utts.loc[utts["speaker"] == "F00", "split"] = "test"
    out = assign_splits(utts, CFG, seed=0)
    assert set(out.loc[out["split"] == "test", "speaker"]) == {"F00"}
    utts.loc[0, "split"] = "dev"
    with pytest.raises(ValueError, match="speaker 'F00' in several splits"):
        assign_splits(utts, CFG, seed=0)


def test_random_split_ignores_input_order():
    speakers = corpus(4, 4, utts=1)[["speaker", "group"]]
    assert random_speaker_splits(speakers, 0.2, 0.2, 1) == random_speaker_splits(speakers.iloc[::-1], 0.2, 0.2, 1)


def test_summary_counts():
    out = assign_splits(corpus(), CFG, seed=13)
    s = split_summary(out)
    assert s["train_n_utts"] + s["dev_n_utts"] + s["test_n_utts"] == len(out)
    assert s["test_n_speakers_impaired"] == 2 and len(s["test_speakers"]) == 4
