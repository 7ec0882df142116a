"""The table of systems for a paper: zero-shot and adapted Whisper x ASR-only, ASR+LM, ASR+CLIP, ASR+CLIP+LM,
test WER per group with the interval of each system's difference to its own model's ASR-only
(from ``fusion.json`` / ``fusion_adapted.json``), as Markdown and as LaTeX (booktabs)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# system -> (WER key stem, difference-interval key stems (overall, per group)). ASR-only is each model's reference;
# the adapted model's ASR-only row carries the interval against the zero-shot ASR-only (fuse --reference-nbest).
SYSTEMS = {
    "ASR-only": ("test_wer_asr", ("test_wer_asr_vs_reference_ci", "test_wer_asr_vs_reference_ci")),
    "ASR+LM": ("test_wer_asr_lm", ("test_wer_asr_lm_ci", "test_wer_asr_lm_diff_ci")),
    "ASR+CLIP": ("test_wer_fused", ("test_wer_diff_ci", "test_wer_diff_ci")),
    "ASR+CLIP+LM": ("test_wer_asr_clip_lm", ("test_wer_asr_clip_lm_ci", "test_wer_asr_clip_lm_diff_ci")),
}
GROUPS = ("all", "impaired", "control")


def cell(m: Mapping[str, Any], system: str, group: str) -> tuple[float | None, float | None, float | None]:
    """(WER, interval low, interval high) of one system in one group ("all": the whole test split); no interval
    (None) where the metrics hold none (the zero-shot ASR-only row)."""
    stem, ci = SYSTEMS[system]
    wer = m.get(stem if group == "all" else f"{stem}_{group}")
    if wer is None:
        return wer, None, None
    if group == "all":
        return wer, m.get(f"{ci[0]}_low"), m.get(f"{ci[0]}_high")
    return wer, m.get(f"{ci[1]}_low_{group}"), m.get(f"{ci[1]}_high_{group}")


def systems_rows(models: Mapping[str, Mapping[str, Any]]) -> list[dict]:
    """One row per (model, system): WER in % per group and the difference interval in points."""
    rows = []
    for model, m in models.items():
        for system in SYSTEMS:
            row = {"model": model, "system": system}
            for g in GROUPS:
                row[g] = cell(m, system, g)
            rows.append(row)
    return rows


def format_cell(c: tuple, dash: str) -> str:
    """``WER [low, high]`` in % and points (the same text in the Markdown and LaTeX tables and the report)."""
    wer, lo, hi = c
    if wer is None:
        return dash
    out = f"{100 * wer:.1f}"
    if lo is not None and hi is not None:
        out += f" [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    return out


def systems_markdown(rows: list[dict], params_hash: str) -> str:
    lines = [f"<!-- mmasr systems table; params_hash {params_hash} -->",
             "| model | system | WER all | WER impaired | WER control |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['system']} | " + " | ".join(format_cell(r[g], "—") for g in GROUPS) + " |" for r in rows]
    lines.append("")
    lines.append("Test WER in %; in brackets the 95% interval of the difference to the same model's ASR-only, in "
                 "points (speaker-level bootstrap when every group has 2+ speakers); for the adapted ASR-only row, "
                 "against the zero-shot ASR-only. Weights chosen on dev.")
    return "\n".join(lines) + "\n"


def systems_latex(rows: list[dict], params_hash: str) -> str:
    lines = [f"% mmasr systems table; params_hash {params_hash}", r"\begin{tabular}{llccc}", r"\toprule",
             r"Model & System & WER all & WER impaired & WER control \\", r"\midrule"]
    last = None
    for r in rows:
        if last is not None and r["model"] != last:
            lines.append(r"\midrule")
        cells = [format_cell(r[g], "--").replace("%", r"\%") for g in GROUPS]
        lines.append(f"{r['model'] if r['model'] != last else ''} & {r['system']} & " + " & ".join(cells) + r" \\")
        last = r["model"]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"
