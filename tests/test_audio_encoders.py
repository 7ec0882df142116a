"""Audio encoders beyond HuBERT and Whisper: AST (patch tokens of a fixed fbank window), EAT (its own
code, only when trust_remote_code is named), BEATs (refused), and the rule that no loader ever passes
trust_remote_code=True unless asked. Every model is tiny, random and built here (no downloads)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mmasr.models.layers import (PATCH_FAMILIES, WAVEFORM_TYPES, audio_forward, audio_inputs, audio_kind, batchable,
                                 embed_audio, encoder_depth, fbank_frames, hidden_size, patch_grid, patch_mask,
                                 select_layers, transformer_layers)
from mmasr.models.loading import (AUDIO_ENCODER_TYPES, EAT_FBANK, ModelLoadError, load_audio_encoder,
                                  remote_code_reason)
from tests.conftest import save_tiny_ast, tone

SR = 16000


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    """Offline, with an empty HF cache of its own: nothing here may touch the network."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf_cache")))


@pytest.fixture(scope="module")
def ast_dir(tmp_path_factory) -> Path:
    return save_tiny_ast(tmp_path_factory.mktemp("ast") / "ast")


# --------------------------------------------------------------------------------------------
# AST: the feature extractor, the patch grid and the pooling mask
# --------------------------------------------------------------------------------------------


def test_fbank_frame_count_is_torchaudio_kaldis():
    import torchaudio.compliance.kaldi as kaldi

    for n in (400, 401, 559, 560, 16000, 16123, 33333):
        frames = kaldi.fbank(torch.randn(1, n), sample_frequency=SR, window_type="hanning", num_mel_bins=128).shape[0]
        assert fbank_frames(n, SR) == frames, n
    assert fbank_frames(399, SR) == 0


def test_ast_feature_extractor_is_kaldi_fbank_padded_to_1024_frames_and_normalised():
    """AST's feature extractor, used as is, runs torchaudio's Kaldi fbank (not its numpy fallback) and
    pads with zeros before normalising with the AudioSet mean/std."""
    import torchaudio.compliance.kaldi as kaldi
    from transformers import ASTFeatureExtractor
    from transformers.utils import is_speech_available

    assert is_speech_available()  # torchaudio is importable: the extractor takes the kaldi path
    fe = ASTFeatureExtractor()
    audio = tone(1.0, lead=0.1, tail=0.1)
    got = fe(audio, sampling_rate=SR, return_tensors="pt")["input_values"][0]
    fbank = kaldi.fbank(torch.from_numpy(audio)[None], sample_frequency=SR, window_type="hanning", num_mel_bins=128)
    n = fbank_frames(len(audio), SR)
    assert got.shape == (1024, 128) and fbank.shape[0] == n == 118
    torch.testing.assert_close(got[:n], (fbank - fe.mean) / (2 * fe.std))
    torch.testing.assert_close(got[n:], torch.full((1024 - n, 128), -fe.mean / (2 * fe.std)))  # padding


def test_patch_grid_of_the_real_ast_and_eat_configs():
    from transformers import ASTConfig

    grid = patch_grid(SimpleNamespace(config=ASTConfig()), 128, 1024)  # MIT/ast-finetuned-audioset-10-10-0.4593
    assert (grid.special_tokens, grid.freq, grid.time, grid.time_stride, grid.time_major) == (2, 12, 101, 10, False)
    assert grid.n_tokens == 1214
    eat = SimpleNamespace(model_type="eat", patch_size=16, stride=16)
    grid = patch_grid(SimpleNamespace(config=eat), 128, 1024)
    assert (grid.special_tokens, grid.freq, grid.time, grid.time_major, grid.n_tokens) == (1, 8, 64, True, 513)


