"""Fusion of ASR and CLIP scores, α grid search on dev, test WER with oracle and a bootstrap interval.

fused(α) = (1-α)·softmax(asr_score) + α·softmax(τ·clip_cos), per utterance over its n-best list.
With the frozen LM's ``lm_score`` (:mod:`mmasr.rescoring.lm`) a second search runs over weight triples on a
simplex grid: w_asr·softmax(asr) + w_clip·softmax(τ·cos) + w_lm·softmax(lm); its w_lm = 0 edge is the α grid
(bit for bit), its w_clip = 0 edge the ASR+LM system.
The beam search and every CLIP cosine are computed once upstream; here each hypothesis's word errors
against its reference are counted once (jiwer), so the whole α grid is array arithmetic over
(α, utterance, hypothesis). Corpus WER pools errors over utterances (icefall/ESPnet convention),
never averages per-utterance WERs (:mod:`mmasr.metrics.wer`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mmasr.data.text import normalise, normaliser
from mmasr.metrics.intervals import wer_diff_interval
from mmasr.metrics.wer import count_errors, gap_closed, group_wer_table, pooled_cer, pooled_wer
from mmasr.rescoring.picture_overlap import picture_overlap_metrics


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


def simplex_grid(step: float) -> np.ndarray:
    """Weight triples (w_asr, w_clip, w_lm) >= 0 summing to 1 in steps of ``step``, shape (W, 3), ordered by
    w_lm then w_clip (so the first of equal dev WERs is the simplest system: no LM, then the least picture).
    w_clip and w_lm are rounded as :func:`alpha_grid` rounds α, and w_asr = 1 - w_clip - w_lm, so the
    w_lm = 0 rows carry exactly the α grid's weights."""
    n = int(round(1.0 / step))
    rows = [(j, k) for k in range(n + 1) for j in range(n + 1 - k)]
    clip = np.round(step * np.array([j for j, _ in rows], np.float64), 6)
    lm = np.round(step * np.array([k for _, k in rows], np.float64), 6)
    return np.stack([np.clip(1 - clip - lm, 0.0, 1.0), clip, lm], axis=1)


def fuse_simplex(asr: np.ndarray, clip: np.ndarray, lm: np.ndarray, valid: np.ndarray, weights: np.ndarray,
                 tau: float) -> np.ndarray:
    """Fused probabilities (W, U, H) for every weight triple at once (one array expression).

    An utterance without a CLIP score (no picture) or without LM scores gives that term's weight to ASR; with
    w_lm = 0 the arithmetic is that of :func:`fuse` term for term, so the choices are identical."""
    p_asr = masked_softmax(asr, valid)
    has_clip = valid & np.isfinite(clip)
    has_lm = valid & np.isfinite(lm)
    p_clip = masked_softmax(tau * np.nan_to_num(clip, nan=0.0), has_clip)
    p_lm = masked_softmax(np.nan_to_num(lm, nan=0.0), has_lm)
    w = np.asarray(weights, np.float64)
    w_clip = np.where(has_clip.any(axis=1)[None, :, None], w[:, 1, None, None], 0.0)  # (W, U, 1)
    w_lm = np.where(has_lm.any(axis=1)[None, :, None], w[:, 2, None, None], 0.0)
    fused = (1 - w_clip - w_lm) * p_asr[None] + w_clip * p_clip[None] + w_lm * p_lm[None]
    return np.where(valid[None], fused, -np.inf)


def choose(fused: np.ndarray) -> np.ndarray:
    """Index of the best hypothesis per (α, utterance); ties go to the better ASR rank (lower index)."""
    return np.argmax(fused, axis=-1)


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


