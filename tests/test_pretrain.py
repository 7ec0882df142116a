"""Demo pre-training: pure helpers, train-split-only data, loss going down, exact resume, HF loading."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from mmasr.demo import pretrain as pretrain
from mmasr.training import streams
from mmasr.training.losses import soft_targets
from mmasr.config import validate
from tests.conftest import tone, write_wav

TINY_MODELS = {
    "whisper": {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "attention_heads": 2, "ffn_dim": 32,
                "num_mel_bins": 16, "chunk_length_s": 1, "max_target_positions": 16},
    "clip": {"image_size": 16, "patch_size": 8, "hidden_size": 16, "layers": 1, "attention_heads": 2,
             "intermediate_size": 32, "projection_dim": 8, "max_position_embeddings": 16},
}
CAPTIONS = ["a red bear", "a red pear", "two red bears", "a blue bear", "a blue pear", "two blue pears"]
COLOURS = {"red": (200, 30, 30), "blue": (30, 30, 200)}


@pytest.fixture(autouse=True, scope="module")
def torch_settings():
    """One thread (the tiny models are latency-bound: faster, and immune to a busy machine); the
    global switches training turns on (deterministic algorithms) are restored afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def tiny_cfg(kind: str, **over) -> dict:
    cfg = copy.deepcopy(validate({})["pretrain"][kind])
    cfg.update(steps=6, batch_size=4, warmup=2, checkpoint_every=2, eval_every=3, lr=3e-3)
    if kind == "whisper":
        cfg["eval_utts"] = 4
    cfg.update(over)
    return cfg


