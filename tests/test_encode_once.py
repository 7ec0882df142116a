"""One encoder pass per (encoder, utterance) (mmasr.models.encode_once, issue 29 item 1): when models.whisper and
models.audio_encoder are the same encoder, encode-audio --pooled runs it once and layer-embeddings and clap-embeddings
read its pooled states; the arrays are those of today's separate passes, every stage counts its passes, and the
Snakemake DAG takes the shared route only for one encoder."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from mmasr.cli import main as mmasr
from mmasr.clap.cache import load_cache
from mmasr.io import read_json, read_metadata
from mmasr.models.encode_once import encoder_identity, load_pooled, same_encoder
from mmasr.models.layers import PassCounter, count_passes, embed_audio
from mmasr.models.loading import load_audio_encoder
from mmasr.pipeline.dvc_yaml import snakemake_jobs
from mmasr.projector.encoder_cache import FeatureCache
from mmasr.rescoring.clip import load_embeddings
from tests.conftest import project_copy, tone, write_wav
from tests.test_clap import save_tiny_bert


def models(whisper="a/w", audio="a/w", **over) -> dict:
    return {"whisper": whisper, "audio_encoder": audio, "whisper_revision": None, "audio_encoder_revision": None,
            "dtype": "auto", **over}


def test_same_encoder_compares_the_folder_or_id_revision_and_dtype():
    assert same_encoder(models())
    assert same_encoder(models("results/checkpoints/whisper-tiny.en", "./results/checkpoints/whisper-tiny.en/"))
    assert same_encoder(models("openai/whisper-tiny.en", "openai/whisper-tiny.en", whisper_revision="main",
                               audio_encoder_revision="main"))
    assert not same_encoder(models("openai/whisper-tiny.en", "facebook/hubert-base-ls960"))
    assert not same_encoder(models(whisper_revision="v1"))  # one pinned, one not: maybe different weights
    assert not same_encoder(models(whisper_revision="v1", audio_encoder_revision="v2"))
    assert not same_encoder(models("/abs/w", "w"))  # spelled differently: separate passes (slower, never wrong)
    assert encoder_identity(models(dtype="bfloat16"), "whisper") == ("a/w", None, "bfloat16")


def test_pass_counter_counts_every_utterance_through_the_first_layer(demo_model_dirs):
    bundle = load_audio_encoder(str(demo_model_dirs["whisper"]), device="cpu")
    audios = [tone(0.3 + 0.1 * i) for i in range(5)]
    with count_passes(bundle.model) as counter:
        embed_audio(bundle, audios, [1, 2], batch_size=2)  # batches of 2, 2, 1
    assert counter.rows == 5 and counter.per_utt(5) == 1.0
    embed_audio(bundle, audios[:2], [1], batch_size=2)  # outside the block: not counted, the hook is gone
    assert counter.rows == 5
    manual = PassCounter()
    manual.add(3)
    assert manual.per_utt(2) == 1.5 and PassCounter().per_utt(0) == 0.0


def corpus(root) -> pd.DataFrame:
    """Eight utterances of different lengths in train/dev/test, two with the same transcript."""
    rows = []
    for i in range(8):
        path = write_wav(root / f"u{i}.wav", tone(0.35 + 0.17 * i, freq=140 + 35 * i, lead=0.05, tail=0.05))
        rows.append({"utt_id": f"u{i}", "speaker": f"s{i % 4}", "group": "impaired" if i % 2 else "control",
                     "audio_path": str(path), "duration_s": 0.45 + 0.17 * i, "text": ["a red bear", "two goats"][i % 2],
                     "image_id": None, "split": ["train", "train", "dev", "test"][i % 4], "source": "t"})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def both_ways(tmp_path_factory, demo_model_dirs):
    """The three stages run by the command line, as the rules run them: separately (each its own encoder pass)
    and through one shared pass. Batch sizes differ on purpose (3 for the projector cache, 2 for the probe, 4
    for CLAP): the shared pass batches otherwise than each separate stage."""
    work = tmp_path_factory.mktemp("encode_once")
    manifest = work / "manifest.parquet"
    corpus(work / "audio").to_parquet(manifest)
    whisper = str(demo_model_dirs["whisper"])
    cfg = json.dumps({"models": {"whisper": whisper, "audio_encoder": whisper, "text_encoder": str(save_tiny_bert(work / "bert")),
                                 "device": "cpu"},
                      "projector": {"encode_batch_size": 3, "shard_size": 5},
                      "probe": {"layers": "quartiles", "encode_batch_size": 2},
                      "clap": {"layers": [0, 2], "encode_batch_size": 4},
                      "nbest": {"batch_size": 3, "num_beams": 3, "num_return_sequences": 3, "keep": 3}})
    common = ["--cfg", cfg, "--threads", "1", "--quiet", "--manifest", str(manifest)]
    out = {}
    for way, extra in (("separate", []), ("shared", ["--pooled", str(work / "shared" / "pooled.safetensors")])):
        (work / way).mkdir(exist_ok=True)
        states = ["--states", str(work / way / "states")] if way == "shared" else []
        assert mmasr(["encode-audio", *common, "--out", str(work / way / "features"), *extra, *states]) == 0
        assert mmasr(["nbest", *common, "--out", str(work / way / "nbest.parquet"), *states]) == 0
        assert mmasr(["layer-embeddings", *common, "--out", str(work / way / "layers.npz"), *extra]) == 0
        assert mmasr(["clap-embeddings", *common, "--out", str(work / way / "clap"), *extra]) == 0
        out[way] = work / way
    return out


def test_the_shared_pass_gives_the_separate_passes_arrays(both_ways):
    sep, shared = both_ways["separate"], both_ways["shared"]
    # Projector cache: stored as float16. The two routes run the same float32 forward on the same features, but in
    # other batches, so BLAS may sum in another order (~1e-6 apart in float32), which can round a float16 value the
    # other way: at most one float16 step, 2^-10 relative (+ 1e-3 absolute near 0, where float16 steps are coarse).
    # Measured on a 2-core Xeon, 1 thread: bit-identical (max difference 0) for all three products.
    a, b = FeatureCache(sep / "features"), FeatureCache(shared / "features")
    assert list(a.index.index) == list(b.index.index) == [f"u{i}" for i in range(8)]
    pd.testing.assert_frame_equal(a.index, b.index)  # same shards, frame counts, dims
    for utt in a.index.index:
        assert a[utt].dtype == b[utt].dtype == np.float16 and a[utt].shape == b[utt].shape
        np.testing.assert_allclose(a[utt].astype(np.float32), b[utt].astype(np.float32), rtol=2 ** -10, atol=1e-3)
    assert {k: v for k, v in a.metadata.items() if "pass" not in k} == {
        k: v for k, v in b.metadata.items() if "pass" not in k}
    # Probe and CLAP embeddings: float32 means of float32 states; only the summation order may differ (1e-5 is ~10x
    # the differences measured here, and far below the embeddings' scale, ~1).
    pa, pb = load_embeddings(sep / "layers.npz"), load_embeddings(shared / "layers.npz")
    assert sorted(pa) == sorted(pb) == [f"u{i}" for i in range(8)]
    for utt in pa:
        assert pa[utt].shape == pb[utt].shape == (4 * 128,)  # quartiles of 2 layers: 1, 1, 2, 2
        np.testing.assert_allclose(pa[utt], pb[utt], rtol=1e-5, atol=1e-5)
    ma, mb = read_json(sep / "layers.npz.json"), read_json(shared / "layers.npz.json")
    drop = ("encoder_source", "encoder_passes", "encoder_passes_per_utt")
    assert {k: v for k, v in ma.items() if k not in drop} == {k: v for k, v in mb.items() if k not in drop}
    ca, cb = load_cache(sep / "clap"), load_cache(shared / "clap")
    pd.testing.assert_frame_equal(ca.utts, cb.utts)
    assert ca.audio.shape == cb.audio.shape == (8, 2 * 128)
    np.testing.assert_allclose(ca.audio, cb.audio, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ca.text, cb.text)  # the text half is the same code either way
    drop = ("audio_source", "audio_encoder_passes", "audio_encoder_passes_per_utt")
    assert {k: v for k, v in ca.meta.items() if k not in drop} == {k: v for k, v in cb.meta.items() if k not in drop}


def test_the_nbest_from_stored_states_is_todays_nbest(both_ways):
    """encode-audio --states stores the whole window's states of the n-best splits; nbest --states starts beam
    search from them (encode-audio batched 3 by utt_id, the n-best 3 by length): the same lists, exactly."""
    sep, shared = both_ways["separate"], both_ways["shared"]
    pd.testing.assert_frame_equal(pd.read_parquet(sep / "nbest.parquet"), pd.read_parquet(shared / "nbest.parquet"))
    a, b = read_metadata(sep / "nbest.parquet"), read_metadata(shared / "nbest.parquet")
    assert a["mmasr.stats.encoder_passes"] == "4" and b["mmasr.stats.encoder_passes"] == "0"  # dev + test: 4 of 8
    assert {k: v for k, v in a.items() if k != "mmasr.stats.encoder_passes"} == {
        k: v for k, v in b.items() if k != "mmasr.stats.encoder_passes"}
    states = FeatureCache(shared / "states")
    assert sorted(states.index.index) == ["u2", "u3", "u6", "u7"] and (states.index["n_frames"] == 150).all()
    assert states.metadata["mmasr.window"] == "full" and states.metadata["mmasr.states_dtype"] == "float32"


def test_nbest_refuses_states_of_another_model(both_ways, tmp_path, caplog, demo_model_dirs):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(demo_model_dirs["whisper"], other)
    manifest = tmp_path / "m.parquet"
    corpus(tmp_path / "audio").to_parquet(manifest)
    cfg = json.dumps({"models": {"whisper": str(other), "device": "cpu"}})
    code = mmasr(["nbest", "--cfg", cfg, "--quiet", "--manifest", str(manifest), "--out", str(tmp_path / "n.parquet"),
                  "--states", str(both_ways["shared"] / "states")])
    assert code == 2 and "re-run encode_audio" in caplog.text and not (tmp_path / "n.parquet").exists()


def test_the_last_pooled_layer_is_the_mean_of_the_cached_last_layer(both_ways):
    """The two products come from one forward: hidden state L (last_hidden_state) pooled is the mean of the
    projector cache's trimmed frames (float16 there)."""
    pooled = load_pooled(both_ways["shared"] / "pooled.safetensors")
    cache = FeatureCache(both_ways["shared"] / "features")
    assert pooled.pooled.shape == (8, 3, 128) and pooled.meta["depth"] == 2
    for i, utt in enumerate(pooled.ids):
        np.testing.assert_allclose(pooled.pooled[i, 2], cache[utt].astype(np.float32).mean(axis=0), atol=2e-3)


