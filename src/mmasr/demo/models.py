"""Small randomly initialised demo models (Whisper for the n-best lists, CLIP for the pictures),
written in Hugging Face format.

Why it exists
-------------
The embedded offline default must not download anything, yet the pipeline must exercise the same
``from_pretrained`` code path that real checkpoints (``openai/whisper-small``,
``openai/clip-vit-base-patch32``) take. So the demo models are built here, in the directory
layout ``save_pretrained`` writes, and loaded back by :mod:`mmasr.models.loading` exactly like a local copy
of a hub checkpoint. They start from a seeded random init; the training stages later fit them to
the demo corpus (:mod:`mmasr.demo.corpus`).

Design
------
* Tokenizers: a tiny byte-level BPE is *learned here* (:func:`learn_bpe`, pure Python, a few ms)
  on the demo vocabulary, merging until every word is one symbol, so every demo word is a single
  token while any other text still tokenizes through the 256 byte symbols. Whisper's BPE is
  GPT-2 style (a leading space is part of the word: ``"Ġbear"``); CLIP's marks word ends with
  ``"</w>"`` and lower-cases, like the original CLIP vocabulary. The files are written by the
  stock ``WhisperTokenizer`` / ``CLIPTokenizer`` classes (``tokenizer.json`` plus the classic
  ``vocab.json``/``merges.txt``), so ``from_pretrained`` needs no custom code.
* Whisper is English-only (``is_multilingual = False``, no ``lang_to_id``), like
  ``whisper-*.en``: ``generate()`` then forces the prompt ``<|startoftranscript|><|notimestamps|>``
  and needs no language argument (a ``lang_to_id`` table would trigger language detection). The
  special tokens follow Whisper's layout (``<|en|>`` right after ``<|startoftranscript|>``,
  ``<|nospeech|>`` right before ``<|notimestamps|>``) because transformers computes ids from
  those positions. Audio windows are ``chunk_length_s`` long (``max_source_positions`` = 50 per
  second), and the feature extractor pads/truncates to the same window.
* CLIP: both towers share width/depth; the image processor resizes and centre-crops to
  ``image_size`` with OpenAI CLIP's normalisation.

Determinism: weights come from ``torch.manual_seed(seed)`` inside a forked RNG (the caller's
global RNG state is untouched); the BPE learner breaks ties lexicographically; JSON files are
written with sorted keys by transformers. The same ``(cfg, seed)`` therefore gives byte-identical
files. :func:`build_demo_models` builds into a temporary sibling folder and renames it into place,
so a killed run never leaves a complete-looking ``out_dir``.
"""

from __future__ import annotations

import copy
import json
import os
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import torch

from mmasr.config import schema_defaults, validate_section
from mmasr.demo.corpus import LEXICON
from mmasr.io import atomic_dir
from mmasr.models.loading import quiet_hf_progress

__all__ = [
    "DEFAULT_CONFIG",
    "WHISPER_SPECIAL_TOKENS",
    "CLIP_SPECIAL_TOKENS",
    "validate_config",
    "demo_vocabulary",
    "learn_bpe",
    "bpe_vocab",
    "write_vocab_merges",
    "seeded_init",
    "build_whisper_tokenizer",
    "build_clip_tokenizer",
    "build_demo_whisper",
    "build_demo_clip",
    "build_demo_models",
]

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

# The params `demo_models` section, defaults as declared in workflow/schemas/params.schema.yaml.
DEFAULT_CONFIG: dict[str, dict[str, int]] = schema_defaults()["demo_models"]

SAMPLE_RATE = 16000
SOURCE_POSITIONS_PER_SECOND = 50  # Whisper: 100 mel frames/s, halved by the encoder's stride-2 conv

# Whisper's special tokens in the original order: transformers derives the language token id as
# sot + 1 + index in LANGUAGES ("en" is first) and the no-speech id as notimestamps - 1.
WHISPER_EOT = "<|endoftext|>"
WHISPER_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|startoftranscript|>",
    "<|en|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nospeech|>",
    "<|notimestamps|>",
)
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_SPECIAL_TOKENS: tuple[str, ...] = (CLIP_BOS, CLIP_EOS)
CLIP_END_OF_WORD = "</w>"

CAPTION_WORDS: tuple[str, ...] = ("an", "image", "showing")  # CLIP-style caption template words
FILLER_WORDS: tuple[str, ...] = ("um", "uh")  # disfluencies a speaker may produce


def validate_config(cfg: dict | None) -> dict[str, dict[str, int]]:
    """The ``demo_models`` params section ``cfg`` (partial, or None; a sub-section may be None too)
    validated against the schema with every default filled in (:func:`mmasr.config.validate_section`,
    cross-field rules included). Raises :class:`mmasr.config.ParamsError` (a ValueError) naming the key."""
    cfg = {name: {} if section is None else section for name, section in (cfg or {}).items()}
    return validate_section("demo_models", cfg)