def test_patch_mask_keeps_the_columns_that_start_inside_the_audio():
    from mmasr.models.layers import PatchGrid

    grid = PatchGrid(special_tokens=2, freq=3, time=5, time_stride=10, time_major=False)
    mask = patch_mask(grid, torch.tensor([1, 10, 11, 35, 500, 0]))
    assert mask.shape == (6, 2 + 15) and not mask[:, :2].any()
    columns = mask[:, 2:].reshape(6, 3, 5)  # frequency-major: token 2 + f * 5 + t
    assert (columns == columns[:, :1]).all()  # every frequency row alike
    assert columns[:, 0].sum(dim=1).tolist() == [1, 1, 2, 4, 5, 1]  # ceil(frames / 10), at least 1, at most 5
    t_major = patch_mask(PatchGrid(1, 3, 5, 10, True), torch.tensor([35]))[0, 1:].reshape(5, 3)  # 1 + t * 3 + f
    assert t_major.all(dim=1).tolist() == [True] * 4 + [False] and not t_major[4].any()


def test_ast_token_order_is_frequency_major(ast_dir):
    """The order the mask assumes, read off transformers' own patch embedding: its conv output
    (B, D, F, T) flattened, so token 2 + f * T + t is frequency row f, time column t."""
    bundle = load_audio_encoder(str(ast_dir), device="cpu")
    emb = bundle.model.embeddings.patch_embeddings
    x = torch.randn(1, 1024, 128)
    with torch.no_grad():
        tokens = emb(x)
        conv = emb.projection(x.unsqueeze(1).transpose(2, 3))  # (1, D, F, T)
    grid = patch_grid(bundle.model, 128, 1024)
    assert conv.shape[2:] == (grid.freq, grid.time)
    torch.testing.assert_close(tokens.reshape(1, grid.freq, grid.time, -1), conv.permute(0, 2, 3, 1))


# --------------------------------------------------------------------------------------------
# AST: loading, pooling, batching
# --------------------------------------------------------------------------------------------


def test_ast_loads_as_a_patch_encoder_and_a_classifier_checkpoint_as_its_base_model(tmp_path, ast_dir):
    bundle = load_audio_encoder(str(ast_dir), device="cpu")
    assert type(bundle.model).__name__ == "ASTModel" and type(bundle.processor).__name__ == "ASTFeatureExtractor"
    assert audio_kind(bundle.model) == "patches" and batchable(bundle)
    assert (encoder_depth(bundle.model), hidden_size(bundle.model), len(transformer_layers(bundle.model))) == (2, 32, 2)

    folder = save_tiny_ast(tmp_path / "cls", classifier=True)
    base = load_audio_encoder(str(folder), device="cpu").model
    from transformers import ASTForAudioClassification

    full = ASTForAudioClassification.from_pretrained(folder)
    assert type(base).__name__ == "ASTModel"
    for name, p in base.state_dict().items():
        torch.testing.assert_close(p, full.audio_spectrogram_transformer.state_dict()[name], msg=name)


def test_ast_pools_only_the_patches_that_cover_the_audio(ast_dir):
    """The pooled vector of each selected layer equals a direct computation: the hidden states without
    CLS and distillation, laid out as the (frequency, time) grid, averaged over the time columns whose
    patches start inside the audio's fbank frames."""
    bundle = load_audio_encoder(str(ast_dir), device="cpu")
    audio = tone(0.73, lead=0.05, tail=0.05)  # 13280 samples -> 81 fbank frames -> 9 of 101 time columns
    layers = [0, 1, 2]
    got = embed_audio(bundle, [audio], layers)[0]
    with torch.no_grad():
        x = bundle.processor(audio, sampling_rate=SR, return_tensors="pt")["input_values"]
        states = bundle.model(x, output_hidden_states=True).hidden_states
    assert fbank_frames(len(audio)) == 81
    for k, i in enumerate(layers):
        grid = states[i][0, 2:].reshape(12, 101, 32)
        np.testing.assert_allclose(got[k * 32:(k + 1) * 32], grid[:, :9].mean(dim=(0, 1)).numpy(), atol=1e-5)
    # neither the special tokens nor the padding's patches are in it
    assert not np.allclose(got[-32:], states[2][0, 2:].mean(0).numpy(), atol=1e-3)
    assert not np.allclose(got[-32:], states[2][0, :2 + 12 * 9].mean(0).numpy(), atol=1e-3)


