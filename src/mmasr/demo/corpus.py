"""Deterministic synthetic picture-description speech corpus (the offline demo data set).

Why it exists
-------------
The pipeline (Whisper n-best lists rescored by CLIP picture similarity) needs a corpus on which
the rescoring question is *answerable* without any download: some speakers must be hard to
recognise on exactly the cue that a picture can resolve. This module writes such a corpus to
a directory in the same shape a user would hand one over (audio files, pictures, manifest CSV).

Design
------
The task is modelled on picture-description corpora (a speaker looks at a picture and says what
they see): the picture helps the recogniser without dictating the answer.

* Every utterance describes a **scene of its own** (its own picture): ``demo.scene_objects`` rows
  of object groups, each ``count`` copies of one noun's glyph in one colour. The speaker names one
  row, "<count> <colour> <noun>", after an optional intro ("i see", "we got", "i caught", ...;
  :data:`INTROS`). A picture shows more than is said, and the intro says things no picture shows.
* The 12 nouns form 6 voicing minimal pairs (bear/pear, goat/coat, bee/pea, bin/pin, dart/tart,
  cub/cup); the intro verbs got/caught are a seventh pair that no picture can decide.
* With probability ``demo.partner_in_scene`` the picture also shows the named noun's partner (then
  the noun alone does not tell the pair apart; only its count and colour might), and with
  probability ``demo.wrong_description_rate`` the speaker gets the picture wrong (names the partner
  or another colour than it shows; the transcript is what was said). ``scenes.csv`` records each
  picture's rows, the described one, and whether the description agrees with it.
* **What is said is disjoint across speakers** (:func:`description_pools`): the intro x count x
  colour x pair units are dealt to speakers, so a speaker-disjoint split is also disjoint in
  transcripts and pictures (``split.disjoint_text`` then excludes nothing), while every object
  phrase is still said by several speakers (with different intros).
* Speech is made by a small formant synthesiser (numpy/scipy only) at the file's own sample
  rate: a Rosenberg glottal pulse train with per-cycle jitter/shimmer and f0 declination drives
  a cascade of three time-varying 2nd-order resonators (formants interpolated sample by sample
  between phone targets, computed as a vectorised complex one-pole recurrence) plus two fixed
  higher formants; sonorants use the same path (nasal murmur for N); fricatives and stop bursts
  are band-filtered noise; stops are closure + place-specific burst + voice onset (aspiration
  noise for the VOT), with a low-frequency voice bar during voiced closures.
* "Control" speakers realise the voicing cues clearly. "Impaired" speakers (TORGO-style names)
  are slower, noisier, have more jitter/shimmer, and their voicing cues (VOT, voice bar,
  aspiration, closure length, and for final stops the preceding-vowel length) are squeezed by a
  per-speaker fraction toward the voiced/voiceless midpoint: confusable, never identical. See
  :func:`stop_voicing_cues` (pure, tested).
* ``demo.synthesiser: espeak`` replaces the formant synthesiser by real English speech from eSpeak NG
  (:mod:`mmasr.demo.tts`, the ``speech`` extra): a voice per speaker (:func:`espeak_voice_slot`), controls at
  150-180 words per minute, impaired speakers slower, flatter and degraded as documented in
  :func:`espeak_utterance` (tremor, breathiness, band-limiting, noise). Everything else (descriptions,
  pictures, formats, defects, manifest) is planned before synthesis and so is identical for both.
* Pictures are drawn procedurally with PIL (:func:`draw_scene`: a glyph per noun, in the colour).
* A handful of deliberately defective rows (one per kind in :data:`DEFECT_KINDS`) are appended;
  ``defects.csv`` lists them so the preprocessing's rejection reasons can be checked.

Determinism: every random draw comes from a ``numpy`` Generator seeded by ``(seed, tag, ...)``
(speaker-level, utterance-level, picture-level), so an utterance does not depend on the others,
files carry no timestamps (libsndfile's PEAK-chunk time in float WAVs is zeroed), and the same
``(cfg, seed)`` gives byte-identical files whether or not a process pool is used. The corpus is written into a temporary sibling directory and renamed
into place at the end, so a killed run never leaves a complete-looking ``out_dir``.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw, ImageFilter
from scipy.ndimage import uniform_filter1d
from scipy.signal import butter, lfilter, resample_poly, sosfilt

from mmasr.config import schema_defaults, validate_section
from mmasr.demo.tts import ESPEAK_VOICES, EspeakError, espeak_synthesise

__all__ = [
    "DEFAULT_CONFIG",
    "LEXICON",
    "MINIMAL_PAIRS",
    "NOUNS",
    "COLOURS",
    "COUNTS",
    "DEFECT_KINDS",
    "CONTROL_NOISE_DB",
    "Speaker",
    "EspeakVoice",
    "SYNTHESISERS",
    "VoicingCues",
    "generate_demo_corpus",
    "validate_config",
    "all_phrases",
    "ObjectPhrase",
    "Scene",
    "INTROS",
    "INTRO_WORDS",
    "PARTNER",
    "describe",
    "parse_phrase",
    "description_pools",
    "plan_scene",
    "draw_scene",
    "build_speakers",
    "stop_voicing_cues",
    "voicing_cue",
    "squeeze_toward_midpoint",
    "synthesize_utterance",
    "espeak_utterance",
    "espeak_voice_slot",
    "make_espeak_voice",
    "tremor_warp",
    "add_breath_noise",
    "band_limit",
    "draw_picture",
]

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

# The params `demo` section, defaults as declared in workflow/schemas/params.schema.yaml.
DEFAULT_CONFIG: dict[str, Any] = schema_defaults()["demo"]

CONTROL_NOISE_DB = -45.0  # controls are recorded much cleaner than impaired speakers
FLOAT_WAV_FRACTION = 0.2  # share of the WAV files written as 32-bit float (rest PCM_16)
MAX_UTTS_PER_SPEAKER = 8999  # ids 9001.. are reserved for the defective rows (the schema's maximum)
SYNTHESISERS = ("formant", "espeak")  # demo.synthesiser (the schema's choices)
MAX_SCENE_OBJECTS = 4  # rows of a picture, each still readable by the demo CLIP (the schema's maximum)


def validate_config(cfg: dict | None) -> dict[str, Any]:
    """The ``demo`` params section ``cfg`` (partial, or None) validated against the schema with every
    default filled in (:func:`mmasr.config.validate_section`, cross-field rules included); lists are
    normalised to plain ints and floats. Raises :class:`mmasr.config.ParamsError` (a ValueError) naming
    the offending key, unknown keys included."""
    merged = validate_section("demo", cfg)
    merged["sample_rates"] = [int(r) for r in merged["sample_rates"]]
    merged["impaired_voicing_blur"] = [float(b) for b in merged["impaired_voicing_blur"]]
    merged["scene_objects"] = [int(k) for k in merged["scene_objects"]]
    return merged


# --------------------------------------------------------------------------------------------
# Vocabulary, lexicon, descriptions
# --------------------------------------------------------------------------------------------

# Singular nouns -> phones. Each minimal pair differs only in the voicing of one stop.
_NOUN_PHONES: dict[str, tuple[str, ...]] = {
    "bear": ("B", "EH", "R"), "pear": ("P", "EH", "R"),
    "goat": ("G", "OW", "T"), "coat": ("K", "OW", "T"),
    "bee": ("B", "IY"), "pea": ("P", "IY"),
    "bin": ("B", "IH", "N"), "pin": ("P", "IH", "N"),
    "dart": ("D", "AA", "R", "T"), "tart": ("T", "AA", "R", "T"),
    "cub": ("K", "AH", "B"), "cup": ("K", "AH", "P"),
}
MINIMAL_PAIRS: list[tuple[str, str]] = [
    ("bear", "pear"), ("goat", "coat"), ("bee", "pea"),
    ("bin", "pin"), ("dart", "tart"), ("cub", "cup"),
]
NOUNS: tuple[str, ...] = tuple(n for pair in MINIMAL_PAIRS for n in pair)
PARTNER: dict[str, str] = {**{a: b for a, b in MINIMAL_PAIRS}, **{b: a for a, b in MINIMAL_PAIRS}}
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
COUNTS: tuple[str, ...] = ("a", "two", "three")
COUNT_VALUE: dict[str, int] = {"a": 1, "two": 2, "three": 3}

# What a speaker says before naming the object (each as often). No picture can decide these words,
# and the verbs "got"/"caught" are themselves a voicing minimal pair (G/K), so impaired speech
# confuses them as it confuses the nouns: there the picture has nothing to add.
INTROS: tuple[str, ...] = ("", "i see", "we see", "i got", "we got", "i caught", "we caught")
INTRO_WORDS: frozenset[str] = frozenset(w for intro in INTROS for w in intro.split())
_INTRO_PHONES: dict[str, tuple[str, ...]] = {
    "i": ("AY",), "we": ("W", "IY"), "see": ("S", "IY"),
    "got": ("G", "AA", "T"), "caught": ("K", "AA", "T"),  # cot-caught merger: /K AA T/
}

_VOICELESS_PHONES = frozenset({"P", "T", "K", "S", "F", "TH"})


def plural_phones(phones: Sequence[str]) -> tuple[str, ...]:
    """English regular plural: /s/ after a voiceless final, /z/ otherwise (no sibilant finals here)."""
    return tuple(phones) + (("S",) if phones[-1] in _VOICELESS_PHONES else ("Z",))


def plural(noun: str) -> str:
    return noun + "s"


LEXICON: dict[str, tuple[str, ...]] = {
    "a": ("AH",), "two": ("T", "UW"), "three": ("TH", "R", "IY"),
    "red": ("R", "EH", "D"), "green": ("G", "R", "IY", "N"),
    "blue": ("B", "L", "UW"), "yellow": ("Y", "EH", "L", "OW"),
    **_NOUN_PHONES,
    **{plural(n): plural_phones(p) for n, p in _NOUN_PHONES.items()},
    **_INTRO_PHONES,
}
_NOUN_FORMS = frozenset(NOUNS) | frozenset(plural(n) for n in NOUNS)


@dataclass(frozen=True)
class ObjectPhrase:
    """One object group of a scene, and the words that name it: "<count> <colour> <noun>"."""

    count: str
    colour: str
    noun: str  # singular

    @property
    def text(self) -> str:
        noun = self.noun if self.count == "a" else plural(self.noun)
        return f"{self.count} {self.colour} {noun}"


def all_phrases() -> list[ObjectPhrase]:
    """All 144 object phrases in a fixed order (count-major, then colour, then noun)."""
    return [ObjectPhrase(c, col, n) for c in COUNTS for col in COLOURS for n in NOUNS]


@dataclass(frozen=True)
class Scene:
    """A picture: rows of object groups, top to bottom. ``described`` is the row the speaker talks
    about; ``agrees`` is False when the speaker got that row wrong (the description names the noun's
    minimal-pair partner or another colour than the picture shows)."""

    objects: tuple[ObjectPhrase, ...]
    described: int
    agrees: bool

    @property
    def summary(self) -> str:
        return "; ".join(o.text for o in self.objects)


def parse_phrase(text: str) -> ObjectPhrase | None:
    """The object phrase a description ends with ("... two red bears"), or None if it names none."""
    words = text.split()
    if len(words) < 3 or words[-3] not in COUNT_VALUE or words[-2] not in COLOURS:
        return None
    count, colour, noun = words[-3:]
    singular = noun if count == "a" else (noun[:-1] if noun.endswith("s") else "")
    return ObjectPhrase(count, colour, singular) if singular in PARTNER else None


def describe(intro: str, said: ObjectPhrase) -> str:
    """The transcript of a description: the optional intro, then the object phrase."""
    return f"{intro} {said.text}".strip()


# A unit: one intro with both nouns of a minimal pair, one count and colour ("we got two red bears",
# "we got two red pears").
_MIN_UNITS_PER_POOL = 2


def description_pools(speakers: Sequence["Speaker"], seed: int) -> dict[str, list[tuple[str, ObjectPhrase]]]:
    """The (intro, object phrase) descriptions each speaker chooses from, such that no two speakers
    share a description.

    The 504 units (intro x count x colour x minimal pair) are dealt out, seeded, to pools of at least
    ``_MIN_UNITS_PER_POOL`` units; speakers take the pools in turn, impaired and control speakers
    alternating. With up to 252 speakers every speaker has a pool of its own, so *any*
    speaker-disjoint split is also disjoint in transcripts (and pictures: each utterance has its own),
    and ``split.disjoint_text`` excludes nothing; every speaker says both members of the minimal
    pairs in the same frame, and every object phrase is said by several speakers with different
    intros (a recogniser can learn every word and combination from the train speakers). With more
    speakers, pools are shared and ``split.disjoint_text`` moves the overlap out.
    """
    units = [(intro, c, col, pair) for intro in INTROS for c in COUNTS for col in COLOURS for pair in MINIMAL_PAIRS]
    order = np.random.default_rng([seed, _TAG_POOL]).permutation(len(units))
    impaired = [s for s in speakers if s.group == "impaired"]
    control = [s for s in speakers if s.group == "control"]
    turn = [s for pair in itertools.zip_longest(impaired, control) for s in pair if s is not None]
    n_pools = max(1, min(len(turn), len(units) // _MIN_UNITS_PER_POOL))
    pools: list[list[tuple[str, ObjectPhrase]]] = [[] for _ in range(n_pools)]
    for k, j in enumerate(order):
        intro, count, colour, pair = units[int(j)]
        pools[k % n_pools].extend((intro, ObjectPhrase(count, colour, noun)) for noun in pair)
    return {s.name: pools[k % n_pools] for k, s in enumerate(turn)}


def plan_scene(said: ObjectPhrase, cfg: dict, rng: np.random.Generator) -> Scene:
    """The picture a speaker describes with ``said``: ``demo.scene_objects`` rows of distinct nouns.

    * The described row shows ``said``, except with probability ``demo.wrong_description_rate``:
      then it shows the noun's minimal-pair partner or another colour (the speaker got it wrong).
    * With probability ``demo.partner_in_scene`` another row shows the said noun's partner (any count
      and colour): then the picture cannot tell the pair apart by the noun alone.
    * The other rows show random other nouns, counts and colours, in random order.
    """
    lo, hi = cfg["scene_objects"]
    n_objects = int(rng.integers(lo, hi + 1))
    agrees = bool(rng.random() >= cfg["wrong_description_rate"])
    shown = said
    if not agrees:
        if rng.random() < 0.5:
            shown = ObjectPhrase(said.count, said.colour, PARTNER[said.noun])
        else:
            others = [c for c in COLOURS if c != said.colour]
            shown = ObjectPhrase(said.count, others[int(rng.integers(len(others)))], said.noun)
    rows = [shown]
    partner = PARTNER[said.noun]
    if n_objects > 1 and shown.noun != partner and rng.random() < cfg["partner_in_scene"]:
        rows.append(ObjectPhrase(COUNTS[int(rng.integers(3))], COLOURS[int(rng.integers(4))], partner))
    free = [n for n in NOUNS if n not in {said.noun, partner}]
    for noun in rng.permutation(free)[: n_objects - len(rows)]:
        rows.append(ObjectPhrase(COUNTS[int(rng.integers(3))], COLOURS[int(rng.integers(4))], str(noun)))
    order = rng.permutation(len(rows))
    objects = tuple(rows[int(i)] for i in order)
    return Scene(objects, described=int(np.flatnonzero(order == 0)[0]), agrees=agrees)


# --------------------------------------------------------------------------------------------
# Phonetics: targets and voicing cues
# --------------------------------------------------------------------------------------------

# Vowel formant targets (Hz, adult-male reference; the speaker's formant scale applies on top),
# with an optional glide end target (OW is a diphthong).
_VOWELS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float] | None]] = {
    "IY": ((280, 2250, 2900), None),
    "IH": ((400, 1920, 2550), None),
    "EH": ((550, 1770, 2490), None),
    "AE": ((690, 1660, 2490), None),
    "AA": ((710, 1100, 2540), None),
    "AH": ((620, 1200, 2550), None),
    "OW": ((560, 1000, 2400), (420, 830, 2350)),
    "UW": ((320, 900, 2250), None),
    "AY": ((710, 1100, 2540), (300, 2150, 2850)),  # diphthong: open to front
}
_VOWEL_DUR = {"IY": 0.10, "IH": 0.075, "EH": 0.09, "AE": 0.11, "AA": 0.115, "AH": 0.065,
              "OW": 0.13, "UW": 0.11, "AY": 0.16}

# Sonorants: formant target, voicing amplitude (re. vowel), duration, nasal mix.
_SONORANTS: dict[str, tuple[tuple[float, float, float], float, float, float]] = {
    "R": ((330, 1100, 1500), 0.6, 0.055, 0.0),
    "L": ((380, 1050, 2650), 0.55, 0.055, 0.0),
    "Y": ((270, 2150, 2950), 0.6, 0.045, 0.0),
    "W": ((300, 650, 2200), 0.6, 0.045, 0.0),
    "N": ((260, 1250, 2300), 0.45, 0.065, 1.0),  # nasal murmur: low-passed, weaker
}

_STOP_PLACE = {"B": "labial", "P": "labial", "D": "alveolar", "T": "alveolar",
               "G": "velar", "K": "velar"}
# Burst noise bands: labial low, velar mid ("compact"), alveolar high.
_BURST_BAND = {"labial": (600.0, 1000.0), "alveolar": (3500.0, 5000.0), "velar": (1800.0, 2500.0)}
# Formant loci that the neighbouring vowels glide from/to.
_LOCUS = {"labial": (250, 900, 2200), "alveolar": (250, 1750, 2700), "velar": (250, 2000, 2400),
          "dental": (300, 1400, 2600), "labiodental": (300, 1000, 2300)}
# Fricatives: noise band, place (for the locus), base duration, frication amplitude.
_FRICATIVES: dict[str, tuple[tuple[float, float], str, float, float]] = {
    "S": ((4000.0, 7500.0), "alveolar", 0.075, 0.5),
    "Z": ((3500.0, 7000.0), "alveolar", 0.075, 0.5),
    "F": ((1200.0, 7000.0), "labiodental", 0.085, 0.35),
    "TH": ((1400.0, 7500.0), "dental", 0.085, 0.3),
}


@dataclass(frozen=True)
class VoicingCues:
    """Acoustic realisation of a stop's voicing (all cues the synthesiser uses)."""

    vot_s: float  # burst onset -> voicing onset
    voice_bar: float  # low-frequency voicing during the closure (0..1)
    aspiration: float  # aspiration noise amplitude during the VOT interval (0..1)
    closure_s: float  # closure duration (voiceless closures are longer)
    vowel_scale: float  # length factor of the preceding vowel (the cue for final stops)


