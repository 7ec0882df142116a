"""Fusion of ASR, CLIP (and LM) scores over n-best lists: weights tuned on dev, test WER with oracle and intervals.

Two forms (``fusion.form`` picks the headline; both are computed in every run, the grids are cheap):

- ``log_linear`` (default), as n-best rescoring in the field (shallow/LM fusion in ESPnet and k2):
  score = sum_logprob + λ_clip·τ·cos + λ_lm·lm_logprob + β·n_tokens, with Whisper's TOTAL log-probability
  (``sum_logprob``), the LM's total log-probability (``lm_logprob``) and a length bonus per Whisper token
  (``n_tokens``); λ on a dev grid of 0 and log-spaced values, β on a small grid (:func:`log_linear_grid`).
- ``seed``: the seed's softmax mixture, kept exactly:
  fused(α) = (1-α)·softmax(asr_score) + α·softmax(τ·clip_cos), per utterance over its n-best list, and with the
  frozen LM's ``lm_score`` (:mod:`mmasr.rescoring.lm`) a simplex grid of weight triples:
  w_asr·softmax(asr) + w_clip·softmax(τ·cos) + w_lm·softmax(lm); its w_lm = 0 edge is the α grid (bit for bit),
  its w_clip = 0 edge the ASR+LM system.

ASR-only is always Whisper's own first hypothesis (rank 0), whatever the form.
The beam search and every CLIP cosine are computed once upstream; here each hypothesis's word errors
against its reference are counted once (jiwer), so every grid is array arithmetic over
(weights, utterance, hypothesis). Corpus WER pools errors over utterances (icefall/ESPnet convention),
never averages per-utterance WERs (:mod:`mmasr.metrics.wer`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mmasr.data.text import normalise, normaliser, other_normaliser
from mmasr.metrics.intervals import n_speakers, wer_diff_interval
from mmasr.metrics.verdict import picture_verdict
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


# ---------------------------------------------------------------- the log-linear form

FORMS = ("log_linear", "seed")
MAX_GRID_CELLS = 1 << 22  # (weights x utterances x hypotheses) scores held at once by the log-linear grid search


def lambda_grid(cfg: dict) -> np.ndarray:
    """λ values from params: 0, then ``lambda_num`` log-spaced values from ``lambda_start`` to ``lambda_stop``
    (inclusive, rounded to 6 decimals so the values print and compare as written)."""
    logs = np.geomspace(cfg["lambda_start"], cfg["lambda_stop"], cfg["lambda_num"])
    return np.concatenate([[0.0], np.round(logs, 6)])


def log_linear_grid(lambdas: np.ndarray, betas: np.ndarray, with_lm: bool) -> np.ndarray:
    """Weight rows (λ_clip, λ_lm, β), shape (C, 3): every λ_clip x β, and x λ_lm when ``with_lm`` (else λ_lm = 0).
    Ordered by λ_lm, then λ_clip, then |β| (then β), so the first of equal dev WERs is the simplest system: no LM,
    then the least picture, then the smallest length bonus."""
    lambdas = np.unique(np.asarray(lambdas, np.float64))
    betas = sorted(set(float(b) for b in betas), key=lambda b: (abs(b), b))
    lms = lambdas if with_lm else np.array([0.0])
    return np.array([(c, lm, b) for lm, c, b in itertools.product(lms, lambdas, betas)], np.float64).reshape(-1, 3)


def filled(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """A per-hypothesis term (U, H) ready to be weighted: 0 for a whole list without it (no picture, no LM: the term
    then moves nothing), and, in a list where only some hypotheses have it, the list's lowest value for the others;
    0 in the padding."""
    has = valid & np.isfinite(x)
    low = np.min(np.where(has, x, np.inf), axis=-1, keepdims=True)
    low = np.where(np.isfinite(low), low, 0.0)
    return np.where(has, x, np.where(valid, low, 0.0))


def log_linear_scores(total: np.ndarray, clip: np.ndarray, lm: np.ndarray, length: np.ndarray, valid: np.ndarray,
                      weights: np.ndarray, tau: float) -> np.ndarray:
    """Log-linear scores (C, U, H) for weight rows (λ_clip, λ_lm, β):
    sum_logprob + λ_clip·τ·cos + λ_lm·lm_logprob + β·n_tokens; -inf in the padding."""
    w = np.asarray(weights, np.float64)[:, :, None, None]
    s = (np.where(valid, total, 0.0)[None] + w[:, 0] * (tau * filled(clip, valid))[None]
         + w[:, 1] * filled(lm, valid)[None] + w[:, 2] * np.where(valid, length, 0.0)[None])
    return np.where(valid[None], s, -np.inf)


def log_linear_choices(total: np.ndarray, clip: np.ndarray, lm: np.ndarray, length: np.ndarray, valid: np.ndarray,
                       weights: np.ndarray, tau: float, max_cells: int = MAX_GRID_CELLS) -> np.ndarray:
    """The chosen hypothesis (C, U) for every weight row, scored in chunks of at most ``max_cells`` scores so that
    memory stays bounded whatever the grid and n-best sizes; ties go to the better ASR rank (lower index)."""
    per_row = max(1, valid.size)
    step = max(1, max_cells // per_row)
    out = np.empty((len(weights), valid.shape[0]), np.int64)
    for start in range(0, len(weights), step):
        out[start:start + step] = choose(log_linear_scores(total, clip, lm, length, valid, weights[start:start + step], tau))
    return out


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
    total: np.ndarray | None = None       # (U, H) float: ``sum_logprob`` (Whisper's total), NaN without it
    length: np.ndarray | None = None      # (U, H) float: ``n_tokens`` (Whisper tokens, end-of-text included)
    lm_total: np.ndarray | None = None    # (U, H) float: ``lm_logprob`` (the LM's total), NaN without it

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
    def column(name: str) -> np.ndarray:
        out = np.full((U, H), np.nan)
        if name in nb:
            out[row, slot] = pd.to_numeric(nb[name], errors="coerce").to_numpy(float)
        return out
    refs_norm = [norm(str(references[u])) for u in utt_ids]
    s, d, i, words = count_errors([refs_norm[r] for r in row], hyp_norm)
    sub, dele, ins = (np.zeros((U, H), np.int64) for _ in range(3))
    sub[row, slot], dele[row, slot], ins[row, slot] = s, d, i
    return NBest(utt_ids, texts, asr, clip, valid, sub, dele, ins, np.array([len(r.split()) for r in refs_norm]),
                 raw, clip_texts, column("lm_score"), column("sum_logprob"), column("n_tokens"), column("lm_logprob"))


# ---------------------------------------------------------------- grids, intervals and the swap control

def alpha_grid(cfg: dict) -> np.ndarray:
    """α values from params: start..stop inclusive in steps, rounded to avoid float drift."""
    n = int(round((cfg["alpha_stop"] - cfg["alpha_start"]) / cfg["alpha_step"])) + 1
    return np.round(cfg["alpha_start"] + cfg["alpha_step"] * np.arange(n), 6)


def group_intervals(group: str, idx: np.ndarray, err_asr: np.ndarray, err_fused: np.ndarray,
                    err_swapped: np.ndarray | None, ref_words: np.ndarray, speakers: np.ndarray, n_resamples: int,
                    seed: int) -> dict:
    """One group's fused − ASR-only difference and its interval (speaker-level with ≥ 2 speakers in the
    group, else utterance-level), its number of test speakers, and the swap control's intervals: swapped −
    ASR-only and the paired fused − swapped (the same resamples as fused − ASR-only: one seed, one split)."""
    words, spk, one = ref_words[idx], speakers[idx], np.zeros(len(idx), np.int64)
    ci = wer_diff_interval(err_asr[idx], err_fused[idx], words, spk, one, n_resamples, seed)
    out = {f"test_wer_diff_{group}": pooled_wer(err_fused[idx], words) - pooled_wer(err_asr[idx], words),
           f"test_wer_diff_ci_low_{group}": ci["low"], f"test_wer_diff_ci_high_{group}": ci["high"],
           f"test_wer_diff_ci_level_{group}": ci["level"], f"test_n_speakers_{group}": n_speakers(spk)}
    if err_swapped is not None:
        sw = wer_diff_interval(err_asr[idx], err_swapped[idx], words, spk, one, n_resamples, seed)
        out[f"test_wer_fused_swapped_ci_low_{group}"] = sw["low"]
        out[f"test_wer_fused_swapped_ci_high_{group}"] = sw["high"]
        vs = wer_diff_interval(err_swapped[idx], err_fused[idx], words, spk, one, n_resamples, seed)
        out[f"test_wer_fused_vs_swapped_{group}"] = pooled_wer(err_fused[idx], words) - pooled_wer(err_swapped[idx], words)
        out[f"test_wer_fused_vs_swapped_ci_low_{group}"] = vs["low"]
        out[f"test_wer_fused_vs_swapped_ci_high_{group}"] = vs["high"]
    else:
        out.update({f"test_wer_fused_vs_swapped_{group}": None, f"test_wer_fused_vs_swapped_ci_low_{group}": None,
                    f"test_wer_fused_vs_swapped_ci_high_{group}": None})
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


def other_normaliser_wers(nb: NBest, references: list[str], picks: dict[str, np.ndarray], text_cfg: dict) -> dict:
    """The headline WERs under the normaliser the run is not scored with (:func:`mmasr.data.text.other_normaliser`):
    ``test_wer_{name}_{seed_norm|whisper_norm}`` of each system's picks, and of the oracle under that
    normaliser (the hypothesis with the fewest errors by its scoring), for comparison with seed 000's numbers
    or with the field's (Whisper's normaliser)."""
    suffix, cfg = other_normaliser(text_cfg)
    norm = normaliser(cfg)
    refs = [norm(r) for r in references]
    rows, slots = np.nonzero(nb.valid)
    sub, dele, ins, words = count_errors([refs[r] for r in rows], [norm(t) for t in nb.raw[rows, slots]])
    errors = np.zeros(nb.valid.shape, np.int64)
    errors[rows, slots] = sub + dele + ins
    ref_words = np.array([len(r.split()) for r in refs])
    out = {f"test_wer_{name}_{suffix}": pooled_wer(take(errors, pick), ref_words) for name, pick in picks.items()}
    out[f"test_wer_oracle_{suffix}"] = pooled_wer(take(errors, oracle_choice(errors, nb.valid)), ref_words)
    return out


def fixed_alpha_choice(nb: NBest, alpha: float, tau: float, clip: np.ndarray | None = None) -> np.ndarray:
    """Choices (U,) at one α, independent of the grid: α = 0 is Whisper's own pick (ASR-only), α = 1 the
    picture alone."""
    return choose(fuse(nb.asr, nb.clip if clip is None else clip, nb.valid, np.array([alpha]), tau))[0]


def headline_fused_choice(nb: NBest, metrics: dict, tau: float) -> np.ndarray:
    """The fused (ASR+CLIP) choices (U,) of a fusion.json's headline form at its dev-chosen weights: the log-linear
    form's (λ_clip, λ_lm = 0, β), or the seed form's α; for stages that re-derive fuse's pick (scoring formats)."""
    if metrics.get("fusion_form", "seed") == "log_linear":
        w = metrics["weights_fused_log_linear_form"]
        row = np.array([[w["lambda_clip"], w.get("lambda_lm", 0.0), w["beta"]]], np.float64)
        return log_linear_choices(nb.total, nb.clip, nb.lm_total, nb.length, nb.valid, row, tau)[0]
    return fixed_alpha_choice(nb, float(metrics["best_alpha"]), tau)