def _picture(path, caption: str) -> None:
    from PIL import Image, ImageDraw

    count, colour, noun = caption.split()
    img = Image.new("RGB", (32, 32), (240, 240, 240))
    draw = ImageDraw.Draw(img)
    n = 1 if count == "a" else 2
    for k in range(n):
        box = (2 + 14 * k, 8, 14 + 14 * k, 24)
        (draw.ellipse if noun.startswith("bear") else draw.rectangle)(box, fill=COLOURS[colour])
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Tiny demo models plus a manifest of 16 utterances: 10 train, 3 dev, 3 test (other speakers);
    dev/test rows have their own audio files and picture ids, so any read of them can be told apart."""
    from mmasr.demo.models import build_demo_models

    root = tmp_path_factory.mktemp("pretrain")
    build_demo_models(root / "init", TINY_MODELS, seed=0)
    rows = []
    for i in range(16):
        split = "train" if i < 10 else ("dev" if i < 13 else "test")
        text = CAPTIONS[i % len(CAPTIONS)]
        image_id = f"img_{CAPTIONS.index(text)}" if split == "train" else f"held_{i}"
        audio = root / "audio" / f"u{i:02d}.wav"
        write_wav(audio, tone(0.4, freq=150 + 40 * (i % len(CAPTIONS)), lead=0.05, tail=0.05))
        _picture(root / "images" / f"{image_id}.png", text)
        rows.append({"utt_id": f"u{i:02d}", "speaker": f"S{i % 5 if split == 'train' else 9 + i}",
                     "group": "impaired" if i % 2 else "control", "audio_path": str(audio), "duration_s": 0.5,
                     "text": text, "image_id": image_id, "split": split,
                     "source": "demo"})
    return {"root": root, "manifest": pd.DataFrame(rows), "text": validate({})["text"]}


def run_whisper(corpus, out, cfg, **kw):
    return pretrain.train_whisper(corpus["root"] / "init" / "whisper", corpus["manifest"], out / "model",
                                  out / "loss.csv", out / "state", cfg, seed=3, device="cpu", progress=False, **kw)


def run_clip(corpus, out, cfg, **kw):
    return pretrain.train_clip(corpus["root"] / "init" / "clip", corpus["manifest"], corpus["root"] / "images",
                               out / "model", out / "loss.csv", out / "state", cfg, seed=3,
                               text_cfg=corpus["text"], device="cpu", progress=False, **kw)


# ------------------------------------------------------------------ pure helpers


def test_augmentation_is_seeded_keeps_shape_and_input():
    feats = torch.randn(3, 16, 50)
    before = feats.clone()
    aug = validate({})["pretrain"]["whisper"]["augment"]
    x = pretrain.augment_features(feats, [40, 30, 50], np.random.default_rng(0), aug)
    y = pretrain.augment_features(feats, [40, 30, 50], np.random.default_rng(0), aug)
    assert x.shape == feats.shape and torch.equal(x, y) and torch.equal(feats, before)
    assert not torch.equal(x, feats)
    # Gain alone is an exact shift of Whisper's (log10(power) + 4) / 4 features: g dB -> g / 40.
    gain_only = {**{k: 0 for k in aug}, "gain_db": 6.0}
    g = pretrain.augment_features(feats, [50] * 3, np.random.default_rng(1), gain_only) - feats
    assert torch.allclose(g, g[:, :1, :1].expand_as(g), atol=1e-6) and g.abs().max() <= 6.0 / 40 + 1e-6


def test_vtlp_positions_identity_and_direction():
    assert np.allclose(pretrain.vtlp_positions(80, 1.0), np.arange(80))
    up = pretrain.vtlp_positions(80, 1.1)  # features move up: bin m reads a lower bin
    assert np.all(up[1:-1] <= np.arange(80)[1:-1] + 1e-9) and np.all(np.diff(up) >= 0)


def test_hard_negatives_are_one_word_neighbours():
    caps = ["a red bear", "a red pear", "two red bears", "a blue bear", "an image showing bear"]
    nb = pretrain.one_word_neighbours(caps)
    assert nb[0] == [1, 3] and nb[1] == [0] and nb[2] == [] and nb[4] == []
    assert pretrain.clip_pool([0], nb, True).tolist() == [0, 1, 3]
    assert pretrain.clip_pool([0], nb, False).tolist() == [0]
    # per_anchor: that many neighbours per anchor, drawn with the step's generator
    many = [[1, 2, 3, 4, 5], [0], [0], [0], [0], [0]]
    drawn = pretrain.clip_pool([0], many, True, 2, np.random.default_rng(0))
    assert len(drawn) == 3 and drawn[0] == 0 and set(drawn[1:].tolist()) <= {1, 2, 3, 4, 5}
    assert drawn.tolist() == pretrain.clip_pool([0], many, True, 2, np.random.default_rng(0)).tolist()
    assert pretrain.clip_pool([1], many, True, 2, np.random.default_rng(0)).tolist() == [0, 1]  # fewer: all
    with pytest.raises(ValueError, match="rng"):
        pretrain.clip_pool([0], many, True, 2)
    t = soft_targets(["p1", "p1", "p2"], ["x", "y", "z"])  # pairs 0 and 1 show the same picture
    assert torch.allclose(t, torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))


def test_intro_words_make_neither_hard_negatives_nor_negatives():
    from mmasr.demo.corpus import INTRO_WORDS

    caps = ["i see two red bears", "we got two red bears", "two red bears", "i caught two red pears"]
    content = [pretrain.picture_words(c, INTRO_WORDS) for c in caps]
    assert content == ["two red bears", "two red bears", "two red bears", "two red pears"]
    nb = pretrain.one_word_neighbours(content)
    assert nb == [[3], [3], [3], [0, 1, 2]]  # only the noun makes a hard negative
    t = soft_targets(["p0", "p1", "p2", "p3"], content)
    assert torch.allclose(t[0], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))  # same picture words: positives


def test_retrieval_r1_and_chance():
    sim = np.array([[0.9, 0.1, 0.0], [0.2, 0.1, 0.8]])
    match = np.array([[True, False, False], [False, True, False]])
    assert pretrain.retrieval_r1(sim, match) == (0.5, pytest.approx(1 / 3))


# ------------------------------------------------------------------ training data


def test_training_reads_only_the_train_split(corpus, tmp_path, monkeypatch):
    manifest = corpus["manifest"]
    train_ids = set(manifest.loc[manifest["split"] == "train", "utt_id"])
    assert set(pretrain.whisper_training_items(manifest)["utt_id"]) == train_ids
    pairs = pretrain.clip_training_pairs(manifest, corpus["root"] / "images", corpus["text"])
    train_images = set(manifest.loc[manifest["split"] == "train", "image_id"])
    assert set(pairs["image_id"]) <= train_images

    import mmasr.data.audio

    read, original = [], mmasr.data.audio.read_audio
    monkeypatch.setattr(mmasr.data.audio, "read_audio", lambda p: read.append(p) or original(p))
    opened, original_pixels = [], pretrain._pixels
    monkeypatch.setattr(pretrain, "_pixels", lambda b, paths, **k: opened.extend(paths) or original_pixels(b, paths, **k))
    # With the held-out monitoring off, nothing but train files may be read.
    run_whisper(corpus, tmp_path / "w", tiny_cfg("whisper", eval_every=0, steps=2))
    run_clip(corpus, tmp_path / "c", tiny_cfg("clip", eval_every=0, steps=2))
    train_audio = set(manifest.loc[manifest["split"] == "train", "audio_path"])
    assert read and set(read) <= train_audio
    assert opened and {p.rsplit("/", 1)[-1][:-4] for p in opened} <= train_images


def test_whisper_groups_keep_only_those_train_speakers(corpus):
    manifest = corpus["manifest"]
    train = manifest[manifest["split"] == "train"]
    control = pretrain.whisper_training_items(manifest, ["control"])
    assert set(control["utt_id"]) == set(train.loc[train["group"] == "control", "utt_id"])
    assert len(control) < len(pretrain.whisper_training_items(manifest)) == len(train)
    assert set(pretrain.whisper_training_items(manifest, ["control", "impaired"])["utt_id"]) == set(train["utt_id"])
    with pytest.raises(ValueError, match="group.*nobody"):
        pretrain.whisper_training_items(manifest, ["nobody"])


def test_no_train_rows_is_an_error(corpus):
    with pytest.raises(ValueError, match="train"):
        pretrain.whisper_training_items(corpus["manifest"].assign(split="test"))


# ------------------------------------------------------------------ training runs


def test_whisper_loss_decreases(corpus, tmp_path):
    cfg = tiny_cfg("whisper", steps=40, warmup=4, lr=1e-2, eval_every=20, checkpoint_every=40)
    summary = run_whisper(corpus, tmp_path, cfg)
    log = pd.read_csv(tmp_path / "loss.csv")
    assert list(log.columns) == ["step", "lr", "loss", "train_loss_noaug", "dev_loss"]
    assert log["step"].tolist() == list(range(1, 41))
    assert log["loss"].tail(5).mean() < 0.6 * log["loss"].head(5).mean()
    manifest = corpus["manifest"]
    n_control_train = int(((manifest["split"] == "train") & (manifest["group"] == "control")).sum())
    assert summary["whisper_steps"] == 40 and summary["whisper_n_train_utts"] == n_control_train < 10
    assert summary["whisper_train_groups"] == ["control"]  # the default pretrain.whisper.groups


def test_whisper_resume_equals_uninterrupted(corpus, tmp_path):
    cfg = tiny_cfg("whisper", eval_every=0)
    run_whisper(corpus, tmp_path / "full", cfg)
    # "Killed" after step 5: the newest checkpoint is step 4, so step 5 is redone after resuming.
    assert run_whisper(corpus, tmp_path / "cut", cfg, stop_after=5) is None
    assert not (tmp_path / "cut" / "model").exists()
    assert sorted(p.name for p in (tmp_path / "cut" / "state").glob("step-*")) == ["step-000002", "step-000004"]
    run_whisper(corpus, tmp_path / "cut", cfg)
    full = load_file(tmp_path / "full" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert (tmp_path / "full" / "loss.csv").read_text() == (tmp_path / "cut" / "loss.csv").read_text()


def test_clip_resume_equals_uninterrupted_and_loss_decreases(corpus, tmp_path):
    cfg = tiny_cfg("clip", eval_every=0)
    run_clip(corpus, tmp_path / "full", cfg)
    assert run_clip(corpus, tmp_path / "cut", cfg, stop_after=3) is None
    run_clip(corpus, tmp_path / "cut", cfg)
    full = load_file(tmp_path / "full" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert (tmp_path / "full" / "loss.csv").read_text() == (tmp_path / "cut" / "loss.csv").read_text()

    # fresh_scenes off: the fixture's pictures are not drawn like the demo's, so fresh demo scenes would not teach them
    longer = tiny_cfg("clip", steps=40, warmup=4, eval_every=20, checkpoint_every=40, fresh_scenes=0)
    summary = run_clip(corpus, tmp_path / "long", longer)
    log = pd.read_csv(tmp_path / "long" / "loss.csv")
    assert log["loss"].tail(5).mean() < 0.6 * log["loss"].head(5).mean()
    assert (log["logit_scale"] <= 100.0 + 1e-4).all()
    assert summary["clip_train_r1"] > 0.5


def test_fresh_scenes_are_new_seeded_pictures_of_the_captions_object(corpus):
    from mmasr.demo import corpus as demo
    from mmasr.models.loading import load_clip

    bundle = load_clip(str(corpus["root"] / "init" / "clip"), device="cpu")
    captions = ["we got two red bears", "the dog"]
    views = pretrain.fresh_scene_views(bundle, captions, 3, seed=5)
    assert views.shape[:2] == (2, 3) and views.shape[2:] == (3, 16, 16)
    assert not torch.equal(views[0, 0], views[0, 1])  # new pictures, not copies
    assert torch.equal(views[1, 0], views[1, 2])  # a blank picture: names no demo object (never sampled)
    assert torch.equal(views, pretrain.fresh_scene_views(bundle, captions, 3, seed=5))  # seeded
    # what is drawn: the caption's object as said, among 1-4 objects
    rng = np.random.default_rng([5, streams.CLIP_FRESH_SCENES, 0, 0])
    scene = demo.plan_scene(demo.parse_phrase(captions[0]), pretrain.FRESH_SCENE_CONFIG, rng)
    assert scene.agrees and scene.objects[scene.described] == demo.ObjectPhrase("two", "red", "bear")


def test_a_checkpoint_of_another_config_is_not_resumed(corpus, tmp_path):
    run_whisper(corpus, tmp_path, tiny_cfg("whisper", eval_every=0), stop_after=3)
    other = tiny_cfg("whisper", eval_every=0, lr=1e-3)
    run_whisper(corpus, tmp_path, other)
    fresh = tmp_path / "fresh"
    run_whisper(corpus, fresh, other)
    a, b = (load_file(p / "model" / "model.safetensors") for p in (tmp_path, fresh))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ the trained models load like real ones


def test_trained_models_load_through_the_pipeline_loaders(corpus, tmp_path):
    from mmasr.models import loading as models

    run_whisper(corpus, tmp_path / "w", tiny_cfg("whisper", steps=2, eval_every=0))
    run_clip(corpus, tmp_path / "c", tiny_cfg("clip", steps=2, eval_every=0))
    w = models.load_whisper(str(tmp_path / "w" / "model"), device="cpu")
    init = models.load_whisper(str(corpus["root"] / "init" / "whisper"), device="cpu")
    assert w.model.generation_config.to_dict() == init.model.generation_config.to_dict()
    assert models.whisper_prompt_ids(w, None) == models.whisper_prompt_ids(init, None)
    feats = models.whisper_features(w, [tone(0.4, lead=0.05, tail=0.05)])
    out = w.model.generate(**feats, num_beams=2, num_return_sequences=2, max_new_tokens=4)
    assert out.shape[0] == 2
    assert not torch.equal(w.model.model.encoder.conv1.weight, init.model.model.encoder.conv1.weight)
    training = json.loads((tmp_path / "w" / "model" / "training.json").read_text())
    assert training["steps"] == 2 and training["seed"] == 3

    c = models.load_clip(str(tmp_path / "c" / "model"), device="cpu")
    assert models.clip_text_embeddings(c, ["a red bear"]).shape == (1, 8)
    r = pretrain.clip_caption_to_picture_r1(c, corpus["manifest"], "train", corpus["root"] / "images", corpus["text"])
    assert r["n_captions"] == len(CAPTIONS) and r["chance"] == pytest.approx(1 / len(CAPTIONS))


def test_cli_smoke_run_writes_model_log_and_metrics(corpus, tmp_path):
    from mmasr.cli import main

    manifest = tmp_path / "manifest.parquet"
    corpus["manifest"].to_parquet(manifest)
    cfg = json.dumps({"seed": 3, "models": {"device": "cpu"},
                      "pretrain": {"whisper": tiny_cfg("whisper"), "clip": tiny_cfg("clip")}})
    common = ["--cfg", cfg, "--manifest", str(manifest), "--max-steps", "2", "--quiet"]
    assert main(["pretrain-whisper", *common, "--init", str(corpus["root"] / "init" / "whisper"),
                 "--out", str(tmp_path / "w"), "--log-csv", str(tmp_path / "w.csv"),
                 "--metrics", str(tmp_path / "w.json"), "--checkpoint-dir", str(tmp_path / "ws")]) == 0
    assert main(["pretrain-clip", *common, "--init", str(corpus["root"] / "init" / "clip"),
                 "--images-dir", str(corpus["root"] / "images"), "--out", str(tmp_path / "c"),
                 "--log-csv", str(tmp_path / "c.csv"), "--metrics", str(tmp_path / "c.json"),
                 "--checkpoint-dir", str(tmp_path / "cs")]) == 0
    w = json.loads((tmp_path / "w.json").read_text())
    c = json.loads((tmp_path / "c.json").read_text())
    assert w["whisper_steps"] == 2 and w["whisper_train_seconds"] > 0
    assert c["clip_steps"] == 2 and c["clip_test_n_captions"] == 3 and c["clip_test_chance_r1"] == pytest.approx(1 / 3)
    assert len(pd.read_csv(tmp_path / "w.csv")) == 2 and (tmp_path / "c" / "config.json").is_file()


@pytest.mark.parametrize("pictures", ["none", "held_out_only"])
def test_clip_without_train_pictures_keeps_the_random_init_and_says_why(corpus, tmp_path, pictures):
    """TORGO has no pictures (every image_id missing); a user's corpus may have them for held-out speakers
    only. Neither can train CLIP contrastively: the init is published unchanged, with the reason."""
    manifest = corpus["manifest"].copy()
    manifest.loc[manifest["split"] == "train" if pictures == "held_out_only" else slice(None), "image_id"] = None
    init = corpus["root"] / "init" / "clip"
    summary = pretrain.train_clip(init, manifest, corpus["root"] / "images", tmp_path / "model", tmp_path / "loss.csv",
                                  tmp_path / "state", tiny_cfg("clip"), seed=3, text_cfg=corpus["text"], device="cpu",
                                  progress=False)
    assert summary["clip_skipped"] and summary["clip_steps"] == 0 and summary["clip_n_train_pairs"] == 0
    reason = summary["clip_skip_reason"]
    assert "no train-split (picture, caption) pairs" in reason
    assert ("no dev or test utterance has a picture" in reason) == (pictures == "none")
    assert ("3 test" in reason) == (pictures == "held_out_only")
    assert json.loads(json.dumps(summary)) == summary  # JSON-ready
    saved, original = (load_file(p / "model.safetensors") for p in (tmp_path / "model", init))
    assert all(torch.equal(saved[k], original[k]) for k in original)
    assert json.loads((tmp_path / "model" / "training.json").read_text())["skipped"] is True
    log = pd.read_csv(tmp_path / "loss.csv")
    assert log.empty and list(log.columns) == pretrain.CLIP_LOG_COLUMNS
    for split in ("train", "dev", "test"):
        assert pretrain.caption_picture_pairs(manifest.assign(image_id=None), split, corpus["root"] / "images",
                                              corpus["text"]).columns.tolist() == ["caption", "image_id", "path"]


def test_cli_pretrain_clip_without_pictures_writes_a_skipped_summary(corpus, tmp_path):
    from mmasr.cli import main

    manifest = tmp_path / "manifest.parquet"
    corpus["manifest"].assign(image_id=None).to_parquet(manifest)
    cfg = json.dumps({"seed": 3, "models": {"device": "cpu"}, "pretrain": {"clip": tiny_cfg("clip")}})
    assert main(["pretrain-clip", "--cfg", cfg, "--manifest", str(manifest), "--quiet",
                 "--init", str(corpus["root"] / "init" / "clip"), "--images-dir", str(corpus["root"] / "images"),
                 "--out", str(tmp_path / "c"), "--log-csv", str(tmp_path / "c.csv"), "--metrics", str(tmp_path / "c.json"),
                 "--checkpoint-dir", str(tmp_path / "cs")]) == 0
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["clip_skipped"] and c["clip_test_r1"] is None and c["clip_test_n_pictures"] == 0
    assert (tmp_path / "c" / "config.json").is_file()
