from pathlib import Path

import pandas as pd
import pytest

from mmasr.config import validate
from mmasr.data.split import assign_splits, n_for, random_speaker_splits, split_summary


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


def test_a_partial_split_column_stops_split_naming_the_rows():
    utts = corpus(2, 2, preset="train")  # 4 speakers x 3 utterances
    utts.loc[utts["speaker"] == "F00", "split"] = "test"
    missing = utts.index[utts["speaker"].isin(["F01", "FC01"])]
    utts.loc[missing, "split"] = None
    with pytest.raises(ValueError, match=r"split for 6 of 12 utterances; 6 have none "
                                         r"\(F01_0, F01_1, F01_2, FC01_0, FC01_1, \.\.\.\)") as err:
        assign_splits(utts, CFG, seed=0)
    assert "FC01_2" not in str(err.value)  # the first five, then the count
    utts.loc[missing[:2], "split"] = "dev"  # F01_2 and FC01_* still have none
    with pytest.raises(ValueError, match=r"4 have none \(F01_2, FC01_0, FC01_1, FC01_2\):"):
        assign_splits(utts, CFG, seed=0)
    # no split anywhere: a random speaker-disjoint split, as before; params lists still take precedence
    assert set(assign_splits(utts.assign(split=None), CFG, seed=0)["split"]) == {"train", "dev", "test"}
    listed = assign_splits(utts, {**CFG, "speakers": {"train": [], "dev": [], "test": ["F01"]}}, seed=0)
    assert set(listed.loc[listed["split"] == "test", "speaker"]) == {"F01"}


def test_random_split_ignores_input_order():
    speakers = corpus(4, 4, utts=1)[["speaker", "group"]]
    assert random_speaker_splits(speakers, 0.2, 0.2, 1) == random_speaker_splits(speakers.iloc[::-1], 0.2, 0.2, 1)


def test_summary_counts():
    out = assign_splits(corpus(), CFG, seed=13)
    s = split_summary(out)
    assert s["train_n_utts"] + s["dev_n_utts"] + s["test_n_utts"] == len(out)
    assert s["test_n_speakers_impaired"] == 2 and len(s["test_speakers"]) == 4


# ------------------------------------------------------------------ prompt-disjoint splits (split.disjoint_text)

import json  # noqa: E402

import numpy as np  # noqa: E402

from mmasr.cli import main  # noqa: E402
from mmasr.data.split import EXCLUDED_COLUMNS, exclusion_summary, make_splits  # noqa: E402
from mmasr.data.text import normaliser  # noqa: E402

NORM = normaliser(validate({})["text"])
ON = {**CFG, "disjoint_text": True, "disjoint_picture": True}
OFF = {**CFG, "disjoint_text": False, "disjoint_picture": False}
TEXT_ONLY = {**CFG, "disjoint_text": True, "disjoint_picture": False}
PARTITION = {**CFG, "disjoint_text": "partition", "disjoint_picture": False}


def demo_shaped(n_prompts=400, utts=12, seed=0):
    """Like the demo: every utterance draws one of many prompts, each with exactly one picture; speakers
    say it with their own case, punctuation and fillers, which the normaliser removes."""
    rng = np.random.default_rng(seed)
    styles = ["{}", "{}.", "Um, {}", "Uh, {}", "{}!"]
    rows = []
    for group, prefix in (("impaired", "F"), ("control", "FC")):
        for i in range(8):
            for j in range(utts):
                k = int(rng.integers(n_prompts))
                prompt = f"the {k % 7} red ball number {k}"
                text = styles[int(rng.integers(len(styles)))].format(prompt.capitalize())
                rows.append({"utt_id": f"{prefix}{i:02d}_{j}", "speaker": f"{prefix}{i:02d}", "group": group,
                             "text": text,
                             "image_id": f"pic{k:03d}", "duration_s": 1.0, "split": None})
    return pd.DataFrame(rows)


def torgo_shaped():
    """Like TORGO: every speaker reads the same word and sentence prompts (no pictures), plus a few
    prompts of their own."""
    shared = ["yes", "no", "The quick brown fox jumps.", "Up", "pat", "tap", "Except in the winter"]
    rows = []
    for group, prefix in (("impaired", "F"), ("control", "FC")):
        for i in range(6):
            spk = f"{prefix}{i:02d}"
            for j, text in enumerate(shared + [f"{spk} own sentence {n}" for n in range(3)]):
                rows.append({"utt_id": f"{spk}_{j:03d}", "speaker": spk, "group": group,
                             "text": text.upper() if i % 2 else text, "image_id": None, "duration_s": 1.0,
                             "split": None})
    return pd.DataFrame(rows)


