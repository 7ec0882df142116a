"""The picture verdict: what the fused − ASR-only and the paired fused − swapped intervals (the same resamples,
:mod:`mmasr.metrics.intervals`) say about the picture, as a code and a sentence (fusion.json's ``picture_verdict``,
the report's verdict). A CLIP text encoder that simply prefers fluent, picture-like sentences passes fused − ASR-only
with any picture; only a fused system that also beats the same fusion with the pictures swapped shows the picture
helping."""

from __future__ import annotations

VERDICTS = {
    "picture_helps": "the picture helps: the fused system beats ASR-only and the same fusion with the pictures "
                     "swapped (both intervals below zero)",
    "text_prior": "CLIP's text prior helps, the picture does not: the fused system beats ASR-only, but not the same "
                  "fusion with the pictures swapped (the fused − swapped interval is not below zero)",
    "no_control": "rescoring helps (fused − ASR-only below zero), but the swap control could not run, so whether the "
                  "picture or CLIP's text prior helps is not shown",
    "not_shown": "nothing is shown: the fused − ASR-only interval is not below zero",
}


def picture_verdict(diff_ci: tuple[float | None, float | None] | None,
                    vs_swapped_ci: tuple[float | None, float | None] | None) -> tuple[str, str]:
    """(code, sentence) from the fused − ASR-only and the paired fused − swapped intervals: "the picture helps"
    only when both lie below zero; "CLIP's text prior helps, the picture does not" when fused − ASR-only does but
    fused − swapped does not; otherwise nothing is shown (also when only fused − swapped is below zero: the right
    picture beats a wrong one, but the system is not shown to beat Whisper alone)."""
    def below(ci) -> bool | None:
        return None if ci is None or None in ci else bool(ci[1] < 0)

    beats_asr, beats_swapped = below(diff_ci), below(vs_swapped_ci)
    if not beats_asr:
        code = "not_shown"
        sentence = VERDICTS[code] + (" (the right picture does beat a wrong one: fused − swapped is below zero)"
                                     if beats_swapped else "")
        return code, sentence
    code = "no_control" if beats_swapped is None else "picture_helps" if beats_swapped else "text_prior"
    return code, VERDICTS[code]
