"""Benchmark: audio-encoder passes per utterance with config/real_whisper.yaml's models, before and after one pass.

config/real_whisper.yaml names one encoder twice: models.whisper (n-best, projector cache) and
models.audio_encoder (probe, CLAP). The four stages that run it - encode_audio, layer_embeddings,
clap_embeddings and nbest - are run here through the ``mmasr`` command line, as the rules run them, on the
same utterances, two ways in one process:

* before: each stage its own pass (encode-audio, layer-embeddings, clap-embeddings without ``--pooled``: the
  route Snakemake takes when the two are different encoders, and every route before issue 29);
* after: the route the workflow takes for this config (``same_encoder``, ``nbest.reuse_encoder_states``):
  encode-audio ``--pooled --states`` once, layer-embeddings and clap-embeddings reading its pooled states, the
  n-best starting beam search from its stored full-window states.

Each stage
counts its own passes where the encoder runs (``mmasr.models.layers.count_passes``) and records them in its
output; this benchmark only reads them back and sums them:
``encoder_passes_per_utt = (sum over stages of utterance passes) / distinct utterances``: 3 + f before and 1
after, f being the share of utterances in the n-best splits.

The counts do not depend on the weights, so by default the encoder is the project's demo Whisper (a tiny
random Whisper, seconds); pass the converted tiny.en folder (``--model``) to count on the real one.

    python benchmarks/encode_once.py --project DIR [--model results/checkpoints/whisper-tiny.en] [--utts 24]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import pandas as pd

from mmasr import config
from mmasr.cli import main as mmasr
from mmasr.clap.cache import load_cache
from mmasr.io import read_json, read_metadata, write_json
from mmasr.rescoring.nbest import STATS_PREFIX

STAGES = ("encode_audio", "layer_embeddings", "clap_embeddings", "nbest")


def subset(manifest: pd.DataFrame, utts: int) -> pd.DataFrame:
    """Up to ``utts`` utterances, a share of every split (in utt_id order), so the n-best splits are in it."""
    per_split = max(1, utts // max(1, manifest["split"].nunique()))
    return (manifest.sort_values("utt_id").groupby("split", sort=True).head(per_split)
            .sort_values("utt_id").reset_index(drop=True))


def stage_passes(out: Path) -> dict[str, int]:
    """Utterance passes each stage recorded in its own output."""
    index = read_metadata(out / "features" / "index.parquet")
    nbest = read_metadata(out / "nbest.parquet")
    return {"encode_audio": int(index["mmasr.encoder_passes"]),
            "layer_embeddings": int(read_json(out / "layers.npz.json")["encoder_passes"]),
            "clap_embeddings": int(load_cache(out / "clap").meta["audio_encoder_passes"]),
            "nbest": int(nbest[f"{STATS_PREFIX}encoder_passes"])}


def run_way(way: str, work: Path, manifest: Path, cfg: dict, threads: int) -> dict:
    """The four encoder stages, ``separate`` or ``shared``; their recorded passes and wall seconds."""
    out = work / way
    out.mkdir(parents=True, exist_ok=True)
    common = ["--cfg", json.dumps(cfg), "--threads", str(threads), "--quiet", "--manifest", str(manifest)]
    pooled = ["--pooled", str(out / "pooled.safetensors")] if way == "shared" else []
    states = ["--states", str(out / "states")] if way == "shared" else []
    commands = [["encode-audio", *common, "--out", str(out / "features"), *pooled, *states],
                ["layer-embeddings", *common, "--out", str(out / "layers.npz"), *pooled],
                ["clap-embeddings", *common, "--out", str(out / "clap"), *pooled],
                ["nbest", *common, "--out", str(out / "nbest.parquet"), *states]]
    start = time.perf_counter()
    for cmd in commands:
        if mmasr(cmd) != 0:
            raise RuntimeError(f"mmasr {cmd[0]} failed ({way} passes); see the log above")
    return {"seconds": time.perf_counter() - start, "passes": stage_passes(out)}


def measure(p: dict, manifest: pd.DataFrame, model: str, work: Path, utts: int = 24, threads: int = 2) -> dict:
    """Passes per utterance both ways on up to ``utts`` utterances of ``manifest``, ``model`` standing for
    models.whisper and models.audio_encoder (real_whisper.yaml's layout), ``p``'s other settings."""
    from mmasr.models.encode_once import same_encoder

    work.mkdir(parents=True, exist_ok=True)
    part = subset(manifest, utts)
    path = work / "manifest.parquet"
    part.to_parquet(path)
    models = {**p["models"], "whisper": model, "audio_encoder": model, "whisper_revision": None,
              "audio_encoder_revision": None}
    if not same_encoder(models):
        raise AssertionError("the real_whisper layout names one encoder twice")
    cfg = {k: p[k] for k in ("models", "projector", "probe", "clap", "text", "nbest")}
    cfg["models"] = models
    ways = {way: run_way(way, work, path, cfg, threads) for way in ("separate", "shared")}
    n = len(part)
    before = sum(ways["separate"]["passes"].values()) / n
    after = sum(ways["shared"]["passes"].values()) / n
    return {"encoder_passes_per_utt_real_whisper": {"before": before, "after": after},
            "encoder_passes_ratio_real_whisper": before / after,
            "encoder_passes_per_stage": {way: ways[way]["passes"] for way in ways},
            "encoder_stage_seconds": {way: round(ways[way]["seconds"], 3) for way in ways},
            "encoder_passes_utts": n, "encoder_passes_nbest_utts": int(part["split"].isin(p["nbest"]["splits"]).sum()),
            "encoder_passes_model": model, "threads": threads}


def report(r: dict) -> str:
    v = r["encoder_passes_per_utt_real_whisper"]
    lines = [f"audio-encoder passes per utterance, real_whisper.yaml's layout ({r['encoder_passes_utts']} utterances, "
             f"{r['encoder_passes_nbest_utts']} of them in the n-best splits; encoder {r['encoder_passes_model']}):",
             f"  before (a pass per stage): {v['before']:.2f}   after (one shared pass): {v['after']:.2f}   "
             f"ratio {r['encoder_passes_ratio_real_whisper']:.2f}x"]
    for way in ("separate", "shared"):
        per = r["encoder_passes_per_stage"][way]
        lines.append(f"  {way:8s} " + ", ".join(f"{s} {per[s]}" for s in STAGES)
                     + f"  ({r['encoder_stage_seconds'][way]:.1f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, default=Path("."), help="a finished run (its manifest and demo models)")
    ap.add_argument("--model", default=None, help="the encoder (default: the project's demo Whisper)")
    ap.add_argument("--utts", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("data/cache/bench_encode_once"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    work, out = args.work.resolve(), args.out.resolve() if args.out else None
    with contextlib.chdir(args.project):  # the manifest's audio paths and the params' model folders are relative
        p = config.load(Path("params.yaml"))
        manifest = pd.read_parquet("data/processed/manifest.parquet")
        r = measure(p, manifest, args.model or p["models"]["whisper"], work, args.utts, args.threads)
    print(report(r))
    if out:
        write_json(out, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
