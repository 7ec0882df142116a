"""Demo models sized from the corpus: the length-bound settings follow the data, so a user's corpus of longer
descriptions (or longer utterances) needs no override.

Each setting becomes ``max(configured, needed)``: the configured value is a floor, never lowered, so the demo
corpus builds exactly the models it always did. What was raised is logged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import pandas as pd

log = logging.getLogger(__name__)

WHISPER_PROMPT_MARGIN = 4  # <|startoftranscript|> [<|lang|> <|task|>] <|notimestamps|>: at most this many tokens


def longest_tokens(tok, texts: Sequence[str]) -> int:
    """The most tokens any of ``texts`` takes (with the leading space a word gets after a prompt)."""
    return max((len(tok(" " + str(t).strip(), add_special_tokens=False).input_ids) for t in texts), default=0)


def raise_to(section: str, cfg: dict, key: str, needed: int, why: str) -> dict:
    """``cfg`` with ``key`` raised to ``needed`` when it is smaller (logged), else ``cfg`` unchanged."""
    if needed <= cfg[key]:
        return cfg
    log.info("%s.%s raised from %s to %d: %s", section, key, cfg[key], needed, why)
    return {**cfg, key: needed}


def train_texts(manifest: pd.DataFrame) -> list[str]:
    """Non-empty transcripts of the train split."""
    texts = manifest.loc[manifest["split"] == "train", "text"].dropna().astype(str).str.strip()
    return texts[texts != ""].tolist()


def size_demo_whisper(cfg: dict, manifest: pd.DataFrame) -> dict:
    """``demo_models.whisper`` with ``max_target_positions`` fitting the prompt, the longest train transcript
    and end-of-text, and ``chunk_length_s`` (whole seconds) fitting the longest utterance of any split."""
    from mmasr.demo.models import build_whisper_tokenizer, demo_vocabulary

    tok = build_whisper_tokenizer(demo_vocabulary(), cfg["max_target_positions"])
    longest = longest_tokens(tok, train_texts(manifest))
    cfg = raise_to("demo_models.whisper", cfg, "max_target_positions", WHISPER_PROMPT_MARGIN + longest + 1,
                   f"the longest train transcript takes {longest} tokens")
    if "duration_s" in manifest and len(manifest):
        seconds = float(manifest["duration_s"].max())
        cfg = raise_to("demo_models.whisper", cfg, "chunk_length_s", math.ceil(seconds),
                       f"the longest utterance lasts {seconds:.2f} s")
    return cfg


def size_demo_lm(cfg: dict, manifest: pd.DataFrame) -> dict:
    """``pretrain.lm`` with ``max_position_embeddings`` fitting the longest train caption read before the
    prompt (repeated and padded with silence, as :func:`mmasr.demo.text_models.train_lm` builds its rows)."""
    from mmasr.demo.models import demo_vocabulary
    from mmasr.demo.text_models import PROJECTOR_PROMPT, build_lm_tokenizer, lm_prompt_ids

    tok = build_lm_tokenizer(demo_vocabulary(), PROJECTOR_PROMPT, cfg["max_position_embeddings"])
    longest = longest_tokens(tok, train_texts(manifest))
    needed = len(lm_prompt_ids(tok)) + longest * (1 + cfg["copy_max_repeat"]) + 2 * cfg["copy_max_silence"] + 1
    return raise_to("pretrain.lm", cfg, "max_position_embeddings", needed,
                    f"the longest train transcript takes {longest} tokens")


def size_demo_text_encoder(cfg: dict, manifest: pd.DataFrame) -> dict:
    """``pretrain.text_encoder`` with ``max_position_embeddings`` fitting [CLS] + the longest train transcript
    + [SEP]."""
    from mmasr.demo.models import demo_vocabulary
    from mmasr.demo.text_models import build_bert_tokenizer

    tok = build_bert_tokenizer(demo_vocabulary(), cfg["max_position_embeddings"])
    texts = train_texts(manifest)
    longest = max((len(tok(t).input_ids) for t in texts), default=0)
    return raise_to("pretrain.text_encoder", cfg, "max_position_embeddings", longest,
                    f"the longest train transcript takes {longest} tokens with [CLS] and [SEP]")
