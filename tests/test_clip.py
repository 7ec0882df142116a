import hashlib

import numpy as np
import pandas as pd
import pytest

from mmasr.rescoring import clip as clip_mod
from mmasr.rescoring.clip import (add_clip_scores, cache_images, clip_scores, load_embeddings, load_text_embeddings,
                        save_embeddings, save_text_embeddings)
from mmasr.config import validate
from mmasr.data.text import caption, clip_text, normalise
from tests.conftest import write_picture

TEXT = validate({})["text"]


def test_normalisation_and_caption_style():
    assert normalise("Um, a RED red bear... you know") == "a red bear"
    assert caption("bear") == "an image showing bear" and caption("two bears") == "an image showing two bears"
    assert caption("a red bear") == "a red bear" and caption("") == ""
    assert clip_text("Uh bear!", TEXT) == "an image showing bear"
    assert clip_text("Uh bear!", {**TEXT, "caption_style": False}) == "bear"


def test_image_cache_embeds_pictures_and_rejects_broken_ones(clip_bundle, tmp_path):
    ok1, ok2 = write_picture(tmp_path / "a.png"), write_picture(tmp_path / "b.png", mode="L")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    images = pd.DataFrame({"image_id": ["b", "a", "bad", "a"], "path": [str(ok2), str(ok1), str(tmp_path / "bad.png"), str(ok1)]})
    ids, vecs, rejects = cache_images(clip_bundle, images, batch_size=2, progress=False)
    assert ids == ["a", "b"] and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert rejects[["id", "reason"]].values.tolist() == [["bad", "unreadable_image"]]


def test_embedding_file_is_byte_stable_and_round_trips(tmp_path):
    vecs = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    digests = []
    for name in ("x.npz", "y.npz"):
        save_embeddings(tmp_path / name, ["c", "a", "b"], vecs, {"model": "m", "revision": "r"})
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    loaded = load_embeddings(tmp_path / "x.npz")
    np.testing.assert_array_equal(loaded["c"], vecs[0])
    meta = __import__("json").loads((tmp_path / "x.npz.json").read_text())
    assert meta == {"model": "m", "revision": "r", "dimension": 4, "count": 3}


def test_clip_scores_encode_each_text_once_and_leave_nan_without_picture(clip_bundle, monkeypatch):
    nbest = pd.DataFrame({"utt_id": ["u1", "u1", "u2", "u2", "u3"], "rank": [0, 1, 0, 1, 0],
                          "text": ["a red bear", "a red pear", "red bear", "bear", "a red bear"]})
    manifest = pd.DataFrame({"utt_id": ["u1", "u2", "u3"], "image_id": ["img", "img", None]})
    dim = clip_bundle.model.config.projection_dim
    img = np.ones(dim, np.float32) / np.sqrt(dim)
    encoded = []
    real = clip_mod.clip_text_embeddings
    monkeypatch.setattr(clip_mod, "clip_text_embeddings", lambda b, texts: (encoded.extend(texts), real(b, texts))[1])
    out = add_clip_scores(nbest, manifest, {"img": img}, clip_bundle, TEXT, progress=False)
    # distinct texts, once each; u2's list (at most 2 words) is read as captions, u1's (3 words) bare
    assert sorted(encoded) == ["a red bear", "a red pear", "an image showing bear", "an image showing red bear"]
    assert out["clip_cos"].isna().tolist() == [False, False, False, False, True]
    assert out["clip_text"].tolist() == ["a red bear", "a red pear", "an image showing red bear",
                                         "an image showing bear", "a red bear"]


def test_one_caption_format_per_list_whatever_the_row_order(clip_bundle):
    """Hypotheses that differ by one word around caption_max_words get the same format: "red pear" is
    read bare beside "a red pear" and as a caption beside "pear"; rows of a list need not be adjacent."""
    nbest = pd.DataFrame({"utt_id": ["u1", "u2", "u1", "u2"], "rank": [0, 0, 1, 1],
                          "text": ["red pear", "red pear", "a red pear", "pear"]})
    manifest = pd.DataFrame({"utt_id": ["u1", "u2"], "image_id": ["img", "img"]})
    dim = clip_bundle.model.config.projection_dim
    img = np.ones(dim, np.float32) / np.sqrt(dim)
    out, texts, vecs = clip_scores(nbest, manifest, {"img": img}, clip_bundle, {**TEXT, "caption_max_words": 2},
                                   progress=False)
    assert out["clip_text"].tolist() == ["red pear", "an image showing red pear", "a red pear", "an image showing pear"]
    # the text-embedding cache is keyed by what CLIP read, and reproduces every cosine
    assert texts == sorted(set(out["clip_text"]))
    by_text = dict(zip(texts, vecs))
    for text, cos in zip(out["clip_text"], out["clip_cos"]):
        assert float(by_text[text] @ img) == pytest.approx(cos, abs=1e-6)


