"""Demo models sized from the corpus (mmasr.demo.sizing): longer descriptions need no override."""

from __future__ import annotations

import pandas as pd
import pytest

from mmasr.config import validate
from mmasr.demo import sizing
from mmasr.demo.pretrain import caption_token_ids

P = validate({})
LONG = "the firefighter carefully climbed the extraordinarily tall ladder beside the neighbourhood bakery"


def manifest(texts, durations=None, split="train"):
    return pd.DataFrame({"utt_id": [f"u{i}" for i in range(len(texts))], "speaker": "s", "group": "control",
                         "split": split, "text": texts, "duration_s": durations or [1.0] * len(texts)})


def test_demo_sized_corpus_keeps_the_configured_sizes():
    m = manifest(["a red ball", "two blue cups"])
    assert sizing.size_demo_lm(P["pretrain"]["lm"], m) == P["pretrain"]["lm"]
    assert sizing.size_demo_text_encoder(P["pretrain"]["text_encoder"], m) == P["pretrain"]["text_encoder"]
    assert sizing.size_demo_whisper(P["demo_models"]["whisper"], m) == P["demo_models"]["whisper"]


def test_lm_positions_follow_the_longest_train_transcript(tmp_path, caplog):
    from mmasr.demo.text_models import build_demo_lm, train_lm

    m = manifest(["a red ball", LONG])
    cfg = {**P["pretrain"]["lm"], "steps": 1, "checkpoint_every": 1}
    with pytest.raises(ValueError, match="needs up to .* positions, the LM has 128"):  # the failure
        train_lm(build_demo_lm(tmp_path / "init0", cfg, 0), m, tmp_path / "out0", tmp_path / "l0.csv",
                 tmp_path / "st0", cfg, 0, progress=False)
    with caplog.at_level("INFO", logger="mmasr.demo.sizing"):
        sized = sizing.size_demo_lm(cfg, m)
    assert sized["max_position_embeddings"] > 128 and "pretrain.lm.max_position_embeddings raised" in caplog.text
    assert sizing.size_demo_lm(cfg, manifest([LONG], split="test")) == cfg  # only train transcripts count
    summary = train_lm(build_demo_lm(tmp_path / "init", sized, 0), m, tmp_path / "out", tmp_path / "l.csv",
                       tmp_path / "st", sized, 0, progress=False)
    assert summary is not None and (tmp_path / "out" / "config.json").is_file()


def test_text_encoder_and_whisper_follow_the_corpus(tmp_path):
    from mmasr.demo.models import build_demo_whisper
    from mmasr.models.loading import load_whisper, whisper_prompt_ids

    m = manifest(["a red ball", LONG * 2], durations=[1.0, 7.3])
    te = sizing.size_demo_text_encoder(P["pretrain"]["text_encoder"], m)
    assert te["max_position_embeddings"] > P["pretrain"]["text_encoder"]["max_position_embeddings"]
    w = sizing.size_demo_whisper(P["demo_models"]["whisper"], m)
    assert w["chunk_length_s"] == 8 and w["max_target_positions"] > 32
    bundle = load_whisper(str(build_demo_whisper(tmp_path / "w", w, 0)), device="cpu", dtype="float32")
    prompt = whisper_prompt_ids(bundle, None)
    assert len(prompt) <= sizing.WHISPER_PROMPT_MARGIN
    caption_token_ids(bundle.processor.tokenizer, m["text"], w["max_target_positions"], len(prompt))  # fits
    with pytest.raises(ValueError, match="decoder positions, the model has 32"):
        caption_token_ids(bundle.processor.tokenizer, m["text"], 32, len(prompt))
