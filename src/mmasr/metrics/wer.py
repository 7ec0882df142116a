"""Word and character error rates: per-pair S/D/I counts (jiwer), corpus (pooled) WER and CER, and the
per-group / per-speaker WER table.

Corpus WER pools errors over utterances (icefall/ESPnet convention): all errors over all reference
words, never a mean of per-utterance WERs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jiwer
import numpy as np
import pandas as pd

__all__ = ["count_errors", "pooled_wer", "pooled_cer", "gap_closed", "group_wer_table"]


def pooled_wer(errors: np.ndarray, ref_words: np.ndarray) -> float:
    """Corpus WER: all errors over all reference words."""
    total = float(np.sum(ref_words))
    return float(np.sum(errors)) / total if total else 0.0


def count_errors(refs: list[str], hyps: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per pair (substitutions, deletions, insertions, reference words), from one jiwer alignment."""
    n = len(refs)
    sub, dele, ins = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    ref_words = np.array([len(r.split()) for r in refs], np.int64)
    scored = [i for i in range(n) if refs[i]]  # jiwer refuses empty references
    for i in range(n):
        if not refs[i]:
            ins[i] = len(hyps[i].split())
    if scored:
        out = jiwer.process_words([refs[i] for i in scored], [hyps[i] for i in scored])
        for i, chunks in zip(scored, out.alignments):
            for c in chunks:
                if c.type == "substitute":
                    sub[i] += c.ref_end_idx - c.ref_start_idx
                elif c.type == "delete":
                    dele[i] += c.ref_end_idx - c.ref_start_idx
                elif c.type == "insert":
                    ins[i] += c.hyp_end_idx - c.hyp_start_idx
    return sub, dele, ins, ref_words


def pooled_cer(refs: list[str], hyps: list[str]) -> float:
    """Corpus CER (jiwer's character alignment, spaces included): all character errors over all reference
    characters; a hypothesis against an empty reference counts its characters as insertions."""
    scored = [i for i in range(len(refs)) if refs[i]]  # jiwer refuses empty references
    errors = sum(len(hyps[i]) for i in range(len(refs)) if not refs[i])
    chars = 0
    if scored:
        out = jiwer.process_characters([refs[i] for i in scored], [hyps[i] for i in scored])
        errors += out.substitutions + out.deletions + out.insertions
        chars = out.hits + out.substitutions + out.deletions
    return pooled_wer(np.array([errors]), np.array([chars]))


def gap_closed(wer_asr: float, wer_fused: float, wer_oracle: float) -> float | None:
    """Share of the ASR-to-oracle gap that fusion closes (None when there is no gap)."""
    gap = wer_asr - wer_oracle
    return (wer_asr - wer_fused) / gap if gap > 0 else None


def group_wer_table(labels: pd.DataFrame, ref_words: np.ndarray, wers: Mapping[str, np.ndarray],
                    sums: Mapping[str, np.ndarray] | None = None,
                    levels: Sequence[str] = ("group", "speaker")) -> list[dict]:
    """Pooled WER per value of each ``levels`` column of ``labels`` (one row per utterance, in the order
    of the per-utterance arrays): one record per (level, value), values sorted within a level, with
    ``level, name, n_utts, ref_words``, then for each ``wers`` item its pooled WER (errors over the
    group's reference words) and for each ``sums`` item its total (an int, e.g. S/D/I counts)."""
    rows = []
    utts = labels.reset_index(drop=True)
    for level in levels:
        for name, idx in utts.groupby(level).indices.items():
            words = ref_words[idx]
            rows.append({"level": level, "name": name, "n_utts": len(idx), "ref_words": int(words.sum()),
                         **{col: pooled_wer(err[idx], words) for col, err in wers.items()},
                         **{col: int(v[idx].sum()) for col, v in (sums or {}).items()}})
    return rows
