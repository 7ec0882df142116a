"""One pass of each audio encoder per utterance.

The projector cache (``encode_audio``: the trimmed last-layer Whisper states), the probe's pooled layer
embeddings (``layer_embeddings``) and the audio half of the CLAP cache (``clap_embeddings``) all run an
audio encoder over every utterance: ``models.whisper`` for the first, ``models.audio_encoder`` for the
other two. When the two name the same encoder (:func:`same_encoder`: the same folder or hub id, revision
and weight dtype; the demo and ``config/real_whisper.yaml`` do), ``encode_audio`` runs it once per
utterance and writes both products from the same forward (:func:`mmasr.projector.encoder_cache.encode_pass`,
which can also store the n-best's full-window states):

* the projector cache, the folder :func:`mmasr.projector.encoder_cache.encode_manifest` writes (its last layer, trimmed to the frames covering the audio, float16 shards + ``index.parquet``);
* the pooled embeddings of **every** hidden state (0 = the embedding output .. ``L``, the last layer, which
  is ``last_hidden_state``): the mean over the frames covering the audio, float32, one ``(L + 1, D)`` array
  per utterance in one safetensors file (:data:`POOLED_FORMAT`). Every layer is kept, not only the ones
  ``probe.layers`` and ``clap.layers`` select, so that changing a layer selection re-runs only the stage that
  reads it, never this pass (and with it the projector's training). It is small: (L + 1) x D x 4 bytes an
  utterance (7.7 kB for tiny.en, 40 kB for Whisper small).

``layer_embeddings`` and ``clap_embeddings`` then select their layers from that file
(:meth:`PooledEmbeddings.select`) instead of loading the encoder; their own files are unchanged. With
different encoders each stage keeps its own pass. Every stage records how many encoder passes it made
(counted by :func:`mmasr.models.layers.count_passes` on the encoder's first layer) in its output metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmasr.io import atomic_path
from mmasr.models.layers import PassCounter, mask_mean

__all__ = ["POOLED_FORMAT", "encoder_identity", "same_encoder", "require_same_encoder", "PooledEmbeddings", "write_pooled", "load_pooled",
           "check_pooled", "pass_metadata", "pooled_means"]

POOLED_FORMAT = "mmasr.encode_once/1"


def encoder_identity(models_cfg: dict, kind: str) -> tuple[str, str | None, str]:
    """What makes ``models.<kind>`` the encoder it is: its folder or hub id (spelled canonically: ``./a/b/`` is
    ``a/b``), its revision and the weight dtype (``models.dtype``; every frozen encoder loads in it)."""
    name = os.path.normpath(os.path.expanduser(str(models_cfg[kind])))
    revision = models_cfg.get(f"{kind}_revision")
    return name, None if revision is None else str(revision), str(models_cfg.get("dtype", "auto"))


def same_encoder(models_cfg: dict, a: str = "whisper", b: str = "audio_encoder") -> bool:
    """True when ``models.<a>`` and ``models.<b>`` are the same encoder (:func:`encoder_identity`), so one pass
    can serve both. A pure function of the params: one folder spelled once relative and once absolute
    counts as two encoders (each then keeps its own pass, which is slower but still right)."""
    return encoder_identity(models_cfg, a) == encoder_identity(models_cfg, b)


def require_same_encoder(models_cfg: dict) -> None:
    """Refuse a shared pass (``encode-audio --pooled``) when ``models.whisper`` and ``models.audio_encoder`` differ."""
    if not same_encoder(models_cfg):
        raise ValueError(f"models.whisper {models_cfg['whisper']!r} and models.audio_encoder "
                         f"{models_cfg['audio_encoder']!r} are not the same encoder (or revision, or dtype): "
                         "one pass cannot serve both; run encode-audio without --pooled")


def pass_metadata(counter: PassCounter, n_utts: int, prefix: str = "") -> dict:
    """The counts a stage records: encoder passes (utterance rows through the encoder) and passes per utterance."""
    return {f"{prefix}encoder_passes": counter.rows, f"{prefix}encoder_passes_per_utt": counter.per_utt(n_utts)}


@dataclass
class PooledEmbeddings:
    """Pooled hidden states of every layer, per utterance, from one encoder pass."""

    ids: list[str]
    pooled: np.ndarray  # (n, depth + 1, D) float32
    meta: dict
    path: str

    def select(self, utt_ids: Sequence[str], layers: Sequence[int]) -> np.ndarray:
        """(len(utt_ids), len(layers) * D) float32: each utterance's selected layers, concatenated in the order
        of ``layers`` (as :func:`mmasr.models.layers.audio_forward` concatenates them)."""
        row = {u: i for i, u in enumerate(self.ids)}
        missing = [u for u in utt_ids if u not in row]
        if missing:
            raise ValueError(f"{self.path}: no pooled embedding of {len(missing)} utterance(s) (e.g. {missing[0]}); "
                             "re-run encode_audio")
        bad = [i for i in layers if not 0 <= i < self.pooled.shape[1]]
        if bad:
            raise ValueError(f"{self.path}: layers {bad} out of range 0..{self.pooled.shape[1] - 1}")
        picked = self.pooled[[row[u] for u in utt_ids]][:, list(layers)]
        return np.ascontiguousarray(picked.reshape(len(utt_ids), -1), dtype=np.float32)


def check_pooled(pooled: PooledEmbeddings, models_cfg: dict, kind: str = "audio_encoder") -> None:
    """Refuse pooled embeddings that another encoder (or revision, or dtype) made than ``models.<kind>``."""
    made_by = {"encoder": pooled.meta["encoder_name"], "encoder_revision": pooled.meta["requested_revision"],
               "dtype": pooled.meta["requested_dtype"]}
    theirs = {kind: made_by["encoder"], f"{kind}_revision": made_by["encoder_revision"], "dtype": made_by["dtype"]}
    if encoder_identity(theirs, kind) != encoder_identity(models_cfg, kind):
        raise ValueError(f"{pooled.path}: pooled by {made_by}, but models.{kind} is "
                         f"{encoder_identity(models_cfg, kind)}: re-run encode_audio, or let the stage encode itself")


def pooled_means(states: Sequence[torch.Tensor], mask: torch.Tensor) -> np.ndarray:
    """(B, len(states), D) float32: every hidden state averaged over the positions of ``mask`` (B, T), in float32
    as :func:`mmasr.models.layers.audio_forward` averages them."""
    return torch.stack([mask_mean(s.float(), mask) for s in states], dim=1).cpu().numpy().astype(np.float32)


def write_pooled(path: str | Path, pooled: dict[str, np.ndarray], meta: dict) -> PooledEmbeddings:
    """One safetensors file of ``utt_id -> (depth + 1, D)`` float32 arrays, ``meta`` in its header, atomically."""
    from safetensors.numpy import save_file

    with atomic_path(path, suffix=".tmp.safetensors") as tmp:
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(pooled.items())}, str(tmp),
                  metadata={"mmasr": json.dumps({**meta, "format": POOLED_FORMAT}, sort_keys=True)})
    return load_pooled(path)


def load_pooled(path: str | Path) -> PooledEmbeddings:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no pooled encoder embeddings here (written by `mmasr encode-audio --pooled`)")
    with safe_open(str(path), framework="np") as f:
        meta = json.loads((f.metadata() or {}).get("mmasr", "{}"))
        if meta.get("format") != POOLED_FORMAT:
            raise ValueError(f"{path}: not a {POOLED_FORMAT} file (format {meta.get('format')!r})")
        ids = sorted(f.keys())
        pooled = np.stack([f.get_tensor(u) for u in ids]) if ids else np.zeros((0, 0, 0), np.float32)
    return PooledEmbeddings(ids=ids, pooled=pooled, meta=meta, path=str(path))