_VOICED_STOP = VoicingCues(vot_s=0.010, voice_bar=1.0, aspiration=0.1, closure_s=0.055,
                           vowel_scale=1.35)
_VOICELESS_STOP = VoicingCues(vot_s=0.070, voice_bar=0.0, aspiration=1.0, closure_s=0.075,
                              vowel_scale=0.8)
# Voiced vs voiceless fricative: (voice bar, frication-amplitude factor, duration factor).
_FRIC_VOICED = (1.0, 1.0, 1.0)
_FRIC_VOICELESS = (0.0, 2.0, 1.45)


def squeeze_toward_midpoint(own: float, other: float, blur: float) -> float:
    """Move ``own`` by the fraction ``blur`` toward the midpoint of ``own`` and ``other``.

    For a pair squeezed with the same blur the gap shrinks to ``(1 - blur)`` of its size,
    so any blur < 1 keeps the categories ordered (confusable, not identical).
    """
    return own + blur * ((own + other) / 2.0 - own)


def stop_voicing_cues(phone: str, blur: float = 0.0) -> VoicingCues:
    """Voicing cues of stop ``phone`` (B D G P T K) with the speaker's voicing ``blur`` in [0, 1]."""
    if phone not in _STOP_PLACE:
        raise ValueError(f"not a stop: {phone!r}")
    if not 0.0 <= blur <= 1.0:
        raise ValueError(f"blur must be in [0, 1], got {blur}")
    own, other = ((_VOICED_STOP, _VOICELESS_STOP) if phone in ("B", "D", "G")
                  else (_VOICELESS_STOP, _VOICED_STOP))
    return VoicingCues(**{f: squeeze_toward_midpoint(getattr(own, f), getattr(other, f), blur)
                          for f in VoicingCues.__dataclass_fields__})


def voicing_cue(phone: str, blur: float = 0.0) -> float:
    """Voice onset time (seconds) of stop ``phone`` under voicing ``blur`` (the headline cue)."""
    return stop_voicing_cues(phone, blur).vot_s


def fricative_voicing(phone: str, blur: float = 0.0) -> tuple[float, float, float]:
    """(voice bar, frication factor, duration factor) of S/Z, squeezed like the stops."""
    own, other = (_FRIC_VOICED, _FRIC_VOICELESS) if phone == "Z" else (_FRIC_VOICELESS, _FRIC_VOICED)
    return tuple(squeeze_toward_midpoint(a, b, blur) for a, b in zip(own, other))  # type: ignore


