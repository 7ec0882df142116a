from mmasr.report.systems import systems_latex, systems_markdown, systems_rows

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
    assert "| zero-shot | ASR+CLIP | 25.0 [-8.0, -2.0] | 35.0 [-10.0, +0.0] | 15.0 [-9.0, -1.0] |" in md
    assert "| zero-shot | ASR+CLIP+LM | — | — | — |" in md
    tex = systems_latex(rows, "abc123")
    assert tex.startswith("% mmasr systems table; params_hash abc123")
    assert r"\toprule" in tex and r"\bottomrule" in tex and tex.count(r"\midrule") == 2
    assert r"adapted & ASR-only & 10.0 & 40.0 & 20.0 \\" in tex
