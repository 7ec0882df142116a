"""Whisper n-best lists with scores, batched and sharded, to Parquet.

Two backends run the beam search (``nbest.backend``): ``transformers`` (the loaded model itself) and
``ctranslate2`` (a CTranslate2 copy of the same weights at ``nbest.compute_type``, converted once and
cached by :mod:`mmasr.models.ct2`). Both get the same log-mel features, prompt, beam size, number of
returned beams, length penalty and token budget, and both write the same table (ctranslate2 searches
with a patience of 2, :data:`CT2_PATIENCE`, to search about as deep as transformers does).

Beam search runs once per utterance, batched across utterances. ``sum_logprob`` of a hypothesis is
the sum over its generated tokens (end-of-text included) of log P(token | audio, prompt, tokens
before), read from the beam search's own per-step scores (``compute_transition_scores``: no second
pass); ``asr_score = sum_logprob / n_tokens ** length_penalty``, the criterion beam search ranks by.
transformers' beam bookkeeping has had version-specific bugs, so the tests recompute every stored
score with an independent teacher-forced pass (:func:`teacher_forced_logprobs`) and require
agreement; transformers' ``sequences_scores`` is kept beside it as ``beam_score``.

With ``ctranslate2``, every returned hypothesis is re-scored by that teacher-forced float32 pass (the
loaded model's decoder, on CTranslate2's own encoder output, all hypotheses of a batch in one pass), so
``sum_logprob`` and ``asr_score`` mean what they mean for ``transformers``, and both backends rank and
de-duplicate alike. CTranslate2's own score is kept as ``beam_score``; it is a different quantity:
the sum of the tokens' log-probabilities *after* the suppressed tokens are masked out (renormalised
over the rest), end-of-text included, divided by the number of tokens *without* end-of-text to the
power ``length_penalty`` (:func:`ct2_beam_score` computes it; the tests check it to 1e-4).

Batching. Beam search keeps ``num_beams`` rows per utterance, and every row used to carry its own
copy of the cross-attention keys and values (1500 encoder positions per layer for a real Whisper):
projected once per beam, and copied at every step when the beams are reordered. On a real tiny.en
that copy, ~1.5 GB a step for 16 utterances, made a batch of 16 slower than 16 batches of one.
Here the cross-attention keys and values are projected once per utterance, held once, shared by its
beams (a grouped-query attention call) and never reordered (:class:`SharedCrossAttentionCache`); the
beams' tokens, scores and order are those of the plain call.

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

import contextlib
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import DynamicCache, EncoderDecoderCache
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList
from transformers.generation.utils import GenerationMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import AttentionInterface

from mmasr.data.audio import length_batches, read_audio
from mmasr.io import read_metadata, write_parquet
from mmasr.progress import track
from mmasr.models.ct2 import DEFAULT_CT2_CACHE, load_ct2_whisper
from mmasr.models.layers import PassCounter, count_passes
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
                    normalise: Callable[[str], str], stats: list[dict] | None = None,
                    ct2_cache: str | Path = DEFAULT_CT2_CACHE, passes: PassCounter | None = None,
                    states: Sequence[torch.Tensor] | None = None) -> list[list[dict]]:
    """Beam search over a batch of 16 kHz mono arrays; per utterance, up to ``cfg['keep']`` distinct
    hypotheses (:func:`distinct_hypotheses`). ``stats``, when given, receives one count dict per utterance.
    ``cfg['backend']`` (default transformers) picks the engine; ``ct2_cache`` is where the ctranslate2
    backend keeps its converted model. ``passes``, when given, counts the utterances the encoder ran over
    (a hook on the transformers encoder's first layer; CTranslate2's encode calls are counted where they run).
    ``states``, when given (transformers backend only), are the utterances' stored full-window encoder states
    (:func:`mmasr.projector.encoder_cache.encode_pass`): beam search starts from them and the encoder does not run.

    Each utterance's token budget comes from its own length (:func:`max_new_tokens`), and utterances
    with different budgets are decoded in separate calls: a budget shared across a batch would make
    the lists depend on which utterances happen to be batched together."""
    passes = passes if passes is not None else PassCounter()
    prompt = whisper_prompt_ids(bundle, cfg["language"], cfg["task"])
    budgets = [max_new_tokens(bundle, cfg, len(prompt), len(a) / 16000) for a in audios]
    backend = cfg.get("backend", "transformers")
    if states is not None and backend != "transformers":
        raise ValueError(f"stored encoder states need nbest.backend transformers, not {backend!r} (CTranslate2 "
                         "encodes with its own copy of the weights)")
    if backend == "transformers":
        def decode(idx, budget):
            given = None if states is None else torch.stack([states[i] for i in idx])
            return beam_candidates(bundle, [audios[i] for i in idx], cfg, prompt, budget, given)
    elif backend == "ctranslate2":
        engine = load_ct2_whisper(bundle, cfg.get("compute_type", "float32"), ct2_cache)

        def decode(idx, budget):
            passes.add(len(idx))  # ct2_candidates encodes the batch once (engine.encode), outside torch
            return ct2_candidates(bundle, engine, [audios[i] for i in idx], cfg, prompt, budget)
    else:
        raise ValueError(f"nbest.backend {backend!r} is not one of transformers, ctranslate2")
    candidates: list[list[dict]] = [[] for _ in audios]
    with count_passes(bundle.model.get_encoder(), passes):
        for budget in sorted(set(budgets)):
            idx = [i for i, b in enumerate(budgets) if b == budget]
            for i, cands in zip(idx, decode(idx, budget)):
                candidates[i] = cands
    results = []
    for cands in candidates:
        kept, counts = distinct_hypotheses(cands, normalise, cfg["keep"])
        results.append(kept)
        if stats is not None:
            stats.append(counts)
    return results


# ------------------------------------------------------------------ transformers: shared cross-attention

SHARED_KV_ATTENTION = "mmasr_shared_kv_sdpa"


class SharedCrossAttentionCache(EncoderDecoderCache):
    """A beam search cache whose cross-attention keys/values hold one row per utterance, not per beam.

    All beams of an utterance attend to the same encoder output, so their cross-attention keys and
    values are identical: reordering them when beams swap (transformers copies every row at every
    step) changes nothing but costs a copy of the whole cross cache. Only the self-attention cache,
    which differs between beams, is reordered."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.self_attention_cache.reorder_cache(beam_idx)