def test_ast_batches_exactly(ast_dir):
    bundle = load_audio_encoder(str(ast_dir), device="cpu")
    short, long = tone(0.4, freq=200, lead=0.05, tail=0.05), tone(2.2, freq=300, lead=0.05, tail=0.05)
    layers = select_layers("quartiles", 2)
    batched = embed_audio(bundle, [short, long], layers, batch_size=2)
    assert batched.shape == (2, 4 * 32)
    np.testing.assert_allclose(batched[0], embed_audio(bundle, [short], layers)[0], atol=1e-5)
    np.testing.assert_allclose(batched[1], embed_audio(bundle, [long], layers)[0], atol=1e-5)


def test_ast_warns_when_audio_is_longer_than_its_window(ast_dir, caplog):
    bundle = load_audio_encoder(str(ast_dir), device="cpu")
    with caplog.at_level(logging.WARNING):
        inputs, mask = audio_inputs(bundle, [np.zeros(11 * SR, np.float32), np.zeros(SR, np.float32)])
    assert "longer than" in caplog.text and "10.255 s window" in caplog.text and "cut off" in caplog.text
    assert inputs["input_values"].shape == (2, 1024, 128)
    assert mask[0].sum() == 12 * 101 and mask[1].sum() == 12 * 10  # the whole window; 98 frames -> 10 columns
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        audio_inputs(bundle, [np.zeros(10 * SR, np.float32), np.zeros(100, np.float32)])  # fits; shorter than a window
    assert "longer than" not in caplog.text


def test_ast_quartiles_of_twelve_layers_and_a_differentiable_last_layer(tmp_path):
    """select_layers' quartiles on AST's 12 layers, and what CLAP phase 2 needs: the last layers found
    and trained through the pooled forward."""
    bundle = load_audio_encoder(str(save_tiny_ast(tmp_path / "ast12", layers=12, width=16)), device="cpu")
    depth = encoder_depth(bundle.model)
    assert depth == 12 and select_layers("quartiles", depth) == [3, 6, 9, 12]
    audios = [tone(0.5, lead=0.05, tail=0.05), tone(0.9, freq=300, lead=0.05, tail=0.05)]
    assert embed_audio(bundle, audios, select_layers("quartiles", depth)).shape == (2, 4 * 16)

    model = bundle.model
    model.requires_grad_(False)
    last = transformer_layers(model)[-1]
    last.requires_grad_(True)
    inputs, mask = audio_inputs(bundle, audios)
    audio_forward(model, inputs, mask, [12]).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in last.parameters())
    assert all(p.grad is None for p in transformer_layers(model)[0].parameters())


def test_every_audio_encoder_type_has_a_kind():
    for model_type in AUDIO_ENCODER_TYPES:
        assert audio_kind(SimpleNamespace(config=SimpleNamespace(model_type=model_type))) in (
            "whisper", "waveform", "patches")
    assert set(AUDIO_ENCODER_TYPES) == {"whisper", *WAVEFORM_TYPES, *PATCH_FAMILIES}
    with pytest.raises(ValueError, match="no layer access for audio encoder model_type 'bert'"):
        audio_kind(SimpleNamespace(config=SimpleNamespace(model_type="bert")))


# --------------------------------------------------------------------------------------------
# EAT: its own code, only when named
# --------------------------------------------------------------------------------------------

# A tiny model with the interface of the published EAT code (worstchan/EAT-*: EATConfig with embed_dim,
# depth, patch_size, stride, mel_bins; EATModel.model = EAT with a Conv2d patch embedding of the
# (B, 1, T, F) fbank, one CLS token, pre_norm, `blocks` returning (x, ffn output), extract_features).
EAT_CONFIG_PY = '''
import os

from transformers import PretrainedConfig

if os.environ.get("MMASR_REMOTE_MARKER"):  # proves whether this code ever ran
    with open(os.environ["MMASR_REMOTE_MARKER"], "a") as f:
        f.write("imported\\n")


class EATConfig(PretrainedConfig):
    model_type = "eat"

    def __init__(self, embed_dim=32, depth=2, num_heads=2, patch_size=16, stride=16, mel_bins=128, max_length=64,
                 model_variant="pretrain", **kwargs):
        super().__init__(**kwargs)
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.patch_size, self.stride, self.mel_bins, self.max_length = patch_size, stride, mel_bins, max_length
        self.model_variant = model_variant
'''

