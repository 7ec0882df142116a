import numpy as np
import pandas as pd
import pytest
import torch

from mmasr.config import validate
from mmasr.data.audio import length_batches, read_audio
from mmasr.rescoring.nbest import (STATS_PREFIX, distinct_histogram, distinct_hypotheses, encoder_passes_per_utt, max_new_tokens, merge_shards,
                                   merge_stats, nbest_for_batch, nbest_metadata, run_nbest, shard_ids,
                                   strip_prompt_and_padding, summarise_stats, teacher_forced_logprobs)
from mmasr.io import read_metadata, write_parquet
from mmasr.models.loading import whisper_features, whisper_prompt_ids
from mmasr.data.text import normaliser
from tests.conftest import processed_corpus

P = validate({})
CFG = {**P["nbest"], "max_new_tokens": 8, "batch_size": 4}
NORM = normaliser(P["text"])


def test_shards_partition_the_sorted_ids():
    ids = [f"u{i}" for i in range(7)]
    parts = [shard_ids(ids[::-1], s, 3) for s in range(3)]
    assert sorted(sum(parts, [])) == sorted(ids) and all(parts)
    with pytest.raises(ValueError, match="shard 3 is not in 0..2"):
        shard_ids(ids, 3, 3)


def test_length_batches_group_similar_durations():
    batches = length_batches([1.0, 3.0, 2.0, 2.5], batch_size=2)
    assert [b.tolist() for b in batches] == [[1, 3], [2, 0]]


def test_strip_prompt_and_padding():
    assert strip_prompt_and_padding([50, 51, 7, 8, 2, 2, 2], 2, eos_id=2, pad_id=2) == [7, 8, 2]
    assert strip_prompt_and_padding([50, 51, 7, 8], 2, eos_id=2, pad_id=2) == [7, 8]  # cut by max_new_tokens


def test_stored_scores_equal_an_unbatched_teacher_forced_recomputation(whisper_bundle, tmp_path):
    man = processed_corpus(tmp_path)
    audios = [read_audio(p) for p in man["audio_path"]]
    batched = nbest_for_batch(whisper_bundle, audios, CFG, NORM)
    prompt = whisper_prompt_ids(whisper_bundle, None)
    tok = whisper_bundle.processor.tokenizer
    model = whisper_bundle.model
    checked = 0
    for audio, hyps in zip(audios, batched):
        assert 1 <= len(hyps) <= CFG["num_return_sequences"]
        assert [h["asr_score"] for h in hyps] == sorted((h["asr_score"] for h in hyps), reverse=True)
        feats = whisper_features(whisper_bundle, [audio])["input_features"]
        with torch.inference_mode():
            logits_states = model.get_encoder()(feats).last_hidden_state
        for h in hyps:
            ids = list(h["token_ids"])
            assert len(ids) == h["n_tokens"] and tok.decode(ids, skip_special_tokens=True).strip() == h["text"]
            # one hypothesis alone, no padding, token by token
            with torch.inference_mode():
                seq = torch.tensor([prompt + ids])
                logp = torch.log_softmax(model(encoder_outputs=(logits_states,), decoder_input_ids=seq[:, :-1]).logits, -1)
            expected = sum(float(logp[0, len(prompt) - 1 + t, tok_id]) for t, tok_id in enumerate(ids))
            assert h["sum_logprob"] == pytest.approx(expected, abs=1e-4)
            checked += 1
        for h in hyps:  # transformers' own beam score, same convention (length-normalised, eos counted)
            assert h["asr_score"] == pytest.approx(h["beam_score"], abs=1e-4)
    assert checked > 0


