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

Audio encoders (see :func:`mmasr.models.loading.load_audio_encoder`): the HuBERT family takes the raw
waveform; models whose feature extractor does not return an attention mask (HuBERT-base,
wav2vec 2.0 base: group-norm convolutions that see padding) are run one utterance at a time, so an
utterance's embedding never depends on what it was batched with; the others are batched with an
attention mask. A Whisper encoder takes log-mel features padded to its fixed window; only the
encoder frames covering the audio are pooled. Every function here has a differentiable ``*_forward``
form (used by CLAP phase 2, where the last layers are trained) and a cached numpy form.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

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
    "masked_mean",
    "batchable",
    "audio_inputs",
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
    """Number of transformer layers (``num_hidden_layers``; a Whisper config maps it to the encoder's)."""
    return int(model.config.num_hidden_layers)


def hidden_size(model) -> int:
    """Width of the encoder's hidden states (``d_model`` for Whisper)."""
    return int(model.config.hidden_size)


def transformer_layers(model) -> torch.nn.ModuleList:
    """The encoder's stack of transformer layers (Whisper encoder, HuBERT family, BERT family)."""
    for path in ("layers", "encoder.layers", "encoder.layer", "transformer.layer", "layer"):
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the transformer layers of {type(model).__name__}")


def masked_mean(states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean over the first ``lengths[b]`` time steps of ``states[b]`` (B, T, D) -> (B, D)."""
    steps = torch.arange(states.shape[1], device=states.device)
    mask = (steps[None, :] < lengths.to(states.device)[:, None]).to(states.dtype)
    return (states * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1)


# --------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------


def _is_whisper(bundle: ModelBundle) -> bool:
    return bundle.model.config.model_type == "whisper"


def batchable(bundle: ModelBundle) -> bool:
    """Whisper (fixed window) and attention-mask models batch exactly; group-norm models do not."""
    return _is_whisper(bundle) or bool(getattr(bundle.processor, "return_attention_mask", False))


def audio_inputs(bundle: ModelBundle, audios: Sequence[np.ndarray], sr: int = 16000) -> tuple[dict, torch.Tensor]:
    """Model inputs for 1-D float audio at ``sr`` (on the model's device, in its dtype) and, per utterance,
    the number of encoder frames that cover its audio."""
    fe = bundle.processor
    if sr != fe.sampling_rate:
        raise ValueError(f"audio at {sr} Hz, but {bundle.name} expects {fe.sampling_rate} Hz")
    arrays = [np.asarray(a, dtype=np.float32) for a in audios]
    n_samples = torch.tensor([len(a) for a in arrays])
    if _is_whisper(bundle):
        from mmasr.projector.encoder_cache import n_encoder_frames

        if max(n_samples) > fe.n_samples:
            log.warning("audio of %.2f s is longer than %s's %.1f s window: the rest is cut off",
                        int(max(n_samples)) / sr, bundle.name, fe.n_samples / sr)
        feats = fe(arrays, sampling_rate=sr, return_tensors="pt")["input_features"]
        window = feats.shape[-1] // 2  # the encoder's stride-2 convolution
        frames = torch.tensor([n_encoder_frames(int(n), fe.hop_length, window) for n in n_samples])
        return {"input_features": feats.to(bundle.device, dtype=bundle.model.dtype)}, frames
    enc = fe(arrays, sampling_rate=sr, return_tensors="pt", padding=True,
             return_attention_mask=bool(fe.return_attention_mask))
    inputs = {"input_values": enc["input_values"].to(bundle.device, dtype=bundle.model.dtype)}
    if fe.return_attention_mask:
        inputs["attention_mask"] = enc["attention_mask"].to(bundle.device)
    frames = bundle.model._get_feat_extract_output_lengths(n_samples).long()
    return inputs, frames


def audio_forward(model, inputs: dict, frames: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    """Pooled hidden states (B, len(layers) * D): each selected layer averaged over the audio's frames."""
    states = model(**inputs, output_hidden_states=True).hidden_states
    return torch.cat([masked_mean(states[i].float(), frames) for i in layers], dim=-1)


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
        inputs, frames = audio_inputs(bundle, [audios[i] for i in idx])
        with autocast(bundle.device):
            pooled = audio_forward(bundle.model, inputs, frames, layers)
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