EAT_MODELING_PY = '''
import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_eat import EATConfig


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        r = self.mlp(self.norm2(x))
        return x + r, r


class EAT(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.embed_dim
        self.local_encoder = nn.Conv2d(1, d, kernel_size=config.patch_size, stride=config.stride)
        self.extra_tokens = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, config.max_length * (config.mel_bins // config.patch_size), d))
        self.pre_norm = nn.LayerNorm(d)
        self.blocks = nn.ModuleList([Block(d, config.num_heads) for _ in range(config.depth)])

    def extract_features(self, x):
        x = self.local_encoder(x).flatten(2).transpose(1, 2)
        x = x + self.pos[:, :x.shape[1]]
        x = self.pre_norm(torch.cat([self.extra_tokens.expand(len(x), -1, -1), x], dim=1))
        for blk in self.blocks:
            x, _ = blk(x)
        return x

    def forward(self, x):
        return self.extract_features(x)


class EATModel(PreTrainedModel):
    config_class = EATConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = EAT(config)
        POST_INIT

    def forward(self, x):
        return self.model(x)

    def extract_features(self, x):
        return self.model.extract_features(x)
'''


@pytest.fixture
def modules_cache(monkeypatch, tmp_path):
    """transformers copies a model's own code into HF_MODULES_CACHE and imports it from there: keep that
    in the test's folder, not in ~/.cache."""
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [m for m in sys.modules if m == "transformers_modules" or m.startswith("transformers_modules.")]:
        monkeypatch.delitem(sys.modules, name)
    return tmp_path / "hf_modules"