def test_every_stage_records_its_encoder_passes(both_ways):
    sep, shared = both_ways["separate"], both_ways["shared"]
    for folder, own in ((sep, "1.0"), (shared, "1.0")):
        meta = read_metadata(folder / "features" / "index.parquet")
        assert (meta["mmasr.encoder_passes"], meta["mmasr.encoder_passes_per_utt"], meta["mmasr.encoded_utts"]) == (
            "8", own, "8")
    assert read_metadata(sep / "features" / "index.parquet")["mmasr.encoder_pass"] == "own"
    assert read_metadata(shared / "features" / "index.parquet")["mmasr.encoder_pass"] == "shared"
    assert load_pooled(shared / "pooled.safetensors").meta["encoder_passes"] == 8
    assert read_json(sep / "layers.npz.json")["encoder_passes_per_utt"] == 1.0
    assert read_json(shared / "layers.npz.json")["encoder_passes_per_utt"] == 0.0
    assert read_json(shared / "layers.npz.json")["encoder_source"].startswith("shared encoder pass (")
    assert load_cache(sep / "clap").meta["audio_encoder_passes"] == 8
    assert load_cache(shared / "clap").meta["audio_encoder_passes"] == 0


def test_a_stage_refuses_pooled_states_of_another_encoder(both_ways, tmp_path, caplog):
    manifest = tmp_path / "m.parquet"
    corpus(tmp_path / "audio").to_parquet(manifest)
    cfg = json.dumps({"models": {"audio_encoder": "facebook/hubert-base-ls960", "device": "cpu"}})
    code = mmasr(["layer-embeddings", "--cfg", cfg, "--quiet", "--manifest", str(manifest), "--out",
                  str(tmp_path / "x.npz"), "--pooled", str(both_ways["shared"] / "pooled.safetensors")])
    assert code == 2 and "re-run encode_audio" in caplog.text and not (tmp_path / "x.npz").exists()
    cfg = json.dumps({"models": {"whisper": "a", "audio_encoder": "b", "device": "cpu"}})
    caplog.clear()
    assert mmasr(["encode-audio", "--cfg", cfg, "--quiet", "--manifest", str(manifest), "--out", str(tmp_path / "f"),
                  "--pooled", str(tmp_path / "p.safetensors")]) == 2
    assert "are not the same encoder" in caplog.text and not (tmp_path / "f").exists()


