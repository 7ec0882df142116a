"""CLIP side of rescoring: a cache of picture embeddings, and the cosine of each hypothesis with its picture.

Every picture is encoded once (``mmasr cache-images``) and every distinct hypothesis text once
(``mmasr clip-scores``); the α grid search then never calls a model.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from mmasr.progress import track

from mmasr.io import atomic_path, reject, rejects_frame, write_json
from mmasr.models.loading import ModelBundle, clip_image_embeddings, clip_text_embeddings
from mmasr.data.text import clip_texts

_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed entry times: the same embeddings give the same bytes


def _write_npz(path: str | Path, arrays: list[tuple[str, np.ndarray]]) -> None:
    """An np.load-compatible .npz whose bytes depend only on the arrays (stored, fixed entry times)."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in arrays:
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=_FIXED_ZIP_TIME), buf.getvalue())


def save_embeddings(path: str | Path, ids: list[str], vectors: np.ndarray, meta: dict) -> None:
    """An .npz keyed by id (np.load-compatible, byte-stable) plus a JSON sidecar ``<path>.json``."""
    _write_npz(path, [(key, np.asarray(vec, dtype=np.float32))
                      for key, vec in sorted(zip(ids, vectors), key=lambda kv: kv[0])])
    write_json(f"{path}.json", {**meta, "dimension": int(vectors.shape[1]) if len(vectors) else 0, "count": len(ids)})


def save_text_embeddings(path: str | Path, texts: list[str], vectors: np.ndarray) -> None:
    """The hypothesis-text cache of ``clip-scores``: arrays ``texts`` (sorted, unicode) and ``vectors``
    (float32, one row per text). Texts are free-form, so they are data here, not npz keys."""
    order = np.argsort(np.asarray(texts, dtype=str), kind="stable")
    dim = vectors.shape[1] if len(texts) else 0
    _write_npz(path, [("texts", np.asarray(texts, dtype=str)[order]),
                      ("vectors", np.asarray(vectors, dtype=np.float32).reshape(len(texts), dim)[order])])


def load_text_embeddings(path: str | Path) -> dict[str, np.ndarray]:
    """clip_text -> its CLIP text embedding (as written by :func:`save_text_embeddings`)."""
    with np.load(path, allow_pickle=False) as data:
        return dict(zip(data["texts"].tolist(), data["vectors"]))


def load_embeddings(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def cache_images(bundle: ModelBundle, images: pd.DataFrame, batch_size: int, progress: bool = True):
    """Embed every picture of ``images`` (image_id, path). Returns (ids, (n, d) float32 array, rejects)."""
    ids, vectors, rejects = [], [], []
    todo = images.drop_duplicates("image_id").sort_values("image_id").to_dict("records")
    for start in track(range(0, len(todo), batch_size), "CLIP image embeddings",
                       items=lambda s: len(todo[s:s + batch_size]), item_name="pictures", bar=progress):
        batch_ids, batch_imgs = [], []
        for rec in todo[start:start + batch_size]:
            try:
                with Image.open(rec["path"]) as img:
                    batch_imgs.append(img.convert("RGB"))
                batch_ids.append(rec["image_id"])
            except (OSError, ValueError) as exc:
                rejects.append(reject(rec["image_id"], rec["path"], "image", "cache_images", "unreadable_image",
                                      f"{rec['path']}: {exc}"))
        if batch_imgs:
            vectors.append(clip_image_embeddings(bundle, batch_imgs))
            ids.extend(batch_ids)
    dim = vectors[0].shape[1] if vectors else 0
    return ids, (np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)), rejects_frame(rejects)


NO_PICTURES = "no utterance of the manifest has a picture"


def rows_with_picture(nbest: pd.DataFrame, manifest: pd.DataFrame, embeddings: dict[str, np.ndarray]) -> np.ndarray:
    """Which n-best rows belong to an utterance whose picture has a cached embedding (bool per row)."""
    image_of = manifest.set_index("utt_id")["image_id"]
    return np.array([isinstance(i, str) and i in embeddings for i in nbest["utt_id"].map(image_of)], dtype=bool)


def nbest_clip_texts(nbest: pd.DataFrame, text_cfg: dict) -> np.ndarray:
    """What CLIP reads for each row of an n-best table (``utt_id``, ``text``): one format per utterance's
    list, all captions or all bare (:func:`mmasr.data.text.clip_texts`), whatever the row order."""
    out = np.full(len(nbest), "", dtype=object)
    texts = nbest["text"].fillna("").astype(str).to_numpy()
    for idx in nbest.groupby("utt_id", sort=False).indices.values():
        out[idx] = clip_texts(texts[idx].tolist(), text_cfg)
    return out


def add_clip_scores(nbest: pd.DataFrame, manifest: pd.DataFrame, embeddings: dict[str, np.ndarray],
                    bundle: ModelBundle | None, text_cfg: dict, batch_size: int = 256,
                    progress: bool = True) -> pd.DataFrame:
    """Add ``clip_text`` (what CLIP read: one caption format per utterance's list, :func:`mmasr.data.text.clip_texts`)
    and ``clip_cos`` (cosine with the utterance's picture; NaN without one)."""
    return clip_scores(nbest, manifest, embeddings, bundle, text_cfg, batch_size, progress)[0]


def clip_scores(nbest: pd.DataFrame, manifest: pd.DataFrame, embeddings: dict[str, np.ndarray],
                bundle: ModelBundle | None, text_cfg: dict, batch_size: int = 256,
                progress: bool = True) -> tuple[pd.DataFrame, list[str], np.ndarray]:
    """:func:`add_clip_scores`'s table, and the distinct texts it embedded with their vectors.

    The vectors are kept (``data/cache/clip_text_embeddings.npz``) so that ``fuse`` can score each
    hypothesis against *another* utterance's picture (the picture-swap control) without a model: the
    Parquet table keeps its columns, and the (hypothesis x picture) cosines for any permutation are one
    dot product of the two caches.

    ``bundle`` may be None when no row has a picture (a corpus without pictures): nothing is encoded then
    and every ``clip_cos`` is NaN."""
    out = nbest.copy()
    image_of = manifest.set_index("utt_id")["image_id"]
    out["clip_text"] = nbest_clip_texts(out, text_cfg)
    image_ids = out["utt_id"].map(image_of)
    has_image = rows_with_picture(out, manifest, embeddings)
    if bundle is None and has_image.any():
        raise ValueError(f"{int(has_image.sum())} hypotheses have a picture embedding: scoring them needs the CLIP model")
    texts = sorted(set(out.loc[has_image, "clip_text"]))
    chunks = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
    vectors = [clip_text_embeddings(bundle, chunk)
               for chunk in track(chunks, "CLIP text embeddings", items=len, item_name="texts", bar=progress)]
    text_vecs = np.concatenate(vectors) if vectors else np.zeros((0, 1), np.float32)
    rows = np.flatnonzero(has_image)
    cos = np.full(len(out), np.nan)
    if len(rows):
        text_idx = pd.Index(texts).get_indexer(out["clip_text"].to_numpy()[rows])
        image_vecs = np.stack([embeddings[i] for i in image_ids.to_numpy()[rows]])
        cos[rows] = np.einsum("ij,ij->i", image_vecs, text_vecs[text_idx])
    out["clip_cos"] = cos
    return out, texts, text_vecs.reshape(len(texts), -1) if len(texts) else np.zeros((0, 0), np.float32)


def cache_metadata(bundle: ModelBundle) -> dict:
    return {"model": bundle.name, "revision": bundle.revision}