def swap_choices(nb: NBest, image_ids: np.ndarray, images: dict[str, np.ndarray], texts: dict[str, np.ndarray],
                 rescore: Callable[[np.ndarray], np.ndarray], n_permutations: int, seed: int) -> np.ndarray | None:
    """The picture-swap control: choices (K, U) of the fused system (``rescore`` maps cosines (U, H) to its
    choices (U,) at its dev-chosen weights) when every utterance with a picture is scored
    against another utterance's picture (K seeded derangements over the pictured utterances, never one
    showing its own picture); utterances without a picture keep their cosines (none). None when no derangement
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
        out.append(rescore(clip))
    return np.stack(out)


def no_picture_reason(n_dev_with_image: int, n_test_with_image: int, picture_weight: float,
                      form: str = "seed") -> str | None:
    """Why the picture changes no test transcript (a corpus without pictures, or without them in test, or in
    dev so that the picture's weight (α, or λ_clip in the log-linear form) stays 0), or None when it can.
    Utterances without a picture get no CLIP term."""
    same = ("so the fused WER equals the ASR-only WER" if form == "seed" else
            "so the fused system is Whisper's total log-probability with the length term (the CLIP term is 0)")
    if n_test_with_image == 0:
        return ("no test utterance has a picture (or a CLIP score): every test utterance is scored without CLIP, "
                f"{same} and the picture's weight changes nothing")
    if n_dev_with_image == 0 and picture_weight == 0:
        return ("no dev utterance has a picture (or a CLIP score): the picture's weight cannot be tuned on dev (the dev "
                f"grid is flat) and stays 0, {same}")
    return None


LM_SYSTEMS = {"asr_lm": "ASR+LM", "asr_clip_lm": "ASR+CLIP+LM"}
SYSTEMS = ("fused", *LM_SYSTEMS)  # ASR+CLIP, ASR+LM, ASR+CLIP+LM: every form reports these three


def has_values(x: np.ndarray | None, valid: np.ndarray) -> bool:
    return x is not None and bool(np.isfinite(np.where(valid, x, np.nan)).any())


def has_lm_scores(nb: NBest) -> bool:
    return has_values(nb.lm, nb.valid)


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


# ---------------------------------------------------------------- the two forms' systems

@dataclass
class FormResult:
    """One form's systems at their dev-chosen weights: test choices (U,), dev WER and named weights per system
    (the LM systems only with LM scores), and ``rescore``: the ASR+CLIP system's test choices for other cosines
    (U, H), at its weights (the swap control)."""
    form: str
    picks: dict[str, np.ndarray]
    dev_wers: dict[str, float]
    weights: dict[str, dict[str, float]]
    rescore: Callable[[np.ndarray], np.ndarray]
    picture_weight: float  # the ASR+CLIP system's weight of the picture (α or λ_clip)


def seed_form(dev_nb: NBest, nb: NBest, alphas: np.ndarray, dev_alpha_wers: np.ndarray, test_alpha_choices: np.ndarray,
              cfg: dict) -> FormResult:
    """The seed's softmax mixture, exactly as seed 000 (α grid) and issue 15 (the simplex with the LM)."""
    tau = cfg["tau"]
    best = best_alpha_index(dev_alpha_wers)
    alpha = float(alphas[best])
    picks, dev_wers = {"fused": test_alpha_choices[best]}, {"fused": float(dev_alpha_wers[best])}
    weights = {"fused": {"alpha": alpha}}
    if has_lm_scores(dev_nb) and has_lm_scores(nb):
        m, lm_picks = lm_systems(dev_nb, nb, cfg["alpha_step"], tau)
        for name in LM_SYSTEMS:
            picks[name], dev_wers[name] = lm_picks[name], m[f"dev_wer_{name}"]
            weights[name] = dict(zip(("w_asr", "w_clip", "w_lm"), m[f"weights_{name}"]))
    return FormResult("seed", picks, dev_wers, weights, lambda clip: fixed_alpha_choice(nb, alpha, tau, clip), alpha)


def log_linear_unavailable(*parts: NBest) -> str | None:
    """Why the log-linear form cannot run on these n-best lists (a hypothesis without ``sum_logprob`` or
    ``n_tokens``), or None."""
    for nb in parts:
        lacking = nb.valid & ~(np.isfinite(nb.total) & np.isfinite(nb.length))
        if lacking.any():
            u, h = np.argwhere(lacking)[0]
            return (f"{int(lacking.sum())} hypotheses have no sum_logprob or n_tokens (e.g. {nb.utt_ids[u]!s} rank "
                    f"slot {int(h)}): the log-linear form needs Whisper's total log-probability, which mmasr nbest writes")
    return None


def log_linear_wers(nb: NBest, weights: np.ndarray, tau: float, max_cells: int = MAX_GRID_CELLS) -> np.ndarray:
    """Pooled WER (C,) of every log-linear weight row on ``nb``, chunked as :func:`log_linear_choices`."""
    step = max(1, max_cells // max(1, nb.valid.size))
    return np.concatenate([grid_wer(log_linear_choices(nb.total, nb.clip, nb.lm_total, nb.length, nb.valid,
                                                       weights[i:i + step], tau, max_cells), nb.errors, nb.ref_words)
                           for i in range(0, len(weights), step)])


def log_linear_form(dev_nb: NBest, nb: NBest, cfg: dict) -> FormResult:
    """The log-linear form: one dev search over (λ_clip, λ_lm, β) (:func:`log_linear_grid`; λ_lm only with the LM's
    total ``lm_logprob`` on dev and test); ASR+CLIP is its λ_lm = 0 part, ASR+LM its λ_clip = 0 part, ASR+CLIP+LM
    the whole grid, each at its dev-best row (ties: the first in the grid's order)."""
    tau = cfg["tau"]
    with_lm = has_values(dev_nb.lm_total, dev_nb.valid) and has_values(nb.lm_total, nb.valid)
    grid = log_linear_grid(lambda_grid(cfg), np.asarray(cfg["beta_grid"], np.float64), with_lm)
    dev_wers = log_linear_wers(dev_nb, grid, tau)
    systems = {"fused": grid[:, 1] == 0}
    if with_lm:
        systems.update(asr_lm=grid[:, 0] == 0, asr_clip_lm=np.ones(len(grid), bool))
    picks, wers, weights, rows = {}, {}, {}, {}
    for name, allowed in systems.items():
        allowed_rows = np.flatnonzero(allowed)
        best = rows[name] = allowed_rows[best_alpha_index(dev_wers[allowed_rows])]
        picks[name] = log_linear_choices(nb.total, nb.clip, nb.lm_total, nb.length, nb.valid, grid[best:best + 1], tau)[0]
        wers[name] = float(dev_wers[best])
        weights[name] = dict(zip(("lambda_clip", "lambda_lm", "beta"), (float(x) for x in grid[best])))
    fused_w = grid[rows["fused"]:rows["fused"] + 1]

    def rescore(clip: np.ndarray) -> np.ndarray:
        return log_linear_choices(nb.total, clip, nb.lm_total, nb.length, nb.valid, fused_w, tau)[0]

    return FormResult("log_linear", picks, wers, weights, rescore, weights["fused"]["lambda_clip"])


def form_metrics(form: str, result: FormResult | None, nb: NBest, err_asr: np.ndarray, speakers: np.ndarray,
                 groups: np.ndarray, group_idx: dict, n_resamples: int, seed: int) -> dict:
    """Every system of one form under ``{system}_{form}_form`` keys: dev and test WER, chosen weights, the
    interval against ASR-only (overall and per group, as the headline's); None where the form or system did
    not run."""
    out = {}
    for name in SYSTEMS:
        key = f"{name}_{form}_form"
        pick = None if result is None else result.picks.get(name)
        if pick is None:
            out.update({f"dev_wer_{key}": None, f"test_wer_{key}": None, f"test_wer_{key}_ci_low": None,
                        f"test_wer_{key}_ci_high": None, f"weights_{key}": None})
            continue
        err = take(nb.errors, pick)
        ci = wer_diff_interval(err_asr, err, nb.ref_words, speakers, groups, n_resamples, seed)
        out.update({f"dev_wer_{key}": result.dev_wers[name], f"test_wer_{key}": pooled_wer(err, nb.ref_words),
                    f"test_wer_{key}_ci_low": ci["low"], f"test_wer_{key}_ci_high": ci["high"],
                    f"weights_{key}": result.weights[name]})
        for group, idx in group_idx.items():
            out[f"test_wer_{key}_{group}"] = pooled_wer(err[idx], nb.ref_words[idx])
            out.update(system_group_interval(key, str(group), idx, err_asr, err, nb.ref_words, speakers, n_resamples,
                                             seed))
    return out


# ---------------------------------------------------------------- the stage

def run_fusion(nbest: pd.DataFrame, manifest: pd.DataFrame, cfg: dict, text_cfg: dict, seed: int,
               embeddings: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None):
    """Tune both forms on dev, report on test (the headline: ``fusion.form``'s). Returns (grid table — the seed
    form's α grid —, metrics dict, changed table, per-speaker table).

    ``embeddings`` (picture cache, hypothesis-text cache) enable the picture-swap control; without them
    its keys are None. A corpus without pictures runs too: every utterance gets no CLIP term, and the metrics
    say so (``n_no_image``, ``fusion_skipped``, ``fusion_skip_reason``)."""
    form = cfg.get("form", "log_linear")
    if form not in FORMS:
        raise ValueError(f"fusion.form {form!r} is not one of {', '.join(FORMS)}")
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

    nb, choice = arrays["test"]
    dev_nb = arrays["dev"][0]
    tau, n_boot = cfg["tau"], cfg["bootstrap_resamples"]
    forms: dict[str, FormResult | None] = {"seed": seed_form(dev_nb, nb, alphas, dev_wers, choice, cfg)}
    ll_reason = log_linear_unavailable(dev_nb, nb)
    if ll_reason is not None and form == "log_linear":
        raise ValueError(f"fusion.form is log_linear, but {ll_reason}; re-run nbest, or set fusion.form: seed")
    forms["log_linear"] = None if ll_reason is not None else log_linear_form(dev_nb, nb, cfg)
    chosen = forms[form]

    # ASR-only (Whisper's rank 0) and the oracle do not depend on the form or the grid (which need not start at 0).
    asr_pick, fused_pick, oracle_pick = fixed_alpha_choice(nb, 0.0, tau), chosen.picks["fused"], oracle_choice(nb.errors, nb.valid)
    alpha1_pick = fixed_alpha_choice(nb, 1.0, tau)
    err_asr, err_fused, err_oracle, err_alpha1 = (take(nb.errors, c) for c in (asr_pick, fused_pick, oracle_pick,
                                                                                alpha1_pick))
    wer_asr, wer_fused, wer_oracle = (pooled_wer(e, nb.ref_words) for e in (err_asr, err_fused, err_oracle))
    test_meta = meta.loc[nb.utt_ids]
    speakers, groups = test_meta["speaker"].astype(str).to_numpy(), test_meta["group"].astype(str).to_numpy()
    group_idx = test_meta.reset_index(drop=True).groupby("group").indices
    ci = wer_diff_interval(err_asr, err_fused, nb.ref_words, speakers, groups, n_boot, seed)
    swap = None if embeddings is None else swap_choices(
        nb, test_meta["image_id"].to_numpy(), embeddings[0], embeddings[1], chosen.rescore, cfg["swap_permutations"], seed)
    # The per-utterance swapped error is the mean over the permutations, so the swap pairs with fused per utterance.
    err_swapped = None if swap is None else take(nb.errors, swap).mean(axis=0)
    swap_ci = None if swap is None else wer_diff_interval(err_asr, err_swapped, nb.ref_words, speakers, groups,
                                                          n_boot, seed)
    vs_swap_ci = None if swap is None else wer_diff_interval(err_swapped, err_fused, nb.ref_words, speakers, groups,
                                                             n_boot, seed)
    no_image = ~np.isfinite(np.where(nb.valid, nb.clip, np.nan)).any(axis=1)
    n_dev_no_image = int((~np.isfinite(np.where(dev_nb.valid, dev_nb.clip, np.nan)).any(axis=1)).sum())
    skip_reason = no_picture_reason(len(dev_nb.utt_ids) - n_dev_no_image, int((~no_image).sum()),
                                    chosen.picture_weight, form)

    metrics = {
        "fusion_form": form, "log_linear_skip_reason": ll_reason,
        "best_alpha": forms["seed"].weights["fused"]["alpha"], "tau": float(cfg["tau"]),
        "dev_wer_asr": pooled_wer(take(dev_nb.errors, fixed_alpha_choice(dev_nb, 0.0, tau)), dev_nb.ref_words),
        "dev_wer_fused": chosen.dev_wers["fused"],
        "dev_wer_oracle": pooled_wer(take(dev_nb.errors, oracle_choice(dev_nb.errors, dev_nb.valid)), dev_nb.ref_words),
        "test_wer_asr": wer_asr, "test_wer_fused": wer_fused, "test_wer_oracle": wer_oracle,
        "test_wer_diff": wer_fused - wer_asr, "test_wer_diff_ci_low": ci["low"], "test_wer_diff_ci_high": ci["high"],
        "test_wer_diff_ci_level": ci["level"],
        "test_wer_diff_ci_low_utt": ci["low_utt"], "test_wer_diff_ci_high_utt": ci["high_utt"],
        "test_n_speakers": n_speakers(speakers),
        "test_wer_alpha1": pooled_wer(err_alpha1, nb.ref_words),
        "test_wer_fused_swapped": None if swap is None else pooled_wer(err_swapped, nb.ref_words),
        "test_wer_fused_swapped_ci_low": None if swap is None else swap_ci["low"],
        "test_wer_fused_swapped_ci_high": None if swap is None else swap_ci["high"],
        "test_wer_fused_vs_swapped": None if swap is None else wer_fused - pooled_wer(err_swapped, nb.ref_words),
        "test_wer_fused_vs_swapped_ci_low": None if swap is None else vs_swap_ci["low"],
        "test_wer_fused_vs_swapped_ci_high": None if swap is None else vs_swap_ci["high"],
        "test_swap_permutations": 0 if swap is None else len(swap),
        "test_gap_closed": gap_closed(wer_asr, wer_fused, wer_oracle),
        "n_dev_utts": int(len(dev_nb.utt_ids)), "n_test_utts": int(len(nb.utt_ids)),
        "n_no_image": int(no_image.sum()), "n_dev_no_image": n_dev_no_image,
        "fusion_skipped": skip_reason is not None, "fusion_skip_reason": skip_reason,
        "n_empty_hypotheses": int(((nb.texts == "") & nb.valid).sum()),
        "test_ref_words": int(nb.ref_words.sum()),
    }
    metrics["picture_verdict"] = picture_verdict((ci["low"], ci["high"]), None if swap is None else
                                                 (vs_swap_ci["low"], vs_swap_ci["high"]))[0]
    for name, pick in (("asr", asr_pick), ("fused", fused_pick), ("oracle", oracle_pick)):
        metrics[f"test_S_{name}"] = int(take(nb.sub, pick).sum())
        metrics[f"test_D_{name}"] = int(take(nb.dele, pick).sum())
        metrics[f"test_I_{name}"] = int(take(nb.ins, pick).sum())
    metrics.update(picture_overlap_metrics(meta, nb.utt_ids, {"asr": err_asr, "fused": err_fused}, nb.ref_words))
    metrics.update(other_scorings(nb, [str(meta.at[u, "text"]) for u in nb.utt_ids],
                                  {"asr": asr_pick, "fused": fused_pick}, text_cfg))
    metrics.update(other_normaliser_wers(nb, [str(meta.at[u, "text"]) for u in nb.utt_ids],
                                         {"asr": asr_pick, "fused": fused_pick}, text_cfg))
    for name, result in forms.items():
        metrics.update(form_metrics(name, result, nb, err_asr, speakers, groups, group_idx, n_boot, seed))

    per_utt = {"asr": err_asr, "fused": err_fused, "oracle": err_oracle, "alpha1": err_alpha1}
    if swap is not None:
        per_utt["fused_swapped"] = err_swapped
    lm_errs = {}
    if all(name in chosen.picks for name in LM_SYSTEMS):
        metrics.update(lm_skipped=False, lm_skip_reason=None)
        if "asr_lm" in forms["seed"].weights:  # the simplex's size and the seed triples (w_asr, w_clip, w_lm), as ever
            metrics["n_weight_triples"] = int(len(simplex_grid(cfg["alpha_step"])))
        for name in LM_SYSTEMS:
            err = lm_errs[name] = per_utt[name] = take(nb.errors, chosen.picks[name])
            sys_ci = wer_diff_interval(err_asr, err, nb.ref_words, speakers, groups, n_boot, seed)
            seed_w = forms["seed"].weights.get(name)
            metrics.update({f"weights_{name}": None if seed_w is None else list(seed_w.values()),
                            f"dev_wer_{name}": chosen.dev_wers[name],
                            f"test_wer_{name}": pooled_wer(err, nb.ref_words), f"test_wer_{name}_ci_low": sys_ci["low"],
                            f"test_wer_{name}_ci_high": sys_ci["high"], f"test_wer_{name}_ci_level": sys_ci["level"]})
        # CLIP's share over the LM: ASR+CLIP+LM − ASR+LM, on the same resamples as every other difference.
        clip_ci = wer_diff_interval(lm_errs["asr_lm"], lm_errs["asr_clip_lm"], nb.ref_words, speakers, groups, n_boot, seed)
        metrics.update({"test_wer_clip_over_lm": metrics["test_wer_asr_clip_lm"] - metrics["test_wer_asr_lm"],
                        "test_wer_clip_over_lm_ci_low": clip_ci["low"], "test_wer_clip_over_lm_ci_high": clip_ci["high"]})
    else:
        reason = ("no lm_score in the n-best table (fusion.lm_enabled off, or lm-scores not run)" if not has_lm_scores(nb)
                  else f"no lm_logprob (the LM's total log-probability) in the n-best table: the {form} form's LM term "
                       "needs it (re-run lm-scores)")
        metrics.update(lm_skipped=True, lm_skip_reason=reason, test_wer_clip_over_lm=None,
                       test_wer_clip_over_lm_ci_low=None, test_wer_clip_over_lm_ci_high=None)
        for name in LM_SYSTEMS:
            metrics.update({f"test_wer_{name}": None, f"test_wer_{name}_ci_low": None, f"test_wer_{name}_ci_high": None})
    per_speaker = group_wer_table(test_meta, nb.ref_words, {f"wer_{name}": err for name, err in per_utt.items()})
    for rec in per_speaker:
        if rec["level"] == "group":
            value = rec["name"]
            for name in per_utt:
                metrics[f"test_wer_{name}_{value}"] = rec[f"wer_{name}"]
            idx = group_idx[value]
            metrics.update(group_intervals(str(value), idx, err_asr, err_fused, err_swapped, nb.ref_words,
                                           speakers, n_boot, seed))
            g_vs = (metrics[f"test_wer_fused_vs_swapped_ci_low_{value}"], metrics[f"test_wer_fused_vs_swapped_ci_high_{value}"])
            metrics[f"picture_verdict_{value}"] = picture_verdict(
                (metrics[f"test_wer_diff_ci_low_{value}"], metrics[f"test_wer_diff_ci_high_{value}"]),
                None if swap is None else g_vs)[0]
            for name, err in lm_errs.items():
                metrics.update(system_group_interval(name, str(value), idx, err_asr, err, nb.ref_words,
                                                     speakers, n_boot, seed))
            if lm_errs:
                cg = system_group_interval("clip_over_lm", str(value), idx, lm_errs["asr_lm"], lm_errs["asr_clip_lm"],
                                           nb.ref_words, speakers, n_boot, seed)
                metrics[f"test_wer_clip_over_lm_ci_low_{value}"] = cg[f"test_wer_clip_over_lm_diff_ci_low_{value}"]
                metrics[f"test_wer_clip_over_lm_ci_high_{value}"] = cg[f"test_wer_clip_over_lm_diff_ci_high_{value}"]

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
