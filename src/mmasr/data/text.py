"""Transcript normalisation, shared by n-best de-duplication, WER scoring, the prompt-disjoint split check,
CLAP transcripts and CLIP captions. :func:`normaliser` (params ``text``) is the one entry point.

Two normalisers (``text.normaliser``):

- ``whisper_english`` (default): openai-whisper's ``EnglishTextNormalizer`` as the pinned
  ``whisper-normalizer`` package ships it, with its British->American spelling map; used as it is, not
  rewritten. It lower-cases, drops bracketed and parenthesised markers ("[laughter]", "<unk>"), removes only
  hesitations (hmm, mm, mhm, mmm, uh, um), expands contractions, writes numbers as digits ("twenty-one" and
  "21" both become "21", "1,000" becomes "1000") and standardises spellings ("colour" -> "color"). Content
  words such as *like, so, well, okay, you know, i mean* are kept. Runs of whitespace in its output become one
  space (jiwer splits on whitespace anyway; the de-duplication key must not differ by a space). It is an
  *English* normaliser: it strips diacritics and combining marks, so use ``seed`` for other scripts.
- ``seed``: seed 000's normaliser, kept exactly (:func:`normalise`): lower-case, drop punctuation, spell
  numerals 0-999 as words ("2" -> "two"), drop filler words and filler bigrams (``text.fillers``, which include
  *like, so, well, you know*), and, with ``collapse_repeats``, collapse immediately repeated words ("the the
  bear"). Seed 000 itself ran with ``collapse_repeats: true`` (:data:`SEED_000_TEXT`).

``collapse_repeats`` (default off) applies under both: collapsing hides Whisper's looping insertions and
removes real repetitions, which matter for dysarthric speech. The other ``text`` keys (lowercase,
remove_punctuation, remove_fillers, fillers, numbers_as_words) apply under ``seed`` only.

Short transcripts become captions ("an image showing bear") because CLIP was trained on captions, not bare
words; every hypothesis of one n-best list is read in the same format (:func:`clip_texts`).

Under ``seed`` any script works: text is put in Unicode NFC first (so "café" typed with a combining accent is
the same word), typographic apostrophes become "'", and letters, digits and combining marks (Devanagari
vowel signs, Arabic harakat) are word characters; only punctuation and symbols are removed.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Callable, Iterable, Sequence

DEFAULT_FILLERS = ("um", "uh", "uh-huh", "hmm", "hm", "ah", "er", "oh", "like", "you know", "i mean",
                   "okay", "ok", "so", "well")
NORMALISERS = ("whisper_english", "seed")
# The params ``text`` keys :func:`normaliser` reads (not the caption keys); workflow/rules/common.smk's
# TEXT_NORM_KEYS are these.
NORMALISER_KEYS = ("normaliser", "lowercase", "remove_punctuation", "collapse_repeats", "remove_fillers", "fillers",
                   "numbers_as_words")
# Seed 000's text settings: ``normaliser(SEED_000_TEXT)`` is seed 000's normaliser (the ``_seed_norm`` scorings).
SEED_000_TEXT = {"normaliser": "seed", "lowercase": True, "remove_punctuation": True, "collapse_repeats": True,
                 "remove_fillers": True, "fillers": list(DEFAULT_FILLERS), "numbers_as_words": True}
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def _wordish(ch: str) -> bool:
    """A letter or digit of any script, an underscore, or a combining mark (part of the letter before it)."""
    return ch.isalnum() or ch == "_" or unicodedata.category(ch).startswith("M")


def strip_punctuation(text: str) -> str:
    """Punctuation and symbols become spaces; an apostrophe or hyphen stays only between word characters
    ("don't", "uh-huh")."""
    out = []
    last = len(text) - 1
    for i, ch in enumerate(text):
        if _wordish(ch) or ch.isspace():
            out.append(ch)
        elif ch in "'-" and 0 < i < last and _wordish(text[i - 1]) and _wordish(text[i + 1]):
            out.append(ch)
        else:
            out.append(" ")
    return "".join(out)


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """An integer 0-999 in English words: 2 -> "two", 21 -> "twenty one", 305 -> "three hundred five"."""
    if not 0 <= n <= 999:
        raise ValueError(f"{n} is outside 0-999")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


def spell_numbers(words: list[str]) -> list[str]:
    """Whole-word numerals 0-999 (ASCII digits) become words, so Whisper's "2 red pears" scores as the
    reference "two red pears"; anything else ("2-0", "1st", "2024") is left as it is."""
    out = []
    for w in words:
        if w.isascii() and w.isdigit() and len(w) <= 3:
            out.extend(number_words(int(w)).split())
        else:
            out.append(w)
    return out


def _collapse(words: list[str]) -> list[str]:
    """Drop a word that repeats the word just before it ("the the bear" -> "the bear")."""
    return [w for i, w in enumerate(words) if i == 0 or w != words[i - 1]]


def normalise(text: str, *, lowercase: bool = True, remove_punctuation: bool = True, collapse_repeats: bool = True,
              remove_fillers: bool = True, fillers: Iterable[str] = DEFAULT_FILLERS, numbers_as_words: bool = True) -> str:
    """The canonical form of a transcript, configured by the params ``text`` section."""
    text = unicodedata.normalize("NFC", text).translate(_APOSTROPHES)
    if lowercase:
        text = text.lower()
    if remove_punctuation:
        text = strip_punctuation(text)
    words = text.split()
    if numbers_as_words:
        words = spell_numbers(words)
    if collapse_repeats:
        words = _collapse(words)
    if remove_fillers and words:
        return drop_fillers(words, set(fillers))
    return " ".join(words)


def drop_fillers(words: list[str], fillers: set[str]) -> str:
    """Remove filler words and two-word fillers ("you know") from a word list."""
    kept, i = [], 0
    while i < len(words):
        if i + 1 < len(words) and f"{words[i]} {words[i + 1]}" in fillers:
            i += 2
            continue
        if words[i] not in fillers:
            kept.append(words[i])
        i += 1
    return " ".join(kept)


def caption(text: str, template: str = "an image showing {}", max_words: int = 2) -> str:
    """Caption style for CLIP: a transcript of at most ``max_words`` words is wrapped in ``template``."""
    return template.format(text) if text and len(text.split()) <= max_words else text


@functools.cache
def _english_normalizer():
    """The pinned package's EnglishTextNormalizer (reads its spelling map once)."""
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def whisper_english(text: str, collapse_repeats: bool = False) -> str:
    """openai-whisper's English normaliser (``whisper-normalizer``), whitespace runs made one space; with
    ``collapse_repeats``, immediately repeated words collapsed afterwards."""
    words = _english_normalizer()(text).split()
    return " ".join(_collapse(words) if collapse_repeats else words)