def write_eat_code(folder: Path, post_init: bool = True) -> Path:
    """The code and config.json of a tiny EAT (no weights yet)."""
    folder.mkdir(parents=True)
    (folder / "configuration_eat.py").write_text(EAT_CONFIG_PY)
    code = EAT_MODELING_PY.replace("POST_INIT", "self.post_init()" if post_init else "pass")
    (folder / "modeling_eat.py").write_text(code)
    config = {"model_type": "eat", "architectures": ["EATModel"], "embed_dim": 32, "depth": 2, "num_heads": 2,
              "patch_size": 16, "stride": 16, "mel_bins": 128, "max_length": 64, "model_variant": "pretrain",
              "auto_map": {"AutoConfig": "configuration_eat.EATConfig", "AutoModel": "modeling_eat.EATModel"}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def save_tiny_eat(folder: Path, post_init: bool = True) -> Path:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModel

    write_eat_code(folder, post_init)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
    model = AutoModel.from_config(config, trust_remote_code=True)
    # weights only (as the hub repo has them): save_pretrained would refuse EAT's `max_length` config field
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder


def test_eat_is_refused_without_trust_remote_code_and_its_code_never_runs(tmp_path, modules_cache, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv("MMASR_REMOTE_MARKER", str(marker))
    folder = write_eat_code(tmp_path / "EAT-tiny")
    for flag in (False, "true", 1):  # only the boolean True opens the door
        with pytest.raises(ModelLoadError) as err:
            load_audio_encoder(str(folder), device="cpu", trust_remote_code=flag)
        message = str(err.value)
        assert repr(str(folder)) in message and "ships its own code" in message and "auto_map" in message
        assert "models.trust_remote_code: true" in message and "review it" in message
    assert not marker.exists()


def test_remote_code_reason():
    assert remote_code_reason({"model_type": "hubert"}) is None
    assert "auto_map in its config.json: AutoConfig, AutoModel" in remote_code_reason(
        {"model_type": "eat", "auto_map": {"AutoModel": "m.M", "AutoConfig": "c.C"}})
    assert "'eat' is not part of the installed transformers" in remote_code_reason({"model_type": "eat"})
    assert "auto_map" in remote_code_reason({"model_type": "bert", "auto_map": {"AutoModel": "m.M"}})


def test_eat_loads_with_trust_remote_code_and_pools_its_patch_tokens(tmp_path, modules_cache):
    folder = save_tiny_eat(tmp_path / "EAT-tiny")
    bundle = load_audio_encoder(str(folder), device="cpu", trust_remote_code=True)
    model = bundle.model
    assert type(model).__name__ == "EATModel" and audio_kind(model) == "patches" and batchable(bundle)
    assert (encoder_depth(model), hidden_size(model), len(transformer_layers(model))) == (2, 32, 2)
    fe = bundle.processor  # no preprocessor_config.json: EAT's published recipe
    assert (fe.num_mel_bins, fe.max_length, fe.mean, fe.std) == (128, 1024, EAT_FBANK["mean"], EAT_FBANK["std"])

    audio = tone(0.73, lead=0.05, tail=0.05)  # 81 fbank frames -> 6 of 64 time columns of 16 frames
    short = tone(0.3, freq=300, lead=0.05, tail=0.05)
    got = embed_audio(bundle, [audio, short], [0, 1, 2], batch_size=2)
    np.testing.assert_allclose(got[1], embed_audio(bundle, [short], [0, 1, 2])[0], atol=1e-5)  # exact batching
    with torch.no_grad():
        x = fe(audio, sampling_rate=SR, return_tensors="pt")["input_values"].unsqueeze(1)  # (1, 1, 1024, 128)
        last = model.extract_features(x)
        first = model.model.pre_norm(torch.cat([model.model.extra_tokens, model.model.local_encoder(x).flatten(2)
                                                .transpose(1, 2) + model.model.pos[:, :512]], dim=1))
    assert last.shape == (1, 513, 32)
    # time-major patches after the one CLS token: (64 time, 8 frequency) grid
    np.testing.assert_allclose(got[0, 64:], last[0, 1:].reshape(64, 8, 32)[:6].mean(dim=(0, 1)).numpy(), atol=1e-5)
    np.testing.assert_allclose(got[0, :32], first[0, 1:].reshape(64, 8, 32)[:6].mean(dim=(0, 1)).numpy(), atol=1e-5)


def test_eat_fallback_feature_extractor_is_its_published_recipe():
    """EAT's extraction (github.com/cwx-worst-one/EAT, feature_extract.py): mean-removed waveform,
    kaldi fbank with htk_compat, no energy, Hanning, 128 bins, dither 0, 10 ms shift, padded to 1024,
    (x - mean) / (2 std). AST's extractor with EAT_FBANK gives the same numbers."""
    import torchaudio.compliance.kaldi as kaldi
    from transformers import ASTFeatureExtractor

    rng = np.random.default_rng(0)
    audio = (tone(0.8, lead=0.05, tail=0.05) + 0.01 * rng.standard_normal(int(0.9 * SR)) + 0.05).astype(np.float32)
    w = torch.from_numpy(audio)
    mel = kaldi.fbank((w - w.mean())[None], htk_compat=True, sample_frequency=SR, use_energy=False,
                      window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
    mel = torch.nn.functional.pad(mel, (0, 0, 0, 1024 - mel.shape[0]))
    expected = (mel - EAT_FBANK["mean"]) / (EAT_FBANK["std"] * 2)
    got = ASTFeatureExtractor(sampling_rate=SR, **EAT_FBANK)(audio, sampling_rate=SR, return_tensors="pt")["input_values"][0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_eat_code_written_for_transformers_4_gets_a_clear_error(tmp_path, modules_cache):
    """The published EAT code never calls post_init(), which transformers 5 needs; say so."""
    folder = tmp_path / "EAT-old"
    save_tiny_eat(tmp_path / "EAT-new")
    write_eat_code(folder, post_init=False)
    (folder / "model.safetensors").write_bytes((tmp_path / "EAT-new" / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match="post_init") as err:
        load_audio_encoder(str(folder), device="cpu", trust_remote_code=True)
    assert repr(str(folder)) in str(err.value)


# --------------------------------------------------------------------------------------------
# BEATs; trust_remote_code is never passed implicitly
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["microsoft/BEATs", "nobody/beats-iter3", "/models/BEATs_iter3_plus_AS2M.pt"])
def test_beats_is_refused_by_name(name):
    with pytest.raises(ModelLoadError, match="BEATs is not supported: it is not part of transformers") as err:
        load_audio_encoder(name, device="cpu")
    assert repr(name) in str(err.value) and "unilm" in str(err.value)


def test_beats_is_refused_by_model_type(tmp_path):
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text(json.dumps({"model_type": "beats"}))
    with pytest.raises(ModelLoadError, match="BEATs is not supported"):
        load_audio_encoder(str(tmp_path / "enc"), device="cpu")


@pytest.fixture
def from_pretrained_calls(monkeypatch) -> list[tuple[str, dict]]:
    """Every from_pretrained call of transformers' model, config, tokenizer, feature-extractor,
    image-processor, processor and Auto classes, with its keyword arguments."""
    from transformers import (AutoConfig, AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer, PretrainedConfig,
                              PreTrainedModel, ProcessorMixin)
    from transformers.feature_extraction_utils import FeatureExtractionMixin
    from transformers.image_processing_base import ImageProcessingMixin
    from transformers.models.auto.auto_factory import _BaseAutoModelClass
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    calls: list[tuple[str, dict]] = []
    for owner in (PreTrainedModel, PretrainedConfig, PreTrainedTokenizerBase, FeatureExtractionMixin,
                  ImageProcessingMixin, ProcessorMixin, _BaseAutoModelClass, AutoConfig, AutoTokenizer,
                  AutoFeatureExtractor, AutoImageProcessor):
        original = owner.__dict__["from_pretrained"].__func__

        def spy(cls, *args, _original=original, **kwargs):
            calls.append((cls.__name__, dict(kwargs)))
            return _original(cls, *args, **kwargs)

        monkeypatch.setattr(owner, "from_pretrained", classmethod(spy))
    return calls


def test_no_loader_passes_trust_remote_code_unless_asked(tmp_path, ast_dir, from_pretrained_calls):
    from mmasr.config import validate
    from mmasr.demo.models import build_demo_models
    from transformers import BertConfig, BertModel

    from mmasr.demo.models import demo_vocabulary
    from mmasr.demo.text_models import build_bert_tokenizer, build_demo_lm
    from mmasr.models.loading import load_clip, load_from_params, load_lm, load_text_encoder, load_whisper

    demo = build_demo_models(tmp_path / "demo", {}, seed=0)
    tok = build_bert_tokenizer(demo_vocabulary(), 32)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    folders = {"whisper": demo["whisper"], "clip": demo["clip"], "lm": build_demo_lm(tmp_path / "lm", None, seed=0),
               "audio_encoder": ast_dir, "text_encoder": tmp_path / "bert"}
    loaders = {"whisper": load_whisper, "clip": load_clip, "lm": load_lm, "audio_encoder": load_audio_encoder,
               "text_encoder": load_text_encoder}
    params = validate({"models": {**{k: str(v) for k, v in folders.items()}, "device": "cpu"}})["models"]
    assert params["trust_remote_code"] is False  # the default
    for kind, loader in loaders.items():
        for load in (lambda: loader(str(folders[kind]), device="cpu", trust_remote_code=False),
                     lambda: loader(str(folders[kind]), device="cpu"),
                     lambda: load_from_params(kind, params)):
            from_pretrained_calls.clear()
            load()
            assert from_pretrained_calls, kind
            passed = [(name, kw.get("trust_remote_code")) for name, kw in from_pretrained_calls]
            assert not any(flag is True for _, flag in passed), (kind, passed)
            # our calls say False (left out, transformers would ask on a terminal); its inner calls pass nothing
            assert any(flag is False for _, flag in passed), (kind, passed)