def test_teacher_forcing_is_independent_of_batch_padding(whisper_bundle, tmp_path):
    man = processed_corpus(tmp_path, n=2)
    feats = whisper_features(whisper_bundle, [read_audio(p) for p in man["audio_path"]])["input_features"]
    with torch.inference_mode():
        states = whisper_bundle.model.get_encoder()(feats).last_hidden_state
    prompt = whisper_prompt_ids(whisper_bundle, None)
    short, long_ = [5, 6, 2], [7, 8, 9, 10, 11, 2]
    together = teacher_forced_logprobs(whisper_bundle, states, prompt, [short, long_])
    alone = [teacher_forced_logprobs(whisper_bundle, states[i:i + 1], prompt, [h])[0] for i, h in enumerate([short, long_])]
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_sharded_and_unsharded_nbest_are_identical(whisper_bundle, tmp_path):
    man = processed_corpus(tmp_path)
    whole = run_nbest(whisper_bundle, man, CFG, NORM, progress=False)
    paths = []
    for s in range(3):
        part = run_nbest(whisper_bundle, man, CFG, NORM, shard=s, num_shards=3, progress=False)
        paths.append(tmp_path / f"{s}-of-3.parquet")
        write_parquet(paths[-1], part, metadata={**nbest_metadata(whisper_bundle, CFG, shard=f"{s}/3"),
                                                 **part.attrs["stats"]})
    merged = merge_shards(paths, tmp_path / "merged.parquet")
    pd.testing.assert_frame_equal(merged, whole)
    assert set(whole["utt_id"]) == set(man["utt_id"])  # dev and test
    assert list(whole.columns) == ["utt_id", "rank", "text", "n_tokens", "sum_logprob", "asr_score", "beam_score",
                                   "token_ids", "complete"]
    # the per-shard counts add up to the whole run's
    merged_meta = read_metadata(tmp_path / "merged.parquet")
    assert {k: v for k, v in merged_meta.items() if k.startswith(STATS_PREFIX)} == whole.attrs["stats"]
    assert sum(distinct_histogram(merged_meta).values()) == len(man)
    # the encoder ran once per utterance (counted on its first layer), in the shards as in the whole run
    assert merged_meta[f"{STATS_PREFIX}encoder_passes"] == str(len(man)) and encoder_passes_per_utt(merged_meta) == 1.0


