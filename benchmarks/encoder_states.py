"""Measurement: could the n-best reuse stored encoder states instead of running Whisper's encoder? (issue 29 item 2)

Beam search attends to the encoder's whole window (1500 frames for a real Whisper), in the model's dtype;
the projector cache keeps only the frames covering the audio, in float16, so it cannot be fed to beam
search as it is. Reuse would mean the shared encoder pass also stores the full-window states of the n-best
splits, and the n-best reads them. This measures, on the same utterances and the same model:

* the n-best stage's own encoder time per utterance (log-mel features + encoder forward, batched as the
  stage batches: by length, ``nbest.batch_size``), and the whole n-best time per utterance
  (``nbest_for_batch`` with the config's beam), so the encoder's share of the stage;
* writing each utterance's full-window state (float32 safetensors, fsync'd) and reading it back, cold
  (the file's pages dropped from the page cache with ``posix_fadvise(DONTNEED)``, so the read goes to the
  disk) and warm; bytes per utterance;
* whether an utterance's states are bit-identical when it is encoded in another batch (the shared pass
  batches by ``utt_id``, ``projector.encode_batch_size``; the n-best by length): only then would reused
  states give exactly today's n-best.

    python benchmarks/encoder_states.py --model results/checkpoints/whisper-tiny.en \\
        --manifest data/processed/manifest.parquet [--utts 24] [--threads 2] [--configfile config/real_whisper.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from mmasr import config
from mmasr.data.audio import length_batches, read_audio
from mmasr.data.text import normaliser
from mmasr.io import write_json
from mmasr.models.loading import load_whisper, whisper_features
from mmasr.rescoring.nbest import nbest_for_batch


def drop_cached_pages(path: Path) -> None:
    """Evict one file's pages from the page cache (only this file: nothing else on the machine is touched)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@torch.inference_mode()
def encode(bundle, audios: list[np.ndarray]) -> tuple[torch.Tensor, float, float]:
    start = time.perf_counter()
    feats = whisper_features(bundle, audios)["input_features"]
    mid = time.perf_counter()
    states = bundle.model.get_encoder()(feats).last_hidden_state
    return states, mid - start, time.perf_counter() - mid


def measure(bundle, manifest: pd.DataFrame, p: dict, work: Path, utts: int) -> dict:
    from safetensors.numpy import save_file
    from safetensors import safe_open

    part = manifest[manifest["split"].isin(p["nbest"]["splits"])].sort_values("utt_id").head(utts).reset_index(drop=True)
    audios = [read_audio(a) for a in part["audio_path"]]
    cfg, norm = p["nbest"], normaliser(p["text"])
    batches = length_batches(part["duration_s"].to_numpy(), cfg["batch_size"])
    encode(bundle, audios[:2])  # warm-up
    nbest_for_batch(bundle, audios[:1], cfg, norm)
    features_s = encoder_s = 0.0
    states = {}
    for idx in batches:
        out, f_s, e_s = encode(bundle, [audios[i] for i in idx])
        features_s, encoder_s = features_s + f_s, encoder_s + e_s
        for row, i in enumerate(idx):
            states[part["utt_id"][i]] = out[row].float().numpy()
    start = time.perf_counter()
    for idx in batches:
        nbest_for_batch(bundle, [audios[i] for i in idx], cfg, norm)
    nbest_s = time.perf_counter() - start
    # the shared pass's batches (utt_id order, projector.encode_batch_size): the same states, bit for bit?
    diffs = []
    size = p["projector"]["encode_batch_size"]
    for b in range(0, len(part), size):
        out, _, _ = encode(bundle, audios[b:b + size])
        diffs += [float(np.abs(out[r].float().numpy() - states[part["utt_id"][b + r]]).max()) for r in range(out.shape[0])]
    work.mkdir(parents=True, exist_ok=True)
    paths = {u: work / f"{u}.safetensors" for u in states}
    start = time.perf_counter()
    for u, s in states.items():
        save_file({"states": s}, str(paths[u]))
        drop_cached_pages(paths[u])  # fsync (the write reaches the disk) + evict
    write_s = time.perf_counter() - start
    reads = {}
    for kind in ("cold", "warm"):
        start = time.perf_counter()
        for u in states:
            with safe_open(str(paths[u]), framework="pt") as f:
                loaded = f.get_tensor("states")
            assert torch.equal(loaded, torch.from_numpy(states[u]))
        reads[kind] = time.perf_counter() - start
    n = len(part)
    nbytes = int(np.mean([paths[u].stat().st_size for u in states]))
    return {"utts": n, "model": bundle.name, "threads": torch.get_num_threads(), "batch_size": cfg["batch_size"],
            "num_beams": cfg["num_beams"], "window_frames": int(next(iter(states.values())).shape[0]),
            "features_s_per_utt": features_s / n, "encoder_s_per_utt": encoder_s / n, "nbest_s_per_utt": nbest_s / n,
            "encoder_share_of_nbest": (features_s + encoder_s) / nbest_s,
            "write_s_per_utt": write_s / n, "read_cold_s_per_utt": reads["cold"] / n,
            "read_warm_s_per_utt": reads["warm"] / n, "bytes_per_utt": nbytes,
            "states_bit_identical_across_batches": max(diffs) == 0.0, "states_max_abs_diff_across_batches": max(diffs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--configfile", default="config/real_whisper.yaml", help="merged over params.yaml (\"\": none)")
    ap.add_argument("--utts", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("data/cache/bench_encoder_states"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    extra = json.dumps(yaml.safe_load(Path(args.configfile).read_text())) if args.configfile else None
    p = config.load(Path("params.yaml"), extra)
    manifest = pd.read_parquet(args.manifest)
    root = args.manifest.parent.parent.parent  # <project>/data/processed/manifest.parquet
    manifest["audio_path"] = [a if os.path.isabs(a) else str(root / a) for a in manifest["audio_path"]]
    r = measure(load_whisper(args.model, device="cpu"), manifest, p, args.work, args.utts)
    print(json.dumps(r, indent=2))
    if args.out:
        write_json(args.out, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
