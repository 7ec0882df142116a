"""Pooled (multi-layer) embeddings from frozen encoders: the inputs of the CLAP heads and of the probe.

An utterance becomes one vector by pooling hidden states over time: a mean over the frames that
cover the real audio (never the padding), and for text either the ``[CLS]`` state or a mean over the
real tokens. Which hidden states are pooled is a layer selection over ``hidden_states`` (index 0 is
the embedding output, index ``i`` the output of transformer layer ``i``):

* ``last``: the last layer only (dimension D);
* ``quartiles``: the four layers at the quartiles of the depth, each pooled and concatenated
  (dimension 4 D), as in seed 004: layers 3, 6, 9, 12 of a 12-layer encoder (0-based layer outputs
  2, 5, 8, 11), 6/12/18/24 of 24 layers, 12/24/36/48 of 48; shallower encoders repeat layers
  (2 layers: 1, 1, 2, 2) so the dimension is always 4 D;
* an explicit list of ``hidden_states`` indices.

Audio encoders (see :func:`mmasr.models.loading.load_audio_encoder`) come in three kinds, decided
once from ``config.model_type`` by :func:`audio_kind`; each has its own inputs and its own mask of the
hidden-state positions that are pooled:

* ``whisper``: log-mel features padded to the encoder's fixed window; the encoder frames covering the
  audio are pooled. Longer audio is cut (with a warning).
* ``waveform`` (HuBERT family): the raw waveform. Models whose feature extractor returns no attention
  mask (HuBERT-base, wav2vec 2.0 base: group-norm convolutions that see padding) run one utterance at a
  time, so an embedding never depends on what it was batched with; the others are batched with an
  attention mask. The frames covering the audio are pooled.
* ``patches`` (AST; EAT, which runs its own code): the feature extractor's Kaldi fbank, padded or cut
  to a fixed window (1024 frames = 10.24 s; longer audio is cut, with a warning), split into patches
  on a (frequency, time) grid; the hidden states are ``[special tokens..., patch tokens]``. Only patch
  tokens are pooled (never CLS/distillation tokens), and only those whose time span starts inside the
  audio's fbank frames. The fixed window makes batching exact. The per-type layout (number of special
  tokens, token order, config fields of the grid) is the table :data:`PATCH_FAMILIES`; EAT returns no
  ``hidden_states``, so they are read off its layer stack with forward hooks.

Every function here has a differentiable ``*_forward`` form (used by CLAP phase 2, where the last
layers are trained) and a cached numpy form.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mmasr.progress import track
from mmasr.models.loading import ModelBundle, autocast

log = logging.getLogger(__name__)

__all__ = [
    "quartile_layers",
    "select_layers",
    "describe_layers",
    "encoder_depth",
    "hidden_size",
    "transformer_layers",
    "layer_outputs",
    "PassCounter",
    "count_passes",
    "masked_mean",
    "mask_mean",
    "lengths_mask",
    "WAVEFORM_TYPES",
    "PatchFamily",
    "PATCH_FAMILIES",
    "PatchGrid",
    "audio_kind",
    "fbank_frames",
    "patch_grid",
    "patch_mask",
    "batchable",
    "audio_inputs",
    "audio_hidden_states",
    "audio_forward",
    "text_inputs",
    "text_forward",
    "embed_audio",
    "embed_text",
]


def quartile_layers(n_layers: int) -> list[int]:
    """``hidden_states`` indices of the four quartile layers of an ``n_layers``-deep encoder:
    layer ``ceil(k * n / 4)`` for k = 1..4 (1-based layer numbers; 0 would be the embeddings)."""
    if n_layers < 1:
        raise ValueError(f"an encoder needs at least one layer, got {n_layers}")
    return [math.ceil(k * n_layers / 4) for k in range(1, 5)]


def select_layers(spec: str | Sequence[int], n_layers: int) -> list[int]:
    """Resolve a layer selection (``last``, ``quartiles`` or a list of ``hidden_states`` indices,
    0 = embedding output .. ``n_layers``) for an encoder of ``n_layers`` layers."""
    if spec == "last":
        return [n_layers]
    if spec == "quartiles":
        return quartile_layers(n_layers)
    if isinstance(spec, str) or not len(spec):
        raise ValueError(f"layers must be 'last', 'quartiles' or a non-empty list of indices, got {spec!r}")
    out = [int(i) for i in spec]
    bad = [i for i in out if not 0 <= i <= n_layers]
    if bad:
        raise ValueError(f"layer indices {bad} out of range: the encoder has hidden states 0..{n_layers}")
    return out


def describe_layers(spec, n_layers: int) -> str:
    return f"{spec} -> hidden_states {select_layers(spec, n_layers)} of {n_layers} layers"


def encoder_depth(model) -> int:
    """Number of transformer layers: ``num_hidden_layers`` (a Whisper config maps it to the encoder's),
    else the length of the layer stack (EAT's config calls it ``depth``)."""
    n = getattr(model.config, "num_hidden_layers", None)
    return int(n) if n is not None else len(transformer_layers(model))


def hidden_size(model) -> int:
    """Width of the encoder's hidden states (``hidden_size``; ``d_model`` for Whisper, ``embed_dim`` for EAT)."""
    for field in ("hidden_size", "embed_dim", "d_model"):
        width = getattr(model.config, field, None)
        if width is not None:
            return int(width)
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__} from its config")


def transformer_layers(model) -> torch.nn.ModuleList:
    """The encoder's stack of transformer layers (Whisper encoder, HuBERT family, AST, BERT family; EAT's
    ``model.blocks``)."""
    for path in ("layers", "encoder.layers", "encoder.layer", "transformer.layer", "layer", "model.blocks", "blocks"):
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the transformer layers of {type(model).__name__}")


def layer_outputs(model, run: Callable[[], object]) -> tuple[torch.Tensor, ...]:
    """``hidden_states`` of a model that does not return them, read off its layer stack while ``run()``
    calls it: the input of the first transformer layer, then every layer's output (the first element
    where a layer returns a tuple). Differentiable like the forward itself."""
    layers = transformer_layers(model)
    states: list[torch.Tensor] = []

    def first_input(_module, args, kwargs):
        states.append(args[0] if args else next(iter(kwargs.values())))

    def output(_module, _args, out):
        states.append(out[0] if isinstance(out, (tuple, list)) else out)

    handles = [layers[0].register_forward_pre_hook(first_input, with_kwargs=True)]
    handles += [layer.register_forward_hook(output) for layer in layers]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    if len(states) != len(layers) + 1:
        raise RuntimeError(f"{type(model).__name__}: expected {len(layers) + 1} hidden states from its {len(layers)} "
                           f"layers, captured {len(states)} (a layer ran more than once, or not at all)")
    return tuple(states)


@dataclass
class PassCounter:
    """Utterances that went through an encoder: one per row of every batch its first transformer layer saw
    (:func:`count_passes`), or added by hand where the encoder is not a torch module (CTranslate2)."""

    rows: int = 0

    def add(self, n: int) -> None:
        self.rows += int(n)

    def per_utt(self, n_utts: int) -> float:
        """Encoder passes per utterance of a stage that covered ``n_utts`` utterances."""
        return self.rows / n_utts if n_utts else 0.0


def _batch_rows(args: tuple, kwargs: dict) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise RuntimeError("count_passes: the first transformer layer was called without a tensor")


@contextlib.contextmanager
def count_passes(model, counter: PassCounter | None = None) -> Iterator[PassCounter]:
    """Count the utterances ``model`` (an encoder, or anything :func:`transformer_layers` finds a stack in)
    encodes while the block runs: a forward pre-hook on its first transformer layer adds each call's batch
    size, so every forward is counted where it runs, whoever calls it."""
    counter = counter if counter is not None else PassCounter()
    handle = transformer_layers(model)[0].register_forward_pre_hook(
        lambda _module, args, kwargs: counter.add(_batch_rows(args, kwargs)), with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


def mask_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``states[b, t]`` (B, T, D) over the positions where ``mask[b, t]`` (B, T) is true -> (B, D)."""
    weights = mask.to(device=states.device, dtype=states.dtype)
    return (states * weights[..., None]).sum(dim=1) / weights.sum(dim=1, keepdim=True).clamp(min=1)


def lengths_mask(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, steps) bool: true at the first ``lengths[b]`` positions of row b."""
    return torch.arange(steps, device=lengths.device)[None, :] < lengths[:, None]


def masked_mean(states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean over the first ``lengths[b]`` time steps of ``states[b]`` (B, T, D) -> (B, D)."""
    return mask_mean(states, lengths_mask(lengths.to(states.device), states.shape[1]))


# --------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------


WAVEFORM_TYPES = ("hubert", "wav2vec2", "wavlm", "data2vec-audio")


@dataclass(frozen=True)
class PatchFamily:
    """How a spectrogram-patch transformer lays out its hidden states, per ``model_type``."""

    special_tokens: int  # tokens before the patches (CLS, distillation): never pooled
    time_major: bool  # patch order: t * F + f (time-major) or f * T + t (frequency-major)
    grid_fields: tuple[str, str, str]  # config fields: patch size, frequency stride, time stride
    # hidden states from (model, inputs); None: transformers' output_hidden_states=True
    states: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, ...]] | None = None


def _eat_states(model, inputs: dict) -> tuple[torch.Tensor, ...]:
    # EAT's published API (worstchan/EAT-*, modeling_eat.py): extract_features(mel of shape (B, 1, T, F))
    # returns the last layer's (B, 1 + patches, D); it has no output_hidden_states.
    return layer_outputs(model, lambda: model.extract_features(inputs["input_values"].unsqueeze(1)))


# AST (transformers' ASTEmbeddings): [CLS, distillation, patches]; the conv output (B, D, F', T') is
# flattened frequency-major. EAT (its PatchEmbed on the (T, F) image): [CLS, patches], time-major,
# one stride for both axes.
PATCH_FAMILIES: dict[str, PatchFamily] = {
    "audio-spectrogram-transformer": PatchFamily(2, False, ("patch_size", "frequency_stride", "time_stride")),
    "eat": PatchFamily(1, True, ("patch_size", "stride", "stride"), _eat_states),
}


@dataclass(frozen=True)
class PatchGrid:
    """The patch grid of one padded fbank window."""

    special_tokens: int
    freq: int  # patches along frequency
    time: int  # patches along time
    time_stride: int  # fbank frames between consecutive time patches
    time_major: bool

    @property
    def n_tokens(self) -> int:
        return self.special_tokens + self.freq * self.time


def audio_kind(model) -> str:
    """``whisper``, ``waveform`` (HuBERT family) or ``patches`` (AST, EAT), from ``config.model_type``."""
    model_type = model.config.model_type
    if model_type == "whisper":
        return "whisper"
    if model_type in WAVEFORM_TYPES:
        return "waveform"
    if model_type in PATCH_FAMILIES:
        return "patches"
    raise ValueError(f"no layer access for audio encoder model_type {model_type!r} "
                     f"(known: whisper, {', '.join(WAVEFORM_TYPES)}, {', '.join(PATCH_FAMILIES)})")


def n_encoder_frames(n_samples: int, hop_length: int, window_frames: int) -> int:
    """Whisper encoder frames covering ``n_samples`` of audio: mel frames (one per hop) halved by the
    encoder's stride-2 convolution, never more than the window holds."""
    return min(window_frames, max(1, math.ceil(n_samples / hop_length / 2)))


def fbank_frames(n_samples: int, sr: int = 16000, frame_ms: float = 25.0, shift_ms: float = 10.0) -> int:
    """Frames of a Kaldi fbank (torchaudio.compliance.kaldi, ``snip_edges``: only whole windows) of
    ``n_samples`` samples: what AST's feature extractor computes before padding."""
    window, shift = int(sr * frame_ms / 1000), int(sr * shift_ms / 1000)
    return 0 if n_samples < window else 1 + (n_samples - window) // shift


def patch_grid(model, n_mels: int, n_frames: int) -> PatchGrid:
    """The grid a patch encoder cuts an (n_frames, n_mels) fbank into (the conv's output size)."""
    family = PATCH_FAMILIES[model.config.model_type]
    patch, f_stride, t_stride = (int(getattr(model.config, field)) for field in family.grid_fields)
    return PatchGrid(family.special_tokens, (n_mels - patch) // f_stride + 1, (n_frames - patch) // t_stride + 1,
                     t_stride, family.time_major)


def patch_mask(grid: PatchGrid, frames: torch.Tensor) -> torch.Tensor:
    """(B, grid.n_tokens) bool: the patch tokens whose time span starts inside the first ``frames[b]``
    fbank frames (at least the first column of patches); special tokens never."""
    columns = ((frames + grid.time_stride - 1) // grid.time_stride).clamp(1, grid.time)
    t = torch.arange(grid.time)
    token_time = t.repeat_interleave(grid.freq) if grid.time_major else t.repeat(grid.freq)
    patches = token_time[None, :] < columns[:, None]
    return torch.cat([torch.zeros(len(frames), grid.special_tokens, dtype=torch.bool), patches], dim=1)


def batchable(bundle: ModelBundle) -> bool:
    """Fixed-window encoders (Whisper, AST, EAT) and attention-mask models batch exactly; group-norm models
    do not."""
    fixed_window = audio_kind(bundle.model) in ("whisper", "patches")
    return fixed_window or bool(getattr(bundle.processor, "return_attention_mask", False))


def _warn_cut(bundle: ModelBundle, seconds: float, window_s: float) -> None:
    log.warning("audio of %.2f s is longer than %s's %g s window: the rest is cut off", seconds, bundle.name, window_s)


def _whisper_inputs(bundle: ModelBundle, arrays: list[np.ndarray], sr: int) -> tuple[dict, torch.Tensor]:
    fe = bundle.processor
    longest = max(len(a) for a in arrays)
    if longest > fe.n_samples:
        _warn_cut(bundle, longest / sr, fe.n_samples / sr)
    feats = fe(arrays, sampling_rate=sr, return_tensors="pt")["input_features"]
    window = feats.shape[-1] // 2  # the encoder's stride-2 convolution
    frames = torch.tensor([n_encoder_frames(len(a), fe.hop_length, window) for a in arrays])
    return {"input_features": feats.to(bundle.device, dtype=bundle.model.dtype)}, lengths_mask(frames, window)


def _waveform_inputs(bundle: ModelBundle, arrays: list[np.ndarray], sr: int) -> tuple[dict, torch.Tensor]:
    fe = bundle.processor
    enc = fe(arrays, sampling_rate=sr, return_tensors="pt", padding=True,
             return_attention_mask=bool(fe.return_attention_mask))
    inputs = {"input_values": enc["input_values"].to(bundle.device, dtype=bundle.model.dtype)}
    if fe.return_attention_mask:
        inputs["attention_mask"] = enc["attention_mask"].to(bundle.device)
    # transformers' own conv arithmetic (private, pinned by a test): frames of each utterance and of the padded batch
    count = bundle.model._get_feat_extract_output_lengths
    frames = count(torch.tensor([len(a) for a in arrays])).long()
    return inputs, lengths_mask(frames, int(count(torch.tensor(enc["input_values"].shape[1]))))


def _patch_inputs(bundle: ModelBundle, arrays: list[np.ndarray], sr: int) -> tuple[dict, torch.Tensor]:
    fe = bundle.processor
    win, shift = int(sr * 0.025), int(sr * 0.010)  # Kaldi's default 25 ms windows every 10 ms
    arrays = [a if len(a) >= win else np.pad(a, (0, win - len(a))) for a in arrays]  # Kaldi needs one whole window
    frames = torch.tensor([fbank_frames(len(a), sr) for a in arrays])
    feats = fe(arrays, sampling_rate=sr, return_tensors="pt")["input_values"]  # (B, window frames, mels)
    if int(frames.max()) > feats.shape[1]:
        _warn_cut(bundle, max(len(a) for a in arrays) / sr, ((feats.shape[1] - 1) * shift + win) / sr)
    grid = patch_grid(bundle.model, feats.shape[2], feats.shape[1])
    return {"input_values": feats.to(bundle.device, dtype=bundle.model.dtype)}, patch_mask(grid, frames.clamp(max=feats.shape[1]))


_INPUTS = {"whisper": _whisper_inputs, "waveform": _waveform_inputs, "patches": _patch_inputs}


def audio_inputs(bundle: ModelBundle, audios: Sequence[np.ndarray], sr: int = 16000) -> tuple[dict, torch.Tensor]:
    """Model inputs for 1-D float audio at ``sr`` (on the model's device, in its dtype) and the (B, T) bool mask of the
    hidden-state positions to pool: those that cover each utterance's audio (see the module docstring)."""
    fe = bundle.processor
    if sr != fe.sampling_rate:
        raise ValueError(f"audio at {sr} Hz, but {bundle.name} expects {fe.sampling_rate} Hz")
    arrays = [np.asarray(a, dtype=np.float32) for a in audios]
    return _INPUTS[audio_kind(bundle.model)](bundle, arrays, sr)


def audio_hidden_states(model, inputs: dict) -> tuple[torch.Tensor, ...]:
    """``hidden_states`` (embedding output, then each layer's output) of an audio encoder."""
    family = PATCH_FAMILIES.get(model.config.model_type)
    if family is not None and family.states is not None:
        return family.states(model, inputs)
    return model(**inputs, output_hidden_states=True).hidden_states


def audio_forward(model, inputs: dict, mask: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    """Pooled hidden states (B, len(layers) * D): each selected layer averaged over the positions of ``mask``."""
    states = audio_hidden_states(model, inputs)
    if tuple(mask.shape) != tuple(states[0].shape[:2]):
        raise ValueError(f"{type(model).__name__}: pooling mask {tuple(mask.shape)} does not match the hidden states "
                         f"{tuple(states[0].shape[:2])}")
    return torch.cat([mask_mean(states[i].float(), mask) for i in layers], dim=-1)


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def text_inputs(bundle: ModelBundle, texts: Sequence[str]) -> dict:
    """Padded, truncated token ids and attention mask on the model's device."""
    tok = bundle.processor
    max_len = min(int(getattr(bundle.model.config, "max_position_embeddings", 512)), tok.model_max_length or 512)
    enc = tok(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return {k: enc[k].to(bundle.device) for k in ("input_ids", "attention_mask")}


def text_forward(model, inputs: dict, layers: Sequence[int], pooling: str) -> torch.Tensor:
    """Pooled hidden states (B, len(layers) * D): ``cls`` (the first token's state) or ``mean``
    (over the real tokens, special tokens included) of each selected layer."""
    states = model(**inputs, output_hidden_states=True).hidden_states
    if pooling == "cls":
        return torch.cat([states[i][:, 0].float() for i in layers], dim=-1)
    if pooling == "mean":
        lengths = inputs["attention_mask"].sum(dim=1)
        return torch.cat([masked_mean(states[i].float(), lengths) for i in layers], dim=-1)
    raise ValueError(f"text pooling must be cls or mean, got {pooling!r}")


# --------------------------------------------------------------------------------------------
# Cached (numpy) forms
# --------------------------------------------------------------------------------------------


@torch.inference_mode()
def embed_audio(bundle: ModelBundle, audios: Sequence[np.ndarray], layers: Sequence[int], batch_size: int = 32,
                progress: bool = False, desc: str = "audio embeddings") -> np.ndarray:
    """(n, len(layers) * D) float32 pooled audio embeddings, in the order of ``audios``; batched by
    similar length (one at a time for encoders that cannot batch exactly)."""
    from mmasr.data.audio import length_batches

    if not len(audios):
        return np.zeros((0, len(layers) * hidden_size(bundle.model)), np.float32)
    size = batch_size if batchable(bundle) else 1
    out: list[np.ndarray | None] = [None] * len(audios)
    for idx in track(length_batches([len(a) for a in audios], size), desc, items=len, item_name="utts", bar=progress):
        inputs, mask = audio_inputs(bundle, [audios[i] for i in idx])
        with autocast(bundle.device):
            pooled = audio_forward(bundle.model, inputs, mask, layers)
        for i, row in zip(idx, pooled.float().cpu().numpy()):
            out[i] = row
    return np.stack(out).astype(np.float32)


@torch.inference_mode()
def embed_text(bundle: ModelBundle, texts: Sequence[str], layers: Sequence[int], pooling: str,
               batch_size: int = 32) -> np.ndarray:
    """(n, len(layers) * D) float32 pooled text embeddings, in the order of ``texts``."""
    out = []
    for s in range(0, len(texts), batch_size):
        with autocast(bundle.device):
            out.append(text_forward(bundle.model, text_inputs(bundle, texts[s:s + batch_size]), layers,
                                    pooling).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, len(layers) * hidden_size(bundle.model)),
                                                                          np.float32)