def shared_kv_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """SDPA (transformers' ``sdpa`` attention function), except when the keys hold one row per
    utterance and the queries one per beam: then the beams of each utterance become extra query
    positions of one row (``(b*n, h, q, d)`` -> ``(b, h, n*q, d)``), attended without a mask, and are
    split back. Each query position is attended independently, so the result is that of repeating
    the keys and values ``n`` times, without the copy."""
    if query.shape[0] == key.shape[0]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows, heads, q_len, dim = query.shape
    utts = key.shape[0]
    if rows % utts or attention_mask is not None:
        raise ValueError(f"shared cross-attention: {rows} query rows for {utts} key rows"
                         f"{' with an attention mask' if attention_mask is not None else ''}")
    beams = rows // utts
    grouped = query.view(utts, beams, heads, q_len, dim).transpose(1, 2).reshape(utts, heads, beams * q_len, dim)
    out, _ = sdpa_attention_forward(module, grouped, key, value, None, **{**kwargs, "is_causal": False})
    # sdpa_attention_forward returns (batch, positions, heads, dim)
    return out.reshape(utts, beams, q_len, heads, dim).reshape(rows, q_len, heads, dim), None


AttentionInterface.register(SHARED_KV_ATTENTION, shared_kv_attention)


def shared_cross_cache(model, encoder_states: torch.Tensor) -> SharedCrossAttentionCache:
    """Every decoder layer's cross-attention keys and values, projected once per utterance (as the
    layer itself would project them) and marked as computed."""
    cross = DynamicCache()
    utts, positions, _ = encoder_states.shape
    for i, layer in enumerate(model.model.decoder.layers):
        attn = layer.encoder_attn
        shape = (utts, positions, -1, attn.head_dim)
        keys = attn.k_proj(encoder_states).view(shape).transpose(1, 2).contiguous()
        values = attn.v_proj(encoder_states).view(shape).transpose(1, 2).contiguous()
        cross.update(keys, values, i)
    return SharedCrossAttentionCache(DynamicCache(), cross)


@contextlib.contextmanager
def shared_kv_attention_on(model) -> Iterator[bool]:
    """Switch the model to :func:`shared_kv_attention` for the duration (yields True), when it runs
    transformers' SDPA attention; any other implementation is left alone (yields False)."""
    before = model.config._attn_implementation
    if before != "sdpa":
        yield False
        return
    model.set_attn_implementation(SHARED_KV_ATTENTION)
    try:
        yield True
    finally:
        model.set_attn_implementation(before)


