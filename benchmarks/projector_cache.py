"""Benchmark: projector training over cached encoder features vs running the frozen encoder every step.

Both runs use the same training function (:func:`mmasr.projector.speech_lm.train_projector`), seed, batches and
steps; only the source of the encoder frames differs: the cache written by ``mmasr encode-audio``
(float16 shards, read back) or :class:`mmasr.projector.encoder_cache.LiveEncoder`, which reads each batch's
audio and runs the frozen Whisper encoder again (then rounds to float16 like the cache, so the two
loss curves must agree to float tolerance). The ratio of wall times is the cache's speed-up.

Run after the pipeline (it reads the manifest, the feature cache and the models in params):
    python benchmarks/projector_cache.py [--params params.yaml] [--steps N] [--out results/benchmarks/projector_cache.json]
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--manifest", type=Path, default=Path("data/processed/manifest.parquet"))
    ap.add_argument("--features", type=Path, default=Path("data/cache/encoder_features"))
    ap.add_argument("--steps", type=int, default=None, help="default: one epoch of the train split (at least 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("results/benchmarks/projector_cache.json"))
    args = ap.parse_args(argv)

    result = measure(config.load(args.params), args.manifest, args.features, args.steps, args.threads)
    steps, n_train, t_live, t_cache, max_diff = (result[k] for k in (
        "projector_steps", "projector_n_train", "projector_live_step_seconds", "projector_cached_step_seconds",
        "projector_max_loss_diff"))
    write_json(args.out, result)
    print(f"projector training, {steps} steps (one epoch of {n_train} train utterances, batch "
          f"{result['projector_batch_size']}), threads {args.threads}:")
    print(f"  encoder on the fly : {t_live * 1000:8.1f} ms a step (median)")
    print(f"  cached features    : {t_cache * 1000:8.1f} ms a step (median)")
    print(f"  speed-up           : {t_live / t_cache:8.1f}x   (target >= 5x)")
    print(f"  loss curves        : max |difference| {max_diff:.2e} -> "
          f"{'same' if result['projector_same_loss_curve'] else 'DIFFERENT'}")
    print(f"written to {args.out}")
    return 0 if result["projector_same_loss_curve"] else 1


if __name__ == "__main__":
    sys.exit(main())