# --------------------------------------------------------------------------------------------
# Speakers
# --------------------------------------------------------------------------------------------

_TAG_SPEAKER, _TAG_UTT, _TAG_SYNTH, _TAG_FORMAT, _TAG_PICTURE, _TAG_DEFECT = 11, 12, 13, 14, 15, 16
_TAG_ESPEAK = 17
_TAG_POOL, _TAG_SCENE = 18, 19
_GROUP_CODE = {"impaired": 0, "control": 1}


@dataclass(frozen=True)
class EspeakVoice:
    """A speaker's eSpeak NG voice and, for the impaired group, the degradations of its speech
    (see :func:`espeak_utterance`; zero/None = that degradation is off)."""

    voice: str  # a name from mmasr.demo.tts.ESPEAK_VOICES
    rate_wpm: int  # speaking rate (impaired: the control rate divided by demo.impaired_rate)
    pitch: int  # eSpeak base pitch 0-100 (50 = the voice's own)
    pitch_range: int  # eSpeak pitch range 0-100 (50 = the voice's own; lower = flatter)
    word_gap_ms: int  # extra pause between words
    tremor: float  # peak relative deviation of the time/pitch warp's rate
    tremor_hz: float  # frequency of its periodic (tremor) part
    breath: float  # breath-noise amplitude relative to the speech's RMS envelope
    lowpass_hz: float | None  # band limit
    noise_db: float  # additive speech-shaped noise, dB re. the speech's active RMS (-SNR)


@dataclass(frozen=True)
class Speaker:
    name: str
    group: str  # "impaired" | "control"
    sex: str  # "F" | "M"
    f0: float  # mean pitch, Hz
    duration_scale: float  # >1 = slower (includes the impaired rate factor)
    formant_scale: float  # vocal-tract length factor (larger = shorter tract)
    breathiness: float  # aspiration noise mixed into voicing
    jitter: float  # relative cycle-to-cycle f0 perturbation
    shimmer: float  # relative cycle-to-cycle amplitude perturbation
    voicing_blur: float  # fraction by which voicing cues are squeezed toward ambiguity
    noise_db: float  # additive noise, dB re. signal peak
    open_quotient: float  # glottal open quotient (breathier voices open longer)
    key: tuple[int, int] = field(default=(0, 0), compare=False)  # (group code, index in group)
    # demo.synthesiser=espeak: the eSpeak NG voice and degradations (the formant fields above are then
    # unused, except name, group and sex); None for the formant synthesiser
    espeak: EspeakVoice | None = None


def speaker_name(group: str, index: int) -> str:
    """TORGO-style names: impaired F01, M01, F02, ...; control FC01, MC01, FC02, ..."""
    sex = "F" if index % 2 == 0 else "M"
    return f"{sex}{'C' if group == 'control' else ''}{index // 2 + 1:02d}"


def make_speaker(group: str, index: int, cfg: dict, seed: int) -> Speaker:
    """Draw one speaker's voice from its own generator (independent of the other speakers)."""
    rng = np.random.default_rng([seed, _TAG_SPEAKER, _GROUP_CODE[group], index])
    name = speaker_name(group, index)
    sex = name[0]
    impaired = group == "impaired"
    f0 = rng.uniform(180, 230) if sex == "F" else rng.uniform(100, 130)
    rate = rng.uniform(0.9, 1.1) * (cfg["impaired_rate"] if impaired else 1.0)
    formant_scale = rng.uniform(1.0, 1.12) if sex == "F" else rng.uniform(0.88, 1.0)
    lo, hi = cfg["impaired_voicing_blur"]
    return Speaker(
        name=name, group=group, sex=sex, f0=float(f0), duration_scale=float(rate),
        formant_scale=float(formant_scale),
        breathiness=float(rng.uniform(0.10, 0.18) if impaired else rng.uniform(0.03, 0.07)),
        jitter=float(rng.uniform(0.02, 0.04) if impaired else rng.uniform(0.003, 0.008)),
        shimmer=float(rng.uniform(0.10, 0.18) if impaired else rng.uniform(0.02, 0.04)),
        voicing_blur=float(rng.uniform(lo, hi)) if impaired else 0.0,
        noise_db=float(cfg["impaired_noise_db"]) if impaired else CONTROL_NOISE_DB,
        open_quotient=float(rng.uniform(0.65, 0.75) if impaired else rng.uniform(0.55, 0.65)),
        key=(_GROUP_CODE[group], index),
        espeak=make_espeak_voice(group, index, cfg, seed) if cfg["synthesiser"] == "espeak" else None,
    )


# The demo's voices by the speaker sex they suit ("+f" variants female; the plain language voices and
# "+m" variants male), each from the most to the least intelligible to Whisper tiny.en on the demo
# captions (word error rate measured here from ~0.4 to ~0.8), so that small corpora use the clearest
# voices and neighbouring slots (one impaired, one control speaker) get voices alike. The two accented
# voices of mmasr.demo.tts.ESPEAK_VOICES, en-gb-scotland+m2 and en-029+f3, are left out: tiny.en got almost no
# caption right in them (word error rate ~1), which would make a control speaker useless.
_FEMALE_VOICES = ("en-us+f2", "en-gb-x-rp+f4", "en+f2", "en-us+f1", "en-us+f3", "en-us+f4")
_MALE_VOICES = ("en-us+m3", "en+m3", "en-us+m2", "en-us", "en", "en-us+m1", "en-us+m7", "en-us+m4")
_UNUSED_VOICES = ("en-gb-scotland+m2", "en-029+f3")


