"""Memory-aware loading (models.dtype), the facts logged per loaded model, and checkpoints whose weights
do not fit the model (mmasr.models.loading; issue 17, items 3 and 5).

The checkpoints are tiny random models written with save_pretrained (a fraction of a second), then
edited the way real checkpoints go wrong: a weight dropped, a junk weight added, weights saved under
the old weight-norm names, a task head on top, a wrong shape. Nothing is downloaded.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mmasr.config import validate
from mmasr.data.audio import read_audio
from mmasr.models import loading
from mmasr.models.loading import (CheckpointMismatchError, ModelLoadError, float32_output_layer, format_count,
                                  format_keys, load_audio_encoder, load_from_params, load_whisper, model_memory_bytes,
                                  parameter_count, resolve_dtype, split_unexpected_keys, whisper_features,
                                  whisper_prompt_ids)
from mmasr.rescoring.nbest import nbest_for_batch, teacher_forced_logprobs
from mmasr.data.text import normaliser
from tests.conftest import processed_corpus

BF16, F32, F16 = torch.bfloat16, torch.float32, torch.float16
POS_CONV = "encoder.pos_conv_embed.conv"


# --------------------------------------------------------------------------------------------
# dtype resolution
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, device, bf16, expected", [
    ("auto", "cpu", None, F32),  # CPU results stay exactly reproducible
    ("auto", "mps", None, F32),
    ("auto", "cuda", True, BF16),
    ("auto", "cuda:1", True, BF16),
    ("auto", "cuda", False, F32),  # a GPU without bf16 (V100): float32, not float16's overflow risk
    ("float32", "cuda", True, F32),
    ("bfloat16", "cpu", None, BF16),
    ("float16", "cuda", True, F16),
    ("float16", "mps", None, F16),
    (torch.bfloat16, "cpu", None, BF16),
])
def test_resolve_dtype_for_frozen_models(name, device, bf16, expected):
    assert resolve_dtype(name, torch.device(device), "frozen", bf16_supported=bf16) == expected


@pytest.mark.parametrize("name", ["auto", "float32", "bfloat16", "float16"])
def test_trained_weights_stay_float32(name):
    assert resolve_dtype(name, torch.device("cuda"), "trained", bf16_supported=True) == F32
    assert resolve_dtype(name, torch.device("cpu"), "trained") == F32  # float16 too: it is not loaded as such


def test_resolve_dtype_refuses_float16_on_cpu_and_unknown_names():
    with pytest.raises(ValueError, match="float16 on the CPU.*use bfloat16"):
        resolve_dtype("float16", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown model dtype 'half'.*auto, float32, bfloat16, float16"):
        resolve_dtype("half", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown model role"):
        resolve_dtype("auto", torch.device("cpu"), "finetuned")


def test_params_schema_knows_models_dtype():
    assert validate({})["models"]["dtype"] == "auto"
    assert validate({"models": {"dtype": "bfloat16"}})["models"]["dtype"] == "bfloat16"
    from mmasr.config import ParamsError

    with pytest.raises(ParamsError):
        validate({"models": {"dtype": "fp8"}})
    with pytest.raises(ParamsError):  # transformers 5 ignores it: no dead key
        validate({"models": {"low_cpu_mem_usage": True}})


# --------------------------------------------------------------------------------------------
# Counting and formatting
# --------------------------------------------------------------------------------------------


class _Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)  # 40
        self.proj = torch.nn.Linear(4, 3)  # 12 + 3
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: counted once
        self.register_buffer("table", torch.zeros(5, dtype=torch.float64))  # 40 bytes, not a parameter


def test_parameter_count_and_memory_count_shared_tensors_once():
    m = _Tied()
    assert parameter_count(m) == 40 + 12 + 3
    assert model_memory_bytes(m) == (40 + 12 + 3) * 4 + 5 * 8
    assert model_memory_bytes(m.to(torch.bfloat16)) == (40 + 12 + 3) * 2 + 5 * 2  # .to() casts float buffers too


def test_process_memory_is_read_from_the_kernel_for_this_and_other_processes():
    import os
    import subprocess
    import sys

    from mmasr.memory import peak_rss_bytes, proc_status_bytes

    before = peak_rss_bytes()
    block = bytearray(64 * 2**20)  # touched: resident
    block[:: 4096] = b"x" * len(block[:: 4096])
    assert peak_rss_bytes() >= before and peak_rss_bytes() >= 64 * 2**20
    assert proc_status_bytes("VmRSS") <= peak_rss_bytes() and proc_status_bytes("NoSuchField") is None
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert 0 < peak_rss_bytes(child.pid) < peak_rss_bytes()  # a bare interpreter, not this process's peak
    finally:
        child.kill()
        child.wait()
    assert peak_rss_bytes(child.pid) is None and os.getpid() != child.pid  # ended: no /proc entry


def test_format_count_quotes_model_sizes():
    assert format_count(241_734_912) == "241.7 M"
    assert format_count(3_075_098_624) == "3.08 B"
    assert format_count(814_720) == "814.7 K"
    assert format_count(950) == "950"


def test_format_keys_caps_the_list():
    keys = [f"layer.{i:02d}.weight" for i in range(25)]
    text = format_keys(reversed(keys))
    assert text.startswith("layer.00.weight, layer.01.weight") and "layer.19.weight" in text
    assert "layer.20.weight" not in text and text.endswith(" ... and 5 more")
    assert format_keys(["b", "a"]) == "a, b"


def test_split_unexpected_keys_drops_heads_of_base_models_only():
    keys = ["lm_head.weight", "lm_head.bias", "cls.predictions.bias", "encoder.junk", "junk"]
    assert split_unexpected_keys(keys, base_model=True) == (
        ["cls.predictions.bias", "lm_head.bias", "lm_head.weight"], ["encoder.junk", "junk"])
    assert split_unexpected_keys(keys, base_model=False) == ([], sorted(keys))


# --------------------------------------------------------------------------------------------
# Checkpoints that do not load cleanly: a tiny HuBERT
# --------------------------------------------------------------------------------------------


def _hubert_config():
    from transformers import HubertConfig

    return HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
                        num_conv_pos_embedding_groups=2, vocab_size=12)


def _save_hubert(model, folder: Path) -> Path:
    from transformers import Wav2Vec2FeatureExtractor

    from mmasr.models.loading import quiet_hf_progress

    with quiet_hf_progress():
        model.save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hubert_dir(tmp_path_factory) -> Path:
    from transformers import HubertModel

    torch.manual_seed(0)
    return _save_hubert(HubertModel(_hubert_config()), tmp_path_factory.mktemp("hubert") / "base")


def _edited(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    save_file(edit(dict(tensors)), dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_the_saved_hubert_uses_the_new_weight_norm_names(hubert_dir):
    keys = set(load_file(hubert_dir / "model.safetensors"))
    assert {f"{POS_CONV}.parametrizations.weight.original0", f"{POS_CONV}.parametrizations.weight.original1"} <= keys
    assert f"{POS_CONV}.weight_g" not in keys


def test_a_dropped_weight_is_an_error_naming_it(hubert_dir, tmp_path):
    broken = _edited(hubert_dir, tmp_path / "dropped", lambda t: {k: v for k, v in t.items()
                                                                  if k != "encoder.layer_norm.bias"})
    with pytest.raises(CheckpointMismatchError) as err:
        load_audio_encoder(str(broken), device="cpu")
    msg = str(err.value)
    assert isinstance(err.value, ModelLoadError)
    assert f"audio encoder model '{broken}' (treated as a local folder" in msg
    assert "1 weight of HubertModel missing from the checkpoint" in msg and "encoder.layer_norm.bias" in msg
    assert "another architecture" in msg and "renamed" in msg


def test_many_missing_weights_are_named_up_to_a_cap(hubert_dir, tmp_path):
    keep = {"feature_extractor.conv_layers.0.conv.weight"}
    broken = _edited(hubert_dir, tmp_path / "gutted", lambda t: {k: v for k, v in t.items() if k in keep})
    with pytest.raises(CheckpointMismatchError) as err:
        load_audio_encoder(str(broken), device="cpu")
    n_missing = len(load_file(hubert_dir / "model.safetensors")) - 1
    msg = str(err.value)
    assert f"{n_missing} weights of HubertModel missing" in msg
    assert f" ... and {n_missing - 20} more" in msg and msg.count("encoder.layers.") <= 20


def test_a_wrong_shape_is_an_error_naming_key_and_shapes(hubert_dir, tmp_path):
    broken = _edited(hubert_dir, tmp_path / "shape", lambda t: {**t, "encoder.layer_norm.weight": torch.ones(7)})
    with pytest.raises(CheckpointMismatchError, match=r"1 weight with another shape in the checkpoint than "
                                                      r"HubertModel expects: encoder.layer_norm.weight \(checkpoint "
                                                      r"\(7,\), model \(32,\)\)"):
        load_audio_encoder(str(broken), device="cpu")


def test_a_junk_weight_is_a_warning_naming_it(hubert_dir, tmp_path, caplog):
    junk = _edited(hubert_dir, tmp_path / "junk", lambda t: {**t, "encoder.junk.weight": torch.zeros(3)})
    with caplog.at_level(logging.INFO, logger="mmasr.models.loading"):
        bundle = load_audio_encoder(str(junk), device="cpu")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "encoder.junk.weight" in warnings[0] and "not used by HubertModel" in warnings[0]
    assert str(junk) in warnings[0]
    reference = load_audio_encoder(str(hubert_dir), device="cpu").model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in bundle.model.state_dict().items())


def test_a_ctc_head_loaded_as_the_base_model_is_one_info_line(tmp_path, caplog):
    from transformers import HubertForCTC

    torch.manual_seed(1)
    ctc = _save_hubert(HubertForCTC(_hubert_config()), tmp_path / "ctc")
    assert {"lm_head.weight", "lm_head.bias"} <= set(load_file(ctc / "model.safetensors"))
    with caplog.at_level(logging.INFO, logger="mmasr.models.loading"):
        bundle = load_audio_encoder(str(ctc), device="cpu")
    assert type(bundle.model).__name__ == "HubertModel"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("2 weights of a task head (lm_head) not part of HubertModel" in r.getMessage() for r in caplog.records)


def test_old_weight_norm_names_load_with_identical_weights(hubert_dir, tmp_path, caplog):
    """Checkpoints saved before torch's weight-norm parametrisation (facebook/hubert-base-ls960's) store
    ``weight_g``/``weight_v``; transformers 5 renames them on load."""
    def rename(t):
        return {k.replace("parametrizations.weight.original0", "weight_g")
                 .replace("parametrizations.weight.original1", "weight_v"): v for k, v in t.items()}

    old = _edited(hubert_dir, tmp_path / "old_names", rename)
    assert {f"{POS_CONV}.weight_g", f"{POS_CONV}.weight_v"} <= set(load_file(old / "model.safetensors"))
    with caplog.at_level(logging.INFO, logger="mmasr.models.loading"):
        bundle = load_audio_encoder(str(old), device="cpu")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    reference = load_audio_encoder(str(hubert_dir), device="cpu").model.state_dict()
    state = bundle.model.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)


# --------------------------------------------------------------------------------------------
# dtype at load, and the log line
# --------------------------------------------------------------------------------------------


def _models_cfg(whisper: Path, dtype: str) -> dict:
    return {**validate({})["models"], "whisper": str(whisper), "device": "cpu", "dtype": dtype}


def test_load_from_params_applies_models_dtype(demo_model_dirs, caplog):
    with caplog.at_level(logging.INFO, logger="mmasr.models.loading"):
        bundle = load_from_params("whisper", _models_cfg(demo_model_dirs["whisper"], "bfloat16"))
    assert {p.dtype for p in bundle.model.parameters()} == {BF16}
    auto = load_from_params("whisper", _models_cfg(demo_model_dirs["whisper"], "auto"))  # CPU: float32
    assert {p.dtype for p in auto.model.parameters()} == {F32}
    trained = load_from_params("whisper", _models_cfg(demo_model_dirs["whisper"], "bfloat16"), role="trained")
    assert {p.dtype for p in trained.model.parameters()} == {F32}
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded Whisper"))
    n = parameter_count(bundle.model)
    assert f"loaded Whisper {demo_model_dirs['whisper']} (revision sha256:" in line
    assert f"{format_count(n)} parameters, bfloat16, cpu, {model_memory_bytes(bundle.model) / 2**20:.1f} MB" in line
    assert "peak RSS" in line and model_memory_bytes(bundle.model) == 2 * n + 2 * sum(
        b.numel() for b in bundle.model.buffers())


def test_float16_on_cpu_fails_before_loading(tmp_path):
    with pytest.raises(ValueError, match="float16 on the CPU"):  # the folder does not even exist
        load_from_params("whisper", _models_cfg(tmp_path / "nothing", "float16"))


def test_the_cli_logs_each_loaded_model(demo_model_dirs, tmp_path, caplog):
    """What a rule's log (the command's stderr) shows: one line per model, through mmasr.cli's logging."""
    import json

    from mmasr.cli import main

    man = processed_corpus(tmp_path, n=2)
    man.to_parquet(tmp_path / "manifest.parquet")
    cfg = {"models": {"whisper": str(demo_model_dirs["whisper"]), "device": "cpu", "dtype": "bfloat16"},
           "nbest": {"max_new_tokens": 4, "num_beams": 2, "num_return_sequences": 2, "keep": 2}}
    with caplog.at_level(logging.INFO):
        rc = main(["nbest", "--cfg", json.dumps(cfg), "--manifest", str(tmp_path / "manifest.parquet"),
                   "--out", str(tmp_path / "nbest.parquet"), "--quiet"])
    assert rc in (0, None)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded ")]
    assert len(lines) == 1 and "bfloat16, cpu" in lines[0]
    from mmasr.io import read_metadata

    assert read_metadata(tmp_path / "nbest.parquet")["mmasr.dtype"] == "bfloat16"


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_frozen_encoders_and_clip_run_in_bfloat16(hubert_dir, demo_model_dirs):
    """Inputs follow the model's dtype (no autocast on the CPU to do it), outputs come back float32."""
    from PIL import Image

    from mmasr.models.layers import embed_audio
    from mmasr.models.loading import clip_image_embeddings, load_clip

    rng = np.random.default_rng(0)
    audios = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (8000, 12000)]
    for name in (str(hubert_dir), str(demo_model_dirs["whisper"])):  # HuBERT family, a Whisper encoder
        out = {dt: embed_audio(load_audio_encoder(name, device="cpu", dtype=dt), audios, [1, 2])
               for dt in ("float32", "bfloat16")}
        assert out["bfloat16"].dtype == np.float32 and out["bfloat16"].shape == out["float32"].shape
        assert _cosines(out["float32"], out["bfloat16"]).min() > 0.99
    pictures = [Image.new("RGB", (64, 48), c) for c in ((200, 30, 30), (30, 30, 200))]
    emb = {dt: clip_image_embeddings(load_clip(str(demo_model_dirs["clip"]), device="cpu", dtype=dt), pictures)
           for dt in ("float32", "bfloat16")}
    assert emb["bfloat16"].dtype == np.float32 and _cosines(emb["float32"], emb["bfloat16"]).min() > 0.99


