"""One pass of each audio encoder per utterance.

The projector cache (``encode_audio``: the trimmed last-layer Whisper states), the probe's pooled layer
embeddings (``layer_embeddings``) and the audio half of the CLAP cache (``clap_embeddings``) all run an
audio encoder over every utterance: ``models.whisper`` for the first, ``models.audio_encoder`` for the
other two. When the two name the same encoder (:func:`same_encoder`: the same folder or hub id, revision
and weight dtype; the demo and ``config/real_whisper.yaml`` do), :func:`encode_once` runs it once per
utterance and writes both products from the same forward:

* the projector cache, byte for byte the folder :func:`mmasr.projector.encoder_cache.encode_manifest`
  writes (its last layer, trimmed to the frames covering the audio, float16 shards + ``index.parquet``);
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
import pandas as pd
import torch

from mmasr.io import atomic_dir, atomic_path
from mmasr.models.layers import PassCounter, count_passes, encoder_depth, hidden_size, lengths_mask, mask_mean, \
    n_encoder_frames
from mmasr.models.loading import ModelBundle, autocast, whisper_features

__all__ = ["POOLED_FORMAT", "encoder_identity", "same_encoder", "PooledEmbeddings", "encode_once", "load_pooled",
           "check_pooled", "pass_metadata"]

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


@torch.inference_mode()
def encode_once(bundle: ModelBundle, manifest: pd.DataFrame, features_dir: str | Path, pooled_path: str | Path, *,
                splits: Sequence[str], models_cfg: dict, batch_size: int = 32, shard_size: int = 512,
                limit: int | None = None, progress: bool = True) -> tuple[pd.DataFrame, PooledEmbeddings]:
    """One pass of the Whisper encoder of ``bundle`` (``models.whisper``) over every utterance of ``manifest``:
    the projector cache of the utterances of ``splits`` (``features_dir``, as
    :func:`mmasr.projector.encoder_cache.encode_manifest` writes it) and every utterance's pooled hidden
    states (``pooled_path``), both written atomically. Returns (the cache index, the pooled embeddings)."""
    from safetensors.numpy import save_file

    from mmasr.data.audio import read_audio
    from mmasr.progress import Progress
    from mmasr.projector.encoder_cache import INDEX_COLUMNS, index_metadata, write_index, write_shard

    if not same_encoder(models_cfg):
        raise ValueError(f"models.whisper {models_cfg['whisper']!r} and models.audio_encoder "
                         f"{models_cfg['audio_encoder']!r} are not the same encoder (or revision, or dtype): "
                         "one pass cannot serve both; run encode-audio without --pooled")
    rows = manifest.sort_values("utt_id").reset_index(drop=True)
    if limit:
        rows = rows.iloc[:limit]
    if not rows["split"].isin(list(splits)).any():
        raise ValueError(f"no utterances in splits {list(splits)} to encode")
    encoder = bundle.model.get_encoder()
    hop = bundle.processor.feature_extractor.hop_length
    index, pooled, pending, shard_no = [], {}, {}, 0
    counter = PassCounter()
    with atomic_dir(features_dir) as tmp, count_passes(encoder, counter):
        def flush():
            nonlocal pending, shard_no
            name = f"shard-{shard_no:05d}.safetensors"
            for utt, feats in pending.items():
                index.append({"utt_id": utt, "shard": name, "n_frames": feats.shape[0], "dim": feats.shape[1]})
            write_shard(tmp / name, pending)
            pending, shard_no = {}, shard_no + 1

        bar = Progress(len(rows), "encode audio (one pass)", unit="utt", bar=progress)
        for b in range(0, len(rows), batch_size):
            batch = rows.iloc[b:b + batch_size]
            audios = [read_audio(p) for p in batch["audio_path"]]
            feats = whisper_features(bundle, audios)["input_features"]  # refuses audio longer than the window
            with autocast(bundle.device):
                out = encoder(feats, output_hidden_states=True)
            states, last = out.hidden_states, out.last_hidden_state
            window = last.shape[1]
            frames = torch.tensor([n_encoder_frames(len(a), hop, window) for a in audios])
            mask = lengths_mask(frames, window)
            means = torch.stack([mask_mean(s.float(), mask) for s in states], dim=1).cpu().numpy()  # (B, L+1, D)
            for i, (utt, split) in enumerate(zip(batch["utt_id"], batch["split"])):
                pooled[utt] = means[i].astype(np.float32)
                if split in splits:
                    pending[utt] = last[i, : int(frames[i])].float().cpu().numpy().astype(np.float16)
                    if len(pending) == shard_size:
                        flush()
            bar.update(len(batch))
        if pending:
            flush()
        bar.close()
        passes = pass_metadata(counter, len(rows))
        write_index(tmp / "index.parquet", index,
                    {**index_metadata(bundle), **{f"mmasr.{k}": str(v) for k, v in passes.items()},
                     "mmasr.encoded_utts": str(len(rows)), "mmasr.encoder_pass": "shared"})
    meta = {"format": POOLED_FORMAT, "encoder_name": str(models_cfg["whisper"]), "revision": bundle.revision,
            "requested_revision": models_cfg.get("whisper_revision"), "requested_dtype": str(models_cfg.get("dtype", "auto")),
            "model_type": encoder.config.model_type, "depth": encoder_depth(encoder), "dim": hidden_size(encoder),
            "pooling": "mean", "layers": "all hidden_states, 0 (embeddings) .. depth (last_hidden_state)",
            "device": str(bundle.device), "dtype": str(encoder.dtype).removeprefix("torch."), "n_utts": len(rows),
            **passes}
    with atomic_path(pooled_path, suffix=".tmp.safetensors") as tmp_file:
        save_file({k: np.ascontiguousarray(v) for k, v in sorted(pooled.items())}, str(tmp_file),
                  metadata={"mmasr": json.dumps(meta, sort_keys=True)})
    return pd.DataFrame(index, columns=INDEX_COLUMNS), load_pooled(pooled_path)
