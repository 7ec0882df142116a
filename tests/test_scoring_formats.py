"""Scores out in the field's formats (issue 28 item 6): sclite trn files with safe speaker codes, the S/D/I
table from the project's alignments, sclite's own totals equal to the project's, HyPoradise JSON."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pandas as pd
import pytest

from mmasr.data.text import normaliser

from mmasr.config import validate
from mmasr.rescoring.formats import (find_sclite, parse_sclite_raw, speaker_codes, trn_ids, trn_lines,
                                     write_scoring)
from mmasr.rescoring.fusion import run_fusion

P = validate({})
FUSION, TEXT = P["fusion"], P["text"]
# Speakers whose names sclite's -i rm would misread or merge: '-', '_', case, no letters at all.
SPEAKERS = ("F-01", "f01", "M_02", "MC 03", "??")
REFS = ["a red bear on the hill", "two green goats", "the cat sat on a mat", "three blue cups", "one small pear"]
# (ASR's first hypothesis, the right one): deletions, insertions, substitutions, an empty hypothesis
WRONG = ["a red pear on hill", "two green green goats eat", "a cat sat on mat today", "", "one pear small"]


def toy() -> tuple[pd.DataFrame, pd.DataFrame]:
    """dev and test utterances of five awkwardly named speakers; ASR ranks a wrong hypothesis first on two
    utterances in three and CLIP prefers the right one."""
    man, nb = [], []
    for split in ("dev", "test"):
        for i in range(15):
            utt, k = f"{split}_{i:02d} (take 1)", i % len(REFS)
            man.append({"utt_id": utt, "split": split, "text": REFS[k].capitalize() + ".",
                        "speaker": SPEAKERS[i % len(SPEAKERS)], "group": "impaired" if i % 2 else "control",
                        "image_id": f"img{k}"})
            hyps = [(WRONG[k], 0.2), (REFS[k], 0.3)] if i % 3 else [(REFS[k], 0.3), (WRONG[k], 0.2)]
            hyps.append((hyps[0][0].upper(), 0.1))  # a third hypothesis that normalises to the first
            for rank, (text, cos) in enumerate(hyps):
                n_tokens = len(text.split()) + 2  # with the prompt's end and end-of-text
                nb.append({"utt_id": utt, "rank": rank, "text": text, "asr_score": -0.1 - 0.05 * rank,
                           "sum_logprob": (-0.1 - 0.05 * rank) * n_tokens, "n_tokens": n_tokens, "clip_cos": cos})
    return pd.DataFrame(nb), pd.DataFrame(man)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    nb, man = toy()
    _, metrics, _, _ = run_fusion(nb, man, FUSION, TEXT, seed=0)
    out = tmp_path_factory.mktemp("scoring") / "scoring"
    summary = write_scoring(nb, man, metrics, TEXT, out, sclite=find_sclite())
    return out, summary, metrics, man


def test_speaker_codes_are_safe_distinct_without_case_and_stable():
    codes = speaker_codes(SPEAKERS + ("f01",))
    assert set(codes) == set(SPEAKERS)
    assert all(re.fullmatch(r"[a-z0-9]+", c) for c in codes.values())
    assert len({c.lower() for c in codes.values()}) == len(SPEAKERS)
    assert codes["F-01"] == "f01" and codes["f01"] == "f01x1" and codes["??"] == "spk1" and codes["MC 03"] == "mc03"
    assert speaker_codes(reversed(SPEAKERS)) == codes


def test_trn_ids_keep_speaker_first_and_never_collide():
    codes = speaker_codes(["A", "B"])
    ids = trn_ids(["u1", "u(1)", "u 1", "U1", "x_y-z"], ["A", "A", "A", "A", "B"], codes)
    assert ids[0] == "a-u1" and ids[4] == "b-x_y-z"
    assert len({i.lower() for i in ids}) == 5
    assert all(re.fullmatch(r"[a-z0-9]+-[A-Za-z0-9._-]+", i) for i in ids)
    assert trn_lines(["a  b", ""], ids[:2]) == f"a b ({ids[0]})\n({ids[1]})\n"
    with pytest.raises(ValueError, match="parenthesis"):
        trn_lines(["a (b)"], ["a-u1"])


def test_trn_files_ids_and_sdi_table_agree_with_the_fusion_stage(scored):
    out, summary, metrics, man = scored
    ids = pd.read_csv(out / "ids.tsv", sep="\t", dtype=str)
    assert len(ids) == len(man) and ids["trn_id"].str.lower().is_unique
    assert set(zip(ids["utt_id"], ids["speaker"])) == set(zip(man["utt_id"], man["speaker"]))  # reversible
    ref = (out / "test" / "ref.trn").read_text().splitlines()
    assert ref[0] == f"a red bear on the hill ({ids.loc[ids['split'] == 'test', 'trn_id'].iloc[0]})"
    assert any(line.startswith("(") for line in (out / "test" / "asr.trn").read_text().splitlines())  # empty hyp
    sdi = pd.read_csv(out / "sdi.tsv", sep="\t")
    for system in ("asr", "fused"):
        total = sdi[(sdi["split"] == "test") & (sdi["system"] == system) & (sdi["level"] == "all")].iloc[0]
        assert (total["S"], total["D"], total["I"]) == (metrics[f"test_S_{system}"], metrics[f"test_D_{system}"],
                                                        metrics[f"test_I_{system}"])
        assert total["wer"] == pytest.approx(metrics[f"test_wer_{system}"], abs=1e-6)
        per = sdi[(sdi["split"] == "test") & (sdi["system"] == system)]
        for level in ("group", "speaker"):
            assert per.loc[per["level"] == level, ["S", "D", "I", "ref_words"]].sum().tolist() == \
                   total[["S", "D", "I", "ref_words"]].tolist()
        assert set(per.loc[per["level"] == "speaker", "name"]) == set(SPEAKERS)
    assert metrics["test_wer_asr"] > 0 and summary["splits"]["test"]["fused"]["errors"] < \
        summary["splits"]["test"]["asr"]["errors"]


def test_hyporadise_json_per_split(scored):
    out, _, _, man = scored
    norm = normaliser(TEXT)  # HyPoradise's hypotheses and references are normalised text
    for split in ("dev", "test"):
        items = json.loads((out / "hyporadise" / f"{split}.json").read_text())
        assert len(items) == (man["split"] == split).sum()
        for item in items:
            assert set(item) == {"utt_id", "input", "output"}
            assert len(item["input"]) == 2 and len(set(item["input"])) == 2  # the upper-cased repeat is dropped
            assert item["output"] in [norm(r) for r in REFS]
    first = json.loads((out / "hyporadise" / "test.json").read_text())[0]
    assert first == {"utt_id": "test_00 (take 1)", "input": [norm(REFS[0]), norm(WRONG[0])], "output": norm(REFS[0])}


def test_a_fusion_json_from_other_data_is_refused(tmp_path):
    nb, man = toy()
    _, metrics, _, _ = run_fusion(nb, man, FUSION, TEXT, seed=0)
    with pytest.raises(ValueError, match="fusion.json and the n-best table disagree"):
        write_scoring(nb, man, {**metrics, "test_wer_fused": 0.5}, TEXT, tmp_path / "s")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("form", ["seed", "log_linear"])
def test_the_fused_trn_is_fuses_pick_in_either_form(tmp_path, form):
    """The fused trn holds the fusion stage's headline pick, whichever form gives the headline."""
    nb, man = toy()
    _, metrics, _, _ = run_fusion(nb, man, {**FUSION, "form": form}, TEXT, seed=0)
    assert metrics["fusion_form"] == form
    summary = write_scoring(nb, man, metrics, TEXT, tmp_path / "s")
    assert summary["fusion_form"] == form
    for split in ("dev", "test"):
        assert summary["splits"][split]["fused"]["wer"] == pytest.approx(metrics[f"{split}_wer_fused"], abs=1e-12)