def normaliser(cfg: dict) -> Callable[[str], str]:
    """A one-argument normalising function from the params ``text`` section (``cfg["normaliser"]``:
    ``whisper_english`` or ``seed``; see the module docstring for which keys each reads)."""
    kind = cfg["normaliser"]
    if kind == "whisper_english":
        collapse = bool(cfg["collapse_repeats"])
        return lambda t: whisper_english(t, collapse)
    if kind == "seed":
        opts = {k: cfg[k] for k in ("lowercase", "remove_punctuation", "collapse_repeats", "remove_fillers", "fillers",
                                    "numbers_as_words")}
        return lambda t: normalise(t, **opts)
    raise ValueError(f"text.normaliser must be one of {', '.join(NORMALISERS)}, got {kind!r}")


def other_normaliser(cfg: dict) -> tuple[str, dict]:
    """(suffix, text cfg) of the normaliser a run is *not* scored with, for the headline WERs under it:
    ``("seed_norm", SEED_000_TEXT)`` (seed 000's exactly) under ``whisper_english``, and
    ``("whisper_norm", whisper_english without collapsing)`` under ``seed``."""
    if cfg["normaliser"] == "whisper_english":
        return "seed_norm", {**cfg, **SEED_000_TEXT}
    return "whisper_norm", {**cfg, "normaliser": "whisper_english", "collapse_repeats": False}


def clip_text(text: str, cfg: dict) -> str:
    """What CLIP reads for one transcript on its own (a reference; a list of one): normalised, then caption
    style when configured. The hypotheses of an n-best list go through :func:`clip_texts`."""
    return clip_texts([text], cfg)[0]


def caption_list(texts: Sequence[str], cfg: dict) -> bool:
    """Whether an n-best list is read as captions: caption style is on and the list's longest normalised
    hypothesis has at most ``caption_max_words`` words. One decision per list, from the hypotheses alone
    (no reference), so every hypothesis of an utterance reaches CLIP in the same format."""
    return bool(cfg["caption_style"]) and max((len(t.split()) for t in texts), default=0) <= cfg["caption_max_words"]


def clip_texts(texts: Sequence[str], cfg: dict) -> list[str]:
    """What CLIP reads for each hypothesis of one n-best list: normalised, then all in caption style
    (``caption_template``) or all bare, by :func:`caption_list`. An empty hypothesis stays empty."""
    norm = normaliser(cfg)
    out = [norm(str(t)) for t in texts]
    if caption_list(out, cfg):
        return [cfg["caption_template"].format(t) if t else t for t in out]
    return out