class SuppressIds(LogitsProcessor):
    """Scores of ``ids`` set to -inf, at every step or (``at_length``) only when the sequences are that
    long: transformers' ``SuppressTokensLogitsProcessor`` / ``SuppressTokensAtBeginLogitsProcessor``,
    which rebuild a vocabulary-sized mask with ``torch.isin`` at every step (two per step, measured at
    5-75 ms each on 2 busy CPU threads for Whisper's 51,864 tokens: per-step cost that batch 1 pays
    for every utterance)."""

    def __init__(self, ids, at_length: int | None = None):
        self.ids = torch.tensor(sorted({int(i) for i in ids}), dtype=torch.long)
        self.at_length = at_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if not len(self.ids) or (self.at_length is not None and input_ids.shape[-1] != self.at_length):
            return scores
        return scores.index_fill(1, self.ids.to(scores.device), -float("inf"))


def suppression_kwargs(gen, prompt_len: int) -> dict:
    """generate() arguments that suppress what the generation config suppresses (``suppress_tokens`` at
    every step, ``begin_suppress_tokens`` at the first generated one) with :class:`SuppressIds`."""
    processors = [SuppressIds(gen.suppress_tokens or []), SuppressIds(gen.begin_suppress_tokens or [], prompt_len)]
    return {"suppress_tokens": None, "begin_suppress_tokens": None,
            "logits_processor": LogitsProcessorList([p for p in processors if len(p.ids)])}


def beam_candidates(bundle: ModelBundle, audios: list[np.ndarray], cfg: dict, prompt: list[int],
                    budget: int, states: torch.Tensor | None = None) -> list[list[dict]]:
    """One batched beam search: every returned beam of every utterance, scored, with ``complete``.
    ``states``: the batch's stored full-window encoder states (B, window, D), in place of running the encoder.

    The scores are float32 whatever the model's dtype: logits from :func:`float32_output_layer`,
    generate()'s float32 log-softmax, sums in float64."""
    model, tok = bundle.model, bundle.processor.tokenizer
    gen = model.generation_config
    R = cfg["num_return_sequences"]
    # Whisper's own generate() repeats each input num_return_sequences times and keeps the best beam
    # of every copy (transformers issue 33445): R copies of one hypothesis. The generic beam search,
    # started from the forced prompt, returns the R best distinct beams.
    with autocast(bundle.device), float32_output_layer(model), shared_kv_attention_on(model) as shared:
        if states is None:
            feats = whisper_features(bundle, audios)  # refuses audio longer than the window
            states = model.get_encoder()(feats["input_features"]).last_hidden_state
        else:
            states = states.to(bundle.device)
        cache = {"past_key_values": shared_cross_cache(model, states)} if shared else {}
        # The budget as the total length (prompt + budget), max_new_tokens cleared: the model's generation config
        # sets max_length, and passing max_new_tokens beside it made transformers warn on every batch. The
        # attention mask is the encoder's (every frame of the window is real: Whisper masks none): without it
        # transformers warns that a batch whose pad token is its eos cannot be masked.
        out = GenerationMixin.generate(
            model, encoder_outputs=BaseModelOutput(last_hidden_state=states),
            attention_mask=torch.ones(states.shape[:2], dtype=torch.long, device=bundle.device),
            decoder_input_ids=torch.tensor([prompt] * len(audios), device=bundle.device),
            num_beams=cfg["num_beams"], num_return_sequences=R, length_penalty=cfg["length_penalty"],
            max_length=len(prompt) + budget, max_new_tokens=None, eos_token_id=gen.eos_token_id, pad_token_id=gen.pad_token_id,
            return_dict_in_generate=True, output_scores=True, do_sample=False, **cache,
            **suppression_kwargs(gen, len(prompt)))
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


# ------------------------------------------------------------------ ctranslate2

# CTranslate2 ends an utterance's beam search once num_beams * patience hypotheses have finished;
# transformers goes on while a running beam could still beat the worst kept one (its early-stopping
# heuristic with a length penalty). At patience 1 ctranslate2 stopped before finding transformers' best
# hypothesis on 5 of 48 real utterances (float32, beam 5); at 2 on none (and found a better one on 1).
CT2_PATIENCE = 2.0


