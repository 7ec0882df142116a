"""Whisper n-best lists with scores, batched and sharded, to Parquet.

Beam search runs once per utterance, batched across utterances. ``sum_logprob`` of a hypothesis is
the sum over its generated tokens (end-of-text included) of log P(token | audio, prompt, tokens
before), read from the beam search's own per-step scores (``compute_transition_scores``: no second
pass); ``asr_score = sum_logprob / n_tokens ** length_penalty``, the criterion beam search ranks by.
transformers' beam bookkeeping has had version-specific bugs, so the tests recompute every stored
score with an independent teacher-forced pass (:func:`teacher_forced_logprobs`) and require
agreement; transformers' ``sequences_scores`` is kept beside it as ``beam_score``.

Real models need three more things than the demo's one-token-per-word Whisper:
- **Depth.** Returned beams often differ only in case or punctuation, so they collapse after
  normalisation; the beam is asked for more (``num_beams``/``num_return_sequences``) than the
  ``keep`` distinct hypotheses stored (HyPoradise: beam 50, keep 5). How many distinct hypotheses
  each utterance had is recorded in the file metadata (``mmasr.stats.distinct``).
- **Truncation.** A beam that reaches ``max_new_tokens`` without end-of-text is a truncated
  hypothesis, and its score (a prefix's) is not comparable with a finished one's. It is dropped
  when the utterance has a finished hypothesis; when none finished, the truncated ones (all cut at the
  same budget) are kept with ``complete = False`` and compared only with each other. Both are
  counted in the metadata. ``max_new_tokens: null`` (the default) takes the model's own limit (decoder positions
  minus the prompt), and ``max_tokens_per_second`` caps it by the audio's length, so only a
  looping beam ever hits the budget (:func:`max_new_tokens`).
- **The 30 s window.** Whisper sees at most its window (30 s for real checkpoints); longer audio
  would be cut silently, so the stage refuses it up front, naming the utterances
  (``preprocess.max_duration_s`` rejects them with a row in the rejects table).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers.generation.utils import GenerationMixin
from transformers.modeling_outputs import BaseModelOutput

from mmasr.data.audio import length_batches, read_audio
from mmasr.io import read_metadata, write_parquet
from mmasr.progress import track
from mmasr.models.loading import ModelBundle, autocast, float32_output_layer, whisper_features, whisper_prompt_ids

log = logging.getLogger(__name__)

NBEST_COLUMNS = ["utt_id", "rank", "text", "n_tokens", "sum_logprob", "asr_score", "beam_score", "token_ids",
                 "complete"]
STATS_PREFIX = "mmasr.stats."  # per-shard counts in the file metadata, summed by merge_shards


def shard_ids(utt_ids: Sequence[str], shard: int, num_shards: int) -> list[str]:
    """The utterances of one shard: every num_shards-th of the sorted ids (balanced, stable)."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is not in 0..{num_shards - 1}")
    return sorted(utt_ids)[shard::num_shards]


def strip_prompt_and_padding(sequence: Sequence[int], prompt_len: int, eos_id: int, pad_id: int) -> list[int]:
    """Generated tokens after the forced prompt, up to and including the first end-of-text."""
    out = []
    for tok in list(sequence)[prompt_len:]:
        out.append(int(tok))
        if tok == eos_id:
            break
    while out and out[-1] == pad_id and pad_id != eos_id:
        out.pop()
    return out


@torch.inference_mode()
def teacher_forced_logprobs(bundle: ModelBundle, encoder_states: torch.Tensor, prompt: list[int],
                            hyps: list[list[int]]) -> np.ndarray:
    """Sum of log-probabilities of each hypothesis's tokens given its utterance's encoder states (float64).

    ``encoder_states`` has one row per hypothesis. Hypotheses are right-padded; a causal decoder
    never looks right, so padding cannot change the scored positions. Whatever dtype the model was
    loaded in, the logits come from a float32 output layer (:func:`float32_output_layer`), the
    log-softmax is float32 and the sums float64.
    """
    model = bundle.model
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    longest = max(len(h) for h in hyps)
    inputs = torch.full((len(hyps), len(prompt) + longest), pad, dtype=torch.long)
    targets = torch.full((len(hyps), longest), -1, dtype=torch.long)
    for i, h in enumerate(hyps):
        seq = prompt + h
        inputs[i, : len(seq)] = torch.tensor(seq)
        targets[i, : len(h)] = torch.tensor(h)
    inputs = inputs.to(bundle.device)
    with autocast(bundle.device), float32_output_layer(model):
        out = model(encoder_outputs=(encoder_states.to(model.dtype),), decoder_input_ids=inputs[:, :-1])
    # The logit at position p predicts token p+1: the first hypothesis token follows the last prompt token.
    logits = out.logits[:, len(prompt) - 1:, :].float()
    logp = torch.log_softmax(logits, dim=-1).cpu()
    mask = targets >= 0
    picked = torch.gather(logp, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=1).double().numpy()


