import pandas as pd
import pytest

from mmasr.report.systems import speaker_counts, systems_latex, systems_markdown, systems_rows

M = {"test_wer_asr": 0.30, "test_wer_asr_impaired": 0.40, "test_wer_asr_control": 0.20,
     "test_wer_fused": 0.25, "test_wer_diff_ci_low": -0.08, "test_wer_diff_ci_high": -0.02,
     "test_wer_fused_impaired": 0.35, "test_wer_diff_ci_low_impaired": -0.1, "test_wer_diff_ci_high_impaired": 0.0,
     "test_wer_fused_control": 0.15, "test_wer_diff_ci_low_control": -0.09, "test_wer_diff_ci_high_control": -0.01,
     "test_wer_asr_lm": 0.28, "test_wer_asr_lm_ci_low": -0.05, "test_wer_asr_lm_ci_high": 0.01,
     "test_wer_asr_lm_impaired": 0.38, "test_wer_asr_lm_diff_ci_low_impaired": -0.04,
     "test_wer_asr_lm_diff_ci_high_impaired": 0.0, "test_wer_asr_clip_lm": None}


def test_systems_table_rows_markdown_and_booktabs():
    rows = systems_rows({"zero-shot": M, "adapted": {**M, "test_wer_asr": 0.1}})
    assert [r["system"] for r in rows[:4]] == ["ASR-only", "ASR+LM", "ASR+CLIP", "ASR+CLIP+LM"] and len(rows) == 8
    assert rows[2]["impaired"] == (0.35, -0.1, 0.0) and rows[0]["all"] == (0.30, None, None)
    assert rows[1]["control"] == (None, None, None) and rows[4]["all"][0] == 0.1
    md = systems_markdown(rows, "abc123")
    assert "params_hash abc123" in md.splitlines()[0]
    assert "| zero-shot | ASR+CLIP | — | 25.0 [-8.0, -2.0] | 35.0 [-10.0, +0.0] | 15.0 [-9.0, -1.0] |" in md
    assert "| zero-shot | ASR+CLIP+LM | — | — | — | — |" in md
    assert "| model | system | form | WER all | WER impaired | WER control |" in md and "Warning" not in md
    tex = systems_latex(rows, "abc123")
    assert tex.startswith("% mmasr systems table; params_hash abc123")
    assert r"\toprule" in tex and r"\bottomrule" in tex and tex.count(r"\midrule") == 2
    assert r"adapted & ASR-only & -- & 10.0 & 40.0 & 20.0 \\" in tex


def _toy(adapted_right: bool, n=12):
    man, nb = [], []
    for i in range(n):
        utt = f"t{i:02d}"
        man.append({"utt_id": utt, "split": "test", "text": "a red bear", "speaker": f"s{i % 4}",
                    "group": "impaired" if i % 2 else "control"})
        first = "a red bear" if (adapted_right or i % 3 == 0) else "a red pear"
        for rank, text in enumerate([first, "a red goat"]):
            nb.append({"utt_id": utt, "rank": rank, "text": text, "asr_score": -0.1 - rank})
    return pd.DataFrame(nb), pd.DataFrame(man)


def test_adapted_asr_only_against_the_zero_shot_with_intervals():
    from mmasr.config import validate
    from mmasr.rescoring.fusion import asr_only_vs_reference

    p = validate({})
    adapted, man = _toy(True)
    zero, _ = _toy(False)
    m = asr_only_vs_reference(adapted, zero, man, p["text"], 200, 0)
    # zero-shot: 8 of 12 utterances have 1 error in 3 words; adapted: none
    assert m["test_wer_asr_reference"] == pytest.approx(8 / 36)
    assert m["test_wer_asr_vs_reference"] == pytest.approx(-8 / 36)
    assert m["test_wer_asr_vs_reference_ci_level"] == "speaker"
    assert m["test_wer_asr_vs_reference_ci_low"] <= -8 / 36 <= m["test_wer_asr_vs_reference_ci_high"] < 0
    for g in ("impaired", "control"):
        assert m[f"test_wer_asr_vs_reference_{g}"] == pytest.approx(-4 / 18)
        assert m[f"test_wer_asr_vs_reference_ci_high_{g}"] < 0
    # the same model against itself: no difference, a zero-width interval
    same = asr_only_vs_reference(zero, zero, man, p["text"], 200, 0)
    assert same["test_wer_asr_vs_reference"] == 0 == same["test_wer_asr_vs_reference_ci_low"]
    # the adapted ASR-only row of the table carries that interval; the zero-shot one has none
    rows = systems_rows({"zero-shot": M, "adapted": {**M, **m}})
    assert rows[4]["all"][1:] == (m["test_wer_asr_vs_reference_ci_low"], m["test_wer_asr_vs_reference_ci_high"])
    assert rows[4]["impaired"][1] == m["test_wer_asr_vs_reference_ci_low_impaired"] and rows[0]["all"][1] is None
    with pytest.raises(ValueError, match="different test utterances"):
        asr_only_vs_reference(adapted[adapted["utt_id"] != "t00"], zero, man, p["text"], 10, 0)


def test_both_forms_headline_first_with_speakers_and_a_warning():
    both = {**M, "fusion_form": "seed", "test_n_speakers": 5, "test_n_speakers_impaired": 2,
            "test_n_speakers_control": 3}
    for form, wer in (("seed", 0.25), ("log_linear", 0.22)):
        stem = f"test_wer_fused_{form}_form"
        both.update({stem: wer, f"{stem}_ci_low": -0.08, f"{stem}_ci_high": -0.02, f"{stem}_impaired": wer + 0.1,
                     f"{stem}_diff_ci_low_impaired": -0.1, f"{stem}_diff_ci_high_impaired": 0.0})
    rows = systems_rows({"zero-shot": both})
    assert [(r["system"], r["form"]) for r in rows] == [
        ("ASR-only", ""), ("ASR+LM", "seed"), ("ASR+LM", "log-linear"), ("ASR+CLIP", "seed"),
        ("ASR+CLIP", "log-linear"), ("ASR+CLIP+LM", "seed"), ("ASR+CLIP+LM", "log-linear")]
    assert rows[4]["all"] == (0.22, -0.08, -0.02) and rows[4]["impaired"] == (pytest.approx(0.32), -0.1, 0.0)
    counts = speaker_counts({"zero-shot": both})
    assert counts == {"all": 5, "impaired": 2, "control": 3}
    md = systems_markdown(rows, "h", counts)
    assert "| model | system | form | WER all (5 spk) | WER impaired (2 spk) | WER control (3 spk) |" in md
    assert "| zero-shot | ASR+CLIP | log-linear | 22.0 [-8.0, -2.0] | 32.0 [-10.0, +0.0] | — |" in md
    assert "**Warning.** Fewer than 4 test speakers in impaired (2), control (3)" in md
    tex = systems_latex(rows, "h", counts)
    assert r"\footnotesize Fewer than 4 test speakers in impaired (2), control (3)" in tex
    assert "WER impaired (2 spk)" in tex
    many = speaker_counts({"m": {**both, "test_n_speakers_impaired": 4, "test_n_speakers_control": 9}})
    assert "Warning" not in systems_markdown(rows, "h", many)
