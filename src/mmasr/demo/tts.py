"""Real English speech without system packages: eSpeak NG through the library ``espeakng-loader`` ships.

``espeakng-loader`` (a pip wheel) carries ``libespeak-ng.so`` and its data folder, so no ``apt-get`` is
needed. The library is driven through ctypes in synchronous mode: a callback receives 16-bit chunks,
which are joined into one float32 array at the library's own rate (22050 Hz).

eSpeak NG keeps global state (one voice, one callback per process), so every call takes a process-wide
lock and sets the voice, rate, pitch, pitch range and word gap afresh. Synthesis is deterministic: the
same arguments give the same samples, whatever was spoken before in the process (eSpeak NG carries
state from call to call, which :meth:`_Engine.reset_state` resets; without that, a corpus written by a
process pool would differ from one written by a single process).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
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
_ESPEAK_RANGE = 4  # pitch range, 0-100 (0 = monotone, 50 = the voice's own)
_ESPEAK_WORDGAP = 7  # extra pause between words, units of 10 ms (at the default speed)
_CHARS_AUTO = 0
_CARRIED_COUNTERS = ("cycle_count", "Flutter_ix")  # wavegen.c statics carried between calls (see reset_state)
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
        self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")  # the rand() eSpeak NG calls
        views = [_library_static(self.lib, espeakng_loader.get_library_path(), "espeak_ng_SetRandSeed", name)
                 for name in _CARRIED_COUNTERS]
        self.repeatable = all(v is not None for v in views)
        self.counters = [(v, v.value) for v in views if v is not None]  # values before any synthesis
        self.chunks: list[np.ndarray] = []
        self._callback = _CALLBACK_TYPE(self._collect)  # kept referenced: the library holds a raw pointer
        self.lib.espeak_SetSynthCallback(self._callback)

    def reset_state(self) -> None:
        """Put the state eSpeak NG carries from one call to the next back to where it started.

        wavegen.c keeps function-static counters that run on through every utterance and are never
        reset, not even by espeak_Initialize: ``cycle_count`` (glottal cycles, which decides when the
        smoothed amplitude and the harmonics are updated) and ``Flutter_ix`` (the index into the
        pitch-flutter table). With them running, the same text comes out slightly different (other
        samples, even another length) on every call, and a corpus written by a process pool would
        differ from one written by a single process. They are not exported, so their addresses are
        read from the library's ELF symbol table (:func:`_library_static`) and their values at
        initialisation are written back before every call; measured here: after any history of
        voices, rates, pitch ranges and word gaps, every call then equals the first call of a fresh
        process. A library without a symbol table (stripped, or not ELF) keeps them running
        (:attr:`repeatable` is False). The library's random generator and the C library's
        ``rand()`` are re-seeded as well.
        """
        for view, initial in self.counters:
            view.value = initial
        self.lib.espeak_ng_SetRandSeed(ctypes.c_long(1))
        self.libc.srand(ctypes.c_uint(1))

    def _collect(self, wav, n: int, events) -> int:
        if n > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = continue


def _elf_symbols(path: str) -> dict[str, tuple[int, int, int]]:
    """``{name: (value, size, type)}`` of a 64-bit little-endian ELF file's full symbol table
    (.symtab, locals included); empty when the file is not such an ELF or has no .symtab."""
    with open(path, "rb") as fh:
        blob = fh.read()
    if blob[:4] != b"\x7fELF" or blob[4] != 2 or blob[5] != 1:  # ELFCLASS64, little-endian
        return {}
    shoff, = struct.unpack_from("<Q", blob, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", blob, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", blob, shoff + i * shentsize) for i in range(shnum)]
    out: dict[str, tuple[int, int, int]] = {}
    for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
        if sh_type != 2 or entsize != 24:  # SHT_SYMTAB
            continue
        str_off = sections[link][4]
        for pos in range(offset, offset + size, entsize):
            st_name, st_info, _, _, value, st_size = struct.unpack_from("<IBBHQQ", blob, pos)
            end = blob.index(b"\0", str_off + st_name)
            out[blob[str_off + st_name:end].decode("ascii", "replace")] = (value, st_size, st_info & 0xF)
    return out


def _library_static(lib: ctypes.CDLL, path: str, exported: str, prefix: str) -> ctypes.c_int | None:
    """The loaded library's non-exported ``int`` variable whose symbol is ``prefix`` or a
    function-static ``prefix.N``, as a ctypes view; None when the symbol table does not say
    exactly one 4-byte object of that name (nothing is then ever written)."""
    try:
        symbols = _elf_symbols(path)
    except (OSError, struct.error, ValueError, IndexError):
        return None
    hits = [v for name, v in symbols.items() if name == prefix or name.startswith(prefix + ".")]
    anchor = symbols.get(exported)
    if len(hits) != 1 or anchor is None or hits[0][1] != 4 or hits[0][2] != 1:  # STT_OBJECT, 4 bytes
        return None
    base = ctypes.cast(getattr(lib, exported), ctypes.c_void_p).value - anchor[0]
    return ctypes.c_int.from_address(base + hits[0][0])


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


def espeak_synthesise(text: str, voice: str = "en-us", rate_wpm: int = 160, pitch: int = 50, *,
                      pitch_range: int = 50, word_gap_ms: int = 0) -> tuple[np.ndarray, int]:
    """Speak ``text`` with eSpeak NG: (float32 mono samples in [-1, 1], sample rate).

    ``pitch`` and ``pitch_range`` are 0-100 (50 = the voice's own; range 0 = monotone);
    ``word_gap_ms`` is an extra pause between words (rounded to eSpeak's 10 ms units). The same
    arguments give the same samples whatever was spoken before (see :meth:`_Engine.reset_state`).
    """
    if not text.strip():
        raise ValueError("nothing to say: the text is empty")
    if not 80 <= rate_wpm <= 450:
        raise ValueError(f"rate_wpm {rate_wpm} is outside eSpeak NG's range 80-450 words per minute")
    for name, value in (("pitch", pitch), ("pitch_range", pitch_range)):
        if not 0 <= value <= 100:
            raise ValueError(f"{name} {value} is outside eSpeak NG's range 0-100")
    if not 0 <= word_gap_ms <= 5000:
        raise ValueError(f"word_gap_ms {word_gap_ms} is outside 0-5000")
    engine = _engine()
    with _LOCK:
        if engine.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise EspeakError(f"eSpeak NG has no voice {voice!r} (e.g. en-us, en-us+f2, en+m3; the English ones are in mmasr.demo.tts.ESPEAK_VOICES)")
        engine.lib.espeak_SetParameter(_ESPEAK_RATE, int(rate_wpm), 0)
        engine.lib.espeak_SetParameter(_ESPEAK_PITCH, int(pitch), 0)
        engine.lib.espeak_SetParameter(_ESPEAK_RANGE, int(pitch_range), 0)
        engine.lib.espeak_SetParameter(_ESPEAK_WORDGAP, int(round(word_gap_ms / 10)), 0)
        engine.reset_state()
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