def max_new_tokens(bundle: ModelBundle, cfg: dict, prompt_len: int, seconds: float | None = None) -> int:
    """The token budget of a beam: ``nbest.max_new_tokens``, or (null) the most the decoder can hold
    after the prompt; with ``nbest.max_tokens_per_second`` and the utterance's length (``seconds``,
    rounded up to whole seconds), at most ``8 + ceil(rate * seconds)``.

    Why the duration cap: beam search ranks by length-normalised score, and a looping beam ("the the
    the ...", a hallucination on noise) keeps a high per-token score, so without a cap such a batch
    decodes to the model's limit (446 tokens for real Whisper) at great cost. Read speech carries
    about 3-5 Whisper tokens a second; a beam past the cap is cut there, flagged ``complete = False``,
    and dropped when a finished hypothesis exists (:func:`distinct_hypotheses`).
    """
    limit = int(bundle.model.config.max_target_positions) - prompt_len
    wanted = cfg.get("max_new_tokens")
    if wanted is not None and wanted > limit:
        raise ValueError(f"nbest.max_new_tokens={wanted} exceeds what {bundle.name} can decode after its "
                         f"{prompt_len}-token prompt ({limit}: max_target_positions "
                         f"{bundle.model.config.max_target_positions}); use null for the model's limit")
    budget = limit if wanted is None else int(wanted)
    rate = cfg.get("max_tokens_per_second")
    if rate and seconds is not None:  # whole seconds: utterances of similar length share a budget (and a batch)
        budget = min(budget, 8 + math.ceil(rate * math.ceil(seconds)))
    return budget


def window_seconds(bundle: ModelBundle) -> float:
    """The longest audio the Whisper encoder sees (its feature extractor's window)."""
    fe = bundle.processor.feature_extractor
    return fe.n_samples / fe.sampling_rate


def distinct_hypotheses(candidates: list[dict], normalise: Callable[[str], str], keep: int) -> tuple[list[dict], dict]:
    """One utterance's beams -> at most ``keep`` distinct hypotheses, best ``asr_score`` first, and counts.

    Distinct means different after normalisation (the best-scored spelling is kept). Truncated
    hypotheses (``complete`` false) are dropped when a finished one exists, since a prefix's score is
    not comparable with a finished hypothesis's; when none finished, they are all there is.
    """
    finished = [c for c in candidates if c["complete"]]
    pool = finished or candidates
    best: dict[str, dict] = {}
    for rec in pool:
        key = normalise(rec["text"])
        if key not in best or rec["asr_score"] > best[key]["asr_score"]:
            best[key] = rec
    ranked = sorted(best.values(), key=lambda r: -r["asr_score"])
    stats = {"distinct": len(ranked), "truncated_dropped": len(candidates) - len(finished) if finished else 0,
             "all_truncated": not finished}
    return ranked[:keep], stats


@torch.inference_mode()
def nbest_for_batch(bundle: ModelBundle, audios: list[np.ndarray], cfg: dict,
                    normalise: Callable[[str], str], stats: list[dict] | None = None) -> list[list[dict]]:
    """Beam search over a batch of 16 kHz mono arrays; per utterance, up to ``cfg['keep']`` distinct
    hypotheses (:func:`distinct_hypotheses`). ``stats``, when given, receives one count dict per utterance.

    Each utterance's token budget comes from its own length (:func:`max_new_tokens`), and utterances
    with different budgets are decoded in separate generate() calls: a budget shared across a batch
    would make the lists depend on which utterances happen to be batched together."""
    prompt = whisper_prompt_ids(bundle, cfg["language"], cfg["task"])
    budgets = [max_new_tokens(bundle, cfg, len(prompt), len(a) / 16000) for a in audios]
    candidates: list[list[dict]] = [[] for _ in audios]
    for budget in sorted(set(budgets)):
        idx = [i for i, b in enumerate(budgets) if b == budget]
        for i, cands in zip(idx, beam_candidates(bundle, [audios[i] for i in idx], cfg, prompt, budget)):
            candidates[i] = cands
    results = []
    for cands in candidates:
        kept, counts = distinct_hypotheses(cands, normalise, cfg["keep"])
        results.append(kept)
        if stats is not None:
            stats.append(counts)
    return results


