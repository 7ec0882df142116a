"""Cache of frozen-encoder outputs: the Whisper encoder runs once per utterance, training reads the cache.

Whisper pads every input to its fixed window (30 s for real models) and its encoder emits 50 frames
per second of that window; only the frames covering the real audio are kept, as float16, grouped in
safetensors shards (one tensor per utterance, keyed by utterance id) with an index table of lengths.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch

from mmasr.io import atomic_dir, atomic_path, read_metadata, write_parquet
from mmasr.models.layers import PassCounter, count_passes, n_encoder_frames
from mmasr.models.loading import ModelBundle, autocast, whisper_features

INDEX_COLUMNS = ["utt_id", "shard", "n_frames", "dim"]
STATES_SHARD_UTTS = 64  # full-window states per shard: 150 MB for tiny.en, 490 MB for large-v3 (1500 x 1280 float32)


@torch.inference_mode()
def encode_batch(bundle: ModelBundle, audios: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Encoder outputs of 16 kHz mono arrays, each trimmed to its audio, as float16 (frames, dim)."""
    feats = whisper_features(bundle, list(audios))["input_features"]
    with autocast(bundle.device):
        states = bundle.model.get_encoder()(feats).last_hidden_state
    hop = bundle.processor.feature_extractor.hop_length
    return [states[i, : n_encoder_frames(len(a), hop, states.shape[1])].float().cpu().numpy().astype(np.float16)
            for i, a in enumerate(audios)]


def write_shard(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """One safetensors file of ``utt_id -> (frames, dim)`` arrays, written atomically."""
    from safetensors.numpy import save_file

    with atomic_path(path, suffix=".tmp.safetensors") as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in sorted(arrays.items())}, str(tmp))


def write_index(path: str | Path, rows: list[dict], metadata: dict[str, str] | None = None) -> None:
    write_parquet(path, pd.DataFrame(rows, columns=INDEX_COLUMNS).sort_values("utt_id").reset_index(drop=True),
                  metadata=metadata)


def index_metadata(bundle: ModelBundle) -> dict[str, str]:
    """The cache's provenance in ``index.parquet``'s metadata: the encoder, its revision, the storage dtype."""
    return {"mmasr.model": bundle.name, "mmasr.model_revision": bundle.revision, "mmasr.encoder": "whisper",
            "mmasr.dtype": "float16"}


def encode_manifest(bundle: ModelBundle, manifest: pd.DataFrame, out_dir: str | Path, *, splits: Sequence[str],
                    batch_size: int = 32, shard_size: int = 512, limit: int | None = None,
                    progress: bool = True) -> pd.DataFrame:
    """Run the frozen encoder once over every utterance of ``splits`` and write the cache folder
    (``shard-NNNNN.safetensors`` + ``index.parquet``) atomically; returns the index.

    Utterances are encoded in batches of similar duration (less padding work is not possible for
    Whisper, whose window is fixed, but it keeps memory flat) and stored in id order. The index's metadata
    records the encoder passes made (``mmasr.encoder_passes``, counted on the encoder's first layer) and
    ``mmasr.encoder_passes_per_utt``.
    """
    from mmasr.data.audio import read_audio
    from mmasr.progress import Progress

    rows = manifest[manifest["split"].isin(list(splits))].sort_values("utt_id").reset_index(drop=True)
    if limit:
        rows = rows.iloc[:limit]
    if rows.empty:
        raise ValueError(f"no utterances in splits {list(splits)} to encode")
    index = []
    counter = PassCounter()
    with atomic_dir(out_dir) as tmp, count_passes(bundle.model.get_encoder(), counter):
        bar = Progress(len(rows), "encode audio", unit="utt", bar=progress)
        for shard_no, start in enumerate(range(0, len(rows), shard_size)):
            part = rows.iloc[start:start + shard_size]
            name = f"shard-{shard_no:05d}.safetensors"
            arrays = {}
            for b in range(0, len(part), batch_size):
                batch = part.iloc[b:b + batch_size]
                for utt, feats in zip(batch["utt_id"], encode_batch(bundle, [read_audio(p) for p in batch["audio_path"]])):
                    arrays[utt] = feats
                    index.append({"utt_id": utt, "shard": name, "n_frames": feats.shape[0], "dim": feats.shape[1]})
                bar.update(len(batch))  # utterances
            write_shard(tmp / name, arrays)
        bar.close()
        write_index(tmp / "index.parquet", index,
                    {**index_metadata(bundle), "mmasr.encoder_passes": str(counter.rows),
                     "mmasr.encoder_passes_per_utt": str(counter.per_utt(len(rows))),
                     "mmasr.encoded_utts": str(len(rows)), "mmasr.encoder_pass": "own"})
    return pd.DataFrame(index, columns=INDEX_COLUMNS)


