"""Losses and their targets, shared by the trainers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

LN_100 = math.log(100.0)  # CLIP's cap on the logit scale
IGNORE = -100  # label of positions without loss (prompt, padding, audio): cross_entropy's ignore_index


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of (..., vocab) ``logits`` against ``labels`` of the same leading shape, in float32,
    skipping ``IGNORE`` positions (``reduction``: mean over the labelled positions, or sum)."""
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE, reduction=reduction)


def symmetric_infonce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor,
                      targets: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of unit-norm pairs: ``logits = exp(min(s, ln 100)) * A B^T``,
    the mean of the a->b and b->a cross-entropies. ``targets`` (rows summing to 1, e.g.
    :func:`soft_targets`) makes repeated items positives of one another; default: the diagonal."""
    logits = logit_scale.clamp(max=LN_100).exp() * a @ b.T
    if targets is None:
        targets = torch.arange(len(a), device=a.device)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T))


def soft_targets(image_keys: Sequence[str], caption_keys: Sequence[str]) -> torch.Tensor:
    """Row-normalised targets for a batch of pairs: pair ``j`` is a positive for pair ``i`` when it
    shows the same picture or says the same caption (so repeated pictures/captions are never
    pushed apart as negatives). The diagonal is always positive."""
    img = np.asarray(image_keys, dtype=object)
    cap = np.asarray(caption_keys, dtype=object)
    same = (img[:, None] == img[None, :]) | (cap[:, None] == cap[None, :])
    t = torch.as_tensor(same, dtype=torch.float32)
    return t / t.sum(dim=1, keepdim=True)


def teacher_forcing_arrays(prompt: Sequence[int], captions: Sequence[Sequence[int]], eos: int,
                           pad: int, prefixes: Sequence[Sequence[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder inputs and labels for ``[prefix +] prompt + caption + [eos]``, right-padded with ``pad``.

    ``inputs[t]`` predicts ``labels[t]`` (= the token at ``t + 1``); labels are ``IGNORE`` on the
    prefix, the prompt and the padding, so only the caption tokens and the end-of-text carry loss.
    """
    heads = [list(prefixes[i]) + list(prompt) for i in range(len(captions))] if prefixes else [list(prompt)] * len(captions)
    seqs = [h + list(c) + [eos] for h, c in zip(heads, captions)]
    width = max(len(s) for s in seqs) - 1
    inputs = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for i, (h, s) in enumerate(zip(heads, seqs)):
        inputs[i, : len(s) - 1] = torch.tensor(s[:-1])
        labels[i, len(h) - 1: len(s) - 1] = torch.tensor(s[len(h):])
    return inputs, labels


@torch.no_grad()
def token_loss(logits_of, inputs: torch.Tensor, labels: torch.Tensor, device, chunk: int = 64) -> float:
    """Mean teacher-forced token loss over the labelled positions (``IGNORE`` elsewhere), in chunks of
    ``chunk`` rows: ``logits_of(rows, inputs_chunk)`` returns the logits of those rows."""
    total, count = 0.0, 0
    for s in range(0, len(inputs), chunk):
        lab = labels[s:s + chunk].to(device)
        logits = logits_of(slice(s, s + chunk), inputs[s:s + chunk].to(device))
        total += float(token_cross_entropy(logits, lab, reduction="sum"))
        count += int((lab != IGNORE).sum())
    return total / max(1, count)