def beam_candidates(bundle: ModelBundle, audios: list[np.ndarray], cfg: dict, prompt: list[int],
                    budget: int) -> list[list[dict]]:
    """One batched beam search: every returned beam of every utterance, scored, with ``complete``.

    The scores are float32 whatever the model's dtype: logits from :func:`float32_output_layer`,
    generate()'s float32 log-softmax, sums in float64."""
    model, tok = bundle.model, bundle.processor.tokenizer
    feats = whisper_features(bundle, audios)  # refuses audio longer than the window
    gen = model.generation_config
    R = cfg["num_return_sequences"]
    # Whisper's own generate() repeats each input num_return_sequences times and keeps the best beam
    # of every copy (transformers issue 33445): R copies of one hypothesis. The generic beam search,
    # started from the forced prompt, returns the R best distinct beams.
    with autocast(bundle.device), float32_output_layer(model):
        states = model.get_encoder()(feats["input_features"]).last_hidden_state
        out = GenerationMixin.generate(
            model, encoder_outputs=BaseModelOutput(last_hidden_state=states),
            decoder_input_ids=torch.tensor([prompt] * len(audios), device=bundle.device),
            num_beams=cfg["num_beams"], num_return_sequences=R, length_penalty=cfg["length_penalty"],
            max_new_tokens=budget, eos_token_id=gen.eos_token_id, pad_token_id=gen.pad_token_id,
            return_dict_in_generate=True, output_scores=True, do_sample=False)
    eos, pad = gen.eos_token_id, gen.pad_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    seqs = out.sequences.cpu().tolist()
    hyps = [strip_prompt_and_padding(s, len(prompt), eos, pad if pad is not None else eos) for s in seqs]
    # Per-token log-probabilities of the chosen tokens; positions after end-of-text are 0.
    steps = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=False)
    sum_lp = np.array([float(steps[k, : len(h)].double().sum()) for k, h in enumerate(hyps)])
    beam = out.sequences_scores.float().cpu().numpy()
    return [[{"text": tok.decode(hyps[k], skip_special_tokens=True).strip(), "n_tokens": len(hyps[k]),
              "sum_logprob": float(sum_lp[k]),
              "asr_score": float(sum_lp[k]) / max(len(hyps[k]), 1) ** cfg["length_penalty"],
              "beam_score": float(beam[k]), "token_ids": hyps[k], "complete": bool(hyps[k]) and hyps[k][-1] == eos}
             for k in range(u * R, (u + 1) * R)]
            for u in range(len(audios))]


STAT_TOTALS = ("utts", "truncated_dropped", "utts_all_truncated")


def _stats_metadata(hist: Counter, totals: Counter) -> dict[str, str]:
    return {f"{STATS_PREFIX}distinct": json.dumps({str(k): hist[k] for k in sorted(hist)}),
            **{f"{STATS_PREFIX}{k}": str(totals[k]) for k in STAT_TOTALS}}


def summarise_stats(stats: Sequence[dict]) -> dict[str, str]:
    """Per-utterance counts -> file metadata: the histogram of distinct hypotheses per utterance and the
    truncation counts (strings, as Parquet metadata holds them)."""
    totals = Counter(utts=len(stats), truncated_dropped=sum(s["truncated_dropped"] for s in stats),
                     utts_all_truncated=sum(bool(s["all_truncated"]) for s in stats))
    return _stats_metadata(Counter(s["distinct"] for s in stats), totals)


def merge_stats(metadatas: Sequence[dict[str, str]]) -> dict[str, str]:
    """Sum the shards' :func:`summarise_stats` metadata (histograms bin by bin)."""
    hist, totals = Counter(), Counter()
    for md in metadatas:
        hist.update(distinct_histogram(md))
        totals.update({k: int(md.get(f"{STATS_PREFIX}{k}", 0)) for k in STAT_TOTALS})
    return _stats_metadata(hist, totals)


