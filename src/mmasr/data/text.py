"""Transcript normalisation, shared by n-best de-duplication, WER scoring and CLIP captions.

Follows seed 000: lower-case, collapse immediately repeated words ("the the bear"), drop filler
words and filler bigrams ("um", "you know"); for scoring also drop punctuation. Numerals 0-999 are
spelled out ("2" -> "two"): a real Whisper writes digits where references spell numbers. Short transcripts
become captions ("an image showing bear") because CLIP was trained on captions, not bare words.

Any script works: text is put in Unicode NFC first (so "café" typed with a combining accent is the
same word), typographic apostrophes become "'", and letters, digits and combining marks (Devanagari
vowel signs, Arabic harakat) are word characters; only punctuation and symbols are removed.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

DEFAULT_FILLERS = ("um", "uh", "uh-huh", "hmm", "hm", "ah", "er", "oh", "like", "you know", "i mean",
                   "okay", "ok", "so", "well")
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


def normaliser(cfg: dict):
    """A one-argument normalising function from the params ``text`` section."""
    opts = {k: cfg[k] for k in ("lowercase", "remove_punctuation", "collapse_repeats", "remove_fillers", "fillers",
                                "numbers_as_words")}
    return lambda t: normalise(t, **opts)


def clip_text(text: str, cfg: dict) -> str:
    """What CLIP reads for a hypothesis: normalised, then caption style when configured."""
    norm = normaliser(cfg)(text)
    return caption(norm, cfg["caption_template"], cfg["caption_max_words"]) if cfg["caption_style"] else norm
