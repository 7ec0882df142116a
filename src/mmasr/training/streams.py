"""The random streams of training, one tag each, in one place.

Every random draw of a training loop comes from ``numpy.random.default_rng([seed, tag, ...])``, so
what a step sees is a pure function of the seed, the tag and the step (or epoch): a resumed run sees
exactly the batches an uninterrupted one would. Two loops that shared a tag would draw the same
permutations from one seed; tests/test_training.py checks that the tags below are distinct.
"""

from __future__ import annotations

# demo pre-training (mmasr.demo.pretrain)
WHISPER_ORDER = 101
WHISPER_AUGMENT = 102
CLIP_ORDER = 103
CLIP_AUGMENT = 104
CLIP_FRESH_SCENES = 109
CLIP_HARD_NEGATIVES = 110
# demo text models (mmasr.demo.text_models)
LM_ORDER = 201
TEXT_ENCODER_ORDER = 202
TEXT_ENCODER_MASK = 203
LM_COPY = 204
# CLAP (mmasr.clap)
CLAP_ORDER = 301
CLAP_PHASE2_ORDER = 302
# SLAM-ASR projector (mmasr.projector); was 301 too, the same stream as CLAP phase 1's order
PROJECTOR_ORDER = 401
# LoRA adaptation of Whisper (mmasr.adapt)
ADAPT_ORDER = 501


def all_tags() -> dict[str, int]:
    """Every tag by name."""
    return {k: v for k, v in globals().items() if k.isupper() and isinstance(v, int)}
