"""Transcript normalisation, shared by n-best de-duplication, WER scoring and CLIP captions.

Follows seed 000: lower-case, collapse immediately repeated words ("the the bear"), drop filler
words and filler bigrams ("um", "you know"); for scoring also drop punctuation. Short transcripts
become captions ("an image showing bear") because CLIP was trained on captions, not bare words.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

DEFAULT_FILLERS = ("um", "uh", "uh-huh", "hmm", "hm", "ah", "er", "oh", "like", "you know", "i mean",
                   "okay", "ok", "so", "well")
_REPEATS = re.compile(r"\b(\w+)( \1\b)+")
_PUNCT = re.compile(r"[^\w\s'-]|(?<!\w)['-]|['-](?!\w)")


def normalise(text: str, *, lowercase: bool = True, remove_punctuation: bool = True, collapse_repeats: bool = True,
              remove_fillers: bool = True, fillers: Iterable[str] = DEFAULT_FILLERS) -> str:
    """The canonical form of a transcript, configured by the params ``text`` section."""
    text = text.strip()
    if lowercase:
        text = text.lower()
    if remove_punctuation:
        text = _PUNCT.sub(" ", text)
    text = re.sub(r"\s+", " ", text).strip()
    if collapse_repeats:
        text = _REPEATS.sub(r"\1", text)
    if remove_fillers and text:
        text = drop_fillers(text.split(), set(fillers))
    return text


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
    opts = {k: cfg[k] for k in ("lowercase", "remove_punctuation", "collapse_repeats", "remove_fillers", "fillers")}
    return lambda t: normalise(t, **opts)


def clip_text(text: str, cfg: dict) -> str:
    """What CLIP reads for a hypothesis: normalised, then caption style when configured."""
    norm = normaliser(cfg)(text)
    return caption(norm, cfg["caption_template"], cfg["caption_max_words"]) if cfg["caption_style"] else norm
