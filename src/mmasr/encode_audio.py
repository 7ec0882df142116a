"""Cache of frozen-encoder outputs: the Whisper encoder runs once per utterance, training reads the cache.

Whisper pads every input to its fixed window (30 s for real models) and its encoder emits 50 frames
per second of that window; only the frames covering the real audio are kept, as float16, grouped in
safetensors shards (one tensor per utterance, keyed by utterance id) with an index table of lengths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .io import atomic_path, write_parquet
from .models import ModelBundle, autocast, whisper_features

INDEX_COLUMNS = ["utt_id", "shard", "n_frames", "dim"]


def n_encoder_frames(n_samples: int, hop_length: int, window_frames: int) -> int:
    """Encoder frames covering ``n_samples`` of audio: mel frames (one per hop) halved by the encoder's
    stride-2 convolution, never more than the window holds."""
    return min(window_frames, max(1, math.ceil(n_samples / hop_length / 2)))


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


def write_index(path: str | Path, rows: list[dict]) -> None:
    write_parquet(path, pd.DataFrame(rows, columns=INDEX_COLUMNS).sort_values("utt_id").reset_index(drop=True))


class FeatureCache:
    """Read-only access to cached encoder outputs by utterance id."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.index = pd.read_parquet(self.folder / "index.parquet").set_index("utt_id")
        self._open: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, utt_id: str) -> np.ndarray:
        from safetensors import safe_open

        shard = self.index.at[utt_id, "shard"]
        if shard not in self._open:
            self._open[shard] = safe_open(str(self.folder / shard), framework="np")
        return self._open[shard].get_tensor(utt_id)