def manifest_shaped():
    """Like a user manifest: splits given in the manifest, pictures shared by different descriptions
    (image overlap without text overlap), utterances without a picture, one empty transcript."""
    rows = []
    spec = {"A": ("train", "impaired"), "B": ("train", "control"), "C": ("dev", "impaired"),
            "D": ("dev", "control"), "E": ("test", "impaired"), "G": ("test", "control")}
    for spk, (split, group) in spec.items():
        for j in range(6):
            image = f"scene{j}" if j < 3 else None
            text = f"{spk.lower()} describes scene {j}" if j != 4 else "a cat on a mat"  # j=4: a shared prompt
            rows.append({"utt_id": f"{spk}{j}", "speaker": spk, "group": group, "text": text, "image_id": image,
                         "duration_s": 1.0, "split": split})
    rows.append({"utt_id": "E9", "speaker": "E", "group": "impaired", "text": "", "image_id": None,
                 "duration_s": 1.0, "split": "test"})
    rows.append({"utt_id": "A9", "speaker": "A", "group": "impaired", "text": "um", "image_id": None,
                 "duration_s": 1.0, "split": "train"})
    return pd.DataFrame(rows)


def assert_disjoint(utts, manifest, excluded, cfg=ON, seed=13):
    """The contract of disjoint_text on one input."""
    full = assign_splits(utts, cfg, seed)
    assert list(excluded.columns) == EXCLUDED_COLUMNS
    assert len(manifest) + len(excluded) == len(utts)  # kept + excluded = input
    assert set(manifest["utt_id"]).isdisjoint(excluded["utt_id"])
    assert set(manifest["utt_id"]) | set(excluded["utt_id"]) == set(utts["utt_id"])
    train_before = full[full["split"] == "train"].reset_index(drop=True)
    assert manifest[manifest["split"] == "train"].reset_index(drop=True).equals(train_before)  # train intact
    assert set(excluded["split"]) <= {"dev", "test"}
    train_texts = {NORM(t) for t in train_before["text"]} - {""}
    train_images = set(train_before["image_id"].dropna())
    held = manifest[manifest["split"].isin(["dev", "test"])]
    assert not {NORM(t) for t in held["text"]} & train_texts
    assert not set(held["image_id"].dropna()) & train_images
    assert held.groupby("speaker")["split"].nunique().max() == 1
    assert not set(held["speaker"]) & set(train_before["speaker"])  # still speaker-disjoint
    by_id = full.set_index("utt_id")
    for row in excluded.itertuples():
        src = by_id.loc[row.utt_id]
        assert (row.speaker, row.group, row.split) == (src["speaker"], src["group"], src["split"])
        if row.reason == "text_in_train":
            assert row.match == NORM(src["text"]) and row.match in train_texts
        else:
            assert row.reason == "image_in_train"
            assert row.match == src["image_id"] in train_images and NORM(src["text"]) not in train_texts


def test_disjoint_text_on_a_demo_shaped_corpus():
    utts = demo_shaped()
    manifest, excluded = make_splits(utts, ON, NORM, 13)
    assert_disjoint(utts, manifest, excluded)
    assert len(excluded) and set(excluded["reason"]) == {"text_in_train"}  # one picture per prompt: text first
    assert (manifest["split"] == "test").sum() >= 10 and (manifest["split"] == "dev").sum() >= 5
    # normalisation matters: some excluded utterances match a train transcript only after normalising
    train_raw = set(manifest.loc[manifest["split"] == "train", "text"])
    assert (~excluded["utt_id"].map(utts.set_index("utt_id")["text"]).isin(train_raw)).any()
    s = exclusion_summary(manifest, excluded, NORM, True)
    assert s["n_excluded"] == s["n_excluded_text_overlap"] == len(excluded) == s["dev_n_excluded"] + s["test_n_excluded"]
    assert s["n_excluded_image_overlap"] == 0
    assert s["dev_n_text_in_train"] == s["test_n_text_in_train"] == s["test_n_image_in_train"] == 0


def test_disjoint_text_on_a_torgo_shaped_corpus():
    utts = torgo_shaped()
    manifest, excluded = make_splits(utts, ON, NORM, 13)
    assert_disjoint(utts, manifest, excluded)
    held = manifest[manifest["split"] != "train"]
    assert held["text"].str.contains("own sentence", case=False).all()  # only the speakers' own prompts survive
    n_held_speakers = utts.shape[0] // 10 - manifest.loc[manifest["split"] == "train", "speaker"].nunique()
    assert len(excluded) == 7 * n_held_speakers and set(excluded["reason"]) == {"text_in_train"}
    assert set(excluded["match"]) == {NORM(t) for t in ("yes", "no", "The quick brown fox jumps.", "Up", "pat", "tap",
                                                        "Except in the winter")}


