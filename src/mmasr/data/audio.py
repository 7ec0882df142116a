"""Reading the preprocessed audio, and batching utterances by length.

Every stage after preprocessing reads audio through :func:`read_audio`, which accepts only what
preprocessing writes (16 kHz mono) and refuses anything else with the file's name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import soundfile as sf

__all__ = ["read_audio", "length_batches"]


def read_audio(path: str) -> np.ndarray:
    """A preprocessed file as float32 16 kHz mono samples; other rates or channel counts are refused."""
    audio, sr = sf.read(path, dtype="float32")
    if sr != 16000 or audio.ndim != 1:
        raise ValueError(f"{path}: expected preprocessed 16 kHz mono audio, got {sr} Hz, shape {audio.shape}")
    return audio


def length_batches(durations: Sequence[float], batch_size: int) -> list[np.ndarray]:
    """Indices grouped into batches of similar duration (longest first), so beams end together."""
    order = np.argsort(-np.asarray(durations, dtype=float), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