def ct2_encoder_states(storage, device: torch.device) -> torch.Tensor:
    """CTranslate2's encoder output (a StorageView) as a float32 torch tensor on ``device``."""
    if device.type == "cpu":
        return torch.from_numpy(np.array(storage)).float()
    return torch.as_tensor(storage, device=device).float()  # CUDA storage: __cuda_array_interface__


def ct2_max_length(budget: int, prompt_len: int) -> int:
    """CTranslate2's ``max_length`` for a budget of ``budget`` generated tokens (end-of-text included).

    Its Whisper ``generate`` decodes at most ``min(max_length // 2, max_length - (prompt_len - 1))``
    tokens (the prompt but its last token is fed first; ``src/models/whisper.cc``), so passing
    ``prompt_len + budget`` would halve the budget."""
    if budget >= prompt_len - 1:
        return 2 * budget
    return budget + prompt_len - 1


def ct2_hypothesis(tokens: Sequence[int], budget: int, eos: int) -> tuple[list[int], bool]:
    """A CTranslate2 hypothesis (prompt and end-of-text stripped) as stored: end-of-text put back when it
    finished, i.e. when it is shorter than the budget (a beam cut at the budget has no room for it)."""
    ids = [int(t) for t in tokens]
    complete = len(ids) < budget
    return (ids + [eos] if complete else ids), complete


def ct2_beam_score(logprobs_masked: Sequence[float], complete: bool, length_penalty: float) -> float:
    """CTranslate2's ``return_scores`` value of a hypothesis from its tokens' log-probabilities *after*
    suppressed tokens are masked out (renormalised; end-of-text included when it finished): the sum over
    the tokens, divided by the number of tokens without end-of-text to the power ``length_penalty``."""
    n = len(logprobs_masked) - (1 if complete else 0)
    return float(sum(logprobs_masked)) / max(n, 1) ** length_penalty


@torch.inference_mode()
def grouped_teacher_forced_logprobs(bundle: ModelBundle, encoder_states: torch.Tensor, prompt: list[int],
                                    hyps: list[list[int]], owners: list[int]) -> np.ndarray:
    """:func:`teacher_forced_logprobs` for hypotheses of several utterances, ``encoder_states`` holding
    one row per *utterance* (``owners[k]`` is hypothesis k's row): the cross-attention keys and values
    are projected once per utterance and shared by its hypotheses (:func:`shared_kv_attention`) instead
    of once per hypothesis, which is most of the cost of scoring a short hypothesis against a 30 s
    window. Models that do not run SDPA attention are scored by :func:`teacher_forced_logprobs`."""
    model = bundle.model
    index = torch.tensor(owners, device=encoder_states.device)
    if model.config._attn_implementation != "sdpa":
        return teacher_forced_logprobs(bundle, encoder_states[index], prompt, hyps)
    # Rows grouped by utterance, the same number per utterance (padded with repeats of its first hypothesis).
    by_utt: dict[int, list[int]] = {u: [] for u in range(encoder_states.shape[0])}
    for k, u in enumerate(owners):
        by_utt[u].append(k)
    per_utt = max(1, max(len(ks) for ks in by_utt.values()))
    order = [ks[i] if i < len(ks) else (ks[0] if ks else None) for ks in by_utt.values() for i in range(per_utt)]
    rows = [hyps[k] if k is not None else [] for k in order]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    longest = max(1, max(len(h) for h in rows))
    inputs = torch.full((len(rows), len(prompt) + longest), pad, dtype=torch.long)
    targets = torch.full((len(rows), longest), -1, dtype=torch.long)
    for i, h in enumerate(rows):
        inputs[i, : len(prompt) + len(h)] = torch.tensor(prompt + h)
        targets[i, : len(h)] = torch.tensor(h, dtype=torch.long)
    mask = targets >= 0
    encoder_states = encoder_states.to(model.dtype)
    with autocast(bundle.device), float32_output_layer(model), shared_kv_attention_on(model):
        hidden = model.model(encoder_outputs=(encoder_states,), decoder_input_ids=inputs[:, :-1].to(bundle.device),
                             past_key_values=shared_cross_cache(model, encoder_states), use_cache=True).last_hidden_state
        # The state at position p predicts token p+1: the first hypothesis token follows the last prompt token.
        # Logits only where a hypothesis token is scored (not at the padding): the vocabulary projection is
        # the larger part of the pass.
        logits = model.get_output_embeddings()(hidden[:, len(prompt) - 1:, :][mask.to(hidden.device)])
    logp = torch.log_softmax(logits.float(), dim=-1).cpu()
    picked = logp.gather(1, targets[mask].unsqueeze(-1)).squeeze(-1).double()
    sums = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, mask.nonzero()[:, 0], picked).numpy()
    result = np.zeros(len(hyps))
    for row, k in enumerate(order):
        if k is not None:
            result[k] = sums[row]
    return result


