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

__all__ = ["UTT_COLUMNS", "ClapCache", "cache_items", "empty_transcript_rejects", "encoder_meta", "encoder_fields",
           "pooled_audio", "build_cache",
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

    return encoder_fields(bundle.name, bundle.revision, bundle.model.config.model_type, encoder_depth(bundle.model),
                          layers, kind, pooling)


def encoder_fields(name: str, revision: str, model_type: str, depth: int, layers: list[int], kind: str,
                   pooling: str) -> dict:
    """The encoder a cache's embeddings come from (:func:`encoder_meta` of a loaded one, or of a shared pass)."""
    return {f"{kind}_encoder": name, f"{kind}_revision": revision, f"{kind}_model_type": model_type,
            f"{kind}_depth": int(depth), f"{kind}_layers": list(layers), f"{kind}_pooling": pooling}


def pooled_audio(pooled, models_cfg: dict, utt_ids: list[str], spec) -> tuple[np.ndarray, dict]:
    """Audio embeddings of ``utt_ids`` at the layers ``spec`` selects, read from a shared encoder pass
    (:class:`mmasr.models.encode_once.PooledEmbeddings`) instead of running ``models.audio_encoder``: the
    embeddings and the :func:`encoder_fields` of that encoder (with no pass made here)."""
    from mmasr.models.encode_once import check_pooled
    from mmasr.models.layers import select_layers

    check_pooled(pooled, models_cfg)
    layers = select_layers(spec, int(pooled.meta["depth"]))
    fields = encoder_fields(str(models_cfg["audio_encoder"]), pooled.meta["revision"], pooled.meta["model_type"],
                            pooled.meta["depth"], layers, "audio", "mean")
    return pooled.select(utt_ids, layers), fields


def build_cache(manifest: pd.DataFrame, audio_bundle, text_bundle, cfg: dict, text_cfg: dict, out_dir: str | Path,
                progress: bool = True, pooled=None, models_cfg: dict | None = None) -> ClapCache:
    """Encode every utterance and distinct transcript once and write the cache folder atomically:
    ``embeddings.safetensors`` (``audio``, ``text``), ``utterances.parquet``, ``texts.parquet``,
    ``meta.json``. ``cfg`` is the ``clap`` section.

    With ``pooled`` (a shared encoder pass, :mod:`mmasr.models.encode_once`, checked against ``models_cfg``),
    the audio embeddings are read from it and ``audio_bundle`` is not used (None). ``meta.json`` records the
    audio-encoder passes this stage made (``audio_encoder_passes``, ``audio_encoder_passes_per_utt``: 0 when
    it read a shared pass) and where the audio embeddings come from (``audio_source``)."""
    from mmasr.models.encode_once import pass_metadata
    from mmasr.models.layers import PassCounter, count_passes, embed_audio, embed_text, encoder_depth, select_layers
    from mmasr.data.audio import read_audio

    utts, texts = cache_items(manifest, text_cfg)
    rejects = empty_transcript_rejects(manifest, utts)
    if len(rejects):
        log.warning("CLAP cache: %d utterance(s) with an empty normalised transcript left out (rejects.parquet)",
                    len(rejects))
    t_layers = select_layers(cfg["layers"], encoder_depth(text_bundle.model))
    counter = PassCounter()
    if pooled is not None:
        audio, audio_fields = pooled_audio(pooled, models_cfg, utts["utt_id"].tolist(), cfg["layers"])
        source, device = f"shared encoder pass ({pooled.path})", pooled.meta["device"]
    else:
        a_layers = select_layers(cfg["layers"], encoder_depth(audio_bundle.model))
        with count_passes(audio_bundle.model, counter):
            audio = embed_audio(audio_bundle, [read_audio(p) for p in utts["audio_path"]], a_layers,
                                cfg["encode_batch_size"], progress=progress, desc="CLAP audio embeddings")
        audio_fields = encoder_meta(audio_bundle, a_layers, "audio", "mean")
        source, device = "own encoder pass", str(audio_bundle.device)
    log.info("CLAP cache: %d utterances (audio layers %s, %s), %d distinct texts (text layers %s, %s pooling)",
             len(utts), audio_fields["audio_layers"], source, len(texts), t_layers, cfg["text_pooling"])
    text = embed_text(text_bundle, texts, t_layers, cfg["text_pooling"], cfg["encode_batch_size"])
    meta = {**audio_fields, **encoder_meta(text_bundle, t_layers, "text", cfg["text_pooling"]),
            "layers": cfg["layers"], "audio_dim": int(audio.shape[1]), "text_dim": int(text.shape[1]),
            "n_utts": len(utts), "n_texts": len(texts), "n_rejected_empty_transcript": len(rejects),
            "device": device, "audio_source": source, **pass_metadata(counter, len(utts), "audio_")}
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
