"""Language-model side of rescoring: each distinct hypothesis text scored once by the frozen LM (``models.lm``).

``lm_score`` is the length-normalised log-probability of ``" " + text`` and the eos after a fixed context
(``fusion.lm_prefix``; bos, or eos for LMs without one, when the prefix is empty): the mean over those tokens of
``log p(token | context, earlier tokens)`` in nats. The demo LM was trained on exactly that shape
(the projector prompt, then the caption and eos), and a general LM reads a prompt-then-text sequence as well.
Texts are scored in batches (right-padded: a causal LM's positions before the padding do not see it) and
cached as ``text -> score`` beside the table, like the CLIP text embeddings, so fusion never calls a model.
The table also gets ``lm_n_tokens`` (the scored tokens: the text's and the eos) and ``lm_logprob`` =
``lm_score · lm_n_tokens``, the total log-probability, which the log-linear fusion form weighs (as shallow fusion
weighs an LM's total), while the seed form softmaxes the mean.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mmasr.models.loading import ModelBundle
from mmasr.progress import track
from mmasr.rescoring.clip import save_text_embeddings


def lm_text(text) -> str:
    """What the LM reads for a hypothesis: its decoded text, stripped (empty stays empty: eos alone is scored)."""
    return "" if text is None or (isinstance(text, float) and np.isnan(text)) else str(text).strip()


def context_ids(tokenizer, prefix: str) -> list[int]:
    """The token ids every hypothesis is conditioned on: the prefix, else bos (eos when the LM has no bos)."""
    ids = tokenizer(prefix, add_special_tokens=False).input_ids if prefix else []
    if ids:
        return list(ids)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("the LM's tokenizer has neither a bos nor an eos token: set fusion.lm_prefix to give it a context")
    return [int(start)]


def target_ids(tokenizer, text: str) -> list[int]:
    """The scored tokens of one hypothesis: ``" " + text`` then eos."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the LM's tokenizer has no eos token: the end of a hypothesis cannot be scored")
    body = tokenizer(" " + text, add_special_tokens=False).input_ids if text else []
    return list(body) + [int(tokenizer.eos_token_id)]


@torch.no_grad()
def sequence_scores(model: torch.nn.Module, context: list[int], targets: list[list[int]], pad_id: int,
                    device: torch.device | str = "cpu") -> np.ndarray:
    """Mean log-probability (nats) of each ``targets[i]`` after ``context``, one right-padded batch."""
    seqs = [context + t for t in targets]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    scored = torch.zeros((len(seqs), width), dtype=torch.bool)  # positions whose token is scored
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        scored[i, len(context):len(s)] = True
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)  # position t predicts token t + 1
    tok_logp = logp.gather(-1, ids[:, 1:, None].to(device))[..., 0].cpu()
    take = scored[:, 1:]
    return ((tok_logp * take).sum(1) / take.sum(1)).numpy().astype(np.float64)


def score_texts(bundle: ModelBundle, texts: list[str], prefix: str, batch_size: int,
                progress: bool = True) -> np.ndarray:
    """:func:`sequence_scores` of each text (as :func:`lm_text` gives it), in batches of similar length."""
    tok, model = bundle.processor, bundle.model
    model.eval()
    ctx = context_ids(tok, prefix)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    targets = [target_ids(tok, t) for t in texts]
    order = np.argsort([len(t) for t in targets], kind="stable")  # less padding per batch
    out = np.zeros(len(texts))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for chunk in track(chunks, "LM scores", items=len, item_name="texts", bar=progress):
        out[chunk] = sequence_scores(model, ctx, [targets[i] for i in chunk], pad, bundle.device)
    return out


def lm_scores(nbest: pd.DataFrame, bundle: ModelBundle | None, prefix: str, batch_size: int,
              progress: bool = True) -> tuple[pd.DataFrame, list[str], np.ndarray]:
    """The n-best table with ``lm_score``, ``lm_n_tokens`` and ``lm_logprob`` (NaN for every row when ``bundle`` is
    None: the LM term is off), and the distinct texts scored with their scores (each text once)."""
    out = nbest.copy()
    keys = [lm_text(t) for t in out["text"]]
    if bundle is None:
        out["lm_score"], out["lm_n_tokens"], out["lm_logprob"] = np.nan, np.nan, np.nan
        return out, [], np.zeros(0)
    texts = sorted(set(keys))
    scores = score_texts(bundle, texts, prefix, batch_size, progress)
    counts = np.array([len(target_ids(bundle.processor, t)) for t in texts], np.float64)
    idx = pd.Index(texts).get_indexer(keys)
    out["lm_score"], out["lm_n_tokens"] = scores[idx], counts[idx]
    out["lm_logprob"] = scores[idx] * counts[idx]
    return out, texts, scores


def save_lm_cache(path: str | Path, texts: list[str], scores: np.ndarray) -> None:
    """The text -> score cache (the same byte-stable layout as the CLIP text-embedding cache, one value per text)."""
    save_text_embeddings(path, texts, np.asarray(scores, np.float32).reshape(len(texts), 1))


def load_lm_cache(path: str | Path) -> dict[str, float]:
    with np.load(path, allow_pickle=False) as data:
        return {t: float(v[0]) for t, v in zip(data["texts"].tolist(), data["vectors"])}