def ct2_candidates(bundle: ModelBundle, engine, audios: list[np.ndarray], cfg: dict, prompt: list[int],
                   budget: int) -> list[list[dict]]:
    """:func:`beam_candidates` with CTranslate2: one batched beam search on the same features and prompt,
    every hypothesis re-scored by the teacher-forced float32 pass (see the module docstring)."""
    import ctranslate2

    tok, gen = bundle.processor.tokenizer, bundle.model.generation_config
    eos = gen.eos_token_id[0] if isinstance(gen.eos_token_id, list) else gen.eos_token_id
    feats = whisper_features(bundle, audios)["input_features"].float().cpu().numpy()
    encoded = engine.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(feats)), to_cpu=False)
    results = engine.generate(encoded, [list(prompt)] * len(audios), beam_size=cfg["num_beams"],
                              num_hypotheses=cfg["num_return_sequences"], length_penalty=cfg["length_penalty"],
                              max_length=ct2_max_length(budget, len(prompt)), return_scores=True, suppress_blank=True,
                              suppress_tokens=[-1], patience=CT2_PATIENCE)
    owners, hyps, complete, beam = [], [], [], []
    for u, res in enumerate(results):
        for seq, score in zip(res.sequences_ids, res.scores):
            ids, done = ct2_hypothesis(seq, budget, eos)
            owners.append(u)
            hyps.append(ids)
            complete.append(done)
            beam.append(float(score))
    sum_lp = grouped_teacher_forced_logprobs(bundle, ct2_encoder_states(encoded, bundle.device), prompt, hyps, owners)
    out: list[list[dict]] = [[] for _ in audios]
    for k, u in enumerate(owners):
        out[u].append({"text": tok.decode(hyps[k], skip_special_tokens=True).strip(), "n_tokens": len(hyps[k]),
                       "sum_logprob": float(sum_lp[k]),
                       "asr_score": float(sum_lp[k]) / max(len(hyps[k]), 1) ** cfg["length_penalty"],
                       "beam_score": beam[k], "token_ids": hyps[k], "complete": complete[k]})
    return out


# encoder_passes: utterances the encoder ran over (encoder_passes / utts: passes per utterance, 1 today)
STAT_TOTALS = ("utts", "truncated_dropped", "utts_all_truncated", "encoder_passes")


def _stats_metadata(hist: Counter, totals: Counter) -> dict[str, str]:
    return {f"{STATS_PREFIX}distinct": json.dumps({str(k): hist[k] for k in sorted(hist)}),
            **{f"{STATS_PREFIX}{k}": str(totals[k]) for k in STAT_TOTALS}}


def summarise_stats(stats: Sequence[dict], encoder_passes: int = 0) -> dict[str, str]:
    """Per-utterance counts -> file metadata: the histogram of distinct hypotheses per utterance, the
    truncation counts and the encoder passes made (strings, as Parquet metadata holds them)."""
    totals = Counter(utts=len(stats), truncated_dropped=sum(s["truncated_dropped"] for s in stats),
                     utts_all_truncated=sum(bool(s["all_truncated"]) for s in stats), encoder_passes=encoder_passes)
    return _stats_metadata(Counter(s["distinct"] for s in stats), totals)


def merge_stats(metadatas: Sequence[dict[str, str]]) -> dict[str, str]:
    """Sum the shards' :func:`summarise_stats` metadata (histograms bin by bin)."""
    hist, totals = Counter(), Counter()
    for md in metadatas:
        hist.update(distinct_histogram(md))
        totals.update({k: int(md.get(f"{STATS_PREFIX}{k}", 0)) for k in STAT_TOTALS})
    return _stats_metadata(hist, totals)


def encoder_passes_per_utt(metadata: dict[str, str]) -> float | None:
    """Encoder passes per utterance an n-best file's stage made (None for files written before it was counted)."""
    passes, utts = metadata.get(f"{STATS_PREFIX}encoder_passes"), int(metadata.get(f"{STATS_PREFIX}utts", 0))
    return None if passes is None or not utts else int(passes) / utts