def picture_derangement(image_ids: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """A random permutation ``perm`` with ``image_ids[perm[i]] != image_ids[i]`` for every i: each
    utterance gets another utterance's picture, never one showing its own picture (utterances can share
    a picture). None when impossible (fewer than 2 items, or one picture held by more than half).

    A uniform permutation is repaired one fixed point at a time by swapping targets with a position j
    where neither side then keeps its own picture; with no picture above half such a j always exists and
    a swap creates no new fixed point, so one pass suffices.
    """
    image_ids = np.asarray(image_ids)
    n = len(image_ids)
    if n < 2 or pd.Series(image_ids).value_counts().iloc[0] * 2 > n:
        return None
    perm = rng.permutation(n)
    for i in np.flatnonzero(image_ids[perm] == image_ids):
        if image_ids[perm[i]] != image_ids[i]:
            continue  # freed by an earlier swap
        ok = (image_ids[perm] != image_ids[i]) & (image_ids != image_ids[perm[i]])
        j = rng.choice(np.flatnonzero(ok))
        perm[i], perm[j] = perm[j], perm[i]
    assert not np.any(image_ids[perm] == image_ids)
    return perm


def swapped_cosines(text_vecs: np.ndarray, has_text: np.ndarray, image_vecs: np.ndarray) -> np.ndarray:
    """Cosine of each hypothesis (text_vecs (U, H, D), L2-normalised) with a picture per utterance
    (image_vecs (U, D)); NaN where ``has_text`` is false."""
    return np.where(has_text, np.einsum("uhd,ud->uh", text_vecs, image_vecs), np.nan)


def raw_text(text: str) -> str:
    """Scoring with normalisation off: lower-cased (and NFC, one apostrophe), punctuation, repeats and
    fillers kept."""
    return normalise(text, remove_punctuation=False, collapse_repeats=False, remove_fillers=False,
                     numbers_as_words=False)


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
    raw: np.ndarray | None = None         # (U, H) object: the hypothesis text as decoded
    clip_texts: np.ndarray | None = None  # (U, H) object: what CLIP read (``clip_text``), None without it
    lm: np.ndarray | None = None          # (U, H) float: ``lm_score``, NaN without it

    @property
    def errors(self) -> np.ndarray:
        return self.sub + self.dele + self.ins


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
    raw = np.full((U, H), "", dtype=object)
    raw[row, slot] = nb["text"].fillna("").astype(str).to_numpy()
    clip_texts = None
    if "clip_text" in nb:
        clip_texts = np.full((U, H), None, dtype=object)
        clip_texts[row, slot] = nb["clip_text"].to_numpy()
    lm = np.full((U, H), np.nan)
    if "lm_score" in nb:
        lm[row, slot] = pd.to_numeric(nb["lm_score"], errors="coerce").to_numpy(float)
    refs_norm = [norm(str(references[u])) for u in utt_ids]
    s, d, i, words = count_errors([refs_norm[r] for r in row], hyp_norm)
    sub, dele, ins = (np.zeros((U, H), np.int64) for _ in range(3))
    sub[row, slot], dele[row, slot], ins[row, slot] = s, d, i
    return NBest(utt_ids, texts, asr, clip, valid, sub, dele, ins, np.array([len(r.split()) for r in refs_norm]),
                 raw, clip_texts, lm)


# ---------------------------------------------------------------- the stage

def alpha_grid(cfg: dict) -> np.ndarray:
    """α values from params: start..stop inclusive in steps, rounded to avoid float drift."""
    n = int(round((cfg["alpha_stop"] - cfg["alpha_start"]) / cfg["alpha_step"])) + 1
    return np.round(cfg["alpha_start"] + cfg["alpha_step"] * np.arange(n), 6)


def group_intervals(group: str, idx: np.ndarray, err_asr: np.ndarray, err_fused: np.ndarray,
                    err_swapped: np.ndarray | None, ref_words: np.ndarray, speakers: np.ndarray, n_resamples: int,
                    seed: int) -> dict:
    """One group's fused − ASR-only difference and its interval (speaker-level with ≥ 2 speakers in the
    group, else utterance-level), and the swap control's interval."""
    words, spk, one = ref_words[idx], speakers[idx], np.zeros(len(idx), np.int64)
    ci = wer_diff_interval(err_asr[idx], err_fused[idx], words, spk, one, n_resamples, seed)
    out = {f"test_wer_diff_{group}": pooled_wer(err_fused[idx], words) - pooled_wer(err_asr[idx], words),
           f"test_wer_diff_ci_low_{group}": ci["low"], f"test_wer_diff_ci_high_{group}": ci["high"],
           f"test_wer_diff_ci_level_{group}": ci["level"]}
    if err_swapped is not None:
        sw = wer_diff_interval(err_asr[idx], err_swapped[idx], words, spk, one, n_resamples, seed)
        out[f"test_wer_fused_swapped_ci_low_{group}"] = sw["low"]
        out[f"test_wer_fused_swapped_ci_high_{group}"] = sw["high"]
    return out


def system_group_interval(name: str, group: str, idx: np.ndarray, err_asr: np.ndarray, err: np.ndarray,
                          ref_words: np.ndarray, speakers: np.ndarray, n_resamples: int, seed: int) -> dict:
    """One group's interval of system ``name`` − ASR-only (levels as :func:`group_intervals`)."""
    ci = wer_diff_interval(err_asr[idx], err[idx], ref_words[idx], speakers[idx], np.zeros(len(idx), np.int64),
                           n_resamples, seed)
    return {f"test_wer_{name}_diff_ci_low_{group}": ci["low"], f"test_wer_{name}_diff_ci_high_{group}": ci["high"]}


def other_scorings(nb: NBest, references: list[str], picks: dict[str, np.ndarray], text_cfg: dict) -> dict:
    """CER (normalised text) and WER with normalisation off (lower-cased only) of each system's picks,
    for comparison with papers that score differently."""
    norm = normaliser(text_cfg)
    refs_norm = [norm(r) for r in references]
    refs_raw = [raw_text(r) for r in references]
    out = {}
    for name, pick in picks.items():
        out[f"test_cer_{name}"] = pooled_cer(refs_norm, list(take(nb.texts, pick)))
        sub, dele, ins, words = count_errors(refs_raw, [raw_text(t) for t in take(nb.raw, pick)])
        out[f"test_wer_{name}_raw"] = pooled_wer(sub + dele + ins, words)
    return out


def fixed_alpha_choice(nb: NBest, alpha: float, tau: float, clip: np.ndarray | None = None) -> np.ndarray:
    """Choices (U,) at one α, independent of the grid: α = 0 is Whisper's own pick (ASR-only), α = 1 the
    picture alone."""
    return choose(fuse(nb.asr, nb.clip if clip is None else clip, nb.valid, np.array([alpha]), tau))[0]


def swap_choices(nb: NBest, image_ids: np.ndarray, images: dict[str, np.ndarray], texts: dict[str, np.ndarray],
                 alpha: float, tau: float, n_permutations: int, seed: int) -> np.ndarray | None:
    """The picture-swap control: choices (K, U) at ``alpha`` when every utterance with a picture is scored
    against another utterance's picture (K seeded derangements over the pictured utterances, never one
    showing its own picture); utterances without a picture stay ASR-only. None when no derangement
    exists (fewer than 2 pictured utterances, or one picture held by more than half of them).

    The swapped cosines come from the CLIP embeddings ``clip-scores`` already computed: ``images`` is the
    picture cache (image_id -> vector), ``texts`` the hypothesis-text cache (clip_text -> vector). They
    must reproduce each hypothesis's stored ``clip_cos`` with its own picture, else the caches are stale.
    """
    pictured = np.flatnonzero(np.isfinite(nb.clip).any(axis=1))
    if len(pictured) < 2:
        return None
    if nb.clip_texts is None:
        raise ValueError("the n-best table has no clip_text column: the picture-swap control needs clip-scores' output")
    pics = np.asarray(image_ids, dtype=object)[pictured]
    absent = sorted({str(i) for i in pics if i not in images})
    if absent:
        raise ValueError(f"{len(absent)} picture(s) with CLIP cosines are not in the picture-embedding cache "
                         f"(e.g. {absent[0]}): re-run cache-images and clip-scores")
    has_text = np.isfinite(nb.clip[pictured])
    keys = nb.clip_texts[pictured][has_text]
    distinct = sorted(set(keys))
    unknown = [k for k in distinct if k not in texts]
    if unknown:
        raise ValueError(f"{len(unknown)} hypothesis text(s) with a CLIP cosine have no stored text embedding "
                         f"(e.g. {unknown[0]!r}): re-run clip-scores")
    table = np.stack([texts[k] for k in distinct]).astype(np.float32)
    text_vecs = np.zeros((len(pictured), nb.clip.shape[1], table.shape[1]), np.float32)
    text_vecs[has_text] = table[pd.Index(distinct).get_indexer(keys)]
    own = np.stack([images[i] for i in pics]).astype(np.float32)
    if not np.allclose(swapped_cosines(text_vecs, has_text, own)[has_text], nb.clip[pictured][has_text], atol=1e-4):
        raise ValueError("the stored CLIP embeddings do not reproduce clip_cos: the caches are stale (re-run clip-scores)")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_permutations):
        perm = picture_derangement(pics, rng)
        if perm is None:
            return None
        clip = nb.clip.copy()
        clip[pictured] = swapped_cosines(text_vecs, has_text, own[perm])
        out.append(fixed_alpha_choice(nb, alpha, tau, clip))
    return np.stack(out)


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


