"""Shared fixtures: small audio and picture files written on the fly (tests never download)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def tone(seconds: float = 1.0, sr: int = 16000, freq: float = 220.0, amp: float = 0.5,
         lead: float = 0.3, tail: float = 0.3, channels: int = 1) -> np.ndarray:
    """A harmonic tone with silent lead-in and tail, shape (frames,) or (frames, channels)."""
    t = np.arange(int(seconds * sr)) / sr
    voiced = amp * (np.sin(2 * np.pi * freq * t) + 0.3 * np.sin(2 * np.pi * 2 * freq * t)) / 1.3
    x = np.concatenate([np.zeros(int(lead * sr)), voiced, np.zeros(int(tail * sr))]).astype(np.float32)
    return x if channels == 1 else np.stack([x * (1 - 0.1 * c) for c in range(channels)], axis=1)


def write_wav(path: Path, audio: np.ndarray, sr: int = 16000, subtype: str = "PCM_16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, sr, subtype=subtype)
    return path


def write_picture(path: Path, mode: str = "RGB", size: tuple[int, int] = (64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = {"RGB": (200, 30, 30), "RGBA": (200, 30, 30, 128), "L": 120, "CMYK": (0, 200, 200, 0), "LA": (120, 200)}[mode]
    img = Image.new(mode, size, color)
    img.save(path, format="JPEG" if mode == "CMYK" else "PNG")
    return path


@pytest.fixture
def preprocess_cfg() -> dict:
    from mmasr.config import validate

    return validate({})["preprocess"]
