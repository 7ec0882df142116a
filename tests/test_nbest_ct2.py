"""nbest.backend: ctranslate2 on the small random demo Whisper: the conversion cache, the table it writes
(same columns, types, de-duplication, shards), and how its scores relate to the transformers backend's."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from mmasr.config import validate
from mmasr.data.audio import read_audio
from mmasr.data.text import normaliser
from mmasr.io import read_metadata, write_parquet
from mmasr.models import ct2
from mmasr.models.loading import whisper_features, whisper_prompt_ids
from mmasr.rescoring.nbest import (ct2_beam_score, ct2_hypothesis, ct2_max_length, merge_shards, nbest_for_batch, nbest_metadata,
                                   run_nbest, teacher_forced_logprobs)
from tests.conftest import processed_corpus

P = validate({})
CFG = {**P["nbest"], "max_new_tokens": 8, "batch_size": 4}
CT2 = {**CFG, "backend": "ctranslate2", "compute_type": "float32"}
NORM = normaliser(P["text"])
INT8_SUM_LOGPROB_TOL = 5e-3  # see test_int8_runs_and_is_scored_by_the_same_teacher_forced_pass


@pytest.fixture(scope="module")
def cache(tmp_path_factory, whisper_bundle):
    root = tmp_path_factory.mktemp("ct2cache")
    ct2.convert_to_ct2(whisper_bundle, "float32", root)
    return root


def test_the_conversion_is_cached_by_revision_and_compute_type(whisper_bundle, cache, monkeypatch):
    folder = ct2.ct2_cache_dir(whisper_bundle.revision, "float32", cache)
    assert folder.name == f"{whisper_bundle.revision.replace(':', '-')}-float32"
    source = json.loads((folder / ct2.SOURCE_FILE).read_text())
    assert source["revision"] == whisper_bundle.revision and source["compute_type"] == "float32"
    assert (folder / "model.bin").is_file() and (folder / "config.json").is_file()

    def no_conversion(*_a, **_k):
        raise AssertionError("converted again")

    monkeypatch.setattr("ctranslate2.converters.TransformersConverter", no_conversion)
    assert ct2.convert_to_ct2(whisper_bundle, "float32", cache) == folder  # reused, not converted again


def test_a_failed_conversion_leaves_nothing_valid_looking(whisper_bundle, tmp_path, monkeypatch):
    import ctranslate2

    real = ctranslate2.converters.TransformersConverter

    class Killed(real):
        def convert(self, output_dir, **kwargs):
            super().convert(output_dir, **kwargs)  # model.bin is written ...
            raise KeyboardInterrupt("killed")      # ... and the job dies before the conversion is recorded

    monkeypatch.setattr(ctranslate2.converters, "TransformersConverter", Killed)
    with pytest.raises(KeyboardInterrupt):
        ct2.convert_to_ct2(whisper_bundle, "int8", tmp_path)
    folder = ct2.ct2_cache_dir(whisper_bundle.revision, "int8", tmp_path)
    assert not folder.exists() and not ct2.is_converted(folder)
    assert [p.name for p in tmp_path.iterdir()] == [f".{folder.name}.lock"]  # no temporary folder left either
    monkeypatch.setattr(ctranslate2.converters, "TransformersConverter", real)
    assert ct2.is_converted(ct2.convert_to_ct2(whisper_bundle, "int8", tmp_path))


def test_unknown_revisions_and_unsupported_compute_types_are_refused(whisper_bundle, tmp_path):
    with pytest.raises(ValueError, match="revision is unknown"):
        ct2.ct2_cache_dir("unknown", "float32", tmp_path)
    import ctranslate2

    if "float16" not in ctranslate2.get_supported_compute_types("cpu"):
        with pytest.raises(ValueError, match="compute_type float16 is not supported by CTranslate2 on cpu"):
            ct2.load_ct2_whisper(whisper_bundle, "float16", tmp_path)
    with pytest.raises(ValueError, match="'bfloat8' is not one of float32, int8, float16"):
        ct2.check_compute_type("bfloat8", "cpu")
    with pytest.raises(ValueError, match="nbest.backend 'onnx' is not one of"):
        nbest_for_batch(whisper_bundle, [np.zeros(8000, np.float32)], {**CFG, "backend": "onnx"}, NORM)


def test_ct2_hypotheses_get_end_of_text_back_unless_cut_at_the_budget():
    assert ct2_hypothesis([5, 6], budget=4, eos=2) == ([5, 6, 2], True)
    assert ct2_hypothesis([5, 6, 7, 8], budget=4, eos=2) == ([5, 6, 7, 8], False)
    # ctranslate2's score: sum (end-of-text included) over the tokens without end-of-text ** length_penalty
    assert ct2_beam_score([-1.0, -2.0, -0.5], complete=True, length_penalty=1.0) == pytest.approx(-3.5 / 2)
    assert ct2_beam_score([-1.0, -2.0], complete=False, length_penalty=0.5) == pytest.approx(-3.0 / 2 ** 0.5)


def masked_logprobs(bundle, states: torch.Tensor, prompt: list[int], ids: list[int]) -> list[float]:
    """Log-probabilities of ``ids`` after the generation config's suppressed tokens are masked out (and the
    begin-suppressed ones at the first step), as ctranslate2 computes them."""
    gen = bundle.model.generation_config
    with torch.inference_mode():
        seq = torch.tensor([prompt + ids])
        logits = bundle.model(encoder_outputs=(states,), decoder_input_ids=seq[:, :-1]).logits[0, len(prompt) - 1:]
    logits = logits.clone().float().numpy()
    logits[:, list(gen.suppress_tokens or [])] = -np.inf
    logits[0, list(gen.begin_suppress_tokens or [])] = -np.inf
    logp = torch.log_softmax(torch.from_numpy(logits), -1)
    return [float(logp[t, tok]) for t, tok in enumerate(ids)]


def test_ct2_scores_mean_what_the_transformers_scores_mean(whisper_bundle, cache, tmp_path):
    man = processed_corpus(tmp_path, n=4)
    audios = [read_audio(p) for p in man["audio_path"]]
    lists = nbest_for_batch(whisper_bundle, audios, CT2, NORM, ct2_cache=cache)
    prompt = whisper_prompt_ids(whisper_bundle, None)
    eos = whisper_bundle.model.generation_config.eos_token_id
    checked = 0
    for audio, hyps in zip(audios, lists):
        assert 1 <= len(hyps) <= CT2["keep"]
        assert [h["asr_score"] for h in hyps] == sorted((h["asr_score"] for h in hyps), reverse=True)
        with torch.inference_mode():
            states = whisper_bundle.model.get_encoder()(whisper_features(whisper_bundle, [audio])["input_features"]).last_hidden_state
        forced = teacher_forced_logprobs(whisper_bundle, states.expand(len(hyps), -1, -1), prompt,
                                         [h["token_ids"] for h in hyps])
        for h, f in zip(hyps, forced):
            # sum_logprob: the transformers model's teacher-forced log-probability (its encoder here, ctranslate2's there)
            assert h["sum_logprob"] == pytest.approx(f, abs=1e-3)
            assert h["asr_score"] == pytest.approx(h["sum_logprob"] / h["n_tokens"] ** CT2["length_penalty"], abs=1e-9)
            assert h["complete"] == (h["token_ids"][-1] == eos)
            assert h["n_tokens"] <= CT2["max_new_tokens"] and (h["complete"] or h["n_tokens"] == CT2["max_new_tokens"])
            # beam_score: ctranslate2's own score, a different quantity (masked distribution, length without EOS)
            masked = masked_logprobs(whisper_bundle, states, prompt, h["token_ids"])
            assert h["beam_score"] == pytest.approx(ct2_beam_score(masked, h["complete"], CT2["length_penalty"]), abs=1e-4)
            checked += 1
    assert checked >= len(audios)


def test_ct2_table_has_the_transformers_columns_and_types_and_shards_merge(whisper_bundle, cache, tmp_path):
    man = processed_corpus(tmp_path)
    whole = run_nbest(whisper_bundle, man, CT2, NORM, progress=False, ct2_cache=cache)
    reference = run_nbest(whisper_bundle, man, CFG, NORM, progress=False)
    assert list(whole.columns) == list(reference.columns)
    assert whole.dtypes.to_dict() == reference.dtypes.to_dict()
    assert set(whole["utt_id"]) == set(man["utt_id"])
    # one encoder pass an utterance either way: CTranslate2's encode calls, the transformers encoder's first layer
    assert whole.attrs["stats"]["mmasr.stats.encoder_passes"] == reference.attrs["stats"]["mmasr.stats.encoder_passes"] \
        == str(len(man))
    # same weights, same float32 maths: the same best hypothesis, scored alike
    best = whole[whole["rank"] == 0].set_index("utt_id")
    ref_best = reference[reference["rank"] == 0].set_index("utt_id")
    assert (best["text"].map(NORM) == ref_best["text"].map(NORM)).mean() >= 0.8
    same = best["text"] == ref_best["text"]
    np.testing.assert_allclose(best.loc[same, "asr_score"], ref_best.loc[same, "asr_score"], atol=1e-3)
    paths = []
    for s in range(2):
        part = run_nbest(whisper_bundle, man, CT2, NORM, shard=s, num_shards=2, progress=False, ct2_cache=cache)
        paths.append(tmp_path / f"{s}-of-2.parquet")
        write_parquet(paths[-1], part, metadata={**nbest_metadata(whisper_bundle, CT2, shard=f"{s}/2"),
                                                 **part.attrs["stats"]})
    merged = merge_shards(paths, tmp_path / "merged.parquet")
    pd.testing.assert_frame_equal(merged, whole)
    decoding = json.loads(read_metadata(tmp_path / "merged.parquet")["mmasr.decoding"])
    assert decoding["backend"] == "ctranslate2" and decoding["compute_type"] == "float32"
    # a transformers shard does not merge with a ctranslate2 one
    write_parquet(tmp_path / "tf.parquet", reference, metadata=nbest_metadata(whisper_bundle, CFG, shard="1/2"))
    with pytest.raises(ValueError, match="made with other settings"):
        merge_shards([paths[0], tmp_path / "tf.parquet"], tmp_path / "m.parquet")


def test_ct2_lists_are_deduplicated_after_normalisation(whisper_bundle, cache, tmp_path):
    man = processed_corpus(tmp_path, n=2)
    audios = [read_audio(p) for p in man["audio_path"]]
    keys = iter(range(10**6))
    distinct = nbest_for_batch(whisper_bundle, audios, CT2, lambda _t: next(keys), ct2_cache=cache)
    assert all(len(h) == CT2["num_return_sequences"] for h in distinct)
    stats: list[dict] = []
    collapsed = nbest_for_batch(whisper_bundle, audios, CT2, lambda _t: "same", stats, ct2_cache=cache)
    assert [len(h) for h in collapsed] == [1, 1] and [s["distinct"] for s in stats] == [1, 1]
    # the one kept is the best-scored beam
    assert [h[0]["asr_score"] for h in collapsed] == [max(x["asr_score"] for x in h) for h in distinct]


def test_int8_runs_and_is_scored_by_the_same_teacher_forced_pass(whisper_bundle, cache, tmp_path):
    man = processed_corpus(tmp_path, n=2)
    audios = [read_audio(p) for p in man["audio_path"]]
    lists = nbest_for_batch(whisper_bundle, audios, {**CT2, "compute_type": "int8"}, NORM, ct2_cache=cache)
    assert (cache / f"{whisper_bundle.revision.replace(':', '-')}-int8" / "model.bin").is_file()
    prompt = whisper_prompt_ids(whisper_bundle, None)
    # sum_logprob is the float32 decoder's teacher-forced pass on ctranslate2's int8 *encoder* output; here the
    # float32 model end to end (its own encoder) scores the same hypotheses. Measured on this demo model (2
    # utterances, 9 hypotheses of 8 tokens, sums near -40.5): int8 differs by at most 1.5e-3 (float32
    # ctranslate2 by at most 5e-6 on the same hypotheses: the difference is the int8 encoder's quantisation).
    # The tolerance, 5e-3, is about 3x the int8 maximum and below the smallest gap between two hypotheses of one
    # utterance (0.012), so a hypothesis scored with another's tokens, without end-of-text (~5 a token), or with
    # ctranslate2's own masked scores would fail.
    checked = 0
    for audio, hyps in zip(audios, lists):
        assert hyps and all(h["asr_score"] == pytest.approx(h["sum_logprob"] / h["n_tokens"]) for h in hyps)
        assert all(h["token_ids"][:len(prompt)] != prompt for h in hyps)
        with torch.inference_mode():
            states = whisper_bundle.model.get_encoder()(whisper_features(whisper_bundle, [audio])["input_features"]).last_hidden_state
        forced = teacher_forced_logprobs(whisper_bundle, states.expand(len(hyps), -1, -1), prompt,
                                         [h["token_ids"] for h in hyps])
        for h, f in zip(hyps, forced):
            assert h["sum_logprob"] == pytest.approx(f, abs=INT8_SUM_LOGPROB_TOL), h["text"]
            checked += 1
    assert checked >= 2 * len(audios)


def test_ct2_max_length_gives_the_budget():
    # ctranslate2's Whisper decodes min(max_length // 2, max_length - (prompt_len - 1)) tokens
    for prompt_len in (2, 4):
        for budget in (1, 2, 3, 8, 446):
            t = ct2_max_length(budget, prompt_len)
            assert min(t // 2, t - (prompt_len - 1)) == budget, (prompt_len, budget)
