"""A real corpus without pictures (TORGO's layout, as a new user would try it): the whole workflow runs, the
picture stages say they were skipped and why, fusion is ASR-only, and CLAP, the probe and the projector run."""

from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmasr.io import read_json
from tests.conftest import project_copy, snakemake, tone, write_wav

# TORGO names: F0x/M0x speakers with dysarthria, FC0x/MC0x controls. One eSpeak voice per speaker.
SPEAKERS = {"F01": "en-us+f2", "M01": "en-us+m3", "M03": "en+m3", "FC01": "en-us+f1", "MC01": "en-us",
            "MC02": "en-us+m1"}
# Short prompts, as TORGO's single words and short sentences (demo words, so the tiny demo Whisper can
# spell them), plus the two kinds of prompt TORGO has that are no transcript (rejected at ingest).
PROMPTS = ["a red bear", "two green goats", "pear", "three blue cups"]
NOT_TRANSCRIPTS = {"[say Ah-P-Eee repeatedly]": "instruction_prompt", "input/images/kitchen.jpg": "picture_prompt"}


def impaired(speaker: str) -> bool:
    return "C" not in speaker


def speech(text: str, speaker: str, seed: int) -> tuple[np.ndarray, int]:
    """eSpeak NG speech of ``text``: controls at a normal rate; dysarthric speakers slower, with noise."""
    from mmasr.demo.tts import espeak_synthesise

    audio, sr = espeak_synthesise(text, SPEAKERS[speaker], rate_wpm=110 if impaired(speaker) else 170)
    if impaired(speaker):
        rng = np.random.default_rng(seed)
        audio = audio + 0.02 * rng.standard_normal(len(audio)).astype(np.float32)
    pad = np.zeros(int(0.2 * sr), np.float32)
    return np.concatenate([pad, audio, pad]).astype(np.float32), sr


def write_torgo(root: Path, real_speech: bool = True) -> Path:
    """``<SPK>/Session1/{wav_arrayMic,prompts}/NNNN.{wav,txt}`` for six speakers, no picture anywhere."""
    for k, speaker in enumerate(SPEAKERS):
        session = root / speaker / "Session1"
        (session / "prompts").mkdir(parents=True, exist_ok=True)
        for i, text in enumerate([*PROMPTS, *NOT_TRANSCRIPTS]):
            if real_speech and text in PROMPTS:
                audio, sr = speech(text, speaker, seed=100 * k + i)
            else:
                audio, sr = tone(0.5, freq=150 + 20 * i), 16000
            write_wav(session / "wav_arrayMic" / f"{i + 1:04d}.wav", audio, sr)
            (session / "prompts" / f"{i + 1:04d}.txt").write_text(text + "\n")
    return root


def torgo_config(work: Path, corpus: Path, **data) -> Path:
    path = work / "config" / "torgo.yaml"
    # Every speaker reads the same prompts, as in TORGO, so prompt-disjoint splits would leave no dev or
    # test utterance (tests/test_split.py checks that error): these tests compare speakers on shared prompts.
    path.write_text(json.dumps({"data": {"source": "torgo", "torgo_root": str(corpus), **data},
                                "split": {"disjoint_text": False}}))
    return path