LM_SYSTEMS = {"asr_lm": "ASR+LM", "asr_clip_lm": "ASR+CLIP+LM"}


def has_lm_scores(nb: NBest) -> bool:
    return nb.lm is not None and bool(np.isfinite(np.where(nb.valid, nb.lm, np.nan)).any())


def lm_systems(dev_nb: NBest, nb: NBest, step: float, tau: float) -> tuple[dict, dict[str, np.ndarray]]:
    """The simplex search on dev and its two LM systems on test: ASR+LM (the w_clip = 0 edge) and ASR+CLIP+LM
    (the whole simplex), each at its dev-best weights (ties: the first of :func:`simplex_grid`'s order).
    Returns (metrics, test choices per system)."""
    weights = simplex_grid(step)
    dev_wers = grid_wer(choose(fuse_simplex(dev_nb.asr, dev_nb.clip, dev_nb.lm, dev_nb.valid, weights, tau)),
                        dev_nb.errors, dev_nb.ref_words)
    metrics, picks = {"n_weight_triples": int(len(weights))}, {}
    for name, allowed in (("asr_lm", weights[:, 1] == 0), ("asr_clip_lm", np.ones(len(weights), bool))):
        rows = np.flatnonzero(allowed)
        best = rows[best_alpha_index(dev_wers[rows])]
        w = weights[best:best + 1]
        picks[name] = choose(fuse_simplex(nb.asr, nb.clip, nb.lm, nb.valid, w, tau))[0]
        metrics[f"weights_{name}"] = [float(x) for x in w[0]]  # (w_asr, w_clip, w_lm)
        metrics[f"dev_wer_{name}"] = float(dev_wers[best])
    return metrics, picks


