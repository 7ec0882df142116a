"""The table of systems for a paper: zero-shot and adapted Whisper x ASR-only, ASR+LM, ASR+CLIP, ASR+CLIP+LM,
each fusion system in both forms (log-linear and the seed's softmax mixture, the headline form first), test WER
per group with the interval of each system's difference to its own model's ASR-only and the number of test
speakers beside it (from ``fusion.json`` / ``fusion_adapted.json``), as Markdown and as LaTeX (booktabs)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmasr.metrics.intervals import few_speakers_warning

# system -> (WER key stem, difference-interval key stems (overall, per group)). ASR-only is each model's reference;
# the adapted model's ASR-only row carries the interval against the zero-shot ASR-only (fuse --reference-nbest).
# These are the headline keys (the chosen form's); a fusion.json without ``fusion_form`` has only them.
SYSTEMS = {
    "ASR-only": ("test_wer_asr", ("test_wer_asr_vs_reference_ci", "test_wer_asr_vs_reference_ci")),
    "ASR+LM": ("test_wer_asr_lm", ("test_wer_asr_lm_ci", "test_wer_asr_lm_diff_ci")),
    "ASR+CLIP": ("test_wer_fused", ("test_wer_diff_ci", "test_wer_diff_ci")),
    "ASR+CLIP+LM": ("test_wer_asr_clip_lm", ("test_wer_asr_clip_lm_ci", "test_wer_asr_clip_lm_diff_ci")),
}
# system -> its name in fusion.json's per-form keys (``test_wer_{name}_{form}_form`` ...)
FORM_KEYS = {"ASR+LM": "asr_lm", "ASR+CLIP": "fused", "ASR+CLIP+LM": "asr_clip_lm"}
FORM_LABELS = {"log_linear": "log-linear", "seed": "seed"}
GROUPS = ("all", "impaired", "control")


def forms_of(m: Mapping[str, Any]) -> list[str | None]:
    """The forms a fusion.json reports, its headline form first; [None] for one written before the forms."""
    chosen = m.get("fusion_form")
    return [None] if chosen is None else [chosen, *(f for f in FORM_LABELS if f != chosen)]


def cell(m: Mapping[str, Any], system: str, group: str,
         form: str | None = None) -> tuple[float | None, float | None, float | None]:
    """(WER, interval low, interval high) of one system in one group ("all": the whole test split) and form (None:
    the headline keys); no interval (None) where the metrics hold none (the zero-shot ASR-only row)."""
    if form is None or system == "ASR-only":
        stem, ci = SYSTEMS[system]
    else:
        stem = f"test_wer_{FORM_KEYS[system]}_{form}_form"
        ci = (f"{stem}_ci", f"{stem}_diff_ci")
    wer = m.get(stem if group == "all" else f"{stem}_{group}")
    if wer is None:
        return wer, None, None
    if group == "all":
        return wer, m.get(f"{ci[0]}_low"), m.get(f"{ci[0]}_high")
    return wer, m.get(f"{ci[1]}_low_{group}"), m.get(f"{ci[1]}_high_{group}")


def systems_rows(models: Mapping[str, Mapping[str, Any]]) -> list[dict]:
    """One row per (model, system, form): WER in % per group and the difference interval in points; ASR-only has
    no form ("")."""
    rows = []
    for model, m in models.items():
        for system in SYSTEMS:
            for form in ([None] if system == "ASR-only" else forms_of(m)):
                row = {"model": model, "system": system, "form": FORM_LABELS.get(form, "")}
                for g in GROUPS:
                    row[g] = cell(m, system, g, form)
                rows.append(row)
    return rows


def speaker_counts(models: Mapping[str, Mapping[str, Any]]) -> dict[str, int | None]:
    """Test speakers per group ("all": the whole split) from the first model's metrics (every model is scored on
    the same test split); None where the metrics predate the count."""
    m = next(iter(models.values()), {})
    return {g: m.get("test_n_speakers" if g == "all" else f"test_n_speakers_{g}") for g in GROUPS}


def headers(counts: Mapping[str, int | None]) -> list[str]:
    """The WER columns' headings, each with its number of test speakers."""
    return [f"WER {g}" + (f" ({counts[g]} spk)" if counts.get(g) is not None else "") for g in GROUPS]


def format_cell(c: tuple, dash: str) -> str:
    """``WER [low, high]`` in % and points (the same text in the Markdown and LaTeX tables and the report)."""
    wer, lo, hi = c
    if wer is None:
        return dash
    out = f"{100 * wer:.1f}"
    if lo is not None and hi is not None:
        out += f" [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    return out


NOTE = ("Test WER in %; in brackets the 95% interval of the difference to the same model's ASR-only, in points "
        "(speaker-level bootstrap when every group has 2+ speakers; test speakers in each column's heading); for the "
        "adapted ASR-only row, against the zero-shot ASR-only. Each fusion system in both forms, the headline form "
        "(fusion.form) first: log-linear (Whisper's total log-probability + λ·τ·cos + λ·LM + β·tokens) and seed "
        "(softmax mixture). Weights chosen on dev.")


def systems_markdown(rows: list[dict], params_hash: str, counts: Mapping[str, int | None] | None = None) -> str:
    counts = counts or {}
    lines = [f"<!-- mmasr systems table; params_hash {params_hash} -->",
             "| model | system | form | " + " | ".join(headers(counts)) + " |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['system']} | {r['form'] or '—'} | "
              + " | ".join(format_cell(r[g], "—") for g in GROUPS) + " |" for r in rows]
    lines.append("")
    lines.append(NOTE)
    warning = few_speakers_warning({g: counts.get(g) for g in GROUPS[1:]})
    if warning:
        lines += ["", f"**Warning.** {warning}"]
    return "\n".join(lines) + "\n"


def systems_latex(rows: list[dict], params_hash: str, counts: Mapping[str, int | None] | None = None) -> str:
    counts = counts or {}
    lines = [f"% mmasr systems table; params_hash {params_hash}", r"\begin{tabular}{lllccc}", r"\toprule",
             "Model & System & Form & " + " & ".join(headers(counts)) + r" \\", r"\midrule"]
    last = None
    for r in rows:
        if last is not None and r["model"] != last:
            lines.append(r"\midrule")
        cells = [format_cell(r[g], "--").replace("%", r"\%") for g in GROUPS]
        lines.append(f"{r['model'] if r['model'] != last else ''} & {r['system']} & {r['form'] or '--'} & "
                     + " & ".join(cells) + r" \\")
        last = r["model"]
    lines.append(r"\bottomrule")
    warning = few_speakers_warning({g: counts.get(g) for g in GROUPS[1:]})
    if warning:
        lines.append(r"\multicolumn{6}{l}{\footnotesize " + warning.replace("%", r"\%") + r"} \\")
    lines.append(r"\end{tabular}")
    return "\n".join(lines) + "\n"
