"""Real English speech without system packages: eSpeak NG through the library ``espeakng-loader`` ships.

``espeakng-loader`` (a pip wheel) carries ``libespeak-ng.so`` and its data folder, so no ``apt-get`` is
needed. The library is driven through ctypes in synchronous mode: a callback receives 16-bit chunks,
which are joined into one float32 array at the library's own rate (22050 Hz).

eSpeak NG keeps global state (one voice, one callback per process), so every call takes a process-wide
lock and sets the voice and the rate afresh. Synthesis is deterministic: the same text, voice and
rate give the same samples.
"""

from __future__ import annotations

import ctypes
import threading
from functools import lru_cache

import numpy as np

__all__ = ["EspeakError", "espeak_available", "espeak_synthesise", "ESPEAK_VOICES"]

# Voice names as eSpeak NG reads them: a language, optionally "+variant" (a speaker: pitch, formants,
# breathiness; "en" is British English). These are the English voices and variants the wheel's data folder holds.
ESPEAK_VOICES = (
    "en-us", "en-us+f1", "en-us+f2", "en-us+f3", "en-us+f4", "en-us+m1", "en-us+m2", "en-us+m3", "en-us+m4",
    "en-us+m7", "en", "en+f2", "en+m3", "en-gb-x-rp+f4", "en-gb-scotland+m2", "en-029+f3",
)

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_RATE = 1  # espeak_PARAMETER: words per minute
_ESPEAK_PITCH = 3  # base pitch, 0-100 (50 = the voice's own)
_CHARS_AUTO = 0
_LOCK = threading.Lock()
_CALLBACK_TYPE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class EspeakError(RuntimeError):
    """eSpeak NG is missing or refused a request; the message says which and what to do."""


class _Engine:
    """The loaded library, its sample rate and the chunks the callback collected for the current call."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as exc:
            raise EspeakError("eSpeak NG speech needs the pip package espeakng-loader "
                              "(pip install 'mmasr[speech]', or the pinned test extra)") from exc
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.sample_rate = int(self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                                          espeakng_loader.get_data_path().encode(), 0))
        if self.sample_rate <= 0:
            raise EspeakError(f"espeak_Initialize failed (returned {self.sample_rate}) with data folder "
                              f"{espeakng_loader.get_data_path()}")
        self.chunks: list[np.ndarray] = []
        self._callback = _CALLBACK_TYPE(self._collect)  # kept referenced: the library holds a raw pointer
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n: int, events) -> int:
        if n > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = continue


@lru_cache(maxsize=1)
def _engine() -> _Engine:
    return _Engine()


def espeak_available() -> bool:
    """True when the espeakng-loader wheel is installed and its library initialises."""
    try:
        _engine()
    except (EspeakError, OSError):
        return False
    return True


def espeak_synthesise(text: str, voice: str = "en-us", rate_wpm: int = 160, pitch: int = 50) -> tuple[np.ndarray, int]:
    """Speak ``text`` with eSpeak NG: (float32 mono samples in [-1, 1], sample rate)."""
    if not text.strip():
        raise ValueError("nothing to say: the text is empty")
    if not 80 <= rate_wpm <= 450:
        raise ValueError(f"rate_wpm {rate_wpm} is outside eSpeak NG's range 80-450 words per minute")
    engine = _engine()
    with _LOCK:
        if engine.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise EspeakError(f"eSpeak NG has no voice {voice!r} (e.g. en-us, en-us+f2, en+m3; the English ones are in mmasr.tts.ESPEAK_VOICES)")
        engine.lib.espeak_SetParameter(_ESPEAK_RATE, int(rate_wpm), 0)
        engine.lib.espeak_SetParameter(_ESPEAK_PITCH, int(pitch), 0)
        engine.chunks = []
        data = text.encode("utf-8")
        status = engine.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, _CHARS_AUTO, None, None)
        if status != 0:
            raise EspeakError(f"espeak_Synth failed with status {status} for {text!r}")
        chunks, engine.chunks = engine.chunks, []
    if not chunks:
        raise EspeakError(f"eSpeak NG produced no audio for {text!r} with voice {voice!r}")
    audio = np.concatenate(chunks).astype(np.float32) / 32768.0
    return audio, engine.sample_rate