def run_fusion(nbest: pd.DataFrame, manifest: pd.DataFrame, cfg: dict, text_cfg: dict, seed: int,
               embeddings: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None):
    """Grid-search α on dev, report on test. Returns (grid table, metrics dict, changed table, per-speaker table).

    ``embeddings`` (picture cache, hypothesis-text cache) enable the picture-swap control; without them
    its keys are None. A corpus without pictures runs too: every utterance keeps its ASR scores, fused =
    ASR-only, and the metrics say so (``n_no_image``, ``fusion_skipped``, ``fusion_skip_reason``)."""
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
    dev_nb = arrays["dev"][0]
    tau, n_boot = cfg["tau"], cfg["bootstrap_resamples"]
    # ASR-only and the oracle do not depend on the grid (which need not start at α = 0).
    asr_pick, fused_pick, oracle_pick = fixed_alpha_choice(nb, 0.0, tau), choice[best], oracle_choice(nb.errors, nb.valid)
    alpha1_pick = fixed_alpha_choice(nb, 1.0, tau)
    err_asr, err_fused, err_oracle, err_alpha1 = (take(nb.errors, c) for c in (asr_pick, fused_pick, oracle_pick,
                                                                                alpha1_pick))
    wer_asr, wer_fused, wer_oracle = (pooled_wer(e, nb.ref_words) for e in (err_asr, err_fused, err_oracle))
    test_meta = meta.loc[nb.utt_ids]
    speakers, groups = test_meta["speaker"].astype(str).to_numpy(), test_meta["group"].astype(str).to_numpy()
    ci = wer_diff_interval(err_asr, err_fused, nb.ref_words, speakers, groups, n_boot, seed)
    swap = None if embeddings is None else swap_choices(
        nb, test_meta["image_id"].to_numpy(), embeddings[0], embeddings[1], float(alphas[best]), tau,
        cfg["swap_permutations"], seed)
    err_swapped = None if swap is None else take(nb.errors, swap).mean(axis=0)  # mean errors over permutations
    swap_ci = None if swap is None else wer_diff_interval(err_asr, err_swapped, nb.ref_words, speakers, groups,
                                                          n_boot, seed)
    no_image = ~np.isfinite(np.where(nb.valid, nb.clip, np.nan)).any(axis=1)
    n_dev_no_image = int((~np.isfinite(np.where(dev_nb.valid, dev_nb.clip, np.nan)).any(axis=1)).sum())
    skip_reason = no_picture_reason(len(dev_nb.utt_ids) - n_dev_no_image, int((~no_image).sum()), float(alphas[best]))

    metrics = {
        "best_alpha": float(alphas[best]), "tau": float(cfg["tau"]),
        "dev_wer_asr": pooled_wer(take(dev_nb.errors, fixed_alpha_choice(dev_nb, 0.0, tau)), dev_nb.ref_words),
        "dev_wer_fused": float(dev_wers[best]),
        "dev_wer_oracle": pooled_wer(take(arrays["dev"][0].errors, oracle_choice(arrays["dev"][0].errors, arrays["dev"][0].valid)),
                                     arrays["dev"][0].ref_words),
        "test_wer_asr": wer_asr, "test_wer_fused": wer_fused, "test_wer_oracle": wer_oracle,
        "test_wer_diff": wer_fused - wer_asr, "test_wer_diff_ci_low": ci["low"], "test_wer_diff_ci_high": ci["high"],
        "test_wer_diff_ci_level": ci["level"],
        "test_wer_diff_ci_low_utt": ci["low_utt"], "test_wer_diff_ci_high_utt": ci["high_utt"],
        "test_wer_alpha1": pooled_wer(err_alpha1, nb.ref_words),
        "test_wer_fused_swapped": None if swap is None else pooled_wer(err_swapped, nb.ref_words),
        "test_wer_fused_swapped_ci_low": None if swap is None else swap_ci["low"],
        "test_wer_fused_swapped_ci_high": None if swap is None else swap_ci["high"],
        "test_swap_permutations": 0 if swap is None else len(swap),
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
    metrics.update(picture_overlap_metrics(meta, nb.utt_ids, {"asr": err_asr, "fused": err_fused}, nb.ref_words))
    metrics.update(other_scorings(nb, [str(meta.at[u, "text"]) for u in nb.utt_ids],
                                  {"asr": asr_pick, "fused": fused_pick}, text_cfg))

    per_utt = {"asr": err_asr, "fused": err_fused, "oracle": err_oracle, "alpha1": err_alpha1}
    if swap is not None:
        per_utt["fused_swapped"] = err_swapped
    lm_errs = {}
    if has_lm_scores(dev_nb) and has_lm_scores(nb):
        lm_metrics, lm_picks = lm_systems(dev_nb, nb, cfg["alpha_step"], tau)
        metrics.update(lm_metrics, lm_skipped=False, lm_skip_reason=None)
        for name, pick in lm_picks.items():
            err = lm_errs[name] = per_utt[name] = take(nb.errors, pick)
            sys_ci = wer_diff_interval(err_asr, err, nb.ref_words, speakers, groups, n_boot, seed)
            metrics.update({f"test_wer_{name}": pooled_wer(err, nb.ref_words), f"test_wer_{name}_ci_low": sys_ci["low"],
                            f"test_wer_{name}_ci_high": sys_ci["high"], f"test_wer_{name}_ci_level": sys_ci["level"]})
    else:
        reason = "no lm_score in the n-best table (fusion.lm_enabled off, or lm-scores not run)"
        metrics.update(lm_skipped=True, lm_skip_reason=reason)
        for name in LM_SYSTEMS:
            metrics.update({f"test_wer_{name}": None, f"test_wer_{name}_ci_low": None, f"test_wer_{name}_ci_high": None})
    per_speaker = group_wer_table(test_meta, nb.ref_words, {f"wer_{name}": err for name, err in per_utt.items()})
    group_idx = test_meta.reset_index(drop=True).groupby("group").indices
    for rec in per_speaker:
        if rec["level"] == "group":
            value = rec["name"]
            for name in per_utt:
                metrics[f"test_wer_{name}_{value}"] = rec[f"wer_{name}"]
            metrics.update(group_intervals(str(value), group_idx[value], err_asr, err_fused, err_swapped, nb.ref_words,
                                           speakers, n_boot, seed))
            for name, err in lm_errs.items():
                metrics.update(system_group_interval(name, str(value), group_idx[value], err_asr, err, nb.ref_words,
                                                     speakers, n_boot, seed))

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



def asr_only_vs_reference(nbest: pd.DataFrame, reference_nbest: pd.DataFrame, manifest: pd.DataFrame,
                          text_cfg: dict, n_resamples: int, seed: int) -> dict:
    """Test ASR-only WER of ``nbest`` (e.g. the adapted Whisper's) minus that of ``reference_nbest`` (the
    zero-shot one's), overall and per group, each with its interval (speaker-level as the fusion systems'):
    keys ``test_wer_asr_reference``, ``test_wer_asr_vs_reference`` (+ ``_ci_low``/``_ci_high``/``_ci_level``)
    and their ``_{group}`` forms. Both tables must hold the same test utterances."""
    meta = manifest.set_index("utt_id")
    ids = meta.index[meta["split"] == "test"]
    nb, ref = (to_arrays(t[t["utt_id"].isin(ids)], meta["text"], text_cfg) for t in (nbest, reference_nbest))
    if not np.array_equal(nb.utt_ids, ref.utt_ids):
        raise ValueError(f"the two n-best tables cover different test utterances ({len(nb.utt_ids)} vs "
                         f"{len(ref.utt_ids)}): the ASR-only difference needs the same ones")
    err, err_ref = take(nb.errors, fixed_alpha_choice(nb, 0.0, 0.0)), take(ref.errors, fixed_alpha_choice(ref, 0.0, 0.0))
    test_meta = meta.loc[nb.utt_ids]
    speakers, groups = test_meta["speaker"].astype(str).to_numpy(), test_meta["group"].astype(str).to_numpy()
    ci = wer_diff_interval(err_ref, err, nb.ref_words, speakers, groups, n_resamples, seed)
    out = {"test_wer_asr_reference": pooled_wer(err_ref, nb.ref_words),
           "test_wer_asr_vs_reference": pooled_wer(err, nb.ref_words) - pooled_wer(err_ref, nb.ref_words),
           "test_wer_asr_vs_reference_ci_low": ci["low"], "test_wer_asr_vs_reference_ci_high": ci["high"],
           "test_wer_asr_vs_reference_ci_level": ci["level"]}
    for group, idx in test_meta.reset_index(drop=True).groupby("group").indices.items():
        words = nb.ref_words[idx]
        gci = wer_diff_interval(err_ref[idx], err[idx], words, speakers[idx], np.zeros(len(idx), np.int64),
                                n_resamples, seed)
        out.update({f"test_wer_asr_reference_{group}": pooled_wer(err_ref[idx], words),
                    f"test_wer_asr_vs_reference_{group}": pooled_wer(err[idx], words) - pooled_wer(err_ref[idx], words),
                    f"test_wer_asr_vs_reference_ci_low_{group}": gci["low"],
                    f"test_wer_asr_vs_reference_ci_high_{group}": gci["high"]})
    return out
