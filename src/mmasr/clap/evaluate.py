"""CLAP retrieval evaluation over the whole candidate set (``mmasr eval-retrieval``): audio->text over
the distinct texts of the split and text->audio over its utterances, for the trained heads and the
untrained ("zero-shot") heads they started from, beside chance (:mod:`mmasr.metrics.retrieval`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mmasr.clap.cache import ClapCache
from mmasr.clap.train import ClapHeads, load_encoders
from mmasr.metrics.retrieval import chance_recall, recall_curve, retrieval_metrics

log = logging.getLogger(__name__)

__all__ = ["load_heads", "evaluate_retrieval"]

# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def load_heads(path: str | Path, dims: dict) -> tuple[ClapHeads, dict[str, torch.Tensor]]:
    """Heads from a ``model.safetensors``/``init.safetensors`` and any fine-tuned encoder parameters."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    heads = ClapHeads(dims["audio_dim"], dims["text_dim"], dims["hidden_dim"], dims["embed_dim"])
    heads.load_state_dict({k[len("heads."):]: v for k, v in state.items() if k.startswith("heads.")}, strict=True)
    heads.eval()
    return heads, {k: v for k, v in state.items() if not k.startswith("heads.")}


def _apply_encoder_state(bundle, prefix: str, state: dict[str, torch.Tensor]) -> None:
    own = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    if own:
        missing, unexpected = bundle.model.load_state_dict(own, strict=False)
        if unexpected:
            raise ValueError(f"fine-tuned {prefix} parameters do not fit the encoder: {unexpected[:3]}")


@torch.no_grad()
def _project(heads: ClapHeads, audio: np.ndarray, text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = heads.audio(torch.from_numpy(np.ascontiguousarray(audio))).numpy()
    t = heads.text(torch.from_numpy(np.ascontiguousarray(text))).numpy()
    return a, t


def evaluate_retrieval(cache: ClapCache, checkpoint: str | Path, split: str = "test", models_cfg: dict | None = None,
                       max_k: int = 20, progress: bool = False) -> tuple[dict, pd.DataFrame]:
    """Audio->text and text->audio retrieval over the whole ``split``: the trained heads of
    ``checkpoint`` and the untrained heads they started from ("zero-shot"), with chance levels.
    Returns the flat metrics and the recall@k curve table (direction, model, k, recall)."""
    checkpoint = Path(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    if config["cache_digest"] != cache.digest:
        raise ValueError(f"{checkpoint} was trained on another embedding cache (digest {config['cache_digest']}, "
                         f"this cache {cache.digest}): re-train it")
    part = cache.split(split)
    if part.empty:
        raise ValueError(f"no {split}-split utterance in the CLAP cache: nothing to evaluate")
    cand_rows = np.array(sorted(set(part["text_row"])))
    relevant = part["text_row"].to_numpy()[:, None] == cand_rows[None, :]  # (audios, distinct texts)
    audio_x, text_x = cache.audio[part.index.to_numpy()], cache.text[cand_rows]

    init_heads, _ = load_heads(checkpoint / "init.safetensors", config["heads"])
    heads, encoder_state = load_heads(checkpoint / "model.safetensors", config["heads"])
    embeddings = {"zeroshot": _project(init_heads, audio_x, text_x)}
    if encoder_state:  # phase 2 changed the encoders: re-encode the split with them
        embeddings["trained"] = _project(heads, *_reencode(part, cand_rows, cache, encoder_state, models_cfg, progress))
    else:
        embeddings["trained"] = _project(heads, audio_x, text_x)

    metrics: dict = {}
    curves = []
    for model, (a, t) in embeddings.items():
        prefix = "" if model == "trained" else "zeroshot_"
        sim = a @ t.T
        for direction, s, rel in (("a2t", sim, relevant), ("t2a", sim.T, relevant.T)):
            m = retrieval_metrics(s, rel)
            metrics.update({f"{prefix}{direction}_{k}": v for k, v in m.items()})
            if direction == "a2t":  # audio queries by speaker group (e.g. impaired vs control)
                for group, rows in part.reset_index(drop=True).groupby("group").groups.items():
                    g = retrieval_metrics(s[rows], rel[rows])
                    metrics.update({f"{prefix}a2t_{k}_{group}": g[k] for k in ("r1", "r10")})
            ks = min(max_k, s.shape[1])
            curves += [{"direction": direction, "model": model, "k": k, "recall": r}
                       for k, r in enumerate(recall_curve(s, rel, ks), start=1)]
    for direction, rel in (("a2t", relevant), ("t2a", relevant.T)):
        for k in (1, 5, 10):
            metrics[f"chance_{direction}_r{k}"] = chance_recall(rel, k)
    metrics.update({"chance_r1": metrics["chance_a2t_r1"], "n_candidates": int(len(cand_rows)),
                    "n_candidate_texts": int(len(cand_rows)), "n_candidate_audios": int(len(part)),
                    "n_speakers": int(part["speaker"].nunique()), "split": split,
                    "fine_tuned_encoders": bool(encoder_state)})
    metrics.update({k: v for k, v in config["summary"].items()})
    metrics["clap_fingerprint"] = config["fingerprint"]
    metrics["n_rejected_empty_transcript"] = int(cache.meta.get("n_rejected_empty_transcript", 0))
    for kind in ("audio", "text"):
        for key in ("encoder", "revision", "layers", "pooling"):
            metrics[f"clap_{kind}_{key}"] = cache.meta[f"{kind}_{key}"]
    return metrics, pd.DataFrame(curves, columns=["direction", "model", "k", "recall"])


def _reencode(part: pd.DataFrame, cand_rows: np.ndarray, cache: ClapCache, encoder_state: dict,
              models_cfg: dict | None, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    from mmasr.models.layers import embed_audio, embed_text
    from mmasr.data.audio import read_audio

    if models_cfg is None:
        raise ValueError("the CLAP checkpoint has fine-tuned encoders: evaluating it needs the models section")
    audio_bundle, text_bundle = load_encoders(models_cfg, cache.meta, models_cfg["device"])
    _apply_encoder_state(audio_bundle, "audio_encoder", encoder_state)
    _apply_encoder_state(text_bundle, "text_encoder", encoder_state)
    audio = embed_audio(audio_bundle, [read_audio(p) for p in part["audio_path"]], cache.meta["audio_layers"],
                        progress=progress, desc="CLAP audio (fine-tuned)")
    text = embed_text(text_bundle, [cache.texts[r] for r in cand_rows], cache.meta["text_layers"],
                      cache.meta["text_pooling"])
    return audio, text
