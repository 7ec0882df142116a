"""Model loading (mmasr.models.loading) and the small demo models (mmasr.demo.models).

The demo models are built once per module into a temporary folder (a fraction of a second) and
loaded through the same functions the pipeline uses. Nothing is downloaded: hub ids are looked up
with offline mode forced on, or with the hub reported unreachable.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmasr.demo import corpus as demo

from mmasr.demo import models as demo_models

from mmasr.models import loading as models
from mmasr.models.loading import ModelBundle, ModelLoadError

SR = 16000


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    """Every test runs offline with an empty HF cache of its own (constants are read at import,
    so the module attributes are patched as well as the environment)."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path_factory.mktemp("hf_cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    return demo_models.build_demo_models(tmp_path_factory.mktemp("demo") / "models", {}, seed=13)


@pytest.fixture(scope="module")
def whisper(built) -> ModelBundle:
    return models.load_whisper(str(built["whisper"]), device="cpu")


@pytest.fixture(scope="module")
def clip(built) -> ModelBundle:
    return models.load_clip(str(built["clip"]), device="cpu")


def noise(seconds: float, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def weights_of(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def test_demo_vocabulary_covers_the_corpus_and_caption_words():
    vocab = demo_models.demo_vocabulary()
    assert len(vocab) == len(set(vocab))
    assert set(demo.LEXICON) <= set(vocab)
    assert {"an", "image", "showing", "um", "uh"} <= set(vocab)


def test_validate_config_rejects_unknown_keys_and_bad_shapes():
    assert demo_models.validate_config(None) == demo_models.DEFAULT_CONFIG
    with pytest.raises(ValueError, match=r"key 'demo_models.whisper.layers': .*'layers' was unexpected"):
        demo_models.validate_config({"whisper": {"layers": 2}})
    with pytest.raises(ValueError, match=r"key 'demo_models.bert': .*'bert' was unexpected"):
        demo_models.validate_config({"bert": {}})
    with pytest.raises(ValueError, match=r"key 'demo_models.clip.hidden_size': 130 must be divisible by .*attention_heads"):
        demo_models.validate_config({"clip": {"hidden_size": 130}})
    with pytest.raises(ValueError, match=r"key 'demo_models.whisper.d_model': 0 is less than the minimum"):
        demo_models.validate_config({"whisper": {"d_model": 0}})
    with pytest.raises(ValueError, match=r"key 'demo_models.clip.image_size': 100 must be a multiple of .*patch_size"):
        demo_models.validate_config({"clip": {"image_size": 100}})


def test_build_is_atomic_and_replaces(tmp_path, monkeypatch):
    out = tmp_path / "models"
    paths = demo_models.build_demo_models(out, {}, seed=0)
    assert paths == {"whisper": out / "whisper", "clip": out / "clip"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # no partial folder left
    before = weights_of(out / "clip")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo_models, "build_demo_clip", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        demo_models.build_demo_models(out, {}, seed=1)
    assert weights_of(out / "clip") == before  # a failed rebuild leaves the old models intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_same_seed_gives_identical_files_and_other_seed_other_weights(tmp_path, built):
    rng_state = torch.get_rng_state()
    again = demo_models.build_demo_models(tmp_path / "again", {}, seed=13)
    other = demo_models.build_demo_models(tmp_path / "other", {}, seed=14)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's RNG is left alone
    for kind in ("whisper", "clip"):
        files = sorted(p.name for p in built[kind].iterdir())
        assert files == sorted(p.name for p in again[kind].iterdir())
        assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
        for name in files:
            assert (built[kind] / name).read_bytes() == (again[kind] / name).read_bytes(), (kind, name)
        assert weights_of(built[kind]) != weights_of(other[kind])
        assert (built[kind] / "tokenizer.json").read_bytes() == (other[kind] / "tokenizer.json").read_bytes()


# --------------------------------------------------------------------------------------------
# Whisper
# --------------------------------------------------------------------------------------------


def test_load_whisper_bundle(whisper, built):
    assert isinstance(whisper, ModelBundle)
    assert whisper.name == str(built["whisper"])
    assert whisper.device == torch.device("cpu")
    assert not whisper.model.training
    assert whisper.revision == models.model_revision(built["whisper"])
    assert whisper.revision.startswith("sha256:") and len(whisper.revision) == len("sha256:") + 12
    assert whisper.model.config.vocab_size == len(whisper.processor.tokenizer)
    assert whisper.model.config.max_source_positions == 3 * 50


def test_whisper_tokenizer_round_trips_captions_with_one_token_per_word(whisper):
    tok = whisper.processor.tokenizer
    for phrase in demo.all_phrases():
        text = demo.describe("we caught", phrase)
        ids = tok(text).input_ids
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert len(tok.tokenize(text)) == len(text.split())
    for word in demo_models.demo_vocabulary():
        assert len(tok.tokenize(word)) == 1 and len(tok.tokenize(" " + word)) == 1, word
    assert tok.decode(tok("a red bear").input_ids, skip_special_tokens=True) == "a red bear"
    unknown = "zebra crossing ünï 42"  # not in the vocabulary: byte-level fallback, still lossless
    assert tok.decode(tok(unknown).input_ids, skip_special_tokens=True) == unknown
    assert len(tok) < 500


def test_whisper_special_tokens_follow_whispers_layout(whisper):
    tok = whisper.processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", *demo_models.WHISPER_SPECIAL_TOKENS)}
    assert ids["<|en|>"] == ids["<|startoftranscript|>"] + 1
    assert ids["<|nospeech|>"] == ids["<|notimestamps|>"] - 1
    tok_en = copy.deepcopy(tok)
    tok_en.set_prefix_tokens(language="en", task="transcribe")
    assert tok_en.convert_ids_to_tokens(tok_en.prefix_tokens) == [
        "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    gen = whisper.model.generation_config
    assert gen.no_timestamps_token_id == ids["<|notimestamps|>"]
    assert gen.decoder_start_token_id == ids["<|startoftranscript|>"]
    assert gen.is_multilingual is False and not hasattr(gen, "lang_to_id")


def test_whisper_features_shape_and_rate_check(whisper):
    feats = models.whisper_features(whisper, [noise(1.0, 0), noise(2.5, 1), noise(3.0, 2)])
    assert set(feats) == {"input_features"}
    assert tuple(feats["input_features"].shape) == (3, 80, 300)
    with pytest.raises(ValueError, match="longer than .* 3.0 s window"):  # refused, never cut off
        models.whisper_features(whisper, [noise(1.0, 0), noise(4.0, 2)])
    assert feats["input_features"].dtype == torch.float32
    with pytest.raises(ValueError, match="expects 16000 Hz"):
        models.whisper_features(whisper, [noise(1.0, 0)], sr=22050)
    with pytest.raises(ValueError, match="1-D"):
        models.whisper_features(whisper, [np.zeros((SR, 2), np.float32)])


def test_whisper_prompt_for_the_english_only_demo_model(whisper):
    prompt = models.whisper_prompt_ids(whisper, None)
    assert models.describe_prompt(whisper, prompt) == ["<|startoftranscript|>", "<|notimestamps|>"]
    assert models.whisper_prompt_ids(whisper, "en") == prompt == models.whisper_prompt_ids(whisper, "English")
    assert models.whisper_generate_kwargs(whisper, None) == {} == models.whisper_generate_kwargs(whisper, "en")
    with pytest.raises(ValueError, match="English-only"):
        models.whisper_prompt_ids(whisper, "de")
    with pytest.raises(ValueError, match="English-only"):
        models.whisper_prompt_ids(whisper, None, task="translate")


def _teacher_forced_scores(model, feats, sequences: torch.Tensor, prompt_len: int, length_penalty: float):
    """sum of log P(generated token | prefix) after the prompt, up to and including the first EOS,
    divided by (number of those tokens) ** length_penalty."""
    eos = model.generation_config.eos_token_id
    beams = sequences.shape[0] // feats["input_features"].shape[0]
    with torch.inference_mode():
        enc = model.get_encoder()(feats["input_features"]).last_hidden_state.repeat_interleave(beams, 0)
        logp = torch.log_softmax(model(encoder_outputs=(enc,), decoder_input_ids=sequences).logits.double(), -1)
    scores = []
    for i, seq in enumerate(sequences.tolist()):
        gen = seq[prompt_len:]
        gen = gen[: gen.index(eos) + 1] if eos in gen else gen
        total = sum(logp[i, prompt_len - 1 + t, tok].item() for t, tok in enumerate(gen))
        scores.append(total / len(gen) ** length_penalty)
    return np.array(scores)


def test_batched_beam_search_returns_nbest_with_scores(whisper):
    feats = models.whisper_features(whisper, [noise(1.0, 3), noise(2.0, 4), noise(3.0, 5)])
    prompt = models.whisper_prompt_ids(whisper, None)
    with torch.inference_mode():
        out = whisper.model.generate(**feats, num_beams=5, num_return_sequences=5, return_dict_in_generate=True,
                                     output_scores=True, length_penalty=1.0, max_new_tokens=6)
    assert out.sequences.shape[0] == 15 and out.sequences_scores.shape == (15,)
    assert torch.equal(out.sequences[:, : len(prompt)], torch.tensor([prompt] * 15))
    # HF's beam score = summed log-probs of the generated tokens / their count ** length_penalty
    expected = _teacher_forced_scores(whisper.model, feats, out.sequences, len(prompt), 1.0)
    np.testing.assert_allclose(out.sequences_scores.double().numpy(), expected, atol=1e-5)


def test_multilingual_calling_convention_matches_generate(built):
    """The real Whisper convention (language + task) on the same small model, made multilingual."""
    bundle = models.load_whisper(str(built["whisper"]), device="cpu")
    tok, gen = bundle.processor.tokenizer, bundle.model.generation_config
    gen.is_multilingual = True
    gen.lang_to_id = {"<|en|>": tok.convert_tokens_to_ids("<|en|>")}
    gen.task_to_id = {t: tok.convert_tokens_to_ids(f"<|{t}|>") for t in ("transcribe", "translate")}
    prompt = models.whisper_prompt_ids(bundle, "english", "transcribe")
    assert models.describe_prompt(bundle, prompt) == [
        "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    kwargs = models.whisper_generate_kwargs(bundle, "english", "transcribe")
    assert kwargs == {"language": "en", "task": "transcribe"}
    feats = models.whisper_features(bundle, [noise(1.0, 6), noise(1.5, 7)])
    with torch.inference_mode():
        out = bundle.model.generate(**feats, **kwargs, num_beams=2, num_return_sequences=2, max_new_tokens=3,
                                    return_dict_in_generate=True)
    assert torch.equal(out.sequences[:, : len(prompt)], torch.tensor([prompt] * 4))
    with pytest.raises(ValueError, match="multilingual"):
        models.whisper_prompt_ids(bundle, None)


# --------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------


def test_clip_tokenizer_and_processor(clip):
    tok = clip.processor.tokenizer
    for word in demo_models.demo_vocabulary():
        assert len(tok.tokenize(word)) == 1, word
    assert tok("Two GREEN Goats").input_ids == tok("two green goats").input_ids  # lower-cased like CLIP
    for phrase in demo.all_phrases()[::7]:
        assert tok.decode(tok(phrase.text).input_ids, skip_special_tokens=True) == phrase.text
    batch = clip.processor(text=["a red bear", "an image showing two blue cups"], padding=True, return_tensors="pt")
    ids = batch["input_ids"]
    assert ids[0, 0] == tok.bos_token_id and ids[1, -1] == tok.eos_token_id
    assert batch["attention_mask"][0].sum() == 5  # bos + 3 words + eos
    pixels = clip.processor(images=[Image.new("RGB", (100, 80)), Image.new("RGB", (30, 60))], return_tensors="pt")
    assert tuple(pixels["pixel_values"].shape) == (2, 3, 96, 96)


def test_clip_embeddings_are_unit_norm(clip, built):
    assert clip.revision == models.model_revision(built["clip"]) and not clip.model.training
    rng = np.random.default_rng(0)
    images = [demo.draw_picture("bear", "red", 2, 96, rng), Image.new("L", (50, 70), 128),
              Image.new("RGBA", (64, 64), (0, 0, 200, 100))]
    img = models.clip_image_embeddings(clip, images)
    txt = models.clip_text_embeddings(clip, ["a red bear", "three yellow cups", "", "um " * 40])
    for emb, n in ((img, 3), (txt, 4)):
        assert emb.shape == (n, 64) and emb.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert models.clip_text_embeddings(clip, []).shape == (0, 64)
    assert models.clip_image_embeddings(clip, []).shape == (0, 64)
    again = models.clip_text_embeddings(clip, ["three yellow cups"])  # batch composition does not matter
    np.testing.assert_allclose(again[0], txt[1], atol=1e-5)


# --------------------------------------------------------------------------------------------
# Revisions and errors
# --------------------------------------------------------------------------------------------


def test_model_revision_local_is_content_based(tmp_path, built):
    copied = Path(shutil.copytree(built["clip"], tmp_path / "elsewhere"))
    (copied / "README.md").write_text("notes do not change the model\n")
    assert models.model_revision(copied) == models.model_revision(built["clip"])
    assert models.model_revision(built["whisper"]) != models.model_revision(built["clip"])
    assert models.model_revision(tmp_path / "missing" / "model") == "unknown"


def test_model_revision_hub_id_reads_the_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--tiny-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    assert models.model_revision("someone/tiny-model") == commit
    assert models.model_revision("someone/other-model") == "unknown"
    assert models.model_revision("someone/other-model", revision="f" * 40) == "f" * 40


def test_local_and_hub_names_are_told_apart(tmp_path, built):
    assert models.is_local_name(str(built["whisper"]))
    assert models.is_local_name("results/checkpoints/demo/whisper")
    assert models.is_local_name("./whisper") and models.is_local_name("~/models/clip")
    assert not models.is_local_name("openai/whisper-small")
    assert not models.is_local_name("gpt2")


def test_missing_local_folder_gives_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        models.load_whisper(str(tmp_path / "nope" / "whisper"), device="cpu")
    msg = str(err.value)
    assert "Whisper model" in msg and "local folder" in msg and "does not exist" in msg
    assert "build-demo-models" in msg


def test_wrong_or_incomplete_folder_is_refused(tmp_path, built):
    with pytest.raises(ModelLoadError, match="model_type='whisper', expected 'clip'"):
        models.load_clip(str(built["whisper"]), device="cpu")
    with pytest.raises(ModelLoadError, match="no config.json"):
        models.load_clip(str(built["clip"].parent), device="cpu")
    from safetensors.torch import load_file, save_file

    broken = Path(shutil.copytree(built["clip"], tmp_path / "broken"))
    tensors = load_file(broken / "model.safetensors")
    tensors.pop("visual_projection.weight")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="1 weight of CLIPModel missing from the checkpoint"):
        models.load_clip(str(broken), device="cpu")


def test_unknown_hub_id_offline_gives_a_clear_error():
    with pytest.raises(ModelLoadError) as err:
        models.load_clip("nobody-here/no-such-model", device="cpu")
    msg = str(err.value)
    assert "CLIP model 'nobody-here/no-such-model'" in msg and "hub id" in msg and "offline" in msg
    assert "no network here?" in msg


def test_unreachable_hub_fails_fast_without_offline_mode(monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout_s=3.0: False)
    with pytest.raises(ModelLoadError, match="cannot be reached"):
        models.load_whisper("nobody-here/no-such-model", device="cpu")


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------


def test_pick_device():
    assert models.pick_device("cpu") == torch.device("cpu")
    assert models.pick_device("auto").type in ("cpu", "cuda", "mps")
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA device"):
            models.pick_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            models.pick_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        models.pick_device("tpu")


def test_autocast_is_a_no_op_on_cpu():
    with models.autocast(torch.device("cpu")):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32
