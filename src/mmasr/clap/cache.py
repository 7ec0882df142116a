"""The CLAP embedding cache: every utterance's pooled frozen audio-encoder embedding and every distinct
transcript's pooled text-encoder embedding, computed once (``mmasr clap-embeddings``) so that phase 1
of :func:`mmasr.clap.train.train_clap` is a few matrix products per epoch."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mmasr.io import atomic_dir, reject, rejects_frame, write_json, write_parquet

log = logging.getLogger(__name__)

__all__ = ["UTT_COLUMNS", "ClapCache", "cache_items", "empty_transcript_rejects", "encoder_meta", "build_cache",
           "write_cache", "load_cache"]

# --------------------------------------------------------------------------------------------
# Embedding cache
# --------------------------------------------------------------------------------------------

UTT_COLUMNS = ["utt_id", "speaker", "group", "split", "text", "text_row", "audio_path", "duration_s"]


@dataclass
class ClapCache:
    """Pooled frozen-encoder embeddings: one audio row per utterance, one text row per distinct
    (normalised) transcript; ``utts.text_row`` links them."""

    audio: np.ndarray
    text: np.ndarray
    utts: pd.DataFrame
    texts: list[str]
    meta: dict
    digest: str

    def split(self, name: str) -> pd.DataFrame:
        return self.utts[self.utts["split"] == name]


def cache_items(manifest: pd.DataFrame, text_cfg: dict) -> tuple[pd.DataFrame, list[str]]:
    """The utterances with a non-empty normalised transcript (all splits, by utt_id) and the
    sorted distinct transcripts."""
    from mmasr.data.text import normaliser

    norm = normaliser(text_cfg)
    utts = manifest.assign(text=[norm(str(t)) for t in manifest["text"].fillna("")])
    utts = utts[utts["text"].str.len() > 0].sort_values("utt_id").reset_index(drop=True)
    if utts.empty:
        raise ValueError("no utterance with a transcript in the manifest: nothing to embed")
    texts = sorted(set(utts["text"]))
    index = {t: i for i, t in enumerate(texts)}
    utts["text_row"] = [index[t] for t in utts["text"]]
    return utts[UTT_COLUMNS], texts


def empty_transcript_rejects(manifest: pd.DataFrame, utts: pd.DataFrame) -> pd.DataFrame:
    """A rejects row (as the other stages write them) for each manifest utterance that
    :func:`cache_items` left out because its normalised transcript is empty."""
    dropped = manifest[~manifest["utt_id"].isin(utts["utt_id"])].sort_values("utt_id")
    return rejects_frame([reject(r["utt_id"], r.get("audio_path"), "utterance", "clap_embeddings", "empty_transcript",
                                 f"transcript {str(r.get('text', ''))!r} is empty after normalisation")
                          for r in dropped.to_dict("records")])


def encoder_meta(bundle, layers: list[int], kind: str, pooling: str) -> dict:
    from mmasr.models.layers import encoder_depth

    return {f"{kind}_encoder": bundle.name, f"{kind}_revision": bundle.revision,
            f"{kind}_model_type": bundle.model.config.model_type, f"{kind}_depth": encoder_depth(bundle.model),
            f"{kind}_layers": layers, f"{kind}_pooling": pooling}


def build_cache(manifest: pd.DataFrame, audio_bundle, text_bundle, cfg: dict, text_cfg: dict, out_dir: str | Path,
                progress: bool = True) -> ClapCache:
    """Encode every utterance and distinct transcript once and write the cache folder atomically:
    ``embeddings.safetensors`` (``audio``, ``text``), ``utterances.parquet``, ``texts.parquet``,
    ``meta.json``. ``cfg`` is the ``clap`` section."""
    from mmasr.models.layers import embed_audio, embed_text, encoder_depth, select_layers
    from mmasr.data.audio import read_audio

    utts, texts = cache_items(manifest, text_cfg)
    rejects = empty_transcript_rejects(manifest, utts)
    if len(rejects):
        log.warning("CLAP cache: %d utterance(s) with an empty normalised transcript left out (rejects.parquet)",
                    len(rejects))
    a_layers = select_layers(cfg["layers"], encoder_depth(audio_bundle.model))
    t_layers = select_layers(cfg["layers"], encoder_depth(text_bundle.model))
    log.info("CLAP cache: %d utterances (audio layers %s), %d distinct texts (text layers %s, %s pooling)",
             len(utts), a_layers, len(texts), t_layers, cfg["text_pooling"])
    audio = embed_audio(audio_bundle, [read_audio(p) for p in utts["audio_path"]], a_layers,
                        cfg["encode_batch_size"], progress=progress, desc="CLAP audio embeddings")
    text = embed_text(text_bundle, texts, t_layers, cfg["text_pooling"], cfg["encode_batch_size"])
    meta = {**encoder_meta(audio_bundle, a_layers, "audio", "mean"),
            **encoder_meta(text_bundle, t_layers, "text", cfg["text_pooling"]),
            "layers": cfg["layers"], "audio_dim": int(audio.shape[1]), "text_dim": int(text.shape[1]),
            "n_utts": len(utts), "n_texts": len(texts), "n_rejected_empty_transcript": len(rejects),
            "device": str(audio_bundle.device)}
    return write_cache(out_dir, audio, text, utts, texts, meta, rejects)


def write_cache(out_dir: str | Path, audio: np.ndarray, text: np.ndarray, utts: pd.DataFrame, texts: list[str],
                meta: dict, rejects: pd.DataFrame | None = None) -> ClapCache:
    """Write a cache folder atomically (see :func:`build_cache`; ``rejects.parquet``: the utterances left
    out) and load it back."""

    from safetensors.numpy import save_file

    if len(audio) != len(utts) or len(text) != len(texts) or not set(utts["text_row"]) <= set(range(len(texts))):
        raise ValueError("cache arrays and tables do not match")
    with atomic_dir(out_dir) as tmp:
        save_file({"audio": np.ascontiguousarray(audio, dtype=np.float32),
                   "text": np.ascontiguousarray(text, dtype=np.float32)}, str(tmp / "embeddings.safetensors"))
        write_parquet(tmp / "utterances.parquet", utts[UTT_COLUMNS].reset_index(drop=True))
        write_parquet(tmp / "texts.parquet", pd.DataFrame({"text_row": range(len(texts)), "text": texts}))
        write_json(tmp / "meta.json", meta)
        write_parquet(tmp / "rejects.parquet", rejects_frame([]) if rejects is None else rejects)
    return load_cache(out_dir)


def load_cache(folder: str | Path) -> ClapCache:
    from safetensors.numpy import load_file

    folder = Path(folder)
    path = folder / "embeddings.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no CLAP embedding cache here (run `mmasr clap-embeddings`)")
    arrays = load_file(str(path))
    utts = pd.read_parquet(folder / "utterances.parquet")
    texts = pd.read_parquet(folder / "texts.parquet").sort_values("text_row")["text"].tolist()
    meta = json.loads((folder / "meta.json").read_text())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return ClapCache(audio=arrays["audio"], text=arrays["text"], utts=utts, texts=texts, meta=meta, digest=digest)