def test_text_embedding_cache_round_trips_free_text_and_is_byte_stable(tmp_path):
    texts = ["a red bear", "an image showing a/b", "", "café ünïcode"]
    vecs = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    save_text_embeddings(tmp_path / "t1.npz", texts, vecs)
    save_text_embeddings(tmp_path / "t2.npz", texts[::-1], vecs[::-1])
    assert (tmp_path / "t1.npz").read_bytes() == (tmp_path / "t2.npz").read_bytes()  # order-independent
    loaded = load_text_embeddings(tmp_path / "t1.npz")
    assert sorted(loaded) == sorted(texts)
    for text, vec in zip(texts, vecs):
        np.testing.assert_array_equal(loaded[text], vec)
    save_text_embeddings(tmp_path / "empty.npz", [], np.zeros((0, 0), np.float32))
    assert load_text_embeddings(tmp_path / "empty.npz") == {}


def test_stored_text_embeddings_reproduce_clip_cos(clip_bundle):
    """What fuse needs for the picture-swap control: text vector . picture vector == clip_cos."""
    nbest = pd.DataFrame({"utt_id": ["u1", "u1", "u2"], "rank": [0, 1, 0], "text": ["a red bear", "bear", "a pear"]})
    manifest = pd.DataFrame({"utt_id": ["u1", "u2"], "image_id": ["img", None]})
    dim = clip_bundle.model.config.projection_dim
    img = np.ones(dim, np.float32) / np.sqrt(dim)
    out, texts, vecs = clip_scores(nbest, manifest, {"img": img}, clip_bundle, TEXT, progress=False)
    assert texts == ["a red bear", "bear"]  # only texts scored against a picture; u1's list is read bare
    by_text = dict(zip(texts, vecs))
    for text, cos in zip(out["clip_text"][:2], out["clip_cos"][:2]):
        assert float(by_text[text] @ img) == pytest.approx(cos, abs=1e-6)


def test_clip_scores_without_any_picture_embedding_need_no_model():
    """A corpus without pictures: an empty embedding cache, no CLIP model loaded, every clip_cos missing."""
    nbest = pd.DataFrame({"utt_id": ["u1", "u1", "u2"], "rank": [0, 1, 0], "text": ["a red bear", "bear", "pear"]})
    manifest = pd.DataFrame({"utt_id": ["u1", "u2"], "image_id": pd.array([None, None], dtype="string")})
    assert not clip_mod.rows_with_picture(nbest, manifest, {}).any()
    out = add_clip_scores(nbest, manifest, {}, None, TEXT, progress=False)
    assert out["clip_cos"].isna().all() and out["clip_text"].tolist() == ["a red bear", "bear", "an image showing pear"]
    with pytest.raises(ValueError, match="needs the CLIP model"):
        add_clip_scores(nbest, manifest.assign(image_id=["img", None]), {"img": np.ones(4, np.float32)}, None, TEXT,
                        progress=False)


def test_cache_images_without_pictures_writes_an_empty_cache_without_loading_clip(tmp_path):
    """mmasr cache-images on a manifest without pictures: an empty .npz that loads, a sidecar saying why; the
    CLIP named in params does not exist, which proves it is never loaded."""
    import json

    from mmasr.cli import main

    manifest, images = tmp_path / "m.parquet", tmp_path / "i.parquet"
    pd.DataFrame({"utt_id": ["u1"], "image_id": pd.array([None], dtype="string")}).to_parquet(manifest)
    pd.DataFrame({"image_id": pd.array([], dtype="string"), "path": pd.array([], dtype="string")}).to_parquet(images)
    cfg = json.dumps({"models": {"clip": str(tmp_path / "no-such-clip"), "device": "cpu"}})
    out = tmp_path / "emb.npz"
    assert main(["cache-images", "--cfg", cfg, "--manifest", str(manifest), "--images", str(images), "--out", str(out),
                 "--rejects", str(tmp_path / "rej.parquet"), "--quiet"]) == 0
    assert load_embeddings(out) == {}
    meta = json.loads((tmp_path / "emb.npz.json").read_text())
    assert meta["count"] == 0 and meta["skipped"] and "no utterance of the manifest has a picture" in meta["skip_reason"]
    assert pd.read_parquet(tmp_path / "rej.parquet").empty