def test_parse_sclite_raw_reads_the_sum_line():
    text = "        | Sum  |    4     12 |    8      1      3      2      6      4 |\n"
    assert parse_sclite_raw(text) == {"n_sent": 4, "ref_words": 12, "correct": 8, "S": 1, "D": 3, "I": 2,
                                      "errors": 6, "sentence_errors": 4}
    with pytest.raises(ValueError):
        parse_sclite_raw("nothing here")


def test_sclite_totals_equal_the_projects(scored):
    out, summary, _, _ = scored
    if summary["sclite"] is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but sclite is not installed (.ci/run installs the Debian package sctk)")
        pytest.skip("sclite not found (Debian package sctk: apt-get install sctk)")
    sdi = pd.read_csv(out / "sdi.tsv", sep="\t")
    for split in ("dev", "test"):
        for system in ("asr", "fused"):
            got = summary["splits"][split][system]["sclite"]
            ours = summary["splits"][split][system]
            assert got["errors"] == ours["errors"] and got["ref_words"] == summary["splits"][split]["ref_words"]
            # The split into S, D and I may differ: sclite weighs a substitution 4, an insertion or deletion 3
            # (so "one pear small" for "one small pear" is a deletion and an insertion), jiwer weighs all 1.
            assert got["S"] + got["D"] + got["I"] == got["errors"]
            assert got["n_sent"] == 15
            raw = (out / "sclite" / f"{split}_{system}.raw").read_text()
            assert (out / "sclite" / f"{split}_{system}.sys").is_file()
            # sclite's per-speaker rows are the project's per-speaker errors, speaker by speaker
            codes = speaker_codes(SPEAKERS)
            per = sdi[(sdi["split"] == split) & (sdi["system"] == system) & (sdi["level"] == "speaker")]
            for _, row in per.iterrows():
                m = re.search(rf"\|\s*{codes[row['name']]}\s*\|\s*(\d+)\s+(\d+)\s*\|(?:\s*\d+){{4}}\s+(\d+)", raw)
                assert m, f"speaker code {codes[row['name']]} not in {split}_{system}.raw"
                assert (int(m[2]), int(m[3])) == (row["ref_words"], row["errors"])
    assert summary["sclite_agrees"] is True
    assert np.isfinite(summary["splits"]["test"]["asr"]["wer"])


def test_the_score_formats_command_writes_the_folder_and_the_summary(tmp_path):
    from mmasr.cli import main

    nb, man = toy()
    _, metrics, _, _ = run_fusion(nb, man, FUSION, TEXT, seed=0)
    nb.to_parquet(tmp_path / "nbest.parquet")
    man.to_parquet(tmp_path / "manifest.parquet")
    (tmp_path / "fusion.json").write_text(json.dumps(metrics))
    args = ["score-formats", "--cfg", json.dumps({"nbest": {"splits": ["test"]}}), "--nbest", str(tmp_path / "nbest.parquet"),
            "--manifest", str(tmp_path / "manifest.parquet"), "--fusion-metrics", str(tmp_path / "fusion.json"),
            "--out", str(tmp_path / "scoring"), "--metrics", str(tmp_path / "scoring.json"), "--no-sclite"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "scoring.json").read_text())
    assert list(summary["splits"]) == ["test"] and summary["sclite"] is None and summary["sclite_agrees"] is None
    assert summary["splits"]["test"]["asr"]["wer"] == pytest.approx(metrics["test_wer_asr"])
    assert sorted(p.name for p in (tmp_path / "scoring").iterdir()) == ["hyporadise", "ids.tsv", "sdi.tsv", "test"]