def demo_vocabulary() -> list[str]:
    """Every word the demo tokenizers keep as one token, in a fixed order: the corpus lexicon
    (counts, colours, nouns and plurals), CLIP caption words and fillers."""
    words: list[str] = []
    for word in (*LEXICON, *CAPTION_WORDS, *FILLER_WORDS):
        if word not in words:
            words.append(word)
    return words


# --------------------------------------------------------------------------------------------
# Byte-level BPE
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def byte_symbols(text: str) -> list[str]:
    """``text`` as its byte-level symbols (one per UTF-8 byte)."""
    table = bytes_to_unicode()
    return [table[b] for b in text.encode("utf-8")]


def _apply_merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def learn_bpe(words: Iterable[Sequence[str]]) -> list[tuple[str, str]]:
    """Learn BPE merges on symbol sequences until every sequence is a single symbol.

    Standard BPE (merge the most frequent adjacent pair everywhere), with ties broken by the
    pair itself so the result never depends on hashing or insertion order. Because encoding
    replays merges by rank, every training word then encodes to exactly one token.
    """
    seqs = [list(w) for w in words if len(w)]
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for s in seqs:
            counts.update(zip(s, s[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        seqs = [_apply_merge(s, best) for s in seqs]


def bpe_vocab(base: Sequence[str], merges: Sequence[tuple[str, str]], tail: Sequence[str]) -> dict[str, int]:
    """Vocabulary in GPT-2/CLIP order: base symbols, merged symbols in merge order, then ``tail``."""
    vocab: dict[str, int] = {}
    for token in (*base, *(a + b for a, b in merges), *tail):
        vocab.setdefault(token, len(vocab))
    return vocab


def build_whisper_tokenizer(words: Sequence[str], max_length: int):
    """A GPT-2-style byte-level BPE ``WhisperTokenizer`` in which every word, with and without its
    leading space, is one token; Whisper's special tokens are added after the vocabulary."""
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer

    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    forms = [byte_symbols(w) for w in words] + [byte_symbols(" " + w) for w in words]
    merges = learn_bpe(forms)
    vocab = bpe_vocab(alphabet, merges, [WHISPER_EOT])
    specials = [AddedToken(t, special=True, normalized=False) for t in WHISPER_SPECIAL_TOKENS]
    tok = WhisperTokenizer(vocab=vocab, merges=merges, model_max_length=max_length,
                           extra_special_tokens=specials)
    tok.set_prefix_tokens()  # rebuild the <|startoftranscript|>..<|notimestamps|> template with real ids
    return tok


def build_clip_tokenizer(words: Sequence[str], max_length: int):
    """A CLIP-style BPE ``CLIPTokenizer`` (lower-cased, ``</w>`` word ends) in which every word is
    one token; ``<|startoftext|>``/``<|endoftext|>`` close the vocabulary as in OpenAI's CLIP."""
    from transformers import CLIPTokenizer

    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    base = alphabet + [c + CLIP_END_OF_WORD for c in alphabet]  # any word can end on any byte
    forms = []
    for w in words:
        symbols = byte_symbols(w.lower())
        forms.append(symbols[:-1] + [symbols[-1] + CLIP_END_OF_WORD])
    merges = learn_bpe(forms)
    vocab = bpe_vocab(base, merges, CLIP_SPECIAL_TOKENS)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length,
                         bos_token=CLIP_BOS, eos_token=CLIP_EOS, pad_token=CLIP_EOS, unk_token=CLIP_EOS)


def write_vocab_merges(out: Path, tok) -> None:
    """Write the classic GPT-2-format ``vocab.json``/``merges.txt`` next to ``tokenizer.json``, for
    tools (and older transformers) that read those; transformers 5 itself loads ``tokenizer.json``."""
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges), encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def seeded_init(seed: int, make):
    """``make()`` under ``torch.manual_seed(seed)`` without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _save(out: Path, model, processor, tok) -> None:
    """``model`` and ``processor`` in Hugging Face format in ``out``, with ``tok``'s GPT-2-format side files."""
    out.mkdir(parents=True, exist_ok=True)
    with quiet_hf_progress():
        model.save_pretrained(out)
    processor.save_pretrained(out)
    write_vocab_merges(out, tok)


def _whisper_generation_config(model, tok, max_target_positions: int):
    """English-only Whisper generation settings that survive save/load (see module docstring)."""
    gen = copy.deepcopy(model.generation_config)
    ids = {t: tok.convert_tokens_to_ids(t) for t in (WHISPER_EOT, *WHISPER_SPECIAL_TOKENS)}
    eot = ids[WHISPER_EOT]
    gen.decoder_start_token_id = ids["<|startoftranscript|>"]
    gen.bos_token_id = eot
    gen.eos_token_id = eot
    gen.pad_token_id = eot
    gen.no_timestamps_token_id = ids["<|notimestamps|>"]
    gen.prev_sot_token_id = ids["<|startofprev|>"]  # used when prompt_ids are passed to generate
    gen.is_multilingual = False  # no lang_to_id/task_to_id: they would trigger language detection
    gen.return_timestamps = False
    gen.forced_decoder_ids = None
    gen.suppress_tokens = []
    # As in Whisper: never start a transcript with a bare space or end it before it starts.
    gen.begin_suppress_tokens = [tok.convert_tokens_to_ids(bytes_to_unicode()[ord(" ")]), eot]
    gen.max_length = max_target_positions
    # Otherwise from_pretrained rebuilds the generation config from the model config and drops
    # no_timestamps_token_id & co.
    gen._from_model_config = False
    return gen


def build_demo_whisper(out_dir: str | os.PathLike, cfg: dict, seed: int) -> Path:
    """Write a randomly initialised tiny Whisper (model, generation config, feature extractor,
    tokenizer) to ``out_dir`` and return it. ``cfg`` is the ``whisper`` section (defaults fill gaps)."""
    from transformers import (WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                              WhisperProcessor)

    w = validate_config({"whisper": cfg})["whisper"]
    out = Path(out_dir)
    tok = build_whisper_tokenizer(demo_vocabulary(), w["max_target_positions"])
    eot = tok.convert_tokens_to_ids(WHISPER_EOT)
    sot = tok.convert_tokens_to_ids("<|startoftranscript|>")
    config = WhisperConfig(
        vocab_size=len(tok),
        num_mel_bins=w["num_mel_bins"],
        d_model=w["d_model"],
        encoder_layers=w["encoder_layers"],
        decoder_layers=w["decoder_layers"],
        encoder_attention_heads=w["attention_heads"],
        decoder_attention_heads=w["attention_heads"],
        encoder_ffn_dim=w["ffn_dim"],
        decoder_ffn_dim=w["ffn_dim"],
        max_source_positions=w["chunk_length_s"] * SOURCE_POSITIONS_PER_SECOND,
        max_target_positions=w["max_target_positions"],
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
        suppress_tokens=[],
        begin_suppress_tokens=None,
        tie_word_embeddings=True,
    )
    model = seeded_init(seed, lambda: WhisperForConditionalGeneration(config))
    model.generation_config = _whisper_generation_config(model, tok, w["max_target_positions"])
    features = WhisperFeatureExtractor(feature_size=w["num_mel_bins"], sampling_rate=SAMPLE_RATE,
                                       hop_length=SAMPLE_RATE // 100, chunk_length=w["chunk_length_s"],
                                       n_fft=400)
    _save(out, model, WhisperProcessor(feature_extractor=features, tokenizer=tok), tok)
    return out


def build_demo_clip(out_dir: str | os.PathLike, cfg: dict, seed: int) -> Path:
    """Write a randomly initialised tiny CLIP (model, image processor, tokenizer) to ``out_dir``
    and return it. ``cfg`` is the ``clip`` section (defaults fill gaps)."""
    from transformers import (CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTextConfig,
                              CLIPVisionConfig)

    c = validate_config({"clip": cfg})["clip"]
    out = Path(out_dir)
    tok = build_clip_tokenizer(demo_vocabulary(), c["max_position_embeddings"])
    tower = dict(hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                 num_hidden_layers=c["layers"], num_attention_heads=c["attention_heads"],
                 projection_dim=c["projection_dim"])
    text = CLIPTextConfig(vocab_size=len(tok), max_position_embeddings=c["max_position_embeddings"],
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, **tower)
    vision = CLIPVisionConfig(image_size=c["image_size"], patch_size=c["patch_size"], num_channels=3, **tower)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=c["projection_dim"])
    model = seeded_init(seed, lambda: CLIPModel(config))
    size = c["image_size"]
    images = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    _save(out, model, CLIPProcessor(image_processor=images, tokenizer=tok), tok)
    return out


def build_demo_models(out_dir: str | os.PathLike, cfg: dict | None, seed: int) -> dict[str, Path]:
    """Build both demo models into ``out_dir/whisper`` and ``out_dir/clip`` atomically.

    Everything is written into a temporary sibling folder first and renamed into place, so
    ``out_dir`` either holds a complete pair or is left as it was. An existing ``out_dir`` is
    replaced. ``cfg`` is the ``demo_models`` params section (``{"whisper": ..., "clip": ...}``).
    """
    merged = validate_config(cfg)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        build_demo_whisper(tmp / "whisper", merged["whisper"], seed)
        build_demo_clip(tmp / "clip", merged["clip"], seed)
    return {"whisper": out / "whisper", "clip": out / "clip"}
