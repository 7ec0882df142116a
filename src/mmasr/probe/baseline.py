"""The probe's trivial baseline: a handful of plain signal features per utterance.

The group probe (:mod:`mmasr.probe.train`) reads frozen-encoder embeddings. Impaired speech is also slower
and often recorded differently (noisier, band-limited), so a probe can score well by knowing the channel and
the tempo alone. The same training and evaluation (speaker-grouped folds, calibration, held-out speakers)
on five features computed from the *processed* audio (16 kHz mono, peak-normalised, trimmed) and the
transcript tells a reader whether the embeddings know more than that:

- ``duration_s``: length of the processed audio;
- ``speech_rate_wps``: words of the transcript per second of audio;
- ``rms_dbfs``: root-mean-square level in dB relative to full scale;
- ``snr_db``: a rough signal-to-noise estimate, 10·log10 of the 90th over the 10th percentile of the
  frame powers (25 ms frames, 10 ms hop): the loud frames against the quiet ones;
- ``spectral_centroid_hz``: centroid of the mean power spectrum over the frames (Hann window).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

__all__ = ["BASELINE_FEATURES", "signal_features", "baseline_features"]

BASELINE_FEATURES = ("duration_s", "speech_rate_wps", "rms_dbfs", "snr_db", "spectral_centroid_hz")
_EPS = 1e-10


def _frames(audio: np.ndarray, frame: int, hop: int) -> np.ndarray:
    """(n, frame) overlapping frames; a clip shorter than a frame is zero-padded to one."""
    if len(audio) < frame:
        audio = np.pad(audio, (0, frame - len(audio)))
    return np.lib.stride_tricks.sliding_window_view(audio, frame)[::hop]


def signal_features(audio: np.ndarray, sample_rate: int, text: str | None, frame_s: float = 0.025,
                    hop_s: float = 0.010) -> np.ndarray:
    """The :data:`BASELINE_FEATURES` of one utterance, in that order (float64)."""
    audio = np.asarray(audio, dtype=np.float64)
    if audio.ndim != 1 or not len(audio):
        raise ValueError(f"expected non-empty mono audio, got shape {audio.shape}")
    duration = len(audio) / sample_rate
    words = len(str(text).split()) if isinstance(text, str) else 0
    rms = float(np.sqrt(np.mean(audio ** 2)))
    frames = _frames(audio, max(1, round(frame_s * sample_rate)), max(1, round(hop_s * sample_rate)))
    power = np.mean(frames ** 2, axis=1)
    snr = 10 * np.log10((np.percentile(power, 90) + _EPS) / (np.percentile(power, 10) + _EPS))
    spectrum = np.mean(np.abs(np.fft.rfft(frames * np.hanning(frames.shape[1]), axis=1)) ** 2, axis=0)
    freqs = np.fft.rfftfreq(frames.shape[1], 1 / sample_rate)
    centroid = float(spectrum @ freqs / spectrum.sum()) if spectrum.sum() > 0 else 0.0
    return np.array([duration, words / duration, 20 * np.log10(rms + _EPS), snr, centroid])


def baseline_features(manifest: pd.DataFrame, read: Callable[[str], np.ndarray], sample_rate: int = 16000
                      ) -> dict[str, np.ndarray]:
    """utt_id -> :func:`signal_features` of every manifest row (``audio_path`` read with ``read``)."""
    return {str(u): signal_features(read(str(a)), sample_rate, t)
            for u, a, t in zip(manifest["utt_id"], manifest["audio_path"],
                               manifest["text"] if "text" in manifest else [None] * len(manifest))}