def distinct_histogram(metadata: dict[str, str]) -> dict[int, int]:
    """Utterances by number of distinct hypotheses, from an n-best file's metadata ({} when absent)."""
    return {int(k): int(v) for k, v in json.loads(metadata.get(f"{STATS_PREFIX}distinct", "{}")).items()}


def run_nbest(bundle: ModelBundle, manifest: pd.DataFrame, cfg: dict, normalise: Callable[[str], str],
              shard: int = 0, num_shards: int = 1, limit: int | None = None, progress: bool = True) -> pd.DataFrame:
    """n-best table for one shard of the manifest's utterances in ``cfg['splits']``."""
    pool = manifest[manifest["split"].isin(cfg["splits"])]
    ids = shard_ids(pool["utt_id"].tolist(), shard, num_shards)[:limit]
    part = pool.set_index("utt_id").loc[ids].reset_index()
    window = window_seconds(bundle)
    too_long = part[part["duration_s"] > window]
    if len(too_long):
        raise ValueError(f"{len(too_long)} utterance(s) are longer than {bundle.name}'s {window:.0f} s window "
                         f"(e.g. {too_long['utt_id'].iloc[0]}: {too_long['duration_s'].iloc[0]:.1f} s) and would be "
                         f"cut off silently; set preprocess.max_duration_s to at most {window:g} so preprocessing "
                         "rejects them (a row each in data/processed/rejects.parquet)")
    rows, stats = [], []
    batches = length_batches(part["duration_s"].to_numpy(), cfg["batch_size"])
    for idx in track(batches, f"n-best shard {shard + 1}/{num_shards}", items=len, item_name="utts", bar=progress):
        recs = part.iloc[idx]
        audios = [read_audio(p) for p in recs["audio_path"]]
        for utt_id, hyps in zip(recs["utt_id"], nbest_for_batch(bundle, audios, cfg, normalise, stats)):
            rows.extend({"utt_id": utt_id, "rank": r, **h} for r, h in enumerate(hyps))
    df = pd.DataFrame(rows, columns=NBEST_COLUMNS)
    df = df.sort_values(["utt_id", "rank"]).reset_index(drop=True).astype(
        {"rank": "int64", "n_tokens": "int64", "sum_logprob": "float64", "asr_score": "float64", "beam_score": "float64",
         "complete": "bool"})
    df.attrs["stats"] = summarise_stats(stats)
    return df


def nbest_metadata(bundle: ModelBundle, cfg: dict, **extra) -> dict[str, str]:
    """Parquet file metadata: which model (and weight dtype) and decoding settings produced the lists."""
    keys = ("num_beams", "num_return_sequences", "keep", "length_penalty", "max_new_tokens", "max_tokens_per_second",
            "language", "task")
    return {"mmasr.model": bundle.name, "mmasr.revision": bundle.revision,
            "mmasr.dtype": str(bundle.model.dtype).removeprefix("torch."),
            "mmasr.decoding": json.dumps({k: cfg[k] for k in keys}, sort_keys=True),
            **{f"mmasr.{k}": str(v) for k, v in extra.items()}}


def merge_shards(paths: Sequence[str | Path], out: str | Path) -> pd.DataFrame:
    """Gather shard files into one table; refuse shards made with different models or settings."""
    tables, meta, shard_stats = [], None, []
    for p in paths:
        md = read_metadata(p)
        md.pop("mmasr.shard", None)
        shard_stats.append({k: md.pop(k) for k in [k for k in md if k.startswith(STATS_PREFIX)]})
        if meta is not None and md != meta:
            raise ValueError(f"{p}: made with other settings than {paths[0]} ({md} vs {meta}); re-run the n-best shards")
        meta = md
        tables.append(pd.read_parquet(p))
    df = pd.concat(tables, ignore_index=True).sort_values(["utt_id", "rank"]).reset_index(drop=True)
    if df.duplicated(["utt_id", "rank"]).any():
        raise ValueError("n-best shards overlap: an utterance appears in two shards")
    write_parquet(out, df, metadata={**meta, **merge_stats(shard_stats)})
    return df
