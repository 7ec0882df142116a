"""Benchmark: one CLAP phase-1 epoch on cached embeddings vs re-encoding every step (seed 003's loop).

Phase 1 trains only the projection heads; the encoders are frozen, so their pooled outputs never
change. Seed 003's training loop still runs both encoders on every batch (audio read from disk,
features, encoder forward under no_grad, then the heads). The pipeline encodes every utterance and
distinct text once (``mmasr clap-embeddings``) and an epoch only indexes the cache. Both ways start
from the same heads, see the same batches and take the same optimizer steps, so their per-step
losses must agree (up to float rounding); the ratio of their epoch times is printed and written.

Run after the pipeline (it reads data/cache/clap_embeddings and the encoders named in params):
    python benchmarks/clap_cache.py [--params params.yaml] [--out results/benchmarks/clap_cache.json]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mmasr import config
from mmasr.clap.cache import load_cache
from mmasr.clap.train import heads_from_cache, heads_step, load_encoders, phase1_batch, steps_per_epoch
from mmasr.io import write_json
from mmasr.models.layers import audio_forward, audio_inputs, text_forward, text_inputs
from mmasr.models.loading import autocast, pick_device
from mmasr.data.audio import read_audio
from mmasr.training.loop import adamw


def epoch(heads, cfg: dict, seed: int, n: int, bs: int, batch_inputs) -> tuple[list[float], float]:
    """One epoch of phase-1 steps from a copy of ``heads``; the losses and the wall time."""
    heads = copy.deepcopy(heads)
    optimizer = adamw(heads, cfg)
    losses = []
    start = time.perf_counter()
    for step in range(steps_per_epoch(n, bs)):
        idx = phase1_batch(n, bs, step, seed)
        audio_x, text_x, rows = batch_inputs(idx)
        losses.append(heads_step(heads, optimizer, audio_x, text_x, rows, cfg["grad_clip"]))
    return losses, time.perf_counter() - start


def measure(p: dict, cache_dir: Path, repeats: int = 5) -> dict:
    """One phase-1 epoch re-encoding every batch vs ``repeats`` epochs on the cache (median)."""
    cfg, seed = p["clap"], p["seed"]
    device = pick_device(p["models"]["device"])
    torch.manual_seed(seed)
    cache = load_cache(cache_dir)
    train = cache.split("train")
    n, bs = len(train), min(cfg["batch_size"], len(train))
    rows, text_rows = train.index.to_numpy(), train["text_row"].to_numpy()
    heads = heads_from_cache(cache, cfg, seed).to(device)
    audio_bundle, text_bundle = load_encoders(p["models"], cache.meta, device)
    a_layers, t_layers, pooling = cache.meta["audio_layers"], cache.meta["text_layers"], cache.meta["text_pooling"]
    paths = train["audio_path"].tolist()
    audio_cache = torch.from_numpy(cache.audio).to(device)
    text_cache = torch.from_numpy(cache.text).to(device)

    def cached(idx):
        return audio_cache[rows[idx]], text_cache[text_rows[idx]], text_rows[idx]

    @torch.no_grad()
    def encode(audios, texts):
        """Seed 003: the frozen encoders on every batch (one utterance at a time where batching is inexact)."""
        from mmasr.models.layers import batchable

        groups = [audios] if batchable(audio_bundle) else [[a] for a in audios]
        with autocast(device):
            a = torch.cat([audio_forward(audio_bundle.model, *audio_inputs(audio_bundle, g), a_layers) for g in groups])
            t = text_forward(text_bundle.model, text_inputs(text_bundle, texts), t_layers, pooling)
        return a.float(), t.float()

    def reencoded(idx):
        a, t = encode([read_audio(paths[i]) for i in idx], [cache.texts[r] for r in text_rows[idx]])
        return a, t, text_rows[idx]

    epoch(heads, cfg, seed, n, bs, cached)  # warm-up (allocations, lazy imports)
    slow_losses, t_reencode = epoch(heads, cfg, seed, n, bs, reencoded)
    runs = [epoch(heads, cfg, seed, n, bs, cached) for _ in range(repeats)]
    fast_losses, t_cached = runs[0][0], float(np.median([t for _, t in runs]))
    max_diff = float(np.max(np.abs(np.array(fast_losses) - np.array(slow_losses))))
    same = bool(np.allclose(fast_losses, slow_losses, rtol=1e-4, atol=1e-4))
    return {"clap_cache_speedup": t_reencode / t_cached, "clap_cache_epoch_s": t_cached,
            "clap_reencode_epoch_s": t_reencode, "clap_cache_steps": len(fast_losses), "clap_cache_batch_size": bs,
            "clap_cache_n_train": n, "clap_cache_same_loss": same, "clap_cache_max_loss_diff": max_diff,
            "clap_cache_audio_encoder": cache.meta["audio_encoder"], "device": str(device)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--cache", type=Path, default=Path("data/cache/clap_embeddings"))
    parser.add_argument("--repeats", type=int, default=5, help="cached epochs timed (median)")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/clap_cache.json"))
    args = parser.parse_args(argv)

    r = measure(config.load(args.params), args.cache, args.repeats)
    write_json(args.out, r)
    print(f"CLAP phase-1 epoch ({r['clap_cache_steps']} steps of {r['clap_cache_batch_size']}, "
          f"{r['clap_cache_n_train']} train utterances, {r['device']}):")
    print(f"  re-encoding every step (seed 003): {r['clap_reencode_epoch_s']:8.3f} s")
    print(f"  cached embeddings:                 {r['clap_cache_epoch_s']:8.3f} s   "
          f"-> {r['clap_cache_speedup']:.0f}x faster")
    print(f"  same losses: {r['clap_cache_same_loss']} (max difference {r['clap_cache_max_loss_diff']:.2e}); "
          f"written to {args.out}")
    return 0 if r["clap_cache_same_loss"] else 1


if __name__ == "__main__":
    sys.exit(main())