def dag(work, *configs) -> dict:
    """rule -> its (first) job in a forced dry run with ``configs``."""
    jobs = snakemake_jobs(work, "--configfile", *configs)
    return {job.rule: job for job in reversed(jobs)}


def test_one_encoder_pass_in_the_real_whisper_dag_and_separate_passes_for_different_encoders(tmp_path):
    work = project_copy(tmp_path / "p")
    real = "results/checkpoints/whisper-tiny.en"
    jobs = dag(work, "config/real_whisper.yaml")
    assert jobs["encode_audio"].output_list == ["data/cache/encoder_features", "data/cache/encoder_pooled.safetensors",
                                                "data/cache/encoder_states"]
    assert real in jobs["encode_audio"].inputs and "--pooled data/cache/encoder_pooled.safetensors" in jobs["encode_audio"].shell
    for rule in ("layer_embeddings", "clap_embeddings"):  # they read the pass; they neither load the encoder nor audio
        job = jobs[rule]
        assert "data/cache/encoder_pooled.safetensors" in job.inputs, rule
        assert real not in job.inputs and "data/processed/audio" not in job.inputs, rule
        assert "--pooled data/cache/encoder_pooled.safetensors" in job.shell, rule
    # the n-best starts from the full-window states the same pass stored (nbest.reuse_encoder_states)
    assert "data/cache/encoder_states" in jobs["nbest"].inputs and "--states data/cache/encoder_states" in jobs["nbest"].shell

    (work / "config" / "hubert.yaml").write_text("models:\n  audio_encoder: facebook/hubert-base-ls960\n")
    jobs = dag(work, "config/real_whisper.yaml", "config/hubert.yaml")
    assert jobs["encode_audio"].output_list == ["data/cache/encoder_features", "data/cache/encoder_states"]
    assert "--pooled" not in jobs["encode_audio"].shell
    for rule in ("layer_embeddings", "clap_embeddings"):
        job = jobs[rule]
        assert "data/processed/audio" in job.inputs and "data/cache/encoder_pooled.safetensors" not in job.inputs, rule
        assert "--pooled" not in job.shell and '"audio_encoder":"facebook/hubert-base-ls960"' in job.shell, rule
    # CTranslate2 encodes with its own copy of the weights, and reuse can be turned off: the n-best encodes itself
    for extra in ("nbest:\n  backend: ctranslate2\n", "nbest:\n  reuse_encoder_states: false\n"):
        (work / "config" / "x.yaml").write_text(extra)
        jobs = dag(work, "config/real_whisper.yaml", "config/x.yaml")
        assert jobs["encode_audio"].output_list == ["data/cache/encoder_features", "data/cache/encoder_pooled.safetensors"]
        assert "data/cache/encoder_states" not in jobs["nbest"].inputs and "--states" not in jobs["nbest"].shell
