"""Speech segments of a long recording with Silero VAD (the ``silero-vad`` package; its TorchScript weights,
``silero_vad/data/silero_vad.jit``, ship in the wheel, so nothing is downloaded).

``mmasr transcribe`` cuts a recording longer than Whisper's window into these segments and transcribes
each one (see :mod:`mmasr.rescoring.transcribe`).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["VAD_SAMPLE_RATE", "speech_segments", "merge_close"]

VAD_SAMPLE_RATE = 16000  # Silero VAD's own rate (8 kHz is its only other one)


@lru_cache(maxsize=1)
def _model():
    import warnings

    from silero_vad import load_silero_vad

    with warnings.catch_warnings():  # silero-vad 6.2.3 uses importlib.resources.path and torch.jit.load
        warnings.simplefilter("ignore", DeprecationWarning)
        return load_silero_vad(onnx=False)


def merge_close(segments: list[tuple[float, float]], gap_s: float, max_len_s: float) -> list[tuple[float, float]]:
    """Join segments less than ``gap_s`` apart while the joined one stays within ``max_len_s``."""
    out: list[tuple[float, float]] = []
    for start, end in segments:
        if out and start - out[-1][1] < gap_s and end - out[-1][0] <= max_len_s:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def speech_segments(audio: np.ndarray, sr: int, cfg: dict) -> list[tuple[float, float]]:
    """(start, end) seconds of each stretch of speech in a mono recording at ``sr`` (16000 Hz), none longer
    than ``cfg["max_segment_s"]`` (Silero splits a longer one at its longest pause).

    ``cfg``: the params' ``transcribe`` section (``vad_threshold``, ``vad_min_silence_ms``,
    ``vad_speech_pad_ms``, ``vad_min_speech_ms``, ``max_segment_s``, ``merge_gap_s``)."""
    import torch
    from silero_vad import get_speech_timestamps

    if sr != VAD_SAMPLE_RATE:
        raise ValueError(f"Silero VAD here reads {VAD_SAMPLE_RATE} Hz audio, got {sr} Hz")
    model = _model()
    model.reset_states()
    with torch.inference_mode():
        stamps = get_speech_timestamps(torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)), model,
                                       threshold=cfg["vad_threshold"], sampling_rate=sr,
                                       min_speech_duration_ms=cfg["vad_min_speech_ms"],
                                       max_speech_duration_s=cfg["max_segment_s"],
                                       min_silence_duration_ms=cfg["vad_min_silence_ms"],
                                       speech_pad_ms=cfg["vad_speech_pad_ms"])
    found = [(s["start"] / sr, s["end"] / sr) for s in stamps]
    return merge_close(found, cfg["merge_gap_s"], cfg["max_segment_s"])