# --------------------------------------------------------------------------------------------
# n-best scores in float32 whatever the load dtype
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def whisper_pair(demo_model_dirs):
    path = str(demo_model_dirs["whisper"])
    return load_whisper(path, device="cpu", dtype="float32"), load_whisper(path, device="cpu", dtype="bfloat16")


def test_float32_output_layer_gives_float32_logits_and_restores_the_layer(whisper_pair):
    _, b16 = whisper_pair
    model = b16.model
    layer = model.get_output_embeddings()
    ids = torch.tensor([whisper_prompt_ids(b16, None)])
    states = torch.randn(1, 8, model.config.d_model, dtype=BF16)
    with torch.inference_mode():
        assert model(encoder_outputs=(states,), decoder_input_ids=ids).logits.dtype == BF16
        with float32_output_layer(model):
            inside = model(encoder_outputs=(states,), decoder_input_ids=ids).logits
    assert inside.dtype == F32 and model.get_output_embeddings() is layer and layer.weight.dtype == BF16
    f32_layer = whisper_pair[0].model.get_output_embeddings()
    with float32_output_layer(whisper_pair[0].model):  # a float32 model on the CPU: left as it is
        assert whisper_pair[0].model.get_output_embeddings() is f32_layer


def test_nbest_scores_agree_between_float32_and_bfloat16_weights(whisper_pair, tmp_path):
    b32, b16 = whisper_pair
    assert {p.dtype for p in b16.model.parameters()} == {BF16}  # bf16 weights really were loaded
    assert {p.dtype for p in b32.model.parameters()} == {F32}
    man = processed_corpus(tmp_path, n=3)
    audios = [read_audio(p) for p in man["audio_path"]]
    params = validate({})
    cfg = {**params["nbest"], "max_new_tokens": 6, "num_beams": 3, "num_return_sequences": 3, "keep": 3}
    prompt = whisper_prompt_ids(b32, None)
    norm = normaliser(params["text"])

    def forced(b, audio, tokens):
        with torch.inference_mode():
            states = b.model.get_encoder()(whisper_features(b, [audio])["input_features"]).last_hidden_state
        scores = teacher_forced_logprobs(b, states.expand(len(tokens), -1, -1), prompt, tokens)
        assert scores.dtype == np.float64
        return scores

    across, within = [], {"f32": [], "b16": []}
    lists = {name: nbest_for_batch(b, audios, cfg, norm) for name, b in (("f32", b32), ("b16", b16))}
    for audio, hyps32, hyps16 in zip(audios, lists["f32"], lists["b16"]):
        for name, b, hyps in (("f32", b32, hyps32), ("b16", b16, hyps16)):
            assert hyps and all(isinstance(h["sum_logprob"], float) for h in hyps)
            stored = [h["sum_logprob"] for h in hyps]
            within[name] += list(np.abs(forced(b, audio, [h["token_ids"] for h in hyps]) - stored))
        tokens = [h["token_ids"] for h in hyps32]  # the same hypotheses scored by both
        across += list(np.abs(forced(b32, audio, tokens) - forced(b16, audio, tokens)) / [len(t) for t in tokens])
    # Measured (random-init demo Whisper, 2 CPU threads): bf16 weights move a token's log-probability by at most
    # 1.3e-3 nats (asserted < 1e-2); the beam's scores equal a teacher-forced pass of the same weights to 4e-6 in
    # both dtypes (asserted < 1e-4, and < 1e-3 for bf16, whose cached and full passes may round differently).
    assert 0 < max(across) < 1e-2, max(across)  # > 0: the bf16 weights were used
    assert max(within["f32"]) < 1e-4, max(within["f32"])
    assert max(within["b16"]) < 1e-3, max(within["b16"])
