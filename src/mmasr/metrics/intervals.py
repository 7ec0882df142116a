"""Bootstrap intervals of a WER difference between two systems scored on the same utterances: paired by
utterance, or two-stage by speaker (stratified by group), and the rule that picks which one to report."""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["paired_bootstrap_ci", "paired_bootstrap_draws", "speaker_bootstrap_ci", "speaker_bootstrap_draws",
           "min_speakers_per_group", "wer_diff_interval", "n_speakers", "FEW_SPEAKERS", "few_speakers_warning"]

FEW_SPEAKERS = 4  # below this many test speakers in a group, a speaker-level interval rests on very few draws

# The resamples depend only on the seed, the number of utterances and (speaker level) which utterances belong to
# which speaker and stratum, never on the errors: every difference computed with one seed on one test split is
# computed on the same resamples, so intervals of fused - ASR-only and fused - swapped are paired draw for draw
# (draws(b - a) - draws(c - a) == draws(b - c)).


def percentile_interval(draws: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def paired_bootstrap_draws(errors_a: np.ndarray, errors_b: np.ndarray, ref_words: np.ndarray, n_resamples: int,
                           seed: int) -> np.ndarray:
    """WER(b) - WER(a) on each of ``n_resamples`` utterance resamples (with replacement, paired)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ref_words), size=(n_resamples, len(ref_words)))
    words = ref_words[idx].sum(axis=1).clip(min=1)
    return (np.asarray(errors_b, np.float64)[idx].sum(axis=1) - np.asarray(errors_a, np.float64)[idx].sum(axis=1)) / words


def paired_bootstrap_ci(errors_a: np.ndarray, errors_b: np.ndarray, ref_words: np.ndarray, n_resamples: int,
                        seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of WER(b) - WER(a), resampling utterances with replacement (paired)."""
    if len(ref_words) == 0:
        return 0.0, 0.0
    return percentile_interval(paired_bootstrap_draws(errors_a, errors_b, ref_words, n_resamples, seed), level)


def speaker_bootstrap_ci(errors_a: np.ndarray, errors_b: np.ndarray, ref_words: np.ndarray, speakers: np.ndarray,
                         strata: np.ndarray | None, n_resamples: int, seed: int,
                         level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of :func:`speaker_bootstrap_draws`."""
    if len(ref_words) == 0:
        return 0.0, 0.0
    return percentile_interval(speaker_bootstrap_draws(errors_a, errors_b, ref_words, speakers, strata, n_resamples,
                                                       seed), level)


def speaker_bootstrap_draws(errors_a: np.ndarray, errors_b: np.ndarray, ref_words: np.ndarray, speakers: np.ndarray,
                            strata: np.ndarray | None, n_resamples: int, seed: int) -> np.ndarray:
    """Pooled WER(b) - WER(a) on each resample of a two-stage (cluster) bootstrap: each resample
    draws, within every stratum, as many speakers as it has, with replacement, then each drawn speaker's
    utterances with replacement; errors and reference words are summed over the resample (corpus WER).

    Drawing a speaker ``c`` times and then ``m`` of its ``m`` utterances each time gives its utterances
    multinomial(c·m, uniform) weights, so the statistic is computed from weights, vectorised over
    resamples (one pass per speaker). ``strata`` (e.g. the speaker's group; None: one stratum) keeps each
    resample's make-up fixed, as the test split was drawn stratified by group.
    """
    rng = np.random.default_rng(seed)
    speakers = np.asarray(speakers)
    strata = np.zeros(len(speakers), np.int64) if strata is None else np.asarray(strata)
    spk_ids, spk_of_utt = np.unique(speakers, return_inverse=True)
    stratum_of_spk = np.empty(len(spk_ids), dtype=strata.dtype)
    stratum_of_spk[spk_of_utt] = strata
    times = np.zeros((n_resamples, len(spk_ids)), np.int64)  # how often each speaker is drawn
    for stratum in np.unique(stratum_of_spk):
        members = np.flatnonzero(stratum_of_spk == stratum)
        draws = members[rng.integers(0, len(members), size=(n_resamples, len(members)))]
        np.add.at(times, (np.arange(n_resamples)[:, None], draws), 1)
    diff_err = np.asarray(errors_b, np.float64) - np.asarray(errors_a, np.float64)
    num, den = np.zeros(n_resamples), np.zeros(n_resamples)
    for s in range(len(spk_ids)):
        own = np.flatnonzero(spk_of_utt == s)
        weights = rng.multinomial(times[:, s] * len(own), np.full(len(own), 1 / len(own)))  # (R, m)
        num += weights @ diff_err[own]
        den += weights @ ref_words[own].astype(np.float64)
    return num / np.maximum(den, 1)


def min_speakers_per_group(speakers: np.ndarray, groups: np.ndarray) -> int:
    """The fewest distinct speakers any group has (0 when there are no utterances)."""
    if len(speakers) == 0:
        return 0
    return int(pd.DataFrame({"s": speakers, "g": groups}).groupby("g")["s"].nunique().min())


def n_speakers(speakers: np.ndarray) -> int:
    """Distinct speakers: the number of clusters a speaker-level interval resamples (with 2 there are only 3
    distinct draws of the pair, so such an interval says little)."""
    return int(len(np.unique(np.asarray(speakers)))) if len(speakers) else 0


def few_speakers_warning(counts: dict[str, int | None]) -> str | None:
    """One sentence naming the groups with fewer than :data:`FEW_SPEAKERS` test speakers (``counts``: group ->
    speakers; None entries are skipped), or None when there are none."""
    few = {g: n for g, n in counts.items() if n is not None and n < FEW_SPEAKERS}
    if not few:
        return None
    listed = ", ".join(f"{g} ({n})" for g, n in few.items())
    return (f"Fewer than {FEW_SPEAKERS} test speakers in {listed}: a speaker-level bootstrap there draws from very "
            "few speakers (with 2, only 3 distinct draws of the pair; with 1, none), so its interval says little.")


def wer_diff_interval(errors_a: np.ndarray, errors_b: np.ndarray, ref_words: np.ndarray, speakers: np.ndarray,
                      groups: np.ndarray, n_resamples: int, seed: int) -> dict:
    """The interval of WER(b) - WER(a) to report: speaker-level (stratified by group) when every group
    has at least 2 speakers, else utterance-level; both, and which one is the reported one."""
    utt = paired_bootstrap_ci(errors_a, errors_b, ref_words, n_resamples, seed)
    level = "speaker" if min_speakers_per_group(speakers, groups) >= 2 else "utterance"
    spk = speaker_bootstrap_ci(errors_a, errors_b, ref_words, speakers, groups, n_resamples, seed) \
        if level == "speaker" else utt
    return {"low": spk[0], "high": spk[1], "level": level, "low_utt": utt[0], "high_utt": utt[1]}
