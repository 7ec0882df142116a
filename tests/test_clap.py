"""CLAP: loss, retrieval metrics with duplicate texts, layer selection, encoders (HuBERT, Whisper, AST),
the embedding cache, training with checkpoint/resume (both phases) and the evaluation contract."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mmasr.clap.cache import build_cache, load_cache, write_cache
from mmasr.clap.evaluate import evaluate_retrieval
from mmasr.clap.train import LOGIT_SCALE_INIT, ClapHeads, clap_loss, train_clap
from mmasr.config import validate
from mmasr.models.layers import embed_audio, embed_text, quartile_layers, select_layers
from mmasr.models.loading import ModelLoadError, load_audio_encoder, load_text_encoder
from mmasr.metrics.retrieval import chance_recall, first_relevant_rank, recall_curve, retrieval_metrics
from mmasr.training.losses import LN_100, soft_targets
from tests.conftest import save_tiny_ast, tone, write_wav

RETRIEVAL_KEYS = [f"{p}{d}_{m}" for p in ("", "zeroshot_") for d in ("a2t", "t2a")
                  for m in ("r1", "r5", "r10", "map10", "mean_rank", "median_rank")] + ["chance_r1", "n_candidates"]


def clap_cfg(**over) -> dict:
    return {**validate({})["clap"], **over}


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def test_loss_matches_the_direct_formula():
    g = torch.Generator().manual_seed(0)
    a, t = unit(torch.randn(4, 3, generator=g)), unit(torch.randn(4, 3, generator=g))
    s = torch.tensor(math.log(20.0))
    scale = 20.0
    a2t = [-math.log(math.exp(scale * float(a[i] @ t[i])) / sum(math.exp(scale * float(a[i] @ t[j])) for j in range(4)))
           for i in range(4)]
    t2a = [-math.log(math.exp(scale * float(t[i] @ a[i])) / sum(math.exp(scale * float(t[i] @ a[j])) for j in range(4)))
           for i in range(4)]
    expected = 0.5 * (np.mean(a2t) + np.mean(t2a))
    assert float(clap_loss(a, t, s)) == pytest.approx(expected, rel=1e-5)
    # the diagonal as explicit targets is the same loss
    assert float(clap_loss(a, t, s, torch.eye(4))) == pytest.approx(expected, rel=1e-5)


def test_duplicate_texts_are_positives_of_each_other():
    """Two audios saying the same text: each has two correct text columns, weighted half each."""
    g = torch.Generator().manual_seed(1)
    a, t = unit(torch.randn(3, 4, generator=g)), unit(torch.randn(3, 4, generator=g))
    t = torch.stack([t[0], t[0], t[2]])  # rows 0 and 1 carry the same text
    targets = soft_targets([0, 0, 2], [0, 0, 2])
    assert targets.tolist() == [[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]]
    logits = 10.0 * a @ t.T
    lp_a, lp_t = logits.log_softmax(1), logits.T.log_softmax(1)
    expected = 0.5 * (-(targets * lp_a).sum(1).mean() - (targets * lp_t).sum(1).mean())
    assert float(clap_loss(a, t, torch.tensor(math.log(10.0)), targets)) == pytest.approx(float(expected), rel=1e-5)


def test_logit_scale_starts_at_ln_1_over_0_07_and_is_clamped_at_ln_100():
    heads = ClapHeads(8, 6, 5, 4)
    assert float(heads.logit_scale.detach()) == pytest.approx(math.log(1 / 0.07)) == pytest.approx(LOGIT_SCALE_INIT)
    g = torch.Generator().manual_seed(2)
    a, t = unit(torch.randn(5, 4, generator=g)), unit(torch.randn(5, 4, generator=g))
    high = torch.tensor(8.0, requires_grad=True)  # exp(8) ~ 2981, clamped to 100
    loss = clap_loss(a, t, high)
    assert float(loss.detach()) == pytest.approx(float(clap_loss(a, t, torch.tensor(LN_100))), rel=1e-6)
    loss.backward()
    assert float(high.grad) == 0.0  # beyond the clamp the scale gets no gradient
    assert float(clap_loss(a, t, torch.tensor(2.0))) != pytest.approx(float(clap_loss(a, t, torch.tensor(LN_100))))


def test_heads_output_unit_vectors_of_the_configured_sizes():
    heads = ClapHeads(12, 10, 7, 5)
    a, t = heads.audio(torch.randn(3, 12)), heads.text(torch.randn(2, 10))
    assert a.shape == (3, 5) and t.shape == (2, 5)
    assert torch.allclose(a.norm(dim=1), torch.ones(3)) and torch.allclose(t.norm(dim=1), torch.ones(2))
    assert heads.dims() == {"audio_dim": 12, "text_dim": 10, "hidden_dim": 7, "embed_dim": 5}


# --------------------------------------------------------------------------------------------
# Retrieval metrics on hand-made matrices
# --------------------------------------------------------------------------------------------


def test_audio_to_text_over_distinct_texts_counts_the_reference_text_as_the_hit():
    # 4 utterances; distinct texts A, B, C; utterances 0 and 1 both say A (two speakers, one prompt).
    sim = np.array([[0.9, 0.1, 0.2],    # says A: rank 1
                    [0.3, 0.8, 0.1],    # says A: rank 2
                    [0.1, 0.2, 0.7],    # says B: rank 2 (C above)
                    [0.5, 0.4, 0.3]])   # says C: rank 3
    says = np.array([0, 0, 1, 2])
    relevant = says[:, None] == np.arange(3)[None, :]
    assert first_relevant_rank(sim, relevant).tolist() == [1, 2, 2, 3]
    m = retrieval_metrics(sim, relevant, ks=(1, 2, 5))
    assert m["r1"] == 0.25 and m["r2"] == 0.75 and m["r5"] == 1.0
    assert m["map10"] == pytest.approx(np.mean([1, 1 / 2, 1 / 2, 1 / 3]))
    assert m["mean_rank"] == 2.0 and m["median_rank"] == 2.0
    assert recall_curve(sim, relevant, 3) == [0.25, 0.75, 1.0]


def test_text_to_audio_with_several_correct_audios():
    # text A is said by audios 0 and 1, text B by audio 2: queries = distinct texts, candidates = audios.
    sim = np.array([[0.9, 0.2, 0.5, 0.7],   # A: ranking 0 (hit), 3, 2, 1 (hit)
                    [0.1, 0.2, 0.3, 0.6]])  # B: ranking 3, 2 (hit)
    relevant = np.array([[1, 1, 0, 0], [0, 0, 1, 0]], bool)
    m = retrieval_metrics(sim, relevant)
    assert m["r1"] == 0.5 and m["r5"] == 1.0
    ap_a = (1 / 1 + 2 / 4) / 2  # hits at positions 1 and 4
    ap_b = 1 / 2
    assert m["map10"] == pytest.approx((ap_a + ap_b) / 2)
    assert m["mean_rank"] == 1.5


def test_ties_count_against_the_model_so_a_collapsed_model_is_not_rewarded():
    sim = np.zeros((3, 5))
    relevant = np.eye(3, 5, dtype=bool)
    assert first_relevant_rank(sim, relevant).tolist() == [5, 5, 5]
    assert retrieval_metrics(sim, relevant)["r1"] == 0.0


def test_map_at_10_ignores_hits_beyond_10():
    sim = -np.arange(12, dtype=float)[None, :]  # candidate j at rank j + 1
    relevant = np.zeros((1, 12), bool)
    relevant[0, [0, 11]] = True  # hits at ranks 1 and 12
    assert retrieval_metrics(sim, relevant)["map10"] == pytest.approx(1 / 2)  # (1/1) / min(2, 10)


def test_chance_levels():
    one = np.eye(4, 10, dtype=bool)  # one correct among 10
    assert chance_recall(one, 1) == pytest.approx(0.1) and chance_recall(one, 5) == pytest.approx(0.5)
    two = np.zeros((1, 4), bool)
    two[0, :2] = True  # two correct among 4: miss both in the top 2 with probability (2/4)(1/3)
    assert chance_recall(two, 2) == pytest.approx(1 - 1 / 6)
    assert chance_recall(two, 4) == 1.0


def test_metrics_reject_queries_without_a_correct_candidate():
    with pytest.raises(ValueError, match="relevant"):
        retrieval_metrics(np.zeros((2, 3)), np.array([[1, 0, 0], [0, 0, 0]], bool))
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(np.zeros((2, 3)), np.ones((3, 2), bool))


# --------------------------------------------------------------------------------------------
# Layer selection and encoders
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, expected", [(12, [3, 6, 9, 12]), (24, [6, 12, 18, 24]), (48, [12, 24, 36, 48]),
                                         (2, [1, 1, 2, 2]), (1, [1, 1, 1, 1])])
def test_quartile_layers(n, expected):
    """hidden_states indices (0 = embeddings): for 12 layers the outputs of layers 2, 5, 8, 11 counted from 0."""
    assert quartile_layers(n) == expected
    assert select_layers("quartiles", n) == expected


def test_layer_selection_last_and_explicit():
    assert select_layers("last", 12) == [12]
    assert select_layers([0, 4], 12) == [0, 4]
    with pytest.raises(ValueError, match="out of range"):
        select_layers([13], 12)
    with pytest.raises(ValueError):
        select_layers("first", 12)


def save_tiny_hubert(folder: Path, stable: bool) -> Path:
    """A random tiny HuBERT (group-norm feature encoder like hubert-base, or layer-norm with an
    attention mask like hubert-large) saved with save_pretrained: the HuBERT path offline."""
    from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    torch.manual_seed(0)
    config = HubertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                          conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                          num_conv_pos_embedding_groups=4, do_stable_layer_norm=stable,
                          feat_extract_norm="layer" if stable else "group")
    HubertModel(config).eval().save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=stable).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("stable", [False, True])
def test_hubert_encoder_gives_padding_independent_quartile_embeddings(tmp_path, stable):
    bundle = load_audio_encoder(str(save_tiny_hubert(tmp_path / "hubert", stable)), device="cpu")
    assert bundle.model.config.model_type == "hubert"
    layers = select_layers("quartiles", 4)
    audios = [tone(0.4, freq=200, lead=0.05, tail=0.05), tone(0.9, freq=300, lead=0.05, tail=0.05)]
    batched = embed_audio(bundle, audios, layers, batch_size=8)
    alone = np.concatenate([embed_audio(bundle, [a], layers) for a in audios])
    assert batched.shape == (2, 4 * 32)
    np.testing.assert_allclose(batched, alone, atol=1e-4)  # the short one's padding is never pooled
    # the quartile blocks are the layers' own mean-pooled states
    with torch.no_grad():
        from transformers import Wav2Vec2FeatureExtractor

        fe = Wav2Vec2FeatureExtractor.from_pretrained(tmp_path / "hubert")
        x = fe(audios[1], sampling_rate=16000, return_tensors="pt")["input_values"]
        states = bundle.model(x, output_hidden_states=True).hidden_states
    np.testing.assert_allclose(alone[1, :32], states[1][0].mean(0).numpy(), atol=1e-5)
    np.testing.assert_allclose(alone[1, 96:], states[4][0].mean(0).numpy(), atol=1e-5)


def test_the_frame_count_still_comes_from_transformers_private_helper(tmp_path):
    """``models.layers.audio_inputs`` counts the encoder frames that cover each utterance with the
    private ``model._get_feat_extract_output_lengths`` of the HuBERT/wav2vec 2.0 models (no public API
    gives it, and padding makes the output length no answer). This pins that it exists and equals the
    number of frames the model outputs for unpadded audio of each length, so a transformers upgrade
    that renames or changes it fails here by name."""
    from mmasr.models.layers import audio_inputs

    bundle = load_audio_encoder(str(save_tiny_hubert(tmp_path / "hubert", False)), device="cpu")
    helper = getattr(bundle.model, "_get_feat_extract_output_lengths", None)
    assert callable(helper), "transformers' HubertModel no longer has _get_feat_extract_output_lengths"
    rng = np.random.default_rng(0)
    for n in (400, 1601, 4000, 7999):
        audio = (0.1 * rng.standard_normal(n)).astype(np.float32)
        with torch.no_grad():
            out = bundle.model(torch.from_numpy(audio)[None]).last_hidden_state.shape[1]
        assert int(helper(torch.tensor([n]))[0]) == out, \
            f"_get_feat_extract_output_lengths({n}) no longer equals the {out} frames the model outputs"
        assert int(audio_inputs(bundle, [audio])[1][0].sum()) == out  # the pooled frames


def test_whisper_encoder_path_pools_only_the_audio_frames(demo_model_dirs):
    bundle = load_audio_encoder(str(demo_model_dirs["whisper"]), device="cpu")
    assert bundle.model.config.model_type == "whisper" and type(bundle.model).__name__ == "WhisperEncoder"
    layers = select_layers("quartiles", 2)
    short, long = tone(0.3, lead=0.05, tail=0.05), tone(1.5, freq=300, lead=0.05, tail=0.05)
    batched = embed_audio(bundle, [short, long], layers, batch_size=2)
    np.testing.assert_allclose(batched[0], embed_audio(bundle, [short], layers)[0], atol=1e-5)
    assert batched.shape == (2, 4 * 128)
    # frames beyond the audio (padding) are left out: the pooled vector differs from a full-window mean
    with torch.no_grad():
        feats = bundle.processor([short], sampling_rate=16000, return_tensors="pt")["input_features"]
        full = bundle.model(feats).last_hidden_state[0].mean(0).numpy()
    assert not np.allclose(batched[0, -128:], full, atol=1e-3)


def save_tiny_bert(folder: Path) -> Path:
    from transformers import BertConfig, BertModel

    from mmasr.demo.models import demo_vocabulary
    from mmasr.demo.text_models import build_bert_tokenizer

    tok = build_bert_tokenizer(demo_vocabulary(), 32)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("bert") / "bert")


def test_text_encoder_cls_and_mean_pooling_ignore_padding(bert_dir):
    bundle = load_text_encoder(str(bert_dir), device="cpu")
    layers = select_layers("quartiles", 2)
    texts = ["a red bear", "three green goats near a blue pear"]
    for pooling in ("cls", "mean"):
        both = embed_text(bundle, texts, layers, pooling)
        alone = embed_text(bundle, texts[:1], layers, pooling)
        assert both.shape == (2, 4 * 16)
        np.testing.assert_allclose(both[0], alone[0], atol=1e-5)
    assert not np.allclose(embed_text(bundle, texts[:1], layers, "cls"), embed_text(bundle, texts[:1], layers, "mean"))
    with pytest.raises(ValueError, match="pooling"):
        embed_text(bundle, texts, layers, "max")


def test_encoder_loaders_refuse_the_wrong_kind_of_model(demo_model_dirs, bert_dir):
    with pytest.raises(ModelLoadError, match="model_type='bert'"):
        load_audio_encoder(str(bert_dir), device="cpu")
    with pytest.raises(ModelLoadError, match="model_type='clip'"):
        load_text_encoder(str(demo_model_dirs["clip"]), device="cpu")


# --------------------------------------------------------------------------------------------
# Cache, training, resume, evaluation
# --------------------------------------------------------------------------------------------


def synthetic_cache(folder: Path, n_texts: int = 6, per_text: int = 6, dim: int = 16, seed: int = 0):
    """Audio embeddings that are a fixed linear map of their text's embedding plus noise (learnable);
    each text read by ``per_text`` speakers; speakers 0-3 train, 4 dev, 5 test."""
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(n_texts, dim)).astype(np.float32)
    mix = rng.normal(size=(dim, dim + 4)).astype(np.float32)
    rows = []
    audio = []
    for spk in range(per_text):
        for t in range(n_texts):
            audio.append(text[t] @ mix + 0.3 * rng.normal(size=dim + 4))
            rows.append({"utt_id": f"s{spk}_{t}", "speaker": f"s{spk}", "group": "control",
                         "split": "train" if spk < 4 else ("dev" if spk == 4 else "test"), "text": f"text {t}",
                         "text_row": t, "audio_path": "", "duration_s": 1.0})
    meta = {"audio_encoder": "synthetic", "audio_revision": "x", "audio_layers": [1], "audio_pooling": "mean",
            "text_encoder": "synthetic", "text_revision": "y", "text_layers": [1], "text_pooling": "cls"}
    return write_cache(folder, np.array(audio, np.float32), text, pd.DataFrame(rows), [f"text {t}" for t in range(n_texts)],
                       meta)


def test_training_on_the_cache_beats_zero_shot_and_chance(tmp_path):
    cache = synthetic_cache(tmp_path / "cache")
    cfg = clap_cfg(hidden_dim=32, embed_dim=16, epochs=60, batch_size=8, warmup=10, lr=0.005, eval_every=20)
    summary = train_clap(tmp_path / "cache", tmp_path / "out", tmp_path / "log.csv", tmp_path / "state", cfg, 0,
                         progress=False)
    assert summary["clap_steps"] == 60 * 3 and summary["clap_phase2_steps"] == 0
    log = pd.read_csv(tmp_path / "log.csv")
    assert list(log.columns[:5]) == ["step", "lr", "train_loss", "logit_scale", "dev_loss"]
    assert len(log) == 180 and log["dev_loss"].notna().sum() == 9
    assert (log["logit_scale"] <= 100.0 + 1e-4).all()
    assert log["train_loss"].iloc[-20:].mean() < log["train_loss"].iloc[:20].mean()
    metrics, curve = evaluate_retrieval(cache, tmp_path / "out", "test", max_k=4)
    assert set(RETRIEVAL_KEYS) <= set(metrics)
    assert metrics["n_candidates"] == 6 and metrics["n_candidate_audios"] == 6
    assert metrics["chance_r1"] == pytest.approx(1 / 6)
    for d in ("a2t", "t2a"):
        assert metrics[f"{d}_r1"] >= 0.8 > metrics[f"zeroshot_{d}_r1"] + 0.3, metrics
    assert list(curve.columns) == ["direction", "model", "k", "recall"] and len(curve) == 2 * 2 * 4
    assert set(curve["model"]) == {"zeroshot", "trained"} and curve["recall"].between(0, 1).all()
    for _, part in curve.groupby(["direction", "model"]):
        assert part["recall"].is_monotonic_increasing


def test_resume_after_a_kill_gives_the_same_weights(tmp_path):
    synthetic_cache(tmp_path / "cache")
    cfg = clap_cfg(hidden_dim=16, embed_dim=8, epochs=4, batch_size=8, warmup=2, checkpoint_every=4, eval_every=5)
    args = (tmp_path / "cache",)
    train_clap(*args, tmp_path / "a", tmp_path / "a.csv", tmp_path / "state_a", cfg, 3, progress=False)
    assert train_clap(*args, tmp_path / "b", tmp_path / "b.csv", tmp_path / "state_b", cfg, 3, stop_after=6,
                      progress=False) is None
    assert not (tmp_path / "b").exists()  # a killed run leaves no model
    assert (tmp_path / "state_b" / "phase1" / "step-000004").is_dir()
    train_clap(*args, tmp_path / "b", tmp_path / "b.csv", tmp_path / "state_b", cfg, 3, progress=False)
    for name in ("model.safetensors", "init.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    # another config does not resume from these checkpoints
    other = train_clap(*args, tmp_path / "c", tmp_path / "c.csv", tmp_path / "state_b", {**cfg, "lr": 0.01}, 3,
                       progress=False)
    assert other["clap_steps"] == 12
    assert (tmp_path / "c" / "model.safetensors").read_bytes() != (tmp_path / "a" / "model.safetensors").read_bytes()


def tiny_corpus(root: Path) -> pd.DataFrame:
    """Four speakers (train, train, dev, test), two prompts each, as a processed manifest."""
    rows = []
    for s, (spk, split) in enumerate([("A", "train"), ("B", "train"), ("C", "dev"), ("D", "test")]):
        for i, text in enumerate(["A red bear.", "two green goats"]):
            path = write_wav(root / f"{spk}{i}.wav", tone(0.5 + 0.1 * s, freq=150 + 60 * i + 10 * s, lead=0.05, tail=0.05))
            rows.append({"utt_id": f"{spk}_{i}", "speaker": spk, "group": "control", "audio_path": str(path),
                         "duration_s": 0.6 + 0.1 * s, "text": text, "image_id": None, "split": split, "source": "t"})
    return pd.DataFrame(rows)


def test_cache_from_real_encoders_and_phase2_with_resume(tmp_path, demo_model_dirs, bert_dir, caplog):
    """The whole path on tiny real encoders: cache (normalised distinct texts), phase 1 + phase 2
    (the last encoder layer fine-tuned, stored, and used by the evaluation), killed in phase 2 and resumed."""
    p = validate({"models": {"audio_encoder": str(demo_model_dirs["whisper"]), "text_encoder": str(bert_dir),
                             "device": "cpu"}})
    manifest = tiny_corpus(tmp_path / "audio")
    cache = build_cache(manifest, load_audio_encoder(p["models"]["audio_encoder"], device="cpu"),
                        load_text_encoder(p["models"]["text_encoder"], device="cpu"), p["clap"], p["text"],
                        tmp_path / "cache", progress=False)
    assert cache.texts == ["2 green goats", "a red bear"]  # normalised (whisper_english: digits), distinct, sorted
    assert cache.audio.shape == (8, 4 * 128) and cache.text.shape == (2, 4 * 16)
    assert cache.utts["text_row"].tolist() == [1, 0] * 4
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["audio_layers"] == [1, 1, 2, 2] and meta["text_pooling"] == "cls" and meta["audio_revision"].startswith("sha256:")
    assert meta["n_rejected_empty_transcript"] == 0 and len(pd.read_parquet(tmp_path / "cache" / "rejects.parquet")) == 0

    cfg = clap_cfg(hidden_dim=8, embed_dim=8, epochs=2, batch_size=4, warmup=1, phase2_epochs=2, phase2_layers=1,
                   checkpoint_every=1, eval_every=1)
    run = dict(cfg=cfg, seed=0, models_cfg=p["models"], progress=False)
    full = train_clap(tmp_path / "cache", tmp_path / "a", tmp_path / "a.csv", tmp_path / "sa", **run)
    assert full["clap_phase1_steps"] == 2 and full["clap_phase2_steps"] == 2
    assert train_clap(tmp_path / "cache", tmp_path / "b", tmp_path / "b.csv", tmp_path / "sb", stop_after=3, **run) is None
    train_clap(tmp_path / "cache", tmp_path / "b", tmp_path / "b.csv", tmp_path / "sb", **run)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    log = pd.read_csv(tmp_path / "b.csv")
    assert log["step"].tolist() == [1, 2, 3, 4] and log["phase"].tolist() == [1, 1, 2, 2]

    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert any(k.startswith("audio_encoder.layers.1.") for k in state)  # the last layer of each encoder
    assert any(k.startswith("text_encoder.encoder.layer.1.") for k in state)
    assert not any(k.startswith(("audio_encoder.layers.0.", "text_encoder.encoder.layer.0.")) for k in state)
    metrics, _ = evaluate_retrieval(load_cache(tmp_path / "cache"), tmp_path / "a", "test", p["models"])
    assert metrics["fine_tuned_encoders"] is True and metrics["n_candidates"] == 2
    # changing only phase 2 keeps the finished phase 1
    caplog.set_level("INFO")
    shorter = train_clap(tmp_path / "cache", tmp_path / "c", tmp_path / "c.csv", tmp_path / "sa",
                         **{**run, "cfg": {**cfg, "phase2_epochs": 1}})
    assert shorter["clap_phase2_steps"] == 1 and "phase1/step-000002 (step 2)" in caplog.text


def test_cache_and_phase2_on_an_ast_audio_encoder(tmp_path, bert_dir):
    """AST as the CLAP audio encoder: quartile cache of its patch tokens, and phase 2 trains, stores and
    evaluates with its last layer."""
    ast = save_tiny_ast(tmp_path / "ast", layers=4, width=16)
    p = validate({"models": {"audio_encoder": str(ast), "text_encoder": str(bert_dir), "device": "cpu"}})
    cache = build_cache(tiny_corpus(tmp_path / "audio"), load_audio_encoder(str(ast), device="cpu"),
                        load_text_encoder(str(bert_dir), device="cpu"), p["clap"], p["text"], tmp_path / "cache",
                        progress=False)
    assert cache.audio.shape == (8, 4 * 16) and cache.meta["audio_layers"] == [1, 2, 3, 4]
    assert cache.meta["audio_model_type"] == "audio-spectrogram-transformer" and cache.meta["audio_depth"] == 4
    cfg = clap_cfg(hidden_dim=8, embed_dim=8, epochs=1, batch_size=4, warmup=1, phase2_epochs=1, phase2_layers=1,
                   eval_every=1)
    summary = train_clap(tmp_path / "cache", tmp_path / "out", tmp_path / "log.csv", tmp_path / "state", cfg, 0,
                         models_cfg=p["models"], progress=False)
    assert summary["clap_phase2_steps"] == 1

    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert any(k.startswith("audio_encoder.layers.3.") for k in state)
    assert not any(k.startswith(("audio_encoder.layers.2.", "audio_encoder.embeddings.")) for k in state)
    metrics, _ = evaluate_retrieval(load_cache(tmp_path / "cache"), tmp_path / "out", "test", p["models"])
    assert metrics["fine_tuned_encoders"] is True

def test_evaluation_refuses_a_checkpoint_of_another_cache(tmp_path):
    synthetic_cache(tmp_path / "c1", seed=0)
    other = synthetic_cache(tmp_path / "c2", seed=1)
    train_clap(tmp_path / "c1", tmp_path / "out", tmp_path / "log.csv", tmp_path / "state",
               clap_cfg(hidden_dim=8, embed_dim=8, epochs=1, batch_size=8), 0, progress=False)
    with pytest.raises(ValueError, match="another embedding cache"):
        evaluate_retrieval(other, tmp_path / "out")


def test_cli_names_a_missing_cache(tmp_path, caplog):
    from mmasr.cli import main

    code = main(["eval-retrieval", "--cache", str(tmp_path / "nope"), "--checkpoint", str(tmp_path), "--quiet"])
    assert code == 2
    assert f"{tmp_path / 'nope'}/embeddings.safetensors: no CLAP embedding cache" in caplog.text


def test_empty_transcripts_get_a_rejects_row():
    from mmasr.clap.cache import cache_items, empty_transcript_rejects

    manifest = pd.DataFrame({"utt_id": ["u1", "u2", "u3"], "text": ["a red bear", "um, uh!", None],
                             "audio_path": ["a.wav", "b.wav", "c.wav"], "speaker": "s", "group": "control",
                             "split": "train", "duration_s": 1.0})
    utts, _ = cache_items(manifest, validate({})["text"])
    rejects = empty_transcript_rejects(manifest, utts)
    assert utts["utt_id"].tolist() == ["u1"]
    assert rejects[["id", "path", "kind", "stage", "reason"]].values.tolist() == [
        ["u2", "b.wav", "utterance", "clap_embeddings", "empty_transcript"],
        ["u3", "c.wav", "utterance", "clap_embeddings", "empty_transcript"]]
