"""Fusion of ASR and CLIP scores, α grid search on dev, test WER with oracle and a bootstrap interval.

fused(α) = (1-α)·softmax(asr_score) + α·softmax(τ·clip_cos), per utterance over its n-best list.
The beam search and every CLIP cosine are computed once upstream; here each hypothesis's word errors
against its reference are counted once (jiwer), so the whole α grid is array arithmetic over
(α, utterance, hypothesis). Corpus WER pools errors over utterances (icefall/ESPnet convention),
never averages per-utterance WERs.
"""

from __future__ import annotations

from dataclasses import dataclass

import jiwer
import numpy as np
import pandas as pd

from .text import normaliser


# ---------------------------------------------------------------- pure maths

def masked_softmax(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Softmax along the last axis over entries where ``mask`` is true (others get 0).
    A row with no valid entry is all zeros. Stable: the row maximum is subtracted first."""
    x = np.where(mask, scores, -np.inf)
    top = np.max(x, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.where(mask, np.exp(x - top), 0.0)
    total = e.sum(axis=-1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


def fuse(asr: np.ndarray, clip: np.ndarray, valid: np.ndarray, alphas: np.ndarray, tau: float) -> np.ndarray:
    """Fused probabilities, shape (A, U, H), for every α at once.

    ``asr`` and ``clip`` are (U, H) with ``valid`` marking real hypotheses; ``clip`` is NaN where the
    utterance has no picture, and such utterances keep their ASR probabilities for every α.
    """
    p_asr = masked_softmax(asr, valid)
    has_clip = valid & np.isfinite(clip)
    p_clip = masked_softmax(tau * np.nan_to_num(clip, nan=0.0), has_clip)
    a = np.asarray(alphas, dtype=np.float64)[:, None, None]
    fused = (1 - a) * p_asr[None] + a * p_clip[None]
    asr_only = ~has_clip.any(axis=1)
    fused[:, asr_only, :] = p_asr[None, asr_only, :]
    return np.where(valid[None], fused, -np.inf)


def choose(fused: np.ndarray) -> np.ndarray:
    """Index of the best hypothesis per (α, utterance); ties go to the better ASR rank (lower index)."""
    return np.argmax(fused, axis=-1)


def pooled_wer(errors: np.ndarray, ref_words: np.ndarray) -> float:
    """Corpus WER: all errors over all reference words."""
    total = float(np.sum(ref_words))
    return float(np.sum(errors)) / total if total else 0.0


def take(per_hyp: np.ndarray, choice: np.ndarray) -> np.ndarray:
    """Gather per-hypothesis values (U, H) at chosen indices (..., U) -> (..., U)."""
    u = np.arange(per_hyp.shape[0])
    return per_hyp[u, choice]


def grid_wer(choice: np.ndarray, errors: np.ndarray, ref_words: np.ndarray) -> np.ndarray:
    """Pooled WER for each row of choices (A, U) -> (A,)."""
    return take(errors, choice).sum(axis=-1) / max(1, ref_words.sum())


def best_alpha_index(wers: np.ndarray) -> int:
    """The lowest WER; among equals the first, i.e. the smallest α of an ascending grid."""
    return int(np.flatnonzero(wers == wers.min())[0])


def oracle_choice(errors: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The hypothesis with the fewest errors per utterance: the n-best lower bound."""
    return np.argmin(np.where(valid, errors, np.iinfo(np.int64).max), axis=-1)


def paired_bootstrap_ci(errors_a: np.ndarray, errors_b: np.ndarray, ref_words: np.ndarray, n_resamples: int,
                        seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of WER(b) - WER(a), resampling utterances with replacement (paired)."""
    if len(ref_words) == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ref_words), size=(n_resamples, len(ref_words)))
    words = ref_words[idx].sum(axis=1).clip(min=1)
    diff = (errors_b[idx].sum(axis=1) - errors_a[idx].sum(axis=1)) / words
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(diff, [tail, 100 - tail])
    return float(low), float(high)


def gap_closed(wer_asr: float, wer_fused: float, wer_oracle: float) -> float | None:
    """Share of the ASR-to-oracle gap that fusion closes (None when there is no gap)."""
    gap = wer_asr - wer_oracle
    return (wer_asr - wer_fused) / gap if gap > 0 else None


# ---------------------------------------------------------------- tables to arrays

@dataclass
class NBest:
    """An n-best table as padded arrays; U utterances x H hypothesis slots."""
    utt_ids: np.ndarray
    texts: np.ndarray       # (U, H) object, "" in padding
    asr: np.ndarray         # (U, H) float
    clip: np.ndarray        # (U, H) float, NaN without picture
    valid: np.ndarray       # (U, H) bool
    sub: np.ndarray         # (U, H) int: word errors of each hypothesis against the reference
    dele: np.ndarray
    ins: np.ndarray
    ref_words: np.ndarray   # (U,)

    @property
    def errors(self) -> np.ndarray:
        return self.sub + self.dele + self.ins


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


def to_arrays(nbest: pd.DataFrame, references: pd.Series, text_cfg: dict) -> NBest:
    """Pad an n-best table (sorted by utt_id, rank) into arrays and count every hypothesis's errors.

    ``references`` maps utt_id -> reference transcript; both sides are normalised the same way.
    """
    norm = normaliser(text_cfg)
    nb = nbest.sort_values(["utt_id", "rank"]).reset_index(drop=True)
    utt_ids = nb["utt_id"].unique()
    slot = nb.groupby("utt_id", sort=False).cumcount().to_numpy()
    row = pd.Index(utt_ids).get_indexer(nb["utt_id"])
    U, H = len(utt_ids), int(slot.max()) + 1 if len(nb) else 1
    texts = np.full((U, H), "", dtype=object)
    asr = np.full((U, H), -np.inf)
    clip = np.full((U, H), np.nan)
    valid = np.zeros((U, H), bool)
    hyp_norm = [norm(t) for t in nb["text"].fillna("")]
    texts[row, slot] = hyp_norm
    asr[row, slot] = nb["asr_score"].to_numpy(float)
    if "clip_cos" in nb:
        clip[row, slot] = pd.to_numeric(nb["clip_cos"], errors="coerce").to_numpy(float)
    valid[row, slot] = True
    refs_norm = [norm(str(references[u])) for u in utt_ids]
    s, d, i, words = count_errors([refs_norm[r] for r in row], hyp_norm)
    sub, dele, ins = (np.zeros((U, H), np.int64) for _ in range(3))
    sub[row, slot], dele[row, slot], ins[row, slot] = s, d, i
    return NBest(utt_ids, texts, asr, clip, valid, sub, dele, ins, np.array([len(r.split()) for r in refs_norm]))


# ---------------------------------------------------------------- the stage

def alpha_grid(cfg: dict) -> np.ndarray:
    """α values from params: start..stop inclusive in steps, rounded to avoid float drift."""
    n = int(round((cfg["alpha_stop"] - cfg["alpha_start"]) / cfg["alpha_step"])) + 1
    return np.round(cfg["alpha_start"] + cfg["alpha_step"] * np.arange(n), 6)


def no_picture_reason(n_dev_with_image: int, n_test_with_image: int, alpha: float) -> str | None:
    """Why the picture changes no test transcript (a corpus without pictures, or without them in test, or in
    dev so that α stays 0), or None when it can. Utterances without a picture are always scored ASR-only."""
    if n_test_with_image == 0:
        return ("no test utterance has a picture (or a CLIP score): every test utterance is scored ASR-only, "
                "so the fused WER equals the ASR-only WER and the α grid is flat")
    if n_dev_with_image == 0 and alpha == 0:
        return ("no dev utterance has a picture (or a CLIP score): α cannot be tuned on dev (the dev grid is flat) "
                "and stays 0, so the fused WER equals the ASR-only WER")
    return None


def run_fusion(nbest: pd.DataFrame, manifest: pd.DataFrame, cfg: dict, text_cfg: dict, seed: int):
    """Grid-search α on dev, report on test. Returns (grid table, metrics dict, changed table, per-speaker table).

    A corpus without pictures runs too: every utterance keeps its ASR scores, fused = ASR-only, and the
    metrics say so (``n_no_image``, ``fusion_skipped``, ``fusion_skip_reason``)."""
    alphas = alpha_grid(cfg)
    meta = manifest.set_index("utt_id")
    arrays = {}
    grid_rows = []
    for split in ("dev", "test"):
        ids = meta.index[meta["split"] == split]
        part = nbest[nbest["utt_id"].isin(ids)]
        if part.empty:
            raise ValueError(f"no n-best hypotheses for the {split} split: fusion needs dev (to tune α) and test")
        nb = to_arrays(part, meta["text"], text_cfg)
        choice = choose(fuse(nb.asr, nb.clip, nb.valid, alphas, cfg["tau"]))
        arrays[split] = (nb, choice)
        for a, ch in zip(alphas, choice):
            grid_rows.append({"alpha": float(a), "split": split, "wer": pooled_wer(take(nb.errors, ch), nb.ref_words),
                              "S": int(take(nb.sub, ch).sum()), "D": int(take(nb.dele, ch).sum()),
                              "I": int(take(nb.ins, ch).sum()), "ref_words": int(nb.ref_words.sum())})
    grid = pd.DataFrame(grid_rows)
    dev_wers = grid.loc[grid["split"] == "dev", "wer"].to_numpy()
    best = best_alpha_index(dev_wers)

    nb, choice = arrays["test"]
    asr_pick, fused_pick, oracle_pick = choice[0], choice[best], oracle_choice(nb.errors, nb.valid)
    err_asr, err_fused, err_oracle = (take(nb.errors, c) for c in (asr_pick, fused_pick, oracle_pick))
    wer_asr, wer_fused, wer_oracle = (pooled_wer(e, nb.ref_words) for e in (err_asr, err_fused, err_oracle))
    low, high = paired_bootstrap_ci(err_asr, err_fused, nb.ref_words, cfg["bootstrap_resamples"], seed)
    test_meta = meta.loc[nb.utt_ids]
    no_image = ~np.isfinite(np.where(nb.valid, nb.clip, np.nan)).any(axis=1)
    dev_nb = arrays["dev"][0]
    n_dev_no_image = int((~np.isfinite(np.where(dev_nb.valid, dev_nb.clip, np.nan)).any(axis=1)).sum())
    skip_reason = no_picture_reason(len(dev_nb.utt_ids) - n_dev_no_image, int((~no_image).sum()), float(alphas[best]))

    metrics = {
        "best_alpha": float(alphas[best]), "tau": float(cfg["tau"]),
        "dev_wer_asr": float(dev_wers[0]), "dev_wer_fused": float(dev_wers[best]),
        "dev_wer_oracle": pooled_wer(take(arrays["dev"][0].errors, oracle_choice(arrays["dev"][0].errors, arrays["dev"][0].valid)),
                                     arrays["dev"][0].ref_words),
        "test_wer_asr": wer_asr, "test_wer_fused": wer_fused, "test_wer_oracle": wer_oracle,
        "test_wer_diff": wer_fused - wer_asr, "test_wer_diff_ci_low": low, "test_wer_diff_ci_high": high,
        "test_gap_closed": gap_closed(wer_asr, wer_fused, wer_oracle),
        "n_dev_utts": int(len(arrays["dev"][0].utt_ids)), "n_test_utts": int(len(nb.utt_ids)),
        "n_no_image": int(no_image.sum()), "n_dev_no_image": n_dev_no_image,
        "fusion_skipped": skip_reason is not None, "fusion_skip_reason": skip_reason,
        "n_empty_hypotheses": int(((nb.texts == "") & nb.valid).sum()),
        "test_ref_words": int(nb.ref_words.sum()),
    }
    for name, pick in (("asr", asr_pick), ("fused", fused_pick), ("oracle", oracle_pick)):
        metrics[f"test_S_{name}"] = int(take(nb.sub, pick).sum())
        metrics[f"test_D_{name}"] = int(take(nb.dele, pick).sum())
        metrics[f"test_I_{name}"] = int(take(nb.ins, pick).sum())

    per_speaker = []
    for key in ("group", "speaker"):
        for value, idx in test_meta.reset_index().groupby(key).indices.items():
            words = nb.ref_words[idx]
            rec = {"level": key, "name": value, "n_utts": len(idx), "ref_words": int(words.sum()),
                   "wer_asr": pooled_wer(err_asr[idx], words), "wer_fused": pooled_wer(err_fused[idx], words),
                   "wer_oracle": pooled_wer(err_oracle[idx], words)}
            per_speaker.append(rec)
            if key == "group":
                for name in ("asr", "fused", "oracle"):
                    metrics[f"test_wer_{name}_{value}"] = rec[f"wer_{name}"]

    changed = np.flatnonzero(asr_pick != fused_pick)
    changed_df = pd.DataFrame({
        "utt_id": nb.utt_ids[changed], "speaker": test_meta["speaker"].to_numpy()[changed],
        "group": test_meta["group"].to_numpy()[changed], "image_id": test_meta["image_id"].to_numpy()[changed],
        "reference": [meta.at[u, "text"] for u in nb.utt_ids[changed]],
        "before": nb.texts[changed, asr_pick[changed]], "after": nb.texts[changed, fused_pick[changed]],
        "before_errors": err_asr[changed], "after_errors": err_fused[changed],
    })
    return grid, metrics, changed_df, pd.DataFrame(per_speaker)


def asr_only_wers(nbest: pd.DataFrame, manifest: pd.DataFrame, split: str, text_cfg: dict) -> dict:
    """Pooled WER of Whisper's best hypothesis and of the n-best oracle on ``split``: the n-best route's
    numbers that do not depend on fusion settings (for comparison with other systems)."""
    meta = manifest.set_index("utt_id")
    part = nbest[nbest["utt_id"].isin(meta.index[meta["split"] == split])]
    if part.empty:
        return {}
    nb = to_arrays(part, meta["text"], text_cfg)
    oracle = oracle_choice(nb.errors, nb.valid)
    return {f"{split}_wer_asr": pooled_wer(nb.errors[:, 0], nb.ref_words),
            f"{split}_wer_oracle": pooled_wer(take(nb.errors, oracle), nb.ref_words)}