def finite_numbers(metrics: dict) -> dict:
    """The numeric values of a metrics file (booleans left out)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def test_require_image_on_a_corpus_without_pictures_fails_with_one_clear_sentence(tmp_path, caplog):
    from mmasr.cli import main

    corpus = write_torgo(tmp_path / "TORGO", real_speech=False)
    cfg = json.dumps({"data": {"source": "torgo", "torgo_root": str(corpus), "require_image": True}})
    ingested, rejects = tmp_path / "ingested.parquet", tmp_path / "ingest_rejects.parquet"
    assert main(["ingest", "--cfg", cfg, "--out", str(ingested), "--rejects", str(rejects)]) == 0
    assert pd.read_parquet(ingested)["image_id"].isna().all()
    code = main(["preprocess", "--cfg", cfg, "--threads", "1", "--ingested", str(ingested),
                 "--ingest-rejects", str(rejects), "--audio-dir", str(tmp_path / "a"), "--image-dir", str(tmp_path / "i"),
                 "--out", str(tmp_path / "u.parquet"), "--images", str(tmp_path / "im.parquet"),
                 "--rejects", str(tmp_path / "r.parquet"), "--metrics", str(tmp_path / "m.json")])
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "no utterance is left after preprocessing" in errors[0]
    assert "missing_image: 24" in errors[0] and "set data.require_image: false" in errors[0]


@pytest.mark.slow
def test_a_torgo_corpus_without_pictures_runs_end_to_end(tmp_path):
    corpus = write_torgo(tmp_path / "TORGO")
    work = project_copy(tmp_path / "work")
    torgo_config(work, corpus)
    t0 = time.monotonic()
    proc = snakemake(work, "--configfile", "config/tiny.yaml", "config/torgo.yaml")
    wall = time.monotonic() - t0
    print(f"no-pictures workflow: {wall:.0f} s", file=sys.stderr)
    assert "pipeline finished" in proc.stdout + proc.stderr

    manifest = pd.read_parquet(work / "data/processed/manifest.parquet")
    assert len(manifest) == len(SPEAKERS) * len(PROMPTS) and manifest["image_id"].isna().all()
    assert set(manifest["source"]) == {"torgo"}
    assert dict(manifest.drop_duplicates("speaker").set_index("speaker")["group"]) == {
        s: "impaired" if impaired(s) else "control" for s in SPEAKERS}
    ingest_rejects = pd.read_parquet(work / "data/processed/ingest_rejects.parquet")
    assert sorted(ingest_rejects["reason"]) == sorted(list(NOT_TRANSCRIPTS.values()) * len(SPEAKERS))

    # CLIP pre-training skipped with its reason; the random-init CLIP is still published for the later rules.
    clip = read_json(work / "results/metrics/pretrain_clip.json")
    assert clip["clip_skipped"] and clip["clip_steps"] == 0 and clip["clip_n_train_pairs"] == 0
    assert (work / "results/checkpoints/demo/clip/config.json").is_file()
    emb = read_json(work / "data/cache/clip_image_embeddings.npz.json")
    assert emb["count"] == 0 and emb["skipped"]
    nbest = pd.read_parquet(work / "data/nbest/nbest.parquet")
    assert len(nbest) and nbest["clip_cos"].isna().all()

    # Fusion: no CLIP term on any test utterance, and it says so: the seed form is ASR-only, the log-linear form
    # (the headline) keeps λ_clip at 0 and re-ranks by Whisper's total log-probability and the length term only.
    fusion = read_json(work / "results/metrics/fusion.json")
    n_test = int((manifest["split"] == "test").sum())
    assert n_test > 0 and fusion["n_test_utts"] == n_test and fusion["n_no_image"] == n_test
    assert fusion["fusion_form"] == "log_linear" and fusion["weights_fused_log_linear_form"]["lambda_clip"] == 0.0
    assert fusion["test_wer_fused_seed_form"] == fusion["test_wer_asr"]
    assert fusion["test_wer_diff"] == pytest.approx(fusion["test_wer_fused"] - fusion["test_wer_asr"])
    assert fusion["fusion_skipped"] and "no test utterance has a picture" in fusion["fusion_skip_reason"]
    assert all(math.isfinite(v) for v in finite_numbers(fusion).values())
    grid = pd.read_csv(work / "results/fusion/grid.csv")
    assert grid.groupby("split")["wer"].nunique().eq(1).all()  # flat α grid

    # CLAP, the probe and the projector use audio and transcripts only: they ran, with finite numbers.
    for name, keys in (("retrieval", ("a2t_r1", "t2a_r1", "chance_r1")), ("probe", ("auc", "brier", "ece_calibrated")),
                       ("projector", ("test_wer",))):
        metrics = read_json(work / f"results/metrics/{name}.json")
        numbers = finite_numbers(metrics)
        assert set(keys) <= set(numbers), (name, metrics)
        assert all(math.isfinite(v) for v in numbers.values()), (name, metrics)

    # The report says which picture stages were skipped, and why.
    page = (work / "results/report.html").read_text()
    assert "Skipped picture stages" in page and "Rescoring with the picture skipped" in page
    for stage, reason in (("pretrain_demo_clip", "no train-split (picture, caption) pairs"),
                          ("cache_image_embeddings", "no utterance of the manifest has a picture"),
                          ("clip_text_scores", "clip_cos is missing for every hypothesis"),
                          ("fuse (rescoring with the picture)", "no test utterance has a picture")):
        assert re.search(rf"<li><b>{re.escape(stage)}</b>: [^<]*{re.escape(reason)}", page), stage
