"""Benchmark: projector training over cached encoder features vs running the frozen encoder every step.

Both runs use the same training function (:func:`mmasr.projector.speech_lm.train_projector`), seed, batches and
steps; only the source of the encoder frames differs: the cache written by ``mmasr encode-audio``
(float16 shards, read back) or :class:`mmasr.projector.encoder_cache.LiveEncoder`, which reads each batch's
audio and runs the frozen Whisper encoder again (then rounds to float16 like the cache, so the two
loss curves must agree to float tolerance). The ratio of wall times is the cache's speed-up.

Run after the pipeline (it reads the manifest, the feature cache and the models in params):
    python benchmarks/projector_cache.py [--params params.yaml] [--steps N] [--out results/benchmarks/projector_cache.json]
    python benchmarks/projector_cache.py --real-shape [--batch 4] [--steps 2]

``--real-shape`` needs no pipeline run: it builds random-weight checkpoints of Whisper small's architecture
(12-layer 768-d encoder, 30 s window = 1500 frames) and of SmolLM3-3B at its real width (hidden 2048, 128 k
vocabulary) with 2 of its 36 layers (the full depth would dominate a CPU step; the real-size tests do the
same), a projector of the real shape (k=5, hidden 2048), and a batch of synthetic utterances of 2-4 s. Cost is
what is measured, so random weights do: the live side runs the encoder on the padded 30 s window of every
utterance every step, the cached side reads only the trimmed frames that cover the audio (~100-200).

By default one epoch of the train split (ceil(n_train / batch_size) steps). The ratio compares
steady-state steps: each step's wall time is the interval between consecutive reads of the frame
source (one read per step), and the median step of each side is compared. Fixed set-up (tokenising,
fingerprint, checkpoint folders) and the first step (lazy initialisation) are left out,
so the ratio is a ratio of two positive times whatever the noise (subtracting a separately measured
set-up time, as an earlier version did, could leave a negative difference on short runs).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mmasr import config
from mmasr.projector.encoder_cache import FeatureCache, LiveEncoder
from mmasr.io import write_json
from mmasr.models.loading import load_from_params
from mmasr.projector.speech_lm import build_speech_lm, train_projector


class StepClock:
    """A frame source that notes the time of every batch read. Training reads once per step (no
    gradient accumulation, no dev evaluation here), so consecutive reads are one step apart."""

    def __init__(self, source) -> None:
        self.source, self.reads = source, []

    def __getattr__(self, name):
        return getattr(self.source, name)

    def batch(self, utt_ids):
        self.reads.append(time.perf_counter())
        return self.source.batch(utt_ids)

    def step_seconds(self) -> np.ndarray:
        return np.diff(np.asarray(self.reads))


def run(source, p: dict, manifest: pd.DataFrame, steps: int, work: Path, name: str) -> tuple[float, float, np.ndarray]:
    """Median steady-state step time, total wall time and train-loss curve of ``steps`` projector steps
    reading frames from ``source``."""
    cfg = dict(p["projector"], steps=steps, warmup=min(p["projector"]["warmup"], steps // 2), grad_accum=1,
               eval_every=10**9, checkpoint_every=10**9)  # measure the steps, not dev evaluation or checkpoints
    model = build_speech_lm(load_from_params("lm", p["models"]), source.dim, cfg)
    clock = StepClock(source)
    start = time.perf_counter()
    train_projector(model, clock, manifest, work / name, work / f"{name}.csv", work / f"{name}-state", cfg, p["seed"],
                    progress=False)
    seconds = time.perf_counter() - start
    intervals = clock.step_seconds()
    if len(intervals) != steps - 1:
        raise RuntimeError(f"{name}: expected one frame read per step ({steps} steps), saw {len(clock.reads)}")
    curve = pd.read_csv(work / f"{name}.csv")["train_loss"].to_numpy(float)
    # The first interval is the first step, which also creates the optimizer's state: left out.
    return float(np.median(intervals[1:])), seconds, curve


def measure(p: dict, manifest_path: Path, features: Path, steps: int | None = None, threads: int = 2) -> dict:
    """Cached vs live projector training over ``steps`` steps (default: one epoch of the train split)."""
    torch.set_num_threads(threads)
    manifest = pd.read_parquet(manifest_path)
    manifest = manifest[manifest["split"] == "train"]  # the epoch only: no dev evaluation in the timings
    n_train = int(((manifest["split"] == "train") & manifest["text"].fillna("").str.strip().astype(bool)).sum())
    steps = max(2, steps or math.ceil(n_train / p["projector"]["batch_size"]))
    cache = FeatureCache(features)
    live = LiveEncoder(load_from_params("whisper", p["models"]), manifest)

    work = Path(tempfile.mkdtemp(prefix="mmasr-bench-projector-"))
    try:
        run(cache, p, manifest, 3, work, "warmup")  # lazy imports, allocator, file cache
        # Two extra steps: n + 2 steps give n + 1 intervals between reads, of which the first (the first
        # step: lazy initialisation, optimizer state) is left out, so n steady-state steps are compared.
        step_cache, t_cache, loss_cache = run(cache, p, manifest, steps + 2, work, "cached")
        step_live, t_live, loss_live = run(live, p, manifest, steps + 2, work, "live")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    max_diff = float(np.max(np.abs(loss_cache - loss_live)))
    return {
        "projector_cache_speedup": step_live / step_cache, "projector_cached_step_seconds": step_cache,
        "projector_live_step_seconds": step_live, "projector_cached_seconds": t_cache,
        "projector_live_seconds": t_live, "projector_steps": steps,
        "projector_batch_size": p["projector"]["batch_size"], "projector_max_loss_diff": max_diff,
        "projector_same_loss_curve": bool(np.allclose(loss_cache, loss_live, atol=1e-3, rtol=1e-3)),
        "projector_n_train": n_train, "device": str(load_from_params("lm", p["models"]).device), "threads": threads,
    }


def synthetic_utterances(folder: Path, n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` train utterances of 2-4 s (a tone with a harmonic and a little noise, 16 kHz WAV) and their manifest."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    words = "a red bear sits by the old tree and eats a small green pear".split()
    rows = []
    for i in range(n):
        seconds = float(rng.uniform(2.0, 4.0))
        t = np.arange(int(seconds * 16000)) / 16000
        f0 = rng.uniform(100, 300)
        audio = 0.5 * np.sin(2 * np.pi * f0 * t) + 0.2 * np.sin(4 * np.pi * f0 * t) + 0.05 * rng.standard_normal(len(t))
        path = folder / f"utt{i:03d}.wav"
        sf.write(path, audio.astype(np.float32), 16000, subtype="PCM_16")
        rows.append({"utt_id": f"utt{i:03d}", "audio_path": str(path), "duration_s": seconds, "split": "train",
                     "text": " ".join(rng.choice(words, 8)), "speaker": "s0", "group": "control", "image_id": None})
    return pd.DataFrame(rows)


def measure_real_shape(p: dict, batch: int = 4, steps: int = 2, threads: int = 2, seed: int = 0) -> dict:
    """Live vs cached projector steps at the real shape (see the module docstring): Whisper small's encoder on
    the 30 s window vs its trimmed cached frames, projector k=5 hidden 2048, SmolLM3 real width, 2 layers.
    One batch of ``batch`` utterances (each step trains on it); ``steps`` steady-state steps each side."""
    from mmasr.demo.real_size import build_real_size
    from mmasr.projector.encoder_cache import encode_manifest

    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="mmasr-bench-projector-real-"))
    try:
        built = build_real_size(work / "models", which=("whisper", "lm"))
        models = dict(p["models"], whisper=str(built["whisper"]), lm=str(built["lm"]), whisper_revision=None,
                      lm_revision=None)
        p = dict(p, models=models, projector=dict(p["projector"], k=5, hidden=2048, batch_size=batch, bucket_batches=1))
        manifest = synthetic_utterances(work / "audio", batch, seed)
        whisper = load_from_params("whisper", models)
        start = time.perf_counter()
        encode_manifest(whisper, manifest, work / "features", splits=["train"], batch_size=batch, progress=False)
        encode_s = time.perf_counter() - start
        cache, live = FeatureCache(work / "features"), LiveEncoder(whisper, manifest)
        window = whisper.processor.feature_extractor.nb_max_frames // 2
        run(cache, p, manifest, 3, work, "warmup")
        step_cache, _, loss_cache = run(cache, p, manifest, steps + 2, work, "cached")
        step_live, _, loss_live = run(live, p, manifest, steps + 2, work, "live")
        device = str(whisper.device)
        cached_frames = int(cache.index["n_frames"].sum())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    max_diff = float(np.max(np.abs(loss_cache - loss_live)))
    return {
        "projector_cache_speedup_real_shape": step_live / step_cache, "real_shape_cached_step_seconds": step_cache,
        "real_shape_live_step_seconds": step_live, "real_shape_encoder_share_of_live_step": 1 - step_cache / step_live,
        "real_shape_encode_seconds_per_utt": encode_s / batch, "real_shape_steps": steps, "real_shape_batch": batch,
        "real_shape_audio_s": [round(float(x), 2) for x in manifest["duration_s"]],
        "real_shape_frames_cached_per_utt": cached_frames / batch, "real_shape_frames_live_per_utt": window,
        "real_shape_models": "Whisper small encoder (12 x 768, 30 s window); SmolLM3-3B width (2048, 128k vocab), "
                             "2 of 36 layers; projector k=5 hidden 2048; random weights",
        "real_shape_max_loss_diff": max_diff,
        "projector_real_shape_same_loss_curve": bool(np.allclose(loss_cache, loss_live, atol=1e-3, rtol=1e-3)),
        "device": device, "threads": threads,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--manifest", type=Path, default=Path("data/processed/manifest.parquet"))
    ap.add_argument("--features", type=Path, default=Path("data/cache/encoder_features"))
    ap.add_argument("--steps", type=int, default=None, help="default: one epoch of the train split (at least 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("results/benchmarks/projector_cache.json"))
    ap.add_argument("--real-shape", action="store_true",
                    help="Whisper small + SmolLM3 width (2 layers), random weights, synthetic 2-4 s audio; no pipeline run")
    ap.add_argument("--batch", type=int, default=4, help="--real-shape: utterances per step")
    args = ap.parse_args(argv)
    if args.real_shape:
        result = measure_real_shape(config.load(args.params), args.batch, args.steps or 2, args.threads)
        write_json(args.out, result)
        print(f"projector training at the real shape ({result['real_shape_models']}), batch {args.batch}, "
              f"{result['real_shape_steps']} steps, threads {args.threads}, {result['device']}:")
        print(f"  encoder on the 30 s window: {result['real_shape_live_step_seconds']:8.2f} s a step (median)")
        print(f"  cached trimmed frames     : {result['real_shape_cached_step_seconds']:8.2f} s a step (median)")
        ratio = result["projector_cache_speedup_real_shape"]
        print(f"  speed-up                  : {ratio:8.1f}x   (target >= 10x: {'met' if ratio >= 10 else 'MISSED'})")
        print(f"  loss curves: max |difference| {result['real_shape_max_loss_diff']:.2e} -> "
              f"{'same' if result['projector_real_shape_same_loss_curve'] else 'DIFFERENT'}")
        return 0 if result["projector_real_shape_same_loss_curve"] else 1

    result = measure(config.load(args.params), args.manifest, args.features, args.steps, args.threads)
    steps, n_train, t_live, t_cache, max_diff = (result[k] for k in (
        "projector_steps", "projector_n_train", "projector_live_step_seconds", "projector_cached_step_seconds",
        "projector_max_loss_diff"))
    write_json(args.out, result)
    print(f"projector training, {steps} steps (one epoch of {n_train} train utterances, batch "
          f"{result['projector_batch_size']}), threads {args.threads}:")
    print(f"  encoder on the fly : {t_live * 1000:8.1f} ms a step (median)")
    print(f"  cached features    : {t_cache * 1000:8.1f} ms a step (median)")
    print(f"  speed-up           : {t_live / t_cache:8.1f}x   (demo config; the target is at the real shape)")
    print(f"  loss curves        : max |difference| {max_diff:.2e} -> "
          f"{'same' if result['projector_same_loss_curve'] else 'DIFFERENT'}")
    print(f"written to {args.out}")
    return 0 if result["projector_same_loss_curve"] else 1


if __name__ == "__main__":
    sys.exit(main())
