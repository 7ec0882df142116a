"""The published architectures of the models a real run names, as configurations built in code.

A user's first real run loads ``openai/whisper-small``, ``openai/clip-vit-base-patch32``,
``HuggingFaceTB/SmolLM3-3B``, ``facebook/hubert-base-ls960``, ``MIT/ast-finetuned-audioset-10-10-0.4593``
and ``bert-base-uncased`` (``config/real.yaml``). Nothing here can download them, so the real-size tests
(``tests/test_real_size.py``) and the memory benchmark (``benchmarks/real_size.py``) build each one from
its configuration with random, seeded weights: same shapes, same code paths, same memory, no weights.

The dimensions are those of each checkpoint's ``config.json`` on the hub, written out here rather than
taken from transformers' defaults (which may change). ``published_params`` is the parameter count the
model's authors publish; :func:`count_parameters` counts a configuration's parameters on the meta
device, so a 3 B model is counted without allocating it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["PublishedModel", "PUBLISHED", "count_parameters", "model_class"]


def _whisper_small(**over) -> Any:
    from transformers import WhisperConfig

    # openai/whisper-small: 768-d, 12 + 12 layers, 12 heads, 80 mel bins, 30 s window (1500 encoder frames),
    # multilingual vocabulary (small.en: 51864). Token ids of the special tokens come from the tokenizer used.
    cfg = dict(vocab_size=51865, d_model=768, encoder_layers=12, decoder_layers=12, encoder_attention_heads=12,
               decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, num_mel_bins=80,
               max_source_positions=1500, max_target_positions=448, activation_function="gelu",
               scale_embedding=False, tie_word_embeddings=True)
    return WhisperConfig(**{**cfg, **over})


def _clip_vit_b32(**over) -> Any:
    from transformers import CLIPConfig

    text = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu")
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=32, hidden_act="quick_gelu")
    text.update(over.pop("text_config", {}))
    vision.update(over.pop("vision_config", {}))
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=512, **over)


def _smollm3_3b(**over) -> Any:
    from transformers import SmolLM3Config

    # 36 layers, every 4th without RoPE (NoPE); grouped-query attention 16 heads / 4 key-value heads;
    # input and output embeddings tied.
    cfg = dict(vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=65536,
               rope_theta=5_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, no_rope_layer_interval=4)
    cfg.update(over)
    cfg.setdefault("no_rope_layers", [int((i + 1) % cfg["no_rope_layer_interval"] != 0)
                                      for i in range(cfg["num_hidden_layers"])])
    return SmolLM3Config(**cfg)


def _hubert_base(**over) -> Any:
    from transformers import HubertConfig

    cfg = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
               feat_extract_norm="group", conv_dim=(512,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2),
               conv_kernel=(10, 3, 3, 3, 3, 2, 2), num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
               do_stable_layer_norm=False, vocab_size=32)
    return HubertConfig(**{**cfg, **over})


def _ast_base(**over) -> Any:
    from transformers import ASTConfig

    # MIT/ast-finetuned-audioset-10-10-0.4593: ViT-Base (DeiT-B distilled) over 16 x 16 patches of a
    # 128-bin x 1024-frame fbank with stride 10 in both axes (12 x 101 patches).
    cfg = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
               patch_size=16, frequency_stride=10, time_stride=10, max_length=1024, num_mel_bins=128)
    return ASTConfig(**{**cfg, **over})


def _bert_base(**over) -> Any:
    from transformers import BertConfig

    cfg = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)
    return BertConfig(**{**cfg, **over})


@dataclass(frozen=True)
class PublishedModel:
    """A model a real run names: its hub id, the count its authors publish, and its configuration."""

    hub_id: str
    published_params: float
    source: str  # where the parameter count is published
    config: Callable[..., Any]  # keyword overrides (e.g. a shallower num_hidden_layers) -> a transformers config
    model_class: str  # the transformers class the pipeline loads it as


PUBLISHED: dict[str, PublishedModel] = {
    "whisper-small": PublishedModel("openai/whisper-small", 244e6, "the Whisper paper's model table (244 M)",
                                    _whisper_small, "WhisperForConditionalGeneration"),
    "clip-vit-base-patch32": PublishedModel("openai/clip-vit-base-patch32", 151.28e6,
                                            "OpenCLIP's model profile of ViT-B-32 (151.28 M)", _clip_vit_b32,
                                            "CLIPModel"),
    "smollm3-3b": PublishedModel("HuggingFaceTB/SmolLM3-3B", 3.08e9, "the model card (3.08 B)", _smollm3_3b,
                                 "SmolLM3ForCausalLM"),
    "hubert-base": PublishedModel("facebook/hubert-base-ls960", 95e6, "the HuBERT paper, BASE (95 M)", _hubert_base,
                                  "HubertModel"),
    "ast-base": PublishedModel("MIT/ast-finetuned-audioset-10-10-0.4593", 86e6,
                               "DeiT-B, AST's backbone (86 M; the AST paper)", _ast_base, "ASTModel"),
    "bert-base": PublishedModel("bert-base-uncased", 110e6, "the BERT paper, BERT-BASE (110 M)", _bert_base,
                                "BertModel"),
}


def model_class(name: str):
    """The transformers class of a published model (``PUBLISHED[name].model_class``)."""
    import transformers

    return getattr(transformers, PUBLISHED[name].model_class)


def count_parameters(config: Any, cls) -> int:
    """Parameters of ``cls(config)``, counted on the meta device (no memory is allocated); tied weights
    counted once, as ``model.parameters()`` yields them."""
    import torch

    with torch.device("meta"):
        model = cls(config)
    return sum(p.numel() for p in model.parameters())