class ShardWriter:
    """Arrays by utterance id into ``shard-NNNNN.safetensors`` files of ``shard_size`` utterances (in the order
    added) under ``folder``, and their ``index.parquet`` rows."""

    def __init__(self, folder: Path, shard_size: int):
        self.folder, self.shard_size = folder, shard_size
        self.index: list[dict] = []
        self._pending: dict[str, np.ndarray] = {}
        self._shard_no = 0

    def add(self, utt_id: str, array: np.ndarray) -> None:
        self._pending[utt_id] = array
        if len(self._pending) == self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        name = f"shard-{self._shard_no:05d}.safetensors"
        self.index += [{"utt_id": u, "shard": name, "n_frames": a.shape[0], "dim": a.shape[1]}
                       for u, a in self._pending.items()]
        write_shard(self.folder / name, self._pending)
        self._pending, self._shard_no = {}, self._shard_no + 1


@torch.inference_mode()
def encode_pass(bundle: ModelBundle, manifest: pd.DataFrame, features_dir: str | Path, *, splits: Sequence[str],
                models_cfg: dict, pooled_path: str | Path | None = None, states_dir: str | Path | None = None,
                states_splits: Sequence[str] = (), batch_size: int = 32, shard_size: int = 512,
                limit: int | None = None, progress: bool = True) -> tuple[pd.DataFrame, object]:
    """One pass of the Whisper encoder of ``bundle`` (``models.whisper``) over every utterance of ``manifest``
    that some product needs, all products from the same forward, each written atomically:

    * ``features_dir``: the projector cache of the utterances of ``splits``, as :func:`encode_manifest` writes it
      (same shards, same index);
    * ``pooled_path`` (when ``models.audio_encoder`` is the same encoder, :mod:`mmasr.models.encode_once`): every
      utterance's pooled hidden states, for the probe and CLAP;
    * ``states_dir``: the whole window's last-layer states of the utterances of ``states_splits`` (the n-best's),
      float32 (lossless for float32, bfloat16 and float16 models; the model's dtype is in the index metadata,
      ``mmasr.states_dtype``), in the same shard + index layout: what beam search attends to.

    Returns (the projector cache's index, the pooled embeddings or None)."""
    from contextlib import ExitStack

    from mmasr.data.audio import read_audio
    from mmasr.models.encode_once import pass_metadata, pooled_means, require_same_encoder, write_pooled
    from mmasr.models.layers import encoder_depth, hidden_size, lengths_mask
    from mmasr.progress import Progress

    if pooled_path is not None:
        require_same_encoder(models_cfg)
    wanted = set(splits) | (set(states_splits) if states_dir is not None else set())
    rows = manifest.sort_values("utt_id").reset_index(drop=True)
    if pooled_path is None:
        rows = rows[rows["split"].isin(wanted)].reset_index(drop=True)
    if limit:
        rows = rows.iloc[:limit]
    if not rows["split"].isin(list(splits)).any():
        raise ValueError(f"no utterances in splits {list(splits)} to encode")
    encoder = bundle.model.get_encoder()
    hop = bundle.processor.feature_extractor.hop_length
    pooled: dict[str, np.ndarray] = {}
    counter = PassCounter()
    states_dtype = None
    with ExitStack() as stack:
        features = ShardWriter(stack.enter_context(atomic_dir(features_dir)), shard_size)
        # full-window states are large (1500 x d_model floats): shards of at most STATES_SHARD_UTTS keep memory flat
        full = (ShardWriter(stack.enter_context(atomic_dir(states_dir)), min(shard_size, STATES_SHARD_UTTS))
                if states_dir is not None else None)
        stack.enter_context(count_passes(encoder, counter))
        bar = Progress(len(rows), "encode audio", unit="utt", bar=progress)  # one pass for every stage
        for b in range(0, len(rows), batch_size):
            batch = rows.iloc[b:b + batch_size]
            audios = [read_audio(p) for p in batch["audio_path"]]
            feats = whisper_features(bundle, audios)["input_features"]  # refuses audio longer than the window
            with autocast(bundle.device):
                out = encoder(feats, output_hidden_states=pooled_path is not None)
            last = out.last_hidden_state
            states_dtype = str(last.dtype).removeprefix("torch.")
            window = last.shape[1]
            frames = torch.tensor([n_encoder_frames(len(a), hop, window) for a in audios])
            means = pooled_means(out.hidden_states, lengths_mask(frames, window)) if pooled_path is not None else None
            for i, (utt, split) in enumerate(zip(batch["utt_id"], batch["split"])):
                if means is not None:
                    pooled[utt] = means[i]
                if split in splits:
                    features.add(utt, last[i, : int(frames[i])].float().cpu().numpy().astype(np.float16))
                if full is not None and split in states_splits:
                    full.add(utt, last[i].float().cpu().numpy())
            bar.update(len(batch))
        bar.close()
        passes = pass_metadata(counter, len(rows))
        counts = {**{f"mmasr.{k}": str(v) for k, v in passes.items()}, "mmasr.encoded_utts": str(len(rows)),
                  "mmasr.encoder_pass": "shared" if pooled_path is not None or full is not None else "own"}
        features.flush()
        write_index(features.folder / "index.parquet", features.index, {**index_metadata(bundle), **counts})
        if full is not None:
            full.flush()
            write_index(full.folder / "index.parquet", full.index,
                        {**index_metadata(bundle), **counts, "mmasr.dtype": "float32",
                         "mmasr.states_dtype": states_dtype or "float32", "mmasr.window": "full"})
    if pooled_path is None:
        return pd.DataFrame(features.index, columns=INDEX_COLUMNS), None
    meta = {"encoder_name": str(models_cfg["whisper"]), "revision": bundle.revision,
            "requested_revision": models_cfg.get("whisper_revision"), "requested_dtype": str(models_cfg.get("dtype", "auto")),
            "model_type": encoder.config.model_type, "depth": encoder_depth(encoder), "dim": hidden_size(encoder),
            "pooling": "mean", "layers": "all hidden_states, 0 (embeddings) .. depth (last_hidden_state)",
            "device": str(bundle.device), "dtype": str(encoder.dtype).removeprefix("torch."), "n_utts": len(rows),
            **passes}
    return pd.DataFrame(features.index, columns=INDEX_COLUMNS), write_pooled(pooled_path, pooled, meta)