def distinct_histogram(metadata: dict[str, str]) -> dict[int, int]:
    """Utterances by number of distinct hypotheses, from an n-best file's metadata ({} when absent)."""
    return {int(k): int(v) for k, v in json.loads(metadata.get(f"{STATS_PREFIX}distinct", "{}")).items()}


def run_nbest(bundle: ModelBundle, manifest: pd.DataFrame, cfg: dict, normalise: Callable[[str], str],
              shard: int = 0, num_shards: int = 1, limit: int | None = None, progress: bool = True,
              ct2_cache: str | Path = DEFAULT_CT2_CACHE, states=None) -> pd.DataFrame:
    """n-best table for one shard of the manifest's utterances in ``cfg['splits']`` (``ct2_cache``: where
    the ctranslate2 backend keeps its converted model). ``states``: stored full-window encoder states of the
    same model (a :class:`mmasr.projector.encoder_cache.FeatureCache` of ``encode-audio --states``), read
    instead of running the encoder (:func:`stored_states`)."""
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
    rows, stats, passes = [], [], PassCounter()
    batches = length_batches(part["duration_s"].to_numpy(), cfg["batch_size"])
    for idx in track(batches, f"n-best shard {shard + 1}/{num_shards}", items=len, item_name="utts", bar=progress):
        recs = part.iloc[idx]
        audios = [read_audio(p) for p in recs["audio_path"]]  # the token budgets follow the audio's length
        given = None if states is None else stored_states(states, bundle, recs["utt_id"].tolist())
        for utt_id, hyps in zip(recs["utt_id"], nbest_for_batch(bundle, audios, cfg, normalise, stats, ct2_cache,
                                                                passes, given)):
            rows.extend({"utt_id": utt_id, "rank": r, **h} for r, h in enumerate(hyps))
    df = pd.DataFrame(rows, columns=NBEST_COLUMNS)
    df = df.sort_values(["utt_id", "rank"]).reset_index(drop=True).astype(
        {"rank": "int64", "n_tokens": "int64", "sum_logprob": "float64", "asr_score": "float64", "beam_score": "float64",
         "complete": "bool"})
    df.attrs["stats"] = summarise_stats(stats, passes.rows)
    return df


def stored_states(cache, bundle: ModelBundle, utt_ids: Sequence[str]) -> list[torch.Tensor]:
    """The stored full-window encoder states of ``utt_ids``, in the dtype the encoder produced them in; refuses a
    store made by another model, revision, or window."""
    meta = cache.metadata
    if (meta.get("mmasr.model"), meta.get("mmasr.model_revision")) != (bundle.name, bundle.revision) \
            or meta.get("mmasr.window") != "full":
        raise ValueError(f"{cache.folder}: full-window encoder states of {meta.get('mmasr.model')} (revision "
                         f"{meta.get('mmasr.model_revision')}, window {meta.get('mmasr.window')}), not of {bundle.name} "
                         f"(revision {bundle.revision}): re-run encode_audio, or run the n-best without --states")
    dtype = getattr(torch, meta.get("mmasr.states_dtype", "float32"))
    missing = [u for u in utt_ids if u not in cache.index.index]
    if missing:
        raise ValueError(f"{cache.folder}: no stored encoder states of {len(missing)} utterance(s) (e.g. {missing[0]})")
    return [torch.from_numpy(cache[u]).to(dtype) for u in utt_ids]


def nbest_metadata(bundle: ModelBundle, cfg: dict, **extra) -> dict[str, str]:
    """Parquet file metadata: which model (and weight dtype) and decoding settings produced the lists."""
    keys = ("num_beams", "num_return_sequences", "keep", "length_penalty", "max_new_tokens", "max_tokens_per_second",
            "language", "task")
    decoding = {k: cfg[k] for k in keys}
    decoding["backend"] = cfg.get("backend", "transformers")
    if decoding["backend"] == "ctranslate2":
        decoding["compute_type"] = cfg.get("compute_type", "float32")
    return {"mmasr.model": bundle.name, "mmasr.revision": bundle.revision,
            "mmasr.dtype": str(bundle.model.dtype).removeprefix("torch."),
            "mmasr.decoding": json.dumps(decoding, sort_keys=True),
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
