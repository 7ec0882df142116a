"""The SLAM-ASR projector between a frozen speech encoder and a frozen decoder-only LM (seed 002).

Encoder frames (T, D) lose their last ``T mod k`` frames, every ``k`` consecutive frames are stacked
into one vector of ``D·k``, and a two-layer MLP maps it to the LM's hidden size:
Linear(D·k → hidden) · ReLU · Linear(hidden → LM hidden). Stacking cuts the sequence the LM reads
by ``k``; the MLP bridges the two embedding spaces. Only this module trains.

The LM then reads ``[projected audio, prompt, transcript, eos]``; the loss covers the transcript and
the end-of-sequence token only (:func:`assemble`).
"""

from __future__ import annotations

import torch
from torch import nn

IGNORE = -100  # label of positions that carry no loss (audio, prompt, padding)


def stack_frames(frames: torch.Tensor, lengths: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, D) frames with valid ``lengths`` -> (B, T // k, D·k) stacked frames and their lengths
    (``lengths // k``: each utterance drops its own last ``length mod k`` frames)."""
    if k < 1:
        raise ValueError(f"stack size k must be >= 1, got {k}")
    b, t, d = frames.shape
    usable = (t // k) * k
    stacked = frames[:, :usable, :].reshape(b, usable // k, d * k)
    return stacked, torch.div(lengths, k, rounding_mode="floor")


class Projector(nn.Module):
    """Stack ``k`` encoder frames, then Linear(D·k → hidden) · ReLU · Linear(hidden → lm_hidden)."""

    def __init__(self, encoder_dim: int, lm_hidden: int, hidden: int = 2048, k: int = 5):
        super().__init__()
        self.k = k
        self.net = nn.Sequential(nn.Linear(encoder_dim * k, hidden), nn.ReLU(), nn.Linear(hidden, lm_hidden))

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stacked, new_lengths = stack_frames(frames, lengths, self.k)
        return self.net(stacked), new_lengths


def n_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def assemble(audio: torch.Tensor, audio_lengths: torch.Tensor, prompt: torch.Tensor, targets: list[list[int]],
             embed: nn.Embedding, eos_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build the LM's input for a batch: per row ``[audio[:len], prompt, target, eos]``, right-padded.

    ``audio`` (B, A, H) are projected frames with valid ``audio_lengths``; ``prompt`` (P,) token ids;
    ``targets`` the transcript token ids per row; ``embed`` the LM's (frozen) input embeddings.
    Returns ``inputs_embeds`` (B, L, H), ``attention_mask`` (B, L) and ``labels`` (B, L), where the
    labels are the next-token targets aligned with the inputs (HF causal LMs shift them) and
    :data:`IGNORE` everywhere except the transcript tokens and the end-of-sequence token.
    """
    device, dtype = audio.device, audio.dtype
    prompt_emb = embed(prompt.to(device)).to(dtype)
    rows, labels = [], []
    for i, target in enumerate(targets):
        text = torch.tensor(list(target) + [eos_id], device=device, dtype=torch.long)
        a = int(audio_lengths[i])
        row = torch.cat([audio[i, :a], prompt_emb, embed(text).to(dtype)])
        lab = torch.full((row.shape[0],), IGNORE, dtype=torch.long, device=device)
        lab[a + len(prompt):] = text
        rows.append(row)
        labels.append(lab)
    width = max(r.shape[0] for r in rows)
    hidden = audio.shape[-1]
    inputs = torch.zeros(len(rows), width, hidden, device=device, dtype=dtype)
    mask = torch.zeros(len(rows), width, device=device, dtype=torch.long)
    out_labels = torch.full((len(rows), width), IGNORE, device=device, dtype=torch.long)
    for i, (row, lab) in enumerate(zip(rows, labels)):
        inputs[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = 1
        out_labels[i, : lab.shape[0]] = lab
    return inputs, mask, out_labels