class FeatureCache:
    """Read-only access to cached encoder outputs by utterance id."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / "index.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no encoder-feature cache here (run `mmasr encode-audio`)")
        self.index = pd.read_parquet(path).set_index("utt_id")
        self.metadata = read_metadata(path)
        self.digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        self._open: dict[str, object] = {}

    @property
    def dim(self) -> int:
        return int(self.index["dim"].iloc[0])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, utt_id: str) -> np.ndarray:
        from safetensors import safe_open

        shard = self.index.at[utt_id, "shard"]
        if shard not in self._open:
            self._open[shard] = safe_open(str(self.folder / shard), framework="np")
        return self._open[shard].get_tensor(utt_id)

    def batch(self, utt_ids: Sequence[str]) -> list[np.ndarray]:
        return [self[u] for u in utt_ids]


class LiveEncoder:
    """The naive route, for comparison (benchmarks/projector_cache.py): the same interface as
    :class:`FeatureCache`, but every request reads the audio and runs the frozen encoder again."""

    def __init__(self, bundle: ModelBundle, manifest: pd.DataFrame):
        from mmasr.data.audio import read_audio

        self.bundle, self._read = bundle, read_audio
        self.paths = manifest.set_index("utt_id")["audio_path"]
        hop = bundle.processor.feature_extractor.hop_length
        window = bundle.processor.feature_extractor.nb_max_frames // 2
        n_frames = [n_encoder_frames(sf.info(path).frames, hop, window) for path in manifest["audio_path"]]
        self.index = pd.DataFrame({"utt_id": manifest["utt_id"], "n_frames": n_frames}).set_index("utt_id")
        self.folder, self.metadata = Path("<live encoder>"), {"mmasr.model": bundle.name}
        self.digest = bundle.revision
        self.dim = int(bundle.model.config.d_model)

    def __getitem__(self, utt_id: str) -> np.ndarray:
        return self.batch([utt_id])[0]

    def batch(self, utt_ids: Sequence[str]) -> list[np.ndarray]:
        return encode_batch(self.bundle, [self._read(self.paths[u]) for u in utt_ids])