def test_merge_refuses_shards_from_different_settings(whisper_bundle, tmp_path):
    man = processed_corpus(tmp_path, n=2)
    part = run_nbest(whisper_bundle, man, CFG, NORM, progress=False)
    write_parquet(tmp_path / "a.parquet", part, metadata=nbest_metadata(whisper_bundle, CFG, shard="0/2"))
    write_parquet(tmp_path / "b.parquet", part, metadata=nbest_metadata(whisper_bundle, {**CFG, "num_beams": 4}, shard="1/2"))
    with pytest.raises(ValueError, match="made with other settings"):
        merge_shards([tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path / "m.parquet")


def test_an_empty_hypothesis_is_kept(whisper_bundle, tmp_path, monkeypatch):
    man = processed_corpus(tmp_path, n=1)
    model = whisper_bundle.model
    eos = model.generation_config.eos_token_id
    bias = torch.zeros(model.config.vocab_size)
    bias[eos] = 100.0  # the decoder now ends every beam at once ...
    # ... after one token: Whisper suppresses end-of-text at the first step. Make that token a special one
    # (decoded to nothing), rather than whatever word a random-init model happens to favour.
    bias[whisper_bundle.processor.tokenizer.convert_tokens_to_ids("<|nospeech|>")] = 50.0
    handle = model.proj_out.register_forward_hook(lambda _m, _i, out: out + bias)
    try:
        hyps = nbest_for_batch(whisper_bundle, [read_audio(man["audio_path"][0])], CFG, NORM)[0]
    finally:
        handle.remove()
    empty = [h for h in hyps if h["text"] == ""]
    assert len(empty) == 1 and empty[0]["n_tokens"] <= 2 and hyps[0] is empty[0]


def test_read_audio_refuses_unprocessed_files(tmp_path):
    from tests.conftest import tone, write_wav

    path = write_wav(tmp_path / "x.wav", tone(sr=22050), sr=22050)
    with pytest.raises(ValueError, match="expected preprocessed 16 kHz mono"):
        read_audio(str(path))


def test_beam_search_returns_distinct_beams_not_copies(whisper_bundle, tmp_path):
    # transformers' Whisper generate() returns num_return_sequences copies of one beam (issue 33445);
    # the n-best must hold the distinct best beams. A key that never repeats switches off de-duplication.
    keys = iter(range(10**6))
    man = processed_corpus(tmp_path, n=2)
    out = nbest_for_batch(whisper_bundle, [read_audio(p) for p in man["audio_path"]], CFG, lambda _t: next(keys))
    for hyps in out:
        assert len(hyps) == CFG["num_return_sequences"]
        assert len({tuple(h["token_ids"]) for h in hyps}) == len(hyps)


def hyp(text: str, score: float, complete: bool = True) -> dict:
    return {"text": text, "asr_score": score, "complete": complete}


def test_distinct_hypotheses_keep_the_best_spelling_and_at_most_keep():
    beams = [hyp("A red bear.", -0.1), hyp("a red bear", -0.3), hyp("a red pear", -0.4), hyp("a bed bear", -0.5),
             hyp("A red pear!", -0.2)]
    kept, stats = distinct_hypotheses(beams, NORM, keep=2)
    assert [h["text"] for h in kept] == ["A red bear.", "A red pear!"]
    assert stats == {"distinct": 3, "truncated_dropped": 0, "all_truncated": False}


def test_truncated_beams_are_dropped_when_a_finished_one_exists():
    beams = [hyp("a red bear a red bear a red", -0.05, complete=False), hyp("a red bear", -0.3),
             hyp("a red", -0.01, complete=False)]
    kept, stats = distinct_hypotheses(beams, NORM, keep=5)
    assert [h["text"] for h in kept] == ["a red bear"]
    assert stats == {"distinct": 1, "truncated_dropped": 2, "all_truncated": False}
    # none finished: they are all there is, kept and flagged (fusion leaves the utterance ASR-only)
    kept, stats = distinct_hypotheses([b for b in beams if not b["complete"]], NORM, keep=5)
    assert [h["complete"] for h in kept] == [False, False] and stats["all_truncated"]


def test_stats_metadata_sum_over_shards():
    a = summarise_stats([{"distinct": 1, "truncated_dropped": 0, "all_truncated": False},
                         {"distinct": 3, "truncated_dropped": 2, "all_truncated": False}])
    b = summarise_stats([{"distinct": 3, "truncated_dropped": 0, "all_truncated": True}])
    merged = merge_stats([a, b])
    assert distinct_histogram(merged) == {1: 1, 3: 2}
    assert merged[f"{STATS_PREFIX}truncated_dropped"] == "2" and merged[f"{STATS_PREFIX}utts_all_truncated"] == "1"
    assert merged[f"{STATS_PREFIX}utts"] == "3"
    assert merged[f"{STATS_PREFIX}encoder_passes"] == "0" and encoder_passes_per_utt(merged) == 0.0  # none counted
    assert encoder_passes_per_utt(merge_stats([summarise_stats([{"distinct": 1, "truncated_dropped": 0,
                                                                  "all_truncated": False}], encoder_passes=2)])) == 2.0
    assert encoder_passes_per_utt({}) is None  # a file from before the count


def test_max_new_tokens_defaults_to_the_models_limit(whisper_bundle):
    limit = whisper_bundle.model.config.max_target_positions
    assert max_new_tokens(whisper_bundle, {"max_new_tokens": None}, 2) == limit - 2
    assert max_new_tokens(whisper_bundle, {"max_new_tokens": 5}, 2) == 5
    # capped by the audio's length: 8 + rate * whole seconds, never above the limit
    capped = {"max_new_tokens": None, "max_tokens_per_second": 4}
    assert max_new_tokens(whisper_bundle, capped, 2, seconds=1.2) == 8 + 8  # 1.2 s counts as 2 whole seconds
    assert max_new_tokens(whisper_bundle, capped, 2, seconds=100.0) == limit - 2
    assert max_new_tokens(whisper_bundle, {**capped, "max_tokens_per_second": None}, 2, seconds=1.2) == limit - 2
    with pytest.raises(ValueError, match="exceeds what .* can decode"):
        max_new_tokens(whisper_bundle, {"max_new_tokens": limit}, 2)


def test_audio_beyond_the_window_is_refused_not_cut(whisper_bundle, tmp_path):
    man = processed_corpus(tmp_path, n=2)
    window = whisper_bundle.processor.feature_extractor.n_samples / 16000
    man.loc[0, "duration_s"] = window + 0.5
    with pytest.raises(ValueError, match=r"1 utterance\(s\) are longer than .* window .*preprocess.max_duration_s"):
        run_nbest(whisper_bundle, man, CFG, NORM, progress=False)
    with pytest.raises(ValueError, match="longer than .* window"):
        nbest_for_batch(whisper_bundle, [np.zeros(int((window + 1) * 16000), np.float32)], CFG, NORM)


def test_a_beam_cut_by_max_new_tokens_is_flagged_incomplete(whisper_bundle, tmp_path):
    man = processed_corpus(tmp_path, n=1)
    model = whisper_bundle.model
    bias = torch.zeros(model.config.vocab_size)
    bias[model.generation_config.eos_token_id] = -1e4  # no beam can end
    handle = model.proj_out.register_forward_hook(lambda _m, _i, out: out + bias)
    stats = []
    try:
        hyps = nbest_for_batch(whisper_bundle, [read_audio(man["audio_path"][0])], {**CFG, "max_new_tokens": 3},
                               NORM, stats)[0]
    finally:
        handle.remove()
    assert hyps and all(not h["complete"] and h["n_tokens"] == 3 for h in hyps)
    assert stats[0]["all_truncated"]


def test_budgets_follow_each_utterance_so_batching_changes_nothing(whisper_bundle, tmp_path):
    from tests.conftest import tone, write_wav

    paths = [write_wav(tmp_path / f"{i}.wav", tone(s, freq=150 + 60 * i, lead=0.05, tail=0.05))
             for i, s in enumerate((0.6, 1.7, 2.6))]
    audios = [read_audio(str(p)) for p in paths]
    cfg = {**CFG, "max_new_tokens": None, "max_tokens_per_second": 2}  # budgets 10, 12, 14: three calls
    batched = nbest_for_batch(whisper_bundle, audios, cfg, NORM)
    alone = [nbest_for_batch(whisper_bundle, [a], cfg, NORM)[0] for a in audios]
    for b, a in zip(batched, alone):
        assert [h["token_ids"] for h in b] == [h["token_ids"] for h in a]
        np.testing.assert_allclose([h["asr_score"] for h in b], [h["asr_score"] for h in a], atol=1e-4)


def test_shared_kv_attention_equals_attention_over_repeated_keys(whisper_bundle):
    from mmasr.rescoring.nbest import shared_kv_attention
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = whisper_bundle.model.model.decoder.layers[0].encoder_attn
    g = torch.Generator().manual_seed(0)
    utts, beams, heads, q_len, dim, positions = 3, 4, 2, 2, 8, 11
    query = torch.randn(utts * beams, heads, q_len, dim, generator=g)
    key, value = (torch.randn(utts, heads, positions, dim, generator=g) for _ in range(2))
    shared, _ = shared_kv_attention(module, query, key, value, None, scaling=1.0)
    repeated, _ = sdpa_attention_forward(module, query, key.repeat_interleave(beams, 0), value.repeat_interleave(beams, 0),
                                         None, scaling=1.0)
    assert shared.shape == repeated.shape == (utts * beams, q_len, heads, dim)
    torch.testing.assert_close(shared, repeated, atol=1e-6, rtol=1e-5)
    same, _ = shared_kv_attention(module, query, key.repeat_interleave(beams, 0), value.repeat_interleave(beams, 0),
                                  None, scaling=1.0)  # one key row per query row: plain SDPA
    torch.testing.assert_close(same, repeated)
    with pytest.raises(ValueError, match="7 query rows for 3 key rows"):
        shared_kv_attention(module, query[:7], key, value, None, scaling=1.0)


def test_beams_with_shared_cross_attention_and_cached_masks_equal_the_plain_beam_search(whisper_bundle, tmp_path, monkeypatch):
    import contextlib

    import mmasr.rescoring.nbest as nbest

    man = processed_corpus(tmp_path, n=4)
    audios = [read_audio(p) for p in man["audio_path"]]
    prompt = whisper_prompt_ids(whisper_bundle, None)
    assert whisper_bundle.model.config._attn_implementation == "sdpa"  # the shared path is the one taken
    shared = nbest.beam_candidates(whisper_bundle, audios, CFG, prompt, 8)
    assert whisper_bundle.model.config._attn_implementation == "sdpa"  # switched back afterwards
    monkeypatch.setattr(nbest, "shared_kv_attention_on", lambda _model: contextlib.nullcontext(False))
    monkeypatch.setattr(nbest, "suppression_kwargs", lambda _gen, _n: {})  # transformers' own processors
    plain = nbest.beam_candidates(whisper_bundle, audios, CFG, prompt, 8)
    for a, b in zip(shared, plain):
        assert [h["token_ids"] for h in a] == [h["token_ids"] for h in b]
        np.testing.assert_allclose([h["sum_logprob"] for h in a], [h["sum_logprob"] for h in b], atol=1e-5)
        np.testing.assert_allclose([h["beam_score"] for h in a], [h["beam_score"] for h in b], atol=1e-5)


def test_grouped_teacher_forcing_equals_one_row_per_hypothesis(whisper_bundle, tmp_path):
    from mmasr.rescoring.nbest import grouped_teacher_forced_logprobs

    man = processed_corpus(tmp_path, n=3)
    feats = whisper_features(whisper_bundle, [read_audio(p) for p in man["audio_path"]])["input_features"]
    with torch.inference_mode():
        states = whisper_bundle.model.get_encoder()(feats).last_hidden_state
    prompt = whisper_prompt_ids(whisper_bundle, None)
    hyps = [[5, 6, 2], [7, 8, 9, 10, 11, 2], [12, 2], [5, 2], [9, 9, 9]]
    owners = [0, 0, 2, 0, 2]  # uneven counts, utterance 1 has none, not grouped in order
    grouped = grouped_teacher_forced_logprobs(whisper_bundle, states, prompt, hyps, owners)
    plain = teacher_forced_logprobs(whisper_bundle, states[owners], prompt, hyps)
    np.testing.assert_allclose(grouped, plain, atol=1e-5)


def test_suppress_ids_masks_like_transformers_processors():
    from transformers.generation.logits_process import (SuppressTokensAtBeginLogitsProcessor,
                                                        SuppressTokensLogitsProcessor)

    from mmasr.rescoring.nbest import SuppressIds

    scores = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    for length in (2, 3):
        ids = torch.zeros(3, length, dtype=torch.long)
        ours = SuppressIds([5, 7, 5], at_length=2)(ids, SuppressIds([1, 39])(ids, scores))
        theirs = SuppressTokensAtBeginLogitsProcessor([5, 7], 2)(ids, SuppressTokensLogitsProcessor([1, 39])(ids, scores))
        assert torch.equal(ours, theirs) and torch.isinf(ours[:, [1, 39]]).all()
        assert torch.isinf(ours[:, [5, 7]]).all() == (length == 2)
    assert torch.equal(SuppressIds([])(torch.zeros(3, 2, dtype=torch.long), scores), scores)