def test_disjoint_text_on_a_manifest_shaped_corpus():
    utts = manifest_shaped()
    manifest, excluded = make_splits(utts, ON, NORM, 13)
    assert_disjoint(utts, manifest, excluded)
    reasons = excluded.set_index("utt_id")["reason"].to_dict()
    for spk in "CDEG":
        assert reasons[f"{spk}0"] == reasons[f"{spk}2"] == "image_in_train"  # another description of a train picture
        assert reasons[f"{spk}4"] == "text_in_train"  # the shared prompt
        assert f"{spk}3" not in reasons and f"{spk}5" not in reasons  # own text, no picture: kept
    assert "E9" not in reasons  # an empty transcript matches nothing (train has one too: "um")
    s = exclusion_summary(manifest, excluded, NORM, True)
    assert (s["n_excluded_text_overlap"], s["n_excluded_image_overlap"]) == (4, 12)
    assert (s["dev_n_excluded_text_overlap"], s["test_n_excluded_image_overlap"]) == (2, 6)
    assert s["n_excluded"] + len(manifest) == len(utts)


def test_disjoint_text_that_empties_test_fails_with_the_remedy():
    utts = corpus(3, 3, utts=2)
    utts["text"] = ["a red ball", "a blue cup"] * (len(utts) // 2)
    utts["image_id"] = None
    with pytest.raises(ValueError, match=r"leaves the (dev|test) split empty: all \d+ .* \(\d+ text_in_train\); "
                                         r".*held out.*split.disjoint_text: false"):
        make_splits(utts, ON, NORM, 0)
    make_splits(utts, OFF, NORM, 0)  # off: the same corpus splits as before
    utts = manifest_shaped()
    utts.loc[utts["split"] == "test", "text"] = "a cat on a mat"  # every test utterance reads a train prompt
    utts.loc[utts["split"] == "test", "image_id"] = None
    with pytest.raises(ValueError, match=r"leaves the test split empty: all 13 test utterances .* \(13 text_in_train\); "
                                         r"use a corpus whose dev/test prompts .* or set split.disjoint_text: false"):
        make_splits(utts, ON, NORM, 13)


def test_disjoint_text_that_empties_a_group_of_test_fails():
    utts = manifest_shaped()
    utts.loc[(utts["speaker"] == "G"), "text"] = "a cat on a mat"  # every control test utterance is a train prompt
    with pytest.raises(ValueError, match="leaves no test utterance of group 'control'.*split.disjoint_text: false"):
        make_splits(utts, ON, NORM, 13)


def test_disjoint_text_off_changes_nothing():
    for utts in (demo_shaped(), torgo_shaped(), manifest_shaped(), corpus()):
        manifest, excluded = make_splits(utts, OFF, NORM, 13)
        assert manifest.equals(assign_splits(utts, OFF, 13))
        assert excluded.empty and list(excluded.columns) == EXCLUDED_COLUMNS
    utts = demo_shaped()
    manifest, excluded = make_splits(utts, OFF, NORM, 13)
    s = exclusion_summary(manifest, excluded, NORM, False)
    assert s["disjoint_text"] is False and s["n_excluded"] == s["n_excluded_text_overlap"] == 0
    assert s["test_n_text_in_train"] > 0  # the overlap is still counted, for the reader to discount


def test_cli_split_writes_the_split_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    utts = manifest_shaped()
    (tmp_path / "data/processed").mkdir(parents=True)
    utts.to_parquet(tmp_path / "data/processed/utterances.parquet", index=False)
    assert main(["split", "--cfg", json.dumps({"split": {"disjoint_text": False}})]) == 0
    off = pd.read_parquet("results/split/excluded.parquet")
    assert off.empty and list(off.columns) == EXCLUDED_COLUMNS
    assert len(pd.read_parquet("data/processed/manifest.parquet")) == len(utts)
    summary = json.loads(Path("results/metrics/split.json").read_text())
    assert summary["disjoint_text"] is False and summary["n_excluded_text_overlap"] == 0
    assert main(["split", "--cfg", json.dumps({"split": {"disjoint_text": True, "disjoint_picture": True}})]) == 0
    excluded = pd.read_parquet("results/split/excluded.parquet")
    manifest = pd.read_parquet("data/processed/manifest.parquet")
    summary = json.loads(Path("results/metrics/split.json").read_text())
    assert len(manifest) + len(excluded) == len(utts) and len(excluded) == 16
    assert summary["n_excluded_text_overlap"] == 4 and summary["n_excluded_image_overlap"] == 12
    assert summary["test_n_utts"] == int((manifest["split"] == "test").sum())


# ------------------------------------------------------------------ picture overlap counted, prompt partition


def test_default_policy_keeps_shared_pictures_and_counts_them():
    assert CFG["disjoint_text"] is True and CFG["disjoint_picture"] is False
    utts = manifest_shaped()
    manifest, excluded = make_splits(utts, TEXT_ONLY, NORM, 13)
    assert set(excluded["reason"]) == {"text_in_train"} and len(excluded) == 4  # only the shared prompt "a cat on a mat"
    held = manifest[manifest["split"] != "train"]
    train_images = set(manifest.loc[manifest["split"] == "train", "image_id"].dropna())
    assert held["image_id"].isin(train_images).sum() == 12  # the same scenes stay in dev/test ...
    s = exclusion_summary(manifest, excluded, NORM, True, False)
    assert s["disjoint_picture"] is False and s["n_excluded_image_overlap"] == 0
    assert s["dev_n_image_in_train"] == s["test_n_image_in_train"] == 6  # ... and are counted
    assert s["dev_n_image_not_in_train"] == s["test_n_image_not_in_train"] == 0


def test_picture_only_policy():
    utts = manifest_shaped()
    manifest, excluded = make_splits(utts, {**CFG, "disjoint_text": False, "disjoint_picture": True}, NORM, 13)
    assert set(excluded["reason"]) == {"image_in_train"} and len(excluded) == 12
    s = exclusion_summary(manifest, excluded, NORM, False, True)
    assert s["test_n_image_in_train"] == 0 and s["test_n_text_in_train"] == 2  # the shared prompt is kept, counted


def test_partition_makes_a_torgo_shaped_corpus_speaker_and_prompt_disjoint():
    utts = torgo_shaped()
    with pytest.raises(ValueError, match="leaves the (dev|test) split empty.*split.disjoint_text: partition"):
        make_splits(utts.assign(text=lambda d: ["yes", "no"] * (len(d) // 2)), TEXT_ONLY, NORM, 13)
    manifest, excluded = make_splits(utts, PARTITION, NORM, 13)
    texts = manifest["text"].map(NORM)
    train_prompts = set(texts[manifest["split"] == "train"])
    held_prompts = set(texts[manifest["split"] != "train"])
    assert train_prompts and held_prompts and not train_prompts & held_prompts  # prompt-disjoint
    full = assign_splits(utts, PARTITION, 13)
    assert not set(full.loc[full["split"] == "train", "speaker"]) & set(manifest.loc[manifest["split"] != "train", "speaker"])
    shared = {NORM(t) for t in ("yes", "no", "The quick brown fox jumps.", "Up", "pat", "tap", "Except in the winter")}
    held_shared = held_prompts & shared
    assert 1 <= len(held_shared) < len(shared)  # some of the common list is held out of train, not all of it
    reasons = excluded["reason"].value_counts().to_dict()
    n_train_spk = full.loc[full["split"] == "train", "speaker"].nunique()
    n_held_spk = full["speaker"].nunique() - n_train_spk
    assert reasons["text_held_out"] == len(held_shared) * n_train_spk  # held-out prompts leave the train speakers
    assert reasons["text_in_train"] == (len(shared) - len(held_shared)) * n_held_spk
    assert set(excluded.loc[excluded["reason"] == "text_held_out", "split"]) == {"train"}
    assert len(manifest) + len(excluded) == len(utts)
    s = exclusion_summary(manifest, excluded, NORM, "partition", False)
    assert s["disjoint_text"] == "partition" and s["n_excluded_text_held_out"] == reasons["text_held_out"]
    assert s["train_n_excluded"] == reasons["text_held_out"] and s["dev_n_text_in_train"] == s["test_n_text_in_train"] == 0
    assert s["n_prompts_train"] == len(train_prompts) and s["n_prompts_held_out"] == len(held_prompts)
    again, _ = make_splits(utts.sample(frac=1, random_state=1), PARTITION, NORM, 13)  # order does not matter
    assert set(again["utt_id"]) == set(manifest["utt_id"])
    other, _ = make_splits(utts, PARTITION, NORM, 14)
    assert set(other["utt_id"]) != set(manifest["utt_id"])  # the seed drives it


def test_partition_with_picture_policy_and_bad_policy():
    utts = manifest_shaped()
    manifest, excluded = make_splits(utts, {**PARTITION, "disjoint_picture": True}, NORM, 13)
    held = manifest[manifest["split"] != "train"]
    assert not set(held["image_id"].dropna()) & set(manifest.loc[manifest["split"] == "train", "image_id"].dropna())
    assert "image_in_train" in set(excluded["reason"])
    with pytest.raises(ValueError, match="must be true, false or partition"):
        make_splits(utts, {**CFG, "disjoint_text": "yes"}, NORM, 13)
    with pytest.raises(Exception, match="partition"):
        validate({"split": {"disjoint_text": "sometimes"}})