def espeak_voice_slot(sex: str, group: str, index: int) -> tuple[str, int, int]:
    """(voice, pitch offset, cycle) of speaker ``index`` of ``group``: pure, independent of the other speakers.

    The k-th female (male) speaker of a group takes slot 2k (impaired) or 2k+1 (control) of a
    sequence that holds the voices of its sex first, then those of the other sex in reverse
    order (with a pitch offset toward the speaker's sex). With the demo's 14 voices (6 female,
    8 male) this gives distinct voices to any mix of up to 14 speakers; beyond that the sequence
    repeats, each repeat ("cycle") with another base pitch and rate, and a female speaker who
    borrows a male voice differs from its male user by her raised pitch.
    """
    own, other = (_FEMALE_VOICES, _MALE_VOICES) if sex == "F" else (_MALE_VOICES, _FEMALE_VOICES)
    sequence = own + other[::-1]
    slot = 2 * (index // 2) + _GROUP_CODE[group]
    cycle, pos = divmod(slot, len(sequence))
    cross_sex = pos >= len(own)
    offset = (22 if sex == "F" else -20) if cross_sex else 0
    return sequence[pos], offset, cycle


def make_espeak_voice(group: str, index: int, cfg: dict, seed: int) -> EspeakVoice:
    """The eSpeak NG voice of speaker ``index`` of ``group``, drawn from its own generator.

    Control: 150-180 words per minute, the voice's own pitch range, clean but for faint room
    noise. Impaired: the rate divided by ``demo.impaired_rate`` (at least eSpeak's 80 wpm), a
    flatter pitch, pauses between words, and the degradations of :func:`espeak_utterance`.
    """
    rng = np.random.default_rng([seed, _TAG_ESPEAK, _GROUP_CODE[group], index])
    sex = speaker_name(group, index)[0]
    voice, pitch_offset, cycle = espeak_voice_slot(sex, group, index)
    sign = -1 if cycle % 2 else 1  # each repeat of the voice sequence sounds different
    rate = float(rng.uniform(150, 180)) + 10 * cycle * -sign
    pitch = 50 + float(rng.uniform(-8, 8)) + pitch_offset + 12 * cycle * sign
    common = dict(voice=voice, pitch=int(np.clip(round(pitch), 5, 95)))
    if group == "control":
        return EspeakVoice(**common, rate_wpm=int(round(rate)), pitch_range=int(rng.integers(45, 61)),
                           word_gap_ms=0, tremor=0.0, tremor_hz=0.0, breath=0.0, lowpass_hz=None,
                           noise_db=CONTROL_NOISE_DB)
    return EspeakVoice(
        **common, rate_wpm=int(round(max(80.0, rate / cfg["impaired_rate"]))),
        pitch_range=int(rng.integers(18, 31)),
        word_gap_ms=int(rng.integers(3, 10)) * 10,
        tremor=float(rng.uniform(0.025, 0.04)), tremor_hz=float(rng.uniform(3.5, 7.0)),
        breath=float(rng.uniform(0.2, 0.3)), lowpass_hz=float(rng.uniform(3000.0, 4000.0)),
        noise_db=float(cfg["impaired_noise_db"]))


def build_speakers(cfg: dict, seed: int) -> list[Speaker]:
    """Impaired speakers first, then controls, each in index order."""
    cfg = validate_config(cfg)
    return ([make_speaker("impaired", i, cfg, seed) for i in range(cfg["n_impaired_speakers"])]
            + [make_speaker("control", i, cfg, seed) for i in range(cfg["n_control_speakers"])])


# --------------------------------------------------------------------------------------------
# Speech synthesis: segment plan
# --------------------------------------------------------------------------------------------


@dataclass
class Segment:
    phone: str
    start: float
    dur: float
    voice: float = 0.0  # glottal source into the formant cascade
    asp: float = 0.0  # aspiration noise into the formant cascade
    bar: float = 0.0  # low-frequency voice bar (closure voicing, voiced fricatives)
    nasal: float = 0.0  # share of the nasal-murmur (low-passed) path
    formants: list[tuple[float, tuple[float, float, float]]] = field(default_factory=list)
    fric: tuple[float, float, float] | None = None  # (lo Hz, hi Hz, amplitude)
    fric_voiced: bool = False  # frication modulated by the glottal cycle
    burst: tuple[float, float, float] | None = None  # release burst at segment start

    @property
    def end(self) -> float:
        return self.start + self.dur


def _vowel_scale_index(phones: Sequence[str]) -> int | None:
    """Index of the vowel whose length cues a word-final stop (V + stop [+ S/Z] at word end)."""
    tail = list(phones)
    if tail and tail[-1] in ("S", "Z"):
        tail = tail[:-1]
    if len(tail) >= 2 and tail[-1] in _STOP_PLACE:
        # nearest vowel before the stop (possibly across R: "dart")
        for i in range(len(tail) - 2, -1, -1):
            if tail[i] in _VOWELS:
                return i
    return None


def plan_segments(words: Sequence[str], speaker: Speaker, rng: np.random.Generator
                  ) -> tuple[list[Segment], float, tuple[float, float]]:
    """Phone-level timeline of an utterance: (segments, total seconds, (speech start, end))."""
    segs: list[Segment] = []
    t = float(rng.uniform(0.15, 0.3))  # leading silence
    speech_start = t
    blur = speaker.voicing_blur
    for wi, word in enumerate(words):
        phones = LEXICON[word]
        stressed = word in _NOUN_FORMS
        final_word = wi == len(words) - 1
        vs_index = _vowel_scale_index(phones)
        final_stop = None
        if vs_index is not None:
            final_stop = next(p for p in reversed(phones) if p in _STOP_PLACE)
        for pi, ph in enumerate(phones):
            mult = speaker.duration_scale * float(rng.uniform(0.9, 1.1)) * (1.15 if final_word else 1.0)
            if ph in _VOWELS:
                dur = _VOWEL_DUR[ph] * (1.25 if stressed else 1.0) * mult
                if pi == vs_index and final_stop is not None:
                    dur *= stop_voicing_cues(final_stop, blur).vowel_scale
                a, b = _VOWELS[ph]
                b = b or a
                seg = Segment(ph, t, dur, voice=1.0, asp=speaker.breathiness,
                              formants=[(t + 0.3 * dur, a), (t + 0.7 * dur, b)])
            elif ph in _SONORANTS:
                target, amp, base, nasal = _SONORANTS[ph]
                dur = base * mult
                seg = Segment(ph, t, dur, voice=amp, asp=speaker.breathiness * amp, nasal=nasal,
                              formants=[(t + 0.5 * dur, target)])
            elif ph in _FRICATIVES:
                band, place, base, amp = _FRICATIVES[ph]
                bar, fric_factor, dur_factor = (fricative_voicing(ph, blur) if ph in ("S", "Z")
                                                else (0.0, 1.0, 1.0))
                dur = base * dur_factor * mult
                seg = Segment(ph, t, dur, bar=0.8 * bar, fric=(band[0], band[1], amp * fric_factor),
                              fric_voiced=bar > 0.5, formants=[(t + 0.5 * dur, _LOCUS[place])])
            elif ph in _STOP_PLACE:
                cues = stop_voicing_cues(ph, blur)
                place = _STOP_PLACE[ph]
                closure = cues.closure_s * speaker.duration_scale * float(rng.uniform(0.9, 1.1))
                segs.append(Segment(ph, t, closure, bar=cues.voice_bar,
                                    formants=[(t + 0.5 * closure, _LOCUS[place])]))
                t += closure
                lo, hi = _BURST_BAND[place]
                # voiceless bursts are a little stronger (higher intra-oral pressure)
                burst_amp = 0.6 + 0.4 * cues.aspiration
                # the VOT interval is the cue itself; it is not stretched by the speaking rate
                seg = Segment(ph, t, cues.vot_s, asp=0.9 * cues.aspiration, burst=(lo, hi, burst_amp))
            else:  # pragma: no cover - LEXICON only uses known phones
                raise ValueError(f"unknown phone {ph!r}")
            segs.append(seg)
            t += seg.dur
        if not final_word:
            t += float(rng.uniform(0.03, 0.06)) * speaker.duration_scale  # word gap
    speech_end = t
    t += float(rng.uniform(0.15, 0.3))  # trailing silence
    return segs, t, (speech_start, speech_end)


# --------------------------------------------------------------------------------------------
# Speech synthesis: signal rendering
# --------------------------------------------------------------------------------------------

# Level calibration of the parallel paths (relative to a voiced vowel at amplitude 1).
_ASP_GAIN = 0.9
_BAR_GAIN = 0.35
_FRIC_GAIN = 0.35
_BURST_GAIN = 0.8
_BANDWIDTHS = (80.0, 100.0, 150.0, 250.0, 300.0)
# Fixed higher formants (Klatt's F4/F5) restore a speech-like level above F3.
_FIXED_FORMANTS = (3300.0, 3900.0)


@lru_cache(maxsize=256)
def _bandpass_sos(lo: float, hi: float, sr: int) -> np.ndarray:
    hi = min(hi, 0.45 * sr)
    lo = min(lo, 0.8 * hi)
    return butter(2, [lo, hi], btype="bandpass", fs=sr, output="sos")


@lru_cache(maxsize=64)
def _highpass_sos(cutoff: float, sr: int) -> np.ndarray:
    return butter(2, cutoff, btype="highpass", fs=sr, output="sos")


@lru_cache(maxsize=64)
def _lowpass_sos(cutoff: float, sr: int, order: int = 2) -> np.ndarray:
    return butter(order, min(cutoff, 0.45 * sr), btype="lowpass", fs=sr, output="sos")


def smooth_envelope(x: np.ndarray, sr: int, seconds: float = 0.006) -> np.ndarray:
    """Triangular smoothing (two box passes): cross-fades between phones instead of clicks."""
    width = max(1, int(round(seconds * sr / 2)))
    return uniform_filter1d(uniform_filter1d(x, width, mode="nearest"), width, mode="nearest")


def rosenberg_pulse(frac: np.ndarray, open_quotient: float) -> np.ndarray:
    """Rosenberg glottal flow for cycle phase ``frac`` in [0, 1): rise, faster fall, closed phase."""
    rise = 0.66 * open_quotient
    fall = open_quotient - rise
    g = np.zeros_like(frac)
    up = frac < rise
    g[up] = 0.5 * (1.0 - np.cos(np.pi * frac[up] / rise))
    down = (~up) & (frac < open_quotient)
    g[down] = np.cos(0.5 * np.pi * (frac[down] - rise) / fall)
    return g


def first_order_recurrence(a: np.ndarray, x: np.ndarray, chunk: int = 128) -> np.ndarray:
    """Solve z[n] = a[n] * z[n-1] + x[n] (z[-1] = 0) for complex ``a`` with |a| < 1, vectorised.

    Within chunks the solution is ``P * cumsum(x / P)`` with ``P`` the running product of ``a``
    (short chunks keep ``1/P`` bounded); the chunks are then chained by their carried state.
    A per-sample Python loop would be ~100x slower and per-block ``lfilter`` calls ~5x.
    """
    n = len(x)
    pad = (-n) % chunk
    a2 = np.concatenate([a, np.ones(pad, a.dtype)]).reshape(-1, chunk)
    x2 = np.concatenate([x, np.zeros(pad)]).reshape(-1, chunk)
    prod = np.cumprod(a2, axis=1)
    local = prod * np.cumsum(x2 / prod, axis=1)
    carry = np.empty(len(a2), dtype=complex)  # state entering each chunk
    state = 0j
    last_local, last_prod = local[:, -1].tolist(), prod[:, -1].tolist()
    for j in range(len(a2)):
        carry[j] = state
        state = last_local[j] + last_prod[j] * state
    return (local + prod * carry[:, None]).reshape(-1)[:n]


def formant_cascade(x: np.ndarray, tracks: Sequence[np.ndarray | float], bandwidths: Sequence[float],
                    sr: int) -> np.ndarray:
    """Cascade of Klatt resonators (unity DC gain) whose centre frequencies follow ``tracks``
    sample by sample, so formants glide between phones instead of being cross-faded.

    A time-varying resonator y[n] = A x[n-1] + b1 y[n-1] + b2 y[n-2] is computed as the imaginary
    part of a complex one-pole recurrence with pole r*exp(i*theta[n]); a fixed (scalar) track
    uses a plain ``lfilter`` (same response, without the one-sample delay).
    """
    y = np.asarray(x, dtype=float)
    for freq, bw in zip(tracks, bandwidths):
        r = math.exp(-math.pi * bw / sr)
        if np.ndim(freq) == 0:
            b1 = 2.0 * r * math.cos(2.0 * math.pi * float(freq) / sr)
            y = lfilter([1.0 - b1 + r * r], [1.0, -b1, r * r], y)
            continue
        theta = 2.0 * np.pi * np.asarray(freq) / sr
        cos, sin = np.cos(theta), np.sin(theta)
        z = first_order_recurrence(r * (cos + 1j * sin), y)
        gain = 1.0 - 2.0 * r * cos + r * r  # unity gain at DC
        # Im(z[n]) / (r sin theta) is the resonator's impulse response delayed by one sample
        y = z.imag * (gain / (r * sin))
    return y


def _per_cycle_noise(rng: np.random.Generator, cycles: np.ndarray) -> np.ndarray:
    """One Gaussian value per glottal cycle, held for that cycle (jitter/shimmer)."""
    values = rng.standard_normal(int(cycles[-1]) + 1 if len(cycles) else 1)
    return values[cycles]


_RENDER_MARGIN_S = 0.05  # rendered context around the speech span (decays, burst tails)


def render_segments(segs: Sequence[Segment], total_s: float, span: tuple[float, float],
                    speaker: Speaker, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Render a segment plan to a mono float64 signal (arbitrary scale) at rate ``sr``.

    Only the speech span plus a margin is synthesised (the rest is exact silence, a quarter of
    the samples saved); times in ``segs`` are absolute.
    """
    n = int(round(total_s * sr))
    off = max(0, int(round((span[0] - _RENDER_MARGIN_S) * sr)))
    m = min(n, int(round((span[1] + _RENDER_MARGIN_S) * sr))) - off
    t = (np.arange(m) + off) / sr

    def index(seconds: float) -> int:
        return min(max(int(round(seconds * sr)) - off, 0), m)

    voice, asp, bar, nasal = (np.zeros(m) for _ in range(4))
    for s in segs:
        i0, i1 = index(s.start), index(s.end)
        voice[i0:i1], asp[i0:i1], bar[i0:i1], nasal[i0:i1] = s.voice, s.asp, s.bar, s.nasal
    voice, asp, bar, nasal = (smooth_envelope(x, sr) for x in (voice, asp, bar, nasal))

    # formant tracks: linear interpolation between the phones' targets, scaled by the speaker
    pts = [(tt, f) for s in segs for tt, f in s.formants]
    pt_t = np.array([p[0] for p in pts])
    pt_f = np.array([p[1] for p in pts], dtype=float) * speaker.formant_scale
    formant_tracks: list[np.ndarray | float] = [
        np.clip(np.interp(t, pt_t, pt_f[:, k]), 150.0, 0.42 * sr) for k in range(3)]
    formant_tracks += [min(f * speaker.formant_scale, 0.42 * sr) for f in _FIXED_FORMANTS]

    # f0: declination over the speech span, a slow wander, per-cycle jitter
    decl = np.interp(t, list(span), [1.08, 0.9])
    wander = 1.0 + 0.025 * np.sin(2 * np.pi * rng.uniform(0.5, 1.2) * t + rng.uniform(0, 2 * np.pi))
    f0 = speaker.f0 * decl * wander
    cycles = np.floor(np.cumsum(f0) / sr).astype(np.int64)
    f0 = f0 * (1.0 + speaker.jitter * _per_cycle_noise(rng, cycles))
    phase = np.cumsum(f0) / sr
    cycles = np.floor(phase).astype(np.int64)
    flow = rosenberg_pulse(phase - cycles, speaker.open_quotient)
    amp = np.clip(1.0 + speaker.shimmer * _per_cycle_noise(rng, cycles), 0.3, 1.7)
    # radiated (differentiated) flow; scaled by sr so the level does not depend on the rate
    source = np.diff(flow, prepend=0.0) * (sr / 1000.0) * amp

    # aspiration: turbulence at the glottis, weak in the F1 region (open glottis damps F1)
    aspiration = sosfilt(_highpass_sos(1000.0, sr), rng.standard_normal(m))
    excitation = source * voice + aspiration * asp * _ASP_GAIN
    bandwidths = [b * (1.0 + 0.5 * speaker.breathiness) for b in _BANDWIDTHS]
    vt = formant_cascade(excitation, formant_tracks, bandwidths, sr)
    murmur = sosfilt(_lowpass_sos(400.0, sr), vt) * 1.5
    out = vt * (1.0 - nasal) + murmur * nasal

    # voice bar: glottal flow band-limited to the first harmonics (no DC)
    out += sosfilt(_bandpass_sos(70.0, 300.0, sr), flow * amp) * bar * _BAR_GAIN

    # frication and bursts: band-filtered noise in parallel with the cascade
    for s in segs:
        i0, i1 = index(s.start), index(s.end)
        if s.fric is not None and i1 > i0:
            lo, hi, a = s.fric
            k = i1 - i0
            env = np.sin(np.pi * (np.arange(k) + 0.5) / k) ** 0.6  # rise/decay within the phone
            noise = sosfilt(_bandpass_sos(lo, hi, sr), rng.standard_normal(k))
            if s.fric_voiced:
                noise *= 0.4 + 0.6 * flow[i0:i1]
            out[i0:i1] += noise * env * a * _FRIC_GAIN
        if s.burst is not None:
            lo, hi, a = s.burst
            k = int(0.012 * sr)
            env = np.exp(-np.arange(k) / (0.003 * sr))
            noise = sosfilt(_bandpass_sos(lo, hi, sr), rng.standard_normal(k))
            out[i0:i0 + k] += (noise * env * a * _BURST_GAIN)[: max(0, min(k, m - i0))]
    full = np.zeros(n)
    full[off:off + m] = out
    return full


def speech_shaped_noise(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Unit-RMS noise with a speech-like spectrum (flat to ~500 Hz, then about -6 dB/octave,
    nothing above 7 kHz): the SNR is then similar in every band and at every sample rate, so the
    noise masks the voicing cues (bursts, aspiration) without simply burying all high frequencies.
    """
    x = sosfilt(_lowpass_sos(500.0, sr, 1), rng.standard_normal(n))
    x = sosfilt(_lowpass_sos(7000.0, sr, 4), x)
    return x / (np.sqrt(np.mean(x * x)) + 1e-12)


def synthesize_utterance(text: str, speaker: Speaker, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Mono float64 speech for ``text`` (words in LEXICON) with peak 1, including the speaker's
    additive noise (gated to the speech span) and a very low noise floor in the silences."""
    words = text.split()
    segs, total_s, span = plan_segments(words, speaker, rng)
    x = render_segments(segs, total_s, span, speaker, sr, rng)
    return _add_noise_and_normalise(x, span, speaker.noise_db, sr, rng)


def _add_noise_and_normalise(x: np.ndarray, span: tuple[float, float], noise_db: float, sr: int,
                             rng: np.random.Generator) -> np.ndarray:
    """``x`` plus :func:`_add_gated_noise` and :func:`_add_floor_and_normalise`."""
    peak = float(np.max(np.abs(x)))
    return _add_floor_and_normalise(_add_gated_noise(x, span, noise_db, sr, rng), peak, rng)


def _add_gated_noise(x: np.ndarray, span: tuple[float, float], noise_db: float, sr: int,
                     rng: np.random.Generator, reference: float | None = None) -> np.ndarray:
    """``x`` (float64, modified in place) plus speech-shaped noise (unit RMS) at ``noise_db`` re.
    ``reference`` (default: the peak of ``x``) over the speech ``span`` (seconds)."""
    peak = float(np.max(np.abs(x))) if reference is None else reference
    n = len(x)
    # the speaker's noise (breath, hoarseness, a noisy setting) is gated to the speech span with
    # 20 ms ramps, so the leading/trailing silences stay near-silent
    ramp = 0.02
    i0 = max(0, int((span[0] - ramp) * sr))
    i1 = min(n, int((span[1] + ramp) * sr) + 1)
    t = np.arange(i0, i1) / sr
    gate = np.clip(np.minimum(t - (span[0] - ramp), (span[1] + ramp) - t) / ramp, 0.0, 1.0)
    x[i0:i1] += speech_shaped_noise(rng, i1 - i0, sr) * gate * peak * 10 ** (noise_db / 20)
    return x


def _add_floor_and_normalise(x: np.ndarray, peak: float, rng: np.random.Generator) -> np.ndarray:
    """``x`` plus a recording noise floor 70 dB below ``peak``, scaled to peak 1."""
    x = x + rng.standard_normal(len(x)) * peak * 10 ** (-70 / 20)
    return x / np.max(np.abs(x))


# --------------------------------------------------------------------------------------------
# Speech synthesis: eSpeak NG (demo.synthesiser: espeak)
# --------------------------------------------------------------------------------------------


def active_rms(x: np.ndarray, sr: int, floor_db: float = 30.0) -> float:
    """RMS of ``x`` over its active 10 ms frames (those within ``floor_db`` of the loudest): the
    speech level an SNR refers to, independent of pauses and of the crest factor."""
    hop = max(1, int(0.01 * sr))
    frames = x[: len(x) // hop * hop].reshape(-1, hop) if len(x) >= hop else x.reshape(1, -1)
    energy = (frames * frames).mean(axis=1)
    return float(np.sqrt(energy[energy >= energy.max() * 10 ** (-floor_db / 10)].mean()))


def _trim_edges(x: np.ndarray, threshold: float = 1e-3) -> np.ndarray:
    """``x`` without eSpeak's own leading/trailing near-silence (relative ``threshold`` of the peak)."""
    loud = np.flatnonzero(np.abs(x) > threshold * np.max(np.abs(x)))
    return x[loud[0]:loud[-1] + 1] if len(loud) else x


def tremor_warp(x: np.ndarray, sr: int, depth: float, tremor_hz: float, rng: np.random.Generator
                ) -> np.ndarray:
    """Read ``x`` back at a smoothly varying rate 1 + depth * (0.6 sin(2 pi f t + phi) + 0.4 drift):
    pitch and timing wobble together, as by a tape with wow. The periodic part models a vocal
    tremor (3.5-7 Hz), the drift (a random walk smoothed over ~0.25 s, at most 1 in size) the
    unsteady pitch and rate of dysarthric speech. The mean rate is 1, so the duration is kept to
    within a few per cent."""
    n = len(x)
    m = int(n * (1 + depth)) + 2  # output samples enough for the slowest reading
    t = np.arange(m) / sr
    knots = rng.standard_normal(int(m / sr / 0.25) + 2)
    drift = np.interp(t, np.arange(len(knots)) * 0.25, knots)
    drift = smooth_envelope(drift, sr, 0.25)
    drift = drift / max(1.0, float(np.max(np.abs(drift))))
    rate = 1.0 + depth * (0.6 * np.sin(2 * np.pi * tremor_hz * t + rng.uniform(0, 2 * np.pi)) + 0.4 * drift)
    pos = np.cumsum(rate) - rate[0]  # read position in x of every output sample
    pos = pos[pos <= n - 1]
    return np.interp(pos, np.arange(n), x)


def add_breath_noise(x: np.ndarray, sr: int, level: float, rng: np.random.Generator) -> np.ndarray:
    """``x`` plus turbulence noise (1-6 kHz, like aspiration) whose amplitude follows the speech's
    20 ms RMS envelope at ``level`` times it: the air escaping through an incompletely closed glottis
    while speaking (breathy voice), so the noise is there when the voice is, not in the pauses."""
    env = np.sqrt(np.maximum(uniform_filter1d(x * x, max(1, int(0.02 * sr)), mode="nearest"), 0.0))
    noise = sosfilt(_bandpass_sos(1000.0, 6000.0, sr), rng.standard_normal(len(x)))
    noise /= np.sqrt(np.mean(noise * noise)) + 1e-12
    return x + level * env * noise


def band_limit(x: np.ndarray, sr: int, cutoff_hz: float) -> np.ndarray:
    """``x`` low-passed at ``cutoff_hz`` (6th-order Butterworth, ~36 dB/octave)."""
    return sosfilt(_lowpass_sos(float(cutoff_hz), sr, 6), x)


def espeak_utterance(text: str, speaker: Speaker, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Mono float64 speech for ``text`` in the speaker's eSpeak NG voice at rate ``sr``, peak 1.

    eSpeak NG speaks at its own rate (22050 Hz); its edge silence is trimmed, the speaker's
    degradations are applied, 0.15-0.3 s of silence is put before and after, speech-shaped noise is
    added over the speech span (20 ms ramps), then the band limit, resampling to ``sr`` and a -70 dB
    noise floor. The noise level is ``noise_db`` re. the speech's active RMS (:func:`active_rms`), i.e.
    a signal-to-noise ratio (the formant voice's is re. its peak; eSpeak's speech needs less noise to be
    hard, and an SNR is what a user would set). Control speakers get only faint room noise
    (``CONTROL_NOISE_DB``: 45 dB SNR).

    Impaired speakers (:class:`EspeakVoice`) model traits reported for dysarthric speech
    (Darley, Aronson & Brown 1969; Kent et al. 1999), each moderate. Measured with Whisper tiny.en
    (beam 5) on 8 utterances of each of the 16 default speakers: word error rate 0.60 impaired, 0.48
    control (eSpeak's own floor: "three" is often heard as "free"); the noun, where the minimal pairs
    are, right in 17 % of impaired and 50 % of control utterances.

    * slow rate (eSpeak's rate divided by ``demo.impaired_rate``) and pauses between words
      (eSpeak's word gap, 30-90 ms): slow, "scanning" speech;
    * flat pitch (eSpeak's pitch range 18-30 instead of ~50): monopitch;
    * tremor and drift (:func:`tremor_warp`, 2.5-4 % rate/pitch wobble at 3.5-7 Hz): vocal tremor and
      pitch/rate instability;
    * breathiness (:func:`add_breath_noise`, noise at 0.2-0.3 of the speech envelope): incomplete
      glottal closure (the degradation that costs tiny.en most);
    * band-limiting (:func:`band_limit` at 3-4 kHz): imprecise consonants, whose weak bursts and
      frication lose their high-frequency energy, and a poor microphone (the noise passes it too);
    * additive speech-shaped noise at ``demo.impaired_noise_db`` SNR (default -20: 20 dB SNR):
      hoarseness, a noisy setting.

    The formant demo's voicing-cue blur (``demo.impaired_voicing_blur``) has no counterpart here:
    eSpeak NG does not expose its stops' voice onset time; the minimal pairs become confusable
    through the degradations above instead. Everything is drawn from ``rng`` (seeded by the seed,
    the speaker and the utterance index) and eSpeak NG is repeatable, so the samples are too.
    """
    ev = speaker.espeak
    if ev is None:
        raise ValueError(f"speaker {speaker.name} has no eSpeak NG voice (demo.synthesiser is not espeak)")
    raw, native = espeak_synthesise(text, ev.voice, ev.rate_wpm, ev.pitch, pitch_range=ev.pitch_range,
                                    word_gap_ms=ev.word_gap_ms)
    x = _trim_edges(raw.astype(np.float64))
    if ev.tremor > 0:
        x = tremor_warp(x, native, ev.tremor, ev.tremor_hz, rng)
    if ev.breath > 0:
        x = add_breath_noise(x, native, ev.breath, rng)
    lead, tail = (int(s * native) for s in rng.uniform(0.15, 0.3, size=2))
    x = np.concatenate([np.zeros(lead), x, np.zeros(tail)])
    x = _add_gated_noise(x, (lead / native, (len(x) - tail) / native), ev.noise_db, native, rng,
                         reference=active_rms(x, native))
    if ev.lowpass_hz is not None:  # after the noise: a poor channel limits speech and noise alike
        x = band_limit(x, native, ev.lowpass_hz)
    if sr != native:
        g = math.gcd(int(sr), int(native))
        x = resample_poly(x, sr // g, native // g)
    return _add_floor_and_normalise(x, float(np.max(np.abs(x))), rng)


def make_channels(mono: np.ndarray, stereo: bool, sr: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) for mono; (n, 2) for stereo with a slightly different second microphone."""
    if not stereo:
        return mono
    delay = int(rng.integers(1, 4))
    second = np.concatenate([np.zeros(delay), mono[:-delay]]) * rng.uniform(0.75, 0.95)
    second = second + speech_shaped_noise(rng, len(mono), sr) * 10 ** (-50 / 20)
    return np.stack([mono, second], axis=1)


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------

_RGB = {"red": (205, 45, 45), "green": (50, 160, 70), "blue": (45, 90, 205), "yellow": (240, 200, 40)}
_INK = (35, 35, 40)


class _Pen:
    """Draws a glyph in unit coordinates (u, v in [0, 1], v down) inside a pixel box.

    ``body`` shapes go into a mask that is filled with the colour and given a silhouette outline;
    ``ink``/``dark``/``light`` details are painted on top.
    """

    def __init__(self, box: tuple[float, float, float, float], scale: float):
        self.x0, self.y0, x1, y1 = box
        self.w, self.h = x1 - self.x0, y1 - self.y0
        self.scale = scale
        self.body: list[tuple[str, tuple, dict]] = []
        self.details: list[tuple[str, str, tuple, dict]] = []

    def p(self, u: float, v: float) -> tuple[float, float]:
        return (self.x0 + u * self.w, self.y0 + v * self.h)

    def _ellipse_box(self, cu, cv, ru, rv):
        return [self.p(cu - ru, cv - rv), self.p(cu + ru, cv + rv)]

    def _add(self, layer: str, kind: str, geom, **kw):
        if layer == "body":
            self.body.append((kind, geom, kw))
        else:
            self.details.append((layer, kind, geom, kw))

    def ellipse(self, cu, cv, ru, rv=None, layer="body", ring: float = 0.0):
        self._add(layer, "ellipse", self._ellipse_box(cu, cv, ru, ru if rv is None else rv),
                  ring=ring)

    def poly(self, pts, layer="body"):
        self._add(layer, "polygon", [self.p(u, v) for u, v in pts])

    def rect(self, u0, v0, u1, v1, layer="body"):
        self._add(layer, "polygon", [self.p(u0, v0), self.p(u1, v0), self.p(u1, v1), self.p(u0, v1)])

    def line(self, pts, width: float, layer="ink"):
        self._add(layer, "line", [self.p(u, v) for u, v in pts], width=width)


def _rotate(pts, degrees: float, cu: float = 0.5, cv: float = 0.5):
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    return [(cu + (u - cu) * c - (v - cv) * s, cv + (u - cu) * s + (v - cv) * c) for u, v in pts]


def _glyph_bear(g: _Pen):  # big round head, two ears, muzzle
    g.ellipse(0.24, 0.24, 0.13)
    g.ellipse(0.76, 0.24, 0.13)
    g.ellipse(0.5, 0.58, 0.38, 0.35)
    g.ellipse(0.24, 0.24, 0.06, layer="dark")
    g.ellipse(0.76, 0.24, 0.06, layer="dark")
    g.ellipse(0.37, 0.5, 0.035, layer="ink")
    g.ellipse(0.63, 0.5, 0.035, layer="ink")
    g.ellipse(0.5, 0.7, 0.14, 0.1, layer="light")
    g.ellipse(0.5, 0.66, 0.05, 0.035, layer="ink")


def _glyph_cub(g: _Pen):  # small whole bear: head with ears and protruding snout on a body
    g.ellipse(0.5, 0.72, 0.27, 0.23)
    g.ellipse(0.33, 0.16, 0.075)
    g.ellipse(0.67, 0.16, 0.075)
    g.ellipse(0.5, 0.34, 0.2, 0.18)
    g.ellipse(0.5, 0.43, 0.11, 0.075)  # snout
    g.ellipse(0.3, 0.93, 0.09, 0.05)
    g.ellipse(0.7, 0.93, 0.09, 0.05)
    g.ellipse(0.5, 0.44, 0.08, 0.055, layer="light")
    g.ellipse(0.5, 0.41, 0.035, 0.025, layer="ink")
    g.ellipse(0.42, 0.3, 0.025, layer="ink")
    g.ellipse(0.58, 0.3, 0.025, layer="ink")
    g.ellipse(0.5, 0.74, 0.15, 0.13, layer="light")  # belly


def _glyph_pear(g: _Pen):  # teardrop with stem and leaf
    g.ellipse(0.5, 0.68, 0.3, 0.28)
    g.ellipse(0.5, 0.38, 0.17, 0.18)
    g.poly([(0.34, 0.4), (0.66, 0.4), (0.79, 0.64), (0.21, 0.64)])
    g.line([(0.5, 0.22), (0.56, 0.05)], 0.045)
    g.ellipse(0.66, 0.11, 0.08, 0.035, layer="dark")
    g.ellipse(0.4, 0.62, 0.05, 0.09, layer="light")  # highlight


def _glyph_goat(g: _Pen):  # body on four legs, head with curved horns and beard
    g.ellipse(0.44, 0.56, 0.3, 0.16)
    for u in (0.22, 0.33, 0.53, 0.63):
        g.rect(u, 0.62, u + 0.055, 0.93)
    g.poly([(0.62, 0.5), (0.72, 0.3), (0.82, 0.32), (0.76, 0.56)])  # neck
    g.ellipse(0.8, 0.3, 0.1, 0.12)
    g.line([(0.75, 0.2), (0.7, 0.08), (0.6, 0.06), (0.58, 0.14)], 0.04)  # horns
    g.line([(0.85, 0.2), (0.86, 0.07), (0.94, 0.08)], 0.04)
    g.poly([(0.77, 0.4), (0.85, 0.4), (0.8, 0.53)], layer="ink")  # beard
    g.ellipse(0.83, 0.28, 0.02, layer="ink")
    g.line([(0.14, 0.5), (0.07, 0.42)], 0.03)  # tail


def _glyph_coat(g: _Pen):  # coat on a hanger: torso, outspread sleeves, collar, buttons
    g.poly([(0.32, 0.14), (0.68, 0.14), (0.76, 0.95), (0.24, 0.95)])
    g.poly([(0.32, 0.14), (0.02, 0.5), (0.1, 0.58), (0.34, 0.36)])
    g.poly([(0.68, 0.14), (0.98, 0.5), (0.9, 0.58), (0.66, 0.36)])
    g.line([(0.28, 0.16), (0.5, 0.08), (0.72, 0.16)], 0.03)  # hanger
    g.line([(0.5, 0.08), (0.5, 0.03), (0.55, 0.0)], 0.03)
    g.line([(0.39, 0.14), (0.5, 0.34), (0.61, 0.14)], 0.035)
    g.line([(0.5, 0.34), (0.5, 0.95)], 0.025)
    for v in (0.45, 0.6, 0.75):
        g.ellipse(0.55, v, 0.025, layer="ink")
    g.rect(0.28, 0.7, 0.42, 0.74, layer="dark")  # pockets
    g.rect(0.58, 0.7, 0.72, 0.74, layer="dark")


def _glyph_bee(g: _Pen):  # striped oval body, wings, head, sting
    g.ellipse(0.52, 0.62, 0.32, 0.2)
    g.ellipse(0.16, 0.6, 0.1)
    g.poly([(0.83, 0.57), (0.97, 0.62), (0.83, 0.67)])
    for u in (0.42, 0.55, 0.68):
        g.ellipse(u, 0.62, 0.04, 0.19, layer="ink")
    g.ellipse(0.42, 0.3, 0.12, 0.17, layer="wing")
    g.ellipse(0.6, 0.28, 0.12, 0.17, layer="wing")
    g.line([(0.12, 0.52), (0.06, 0.36)], 0.02)
    g.line([(0.19, 0.51), (0.2, 0.35)], 0.02)


def _glyph_pea(g: _Pen):  # open pod (lens shape) with a row of peas
    top = [(u, 0.5 - 0.26 * math.sin(math.pi * (u - 0.05) / 0.9)) for u in np.linspace(0.05, 0.95, 19)]
    bot = [(u, 0.5 + 0.14 * math.sin(math.pi * (u - 0.05) / 0.9)) for u in np.linspace(0.95, 0.05, 19)]
    g.poly(_rotate(top + bot, -20))
    for u, v in _rotate([(0.26, 0.46), (0.42, 0.45), (0.58, 0.45), (0.74, 0.46)], -20):
        g.ellipse(u, v, 0.075, layer="light")
        g.ellipse(u, v, 0.075, layer="ink", ring=0.015)
    g.line(_rotate([(0.95, 0.5), (1.0, 0.42)], -20), 0.03)


def _glyph_bin(g: _Pen):  # ridged can with a lid and handle
    g.rect(0.27, 0.3, 0.73, 0.96)
    g.rect(0.2, 0.2, 0.8, 0.31)
    g.ellipse(0.5, 0.14, 0.1, 0.06, ring=0.03)
    for u in (0.37, 0.5, 0.63):
        g.line([(u, 0.4), (u, 0.87)], 0.03)


def _glyph_pin(g: _Pen):  # push-pin: round head, collar, needle
    g.ellipse(0.5, 0.26, 0.26, 0.2)
    g.poly([(0.38, 0.44), (0.62, 0.44), (0.58, 0.6), (0.42, 0.6)])
    g.rect(0.33, 0.58, 0.67, 0.64)
    g.line([(0.5, 0.64), (0.5, 0.98)], 0.035)
    g.ellipse(0.41, 0.2, 0.07, 0.045, layer="light")


def _glyph_dart(g: _Pen):  # arrow: thin shaft, slim barrel, metal tip, swept tail fins (diagonal)
    ang = -35
    g.poly(_rotate([(0.1, 0.47), (0.62, 0.47), (0.62, 0.53), (0.1, 0.53)], ang))
    g.poly(_rotate([(0.5, 0.445), (0.74, 0.455), (0.74, 0.545), (0.5, 0.555)], ang))
    g.poly(_rotate([(0.02, 0.27), (0.14, 0.27), (0.3, 0.47), (0.1, 0.47)], ang))
    g.poly(_rotate([(0.02, 0.73), (0.14, 0.73), (0.3, 0.53), (0.1, 0.53)], ang))
    g.poly(_rotate([(0.73, 0.47), (0.99, 0.5), (0.73, 0.53)], ang), layer="ink")


def _glyph_tart(g: _Pen):  # triangular slice with a crust band and fruit on top
    g.poly([(0.06, 0.66), (0.94, 0.4), (0.94, 0.7), (0.06, 0.8)])  # side of the slice
    g.poly([(0.06, 0.66), (0.78, 0.16), (0.94, 0.4)])  # top face
    g.line([(0.78, 0.16), (0.94, 0.4), (0.94, 0.7)], 0.07, layer="dark")  # crust
    g.poly([(0.06, 0.73), (0.94, 0.55), (0.94, 0.7), (0.06, 0.8)], layer="dark")
    for u, v in ((0.45, 0.4), (0.62, 0.33), (0.7, 0.45), (0.3, 0.52)):
        g.ellipse(u, v, 0.035, layer="light")


def _glyph_cup(g: _Pen):  # mug with handle, rim and steam
    g.poly([(0.18, 0.32), (0.68, 0.32), (0.65, 0.9), (0.21, 0.9)])
    g.ellipse(0.75, 0.6, 0.15, 0.17, ring=0.06)
    g.ellipse(0.43, 0.32, 0.25, 0.05, layer="dark")
    for u in (0.33, 0.47):
        g.line([(u, 0.24), (u + 0.04, 0.16), (u, 0.09), (u + 0.04, 0.02)], 0.025)


_GLYPHS: dict[str, Callable[[_Pen], None]] = {
    "bear": _glyph_bear, "pear": _glyph_pear, "goat": _glyph_goat, "coat": _glyph_coat,
    "bee": _glyph_bee, "pea": _glyph_pea, "bin": _glyph_bin, "pin": _glyph_pin,
    "dart": _glyph_dart, "tart": _glyph_tart, "cub": _glyph_cub, "cup": _glyph_cup,
}

# Layout of 1/2/3 copies: (centre u, centre v, box size) in picture units.
_LAYOUT = {1: [(0.5, 0.5, 0.66)],
           2: [(0.27, 0.5, 0.44), (0.73, 0.5, 0.44)],
           3: [(0.27, 0.29, 0.4), (0.73, 0.29, 0.4), (0.5, 0.72, 0.4)]}


def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(round(c * factor)) for c in rgb)  # type: ignore[return-value]


def _tint(rgb: tuple[int, int, int], toward_white: float) -> tuple[int, int, int]:
    return tuple(int(round(c + (255 - c) * toward_white)) for c in rgb)  # type: ignore[return-value]


def _paint_glyph(img: Image.Image, pen: _Pen, rgb: tuple[int, int, int], outline_px: int) -> None:
    mask = Image.new("L", img.size, 0)
    md = ImageDraw.Draw(mask)
    for kind, geom, kw in pen.body:
        if kind == "ellipse" and kw.get("ring"):
            md.ellipse(geom, outline=255, width=max(1, int(kw["ring"] * pen.w)))
        elif kind == "ellipse":
            md.ellipse(geom, fill=255)
        else:
            md.polygon(geom, fill=255)
    # silhouette outline: dilated mask minus mask, so unions of primitives get one clean contour
    dilated = mask.filter(ImageFilter.MaxFilter(outline_px))
    img.paste(_INK, mask=dilated)
    img.paste(rgb, mask=mask)
    draw = ImageDraw.Draw(img)
    colours = {"ink": _INK, "dark": _shade(rgb, 0.55), "light": _tint(rgb, 0.6),
               "wing": (225, 235, 245)}
    for layer, kind, geom, kw in pen.details:
        col = colours[layer]
        if kind == "ellipse" and kw.get("ring"):
            draw.ellipse(geom, outline=col, width=max(1, int(kw["ring"] * pen.w)))
        elif kind == "ellipse":
            draw.ellipse(geom, fill=col, outline=_INK if layer == "wing" else None,
                         width=max(1, outline_px // 3))
        elif kind == "polygon":
            draw.polygon(geom, fill=col)
        else:
            draw.line(geom, fill=col, width=max(1, int(kw["width"] * pen.w)), joint="curve")


def _glyph_box(pen_canvas: int, cu: float, cv: float, box: float) -> tuple[float, float, float, float]:
    half = box * pen_canvas / 2
    return (cu * pen_canvas - half, cv * pen_canvas - half, cu * pen_canvas + half, cv * pen_canvas + half)


def draw_scene(objects: Sequence[ObjectPhrase], size: int, rng: np.random.Generator) -> Image.Image:
    """A scene on a light neutral background (RGB): one row per object group, top to bottom, each
    ``count`` copies of the noun's glyph in the colour. A one-object scene fills the picture."""
    canvas = size * max(2, math.ceil(256 / size))  # supersample, then downscale = antialiasing
    # light neutral background: random brightness, only a faint tint (colour is the glyph's job)
    bg = tuple(int(v) for v in np.array([236, 234, 229]) + rng.integers(-6, 7) + rng.integers(-2, 3, size=3))
    img = Image.new("RGB", (canvas, canvas), bg)  # type: ignore[arg-type]
    outline_px = 2 * max(1, canvas // 110) + 1
    n = len(objects)
    for row, obj in enumerate(objects):
        k = COUNT_VALUE[obj.count]
        if n == 1:
            slots = _LAYOUT[k]
        else:  # copies side by side, centred in the row
            box = min(0.88 / n, 0.31)
            slots = [(0.5 + (i - (k - 1) / 2) * 1.08 * box, (row + 0.5) / n, box) for i in range(k)]
        for cu, cv, box in slots:
            cu += rng.uniform(-0.03, 0.03) / n
            cv += rng.uniform(-0.03, 0.03) / n
            box *= rng.uniform(0.9, 1.04)
            pen = _Pen(_glyph_box(canvas, cu, cv, box), canvas)
            _GLYPHS[obj.noun](pen)
            _paint_glyph(img, pen, _RGB[obj.colour], outline_px)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def draw_picture(noun: str, colour: str, count: int, size: int, rng: np.random.Generator) -> Image.Image:
    """``count`` copies of ``noun``'s glyph in ``colour``: a one-object scene."""
    count_word = {v: w for w, v in COUNT_VALUE.items()}[count]
    return draw_scene([ObjectPhrase(count_word, colour, noun)], size, rng)


def png_bytes(img: Image.Image) -> bytes:
    """PNG bytes without metadata (byte-stable)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Corpus plan and file writing
# --------------------------------------------------------------------------------------------

DEFECT_KINDS: tuple[str, ...] = ("empty_file", "corrupt_header", "silent", "nonfinite", "too_short",
                                 "empty_transcript", "missing_image", "duplicate_id")
MANIFEST_COLUMNS = ("utt_id", "speaker", "group", "audio_path", "text", "image_path")
DEFECTS_COLUMNS = ("utt_id", "audio_path", "defect")
# scenes.csv: what each picture shows (object phrases top to bottom, "; "-separated), which row the
# description is about, and whether the description agrees with the picture
SCENES_COLUMNS = ("utt_id", "image_path", "objects", "described", "picture_agrees")


@dataclass(frozen=True)
class AudioJob:
    """Everything needed to write one audio file (and its picture), independent of every other job."""

    utt_id: str
    speaker: Speaker
    spoken: str  # what the audio says
    text: str  # manifest text (empty for the empty-transcript defect)
    scene: Scene  # the picture the speaker describes
    audio_path: str  # relative to the corpus root
    image_path: str
    sample_rate: int
    stereo: bool
    subtype: str  # soundfile subtype: PCM_16 | FLOAT
    level: float  # output peak
    seed_key: tuple[int, ...]  # seeds the synthesis generator
    picture_key: tuple[int, ...] = ()  # seeds the picture's drawing
    defect: str | None = None

    @property
    def audio_format(self) -> str:
        return "FLAC" if self.audio_path.endswith(".flac") else "WAV"


def _exact_share(rng: np.random.Generator, n: int, fraction: float) -> np.ndarray:
    """Boolean mask with exactly round(fraction * n) True entries at random positions."""
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[: int(round(fraction * n))]] = True
    return mask


def plan_corpus(cfg: dict, seed: int) -> list[AudioJob]:
    """All audio jobs (regular utterances, then defective rows) for ``(cfg, seed)``.

    Each utterance describes a scene of its own (its own picture): the speaker picks an object phrase
    and intro from their pool (:func:`description_pools`), and the scene is planned
    around the phrase (:func:`plan_scene`)."""
    cfg = validate_config(cfg)
    speakers = build_speakers(cfg, seed)
    pools = description_pools(speakers, seed)
    jobs: list[AudioJob] = []
    draws = []
    for spk in speakers:
        pool = pools[spk.name]
        for u in range(cfg["utts_per_speaker"]):
            rng = np.random.default_rng([seed, _TAG_UTT, *spk.key, u])
            intro, said = pool[int(rng.integers(len(pool)))]
            sr = int(cfg["sample_rates"][int(rng.integers(len(cfg["sample_rates"])))])
            level = float(rng.uniform(0.2, 0.9))
            scene = plan_scene(said, cfg, np.random.default_rng([seed, _TAG_SCENE, *spk.key, u]))
            draws.append((spk, u, describe(intro, said), scene, sr, level))
    # file formats: exact shares (so small corpora still contain every format)
    fmt_rng = np.random.default_rng([seed, _TAG_FORMAT])
    n = len(draws)
    stereo = _exact_share(fmt_rng, n, cfg["stereo_fraction"])
    flac = _exact_share(fmt_rng, n, cfg["flac_fraction"])
    wav_idx = np.flatnonzero(~flac)
    is_float = np.zeros(n, dtype=bool)
    is_float[wav_idx[_exact_share(fmt_rng, len(wav_idx), FLOAT_WAV_FRACTION)]] = True
    for i, (spk, u, text, scene, sr, level) in enumerate(draws):
        utt_id = f"{spk.name}_{u + 1:04d}"
        jobs.append(AudioJob(
            utt_id=utt_id, speaker=spk, spoken=text, text=text, scene=scene,
            audio_path=f"audio/{utt_id}.{'flac' if flac[i] else 'wav'}",
            image_path=f"images/{utt_id}.png", sample_rate=sr, stereo=bool(stereo[i]),
            subtype="FLOAT" if is_float[i] else "PCM_16", level=level,
            seed_key=(seed, _TAG_SYNTH, *spk.key, u), picture_key=(seed, _TAG_PICTURE, *spk.key, u)))
    if cfg["defects"]:
        jobs.extend(plan_defects(jobs, speakers, cfg, seed))
    return jobs


def plan_defects(regular: Sequence[AudioJob], speakers: Sequence[Speaker], cfg: dict, seed: int
                 ) -> list[AudioJob]:
    """One defective row per kind, with ids of real speakers, each saying one of its speaker's
    descriptions about that utterance's picture (so no picture or text crosses speakers)."""
    rng = np.random.default_rng([seed, _TAG_DEFECT])
    first = int(rng.integers(len(speakers)))
    by_speaker: dict[str, list[AudioJob]] = {}
    for job in regular:
        by_speaker.setdefault(job.speaker.name, []).append(job)
    out = []
    for i, kind in enumerate(DEFECT_KINDS):
        spk = speakers[(first + i) % len(speakers)]
        own = by_speaker[spk.name]
        base = own[int(rng.integers(len(own)))]  # borrow a pictured description of the same speaker
        sr = int(cfg["sample_rates"][int(rng.integers(len(cfg["sample_rates"])))])
        level = float(rng.uniform(0.2, 0.9))
        if kind == "duplicate_id":
            utt_id = base.utt_id
            audio_path = f"audio/{utt_id}_take2.wav"
        else:
            utt_id = f"{spk.name}_{9001 + i}"
            audio_path = f"audio/{utt_id}.wav"
        text = "" if kind == "empty_transcript" else base.text
        image_path = f"images/{utt_id}.png" if kind == "missing_image" else base.image_path
        out.append(AudioJob(
            utt_id=utt_id, speaker=spk, spoken=base.text, text=text, scene=base.scene, audio_path=audio_path,
            image_path=image_path, sample_rate=sr, stereo=False,
            subtype="FLOAT" if kind == "nonfinite" else "PCM_16", level=level,
            seed_key=(seed, _TAG_DEFECT, i), defect=kind))
    return out


def _zero_peak_timestamp(blob: bytes) -> bytes:
    """libsndfile adds a PEAK chunk to float WAVs whose header holds the wall-clock time of
    writing; zero that field so identical audio gives identical bytes."""
    out = bytearray(blob)
    pos = 12  # after "RIFF" <size> "WAVE"
    while pos + 8 <= len(out):
        chunk_id, size = bytes(out[pos:pos + 4]), int.from_bytes(out[pos + 4:pos + 8], "little")
        if chunk_id == b"PEAK" and size >= 8:
            out[pos + 12:pos + 16] = b"\0\0\0\0"  # (version u32, timestamp u32, peaks...)
        if chunk_id == b"data":
            break
        pos += 8 + size + (size & 1)
    return bytes(out)


def _encode(data: np.ndarray, sr: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, sr, format=fmt, subtype=subtype)
    blob = buf.getvalue()
    return _zero_peak_timestamp(blob) if fmt == "WAV" else blob


def _decodes(blob: bytes) -> bool:
    try:
        sf.info(io.BytesIO(blob))
        return True
    except Exception:  # soundfile raises various errors for unreadable data
        return False


def render_audio_bytes(job: AudioJob) -> bytes:
    """The bytes of the job's audio file (a deliberately broken one for defect jobs)."""
    rng = np.random.default_rng(list(job.seed_key))
    sr = job.sample_rate
    if job.defect == "empty_file":
        return b""
    if job.defect == "silent":
        return _encode(np.zeros(int(rng.uniform(1.0, 1.5) * sr)), sr, "WAV", "PCM_16")
    synthesise = synthesize_utterance if job.speaker.espeak is None else espeak_utterance
    mono = synthesise(job.spoken, job.speaker, sr, rng)
    if job.defect == "too_short":
        # ~50 ms around the loudest point: speech-like, but far too short to be an utterance
        m = int(0.05 * sr)
        c = int(np.argmax(np.abs(mono)))
        lo = min(max(0, c - m // 2), len(mono) - m)
        mono = mono[lo:lo + m] * np.hanning(m)
        mono = mono / np.max(np.abs(mono))
    data = make_channels(mono, job.stereo, sr, rng) * job.level
    if job.defect == "nonfinite":
        start = int(rng.integers(len(data) // 4, len(data) // 2))
        data = data.copy()
        data[start:start + int(0.02 * sr)] = np.nan  # a dropout written as NaN by a broken tool
    blob = _encode(data, sr, job.audio_format, job.subtype)
    if job.defect == "corrupt_header":
        blob = bytearray(blob)
        while True:  # overwrite the RIFF header with garbage until no decoder accepts it
            blob[:44] = rng.bytes(44)
            if not _decodes(bytes(blob)):
                break
        blob = bytes(blob)
    return blob


def _write_audio(job: AudioJob, root: str) -> str:
    """Worker: render and write one audio file; returns the utt_id (for progress only)."""
    path = Path(root) / job.audio_path
    path.write_bytes(render_audio_bytes(job))
    return job.utt_id


def _write_picture(job: AudioJob, size: int, root: str) -> str:
    """Worker: draw and write the picture of a regular job; returns the utt_id (for progress only)."""
    img = draw_scene(job.scene.objects, size, np.random.default_rng(list(job.picture_key)))
    (Path(root) / job.image_path).write_bytes(png_bytes(img))
    return job.utt_id


def _require_espeak() -> None:
    """Raise EspeakError (saying what to install) unless eSpeak NG speaks."""
    try:
        espeak_synthesise("a", ESPEAK_VOICES[0])
    except OSError as exc:
        raise EspeakError(f"demo.synthesiser=espeak: eSpeak NG's library did not load ({exc}); "
                          "reinstall with pip install 'mmasr[speech]'") from exc


def _worker_count(n_jobs: int, requested: int | None) -> int:
    if requested is not None:
        return max(1, int(requested))
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cpus = os.cpu_count() or 1
    # a pool costs ~1 s of start-up; not worth it for test-sized corpora
    return 1 if n_jobs < 64 else max(1, min(cpus, 8))


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def generate_demo_corpus(out_dir: str | Path, cfg: dict, seed: int, progress: bool = True,
                         *, workers: int | None = None) -> Path:
    """Write out_dir/manifest.csv, out_dir/audio/*, out_dir/images/*.png; return the manifest path.

    Also writes out_dir/defects.csv (utt_id, audio_path, defect) listing the deliberately
    defective rows, and out_dir/scenes.csv (:data:`SCENES_COLUMNS`) saying what each picture shows. Writes into a temporary sibling directory and renames it into place at the
    end (atomic: a killed run leaves no complete-looking out_dir). If out_dir exists it is replaced.
    ``workers``: processes for synthesis (default: 1 for small corpora, else the usable CPUs, <= 8);
    the files do not depend on it. Pools use the "spawn" start method (safe when the caller has
    threads, e.g. torch), so a calling *script* needs the usual ``if __name__ == "__main__":``.
    """
    seed = int(validate_section("seed", seed))
    cfg = validate_config(cfg)
    if cfg["synthesiser"] == "espeak":
        _require_espeak()  # one clear error here, not one per worker
    out_dir = Path(out_dir).resolve()
    jobs = plan_corpus(cfg, seed)
    pictured = [j for j in jobs if j.defect is None]

    from mmasr.io import atomic_dir  # here, not at the top: spawned synthesis workers need not import it

    with atomic_dir(out_dir) as tmp:
        (tmp / "audio").mkdir(parents=True)
        (tmp / "images").mkdir()
        workers = _worker_count(len(jobs), workers)
        from mmasr.progress import Progress

        bar = Progress(len(jobs) + len(pictured), "demo corpus", unit="file", bar=progress)
        if workers == 1:
            for job in pictured:
                _write_picture(job, cfg["image_size"], str(tmp))
                bar.update()
            for job in jobs:
                _write_audio(job, str(tmp))
                bar.update()
        else:
            # spawn, not fork: the caller may already hold threads (torch) that fork would break
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futures = [pool.submit(_write_audio, job, str(tmp)) for job in jobs]
                futures += [pool.submit(_write_picture, job, cfg["image_size"], str(tmp)) for job in pictured]
                for fut in as_completed(futures):
                    fut.result()
                    bar.update()
        bar.close()

        rows = sorted(([j.utt_id, j.speaker.name, j.speaker.group, j.audio_path, j.text, j.image_path]
                       for j in jobs), key=lambda r: (r[0], r[3]))
        _write_csv(tmp / "manifest.csv", MANIFEST_COLUMNS, rows)
        _write_csv(tmp / "defects.csv", DEFECTS_COLUMNS,
                   [[j.utt_id, j.audio_path, j.defect] for j in jobs if j.defect is not None])
        _write_csv(tmp / "scenes.csv", SCENES_COLUMNS,
                   [[j.utt_id, j.image_path, j.scene.summary, str(j.scene.described),
                     str(j.scene.agrees).lower()] for j in pictured])
    return out_dir / "manifest.csv"
