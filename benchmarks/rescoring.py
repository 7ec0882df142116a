"""Benchmarks for the rescoring core, each against the naive way, measured in the same run.

1. n-best: batched beam search over many utterances vs one utterance at a time, same model and
   audio, in two ways: seed 000's loop as written (Whisper's generate() per utterance, which also
   repeats the input once per returned sequence and so returns copies of one beam: transformers
   issue 33445), and the pipeline's own code with batches of one (batching alone). The best
   hypothesis must be the same; with the pipeline's code every hypothesis must be.
2. alpha grid search: CLIP cosines computed once per distinct text and the grid as array arithmetic,
   vs seed 001's loop (for every alpha and utterance, re-encode the hypotheses with CLIP, softmax,
   pick, score with jiwer); WER per alpha and the best alpha must be identical.

Run after the pipeline (it reads data/processed, data/nbest, data/cache and the models in params):
    python benchmarks/rescoring.py [--params params.yaml] [--utts 48] [--out results/benchmarks/rescoring.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jiwer
import numpy as np
import pandas as pd
import torch

from mmasr import config
from mmasr.rescoring.clip import add_clip_scores, load_embeddings
from mmasr.rescoring.fusion import alpha_grid, choose, fuse, grid_wer, masked_softmax, to_arrays
from mmasr.io import write_json
from mmasr.models.loading import clip_text_embeddings, load_from_params, whisper_generate_kwargs
from mmasr.data.audio import read_audio
from mmasr.rescoring.nbest import nbest_for_batch
from mmasr.data.text import clip_text, normaliser


def timed(fn, repeats: int = 1):
    """Result and median wall time over ``repeats`` runs (a sub-0.1 s path is noisy on a busy machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, float(np.median(times))


def bench_nbest(p: dict, manifest: pd.DataFrame, n_utts: int) -> dict:
    bundle = load_from_params("whisper", p["models"])
    norm = normaliser(p["text"])
    cfg = p["nbest"]
    utts = manifest[manifest["split"].isin(cfg["splits"])].sort_values("utt_id").head(n_utts)
    audios = [read_audio(a) for a in utts["audio_path"]]
    nbest_for_batch(bundle, audios[:2], cfg, norm)  # warm-up (allocations, lazy imports)
    seed_loop, t_seed = timed(lambda: [seed_generate_nbest(bundle, a, cfg) for a in audios], repeats=3)
    one_by_one, t_loop = timed(lambda: [nbest_for_batch(bundle, [a], cfg, norm)[0] for a in audios], repeats=3)
    bs = cfg["batch_size"]
    batched, t_batch = timed(lambda: [h for i in range(0, len(audios), bs)
                                      for h in nbest_for_batch(bundle, audios[i:i + bs], cfg, norm)], repeats=3)
    same_texts = all([h["text"] for h in a] == [h["text"] for h in b] for a, b in zip(one_by_one, batched))
    same_best = all(norm(s[0]) == norm(b[0]["text"]) for s, b in zip(seed_loop, batched))
    max_score_diff = max(abs(x["asr_score"] - y["asr_score"]) for a, b in zip(one_by_one, batched) for x, y in zip(a, b))
    return {"nbest_utts": len(audios), "nbest_batch_size": bs, "nbest_seed_loop_s": t_seed,
            "nbest_loop_s": t_loop, "nbest_batched_s": t_batch, "nbest_batched_speedup": t_seed / t_batch,
            "nbest_batching_alone_speedup": t_loop / t_batch, "nbest_same_best_as_seed_loop": bool(same_best),
            "nbest_seed_loop_mean_distinct": float(np.mean([len(s) for s in seed_loop])),
            "nbest_mean_distinct": float(np.mean([len(b) for b in batched])),
            "nbest_same_hypotheses": bool(same_texts), "nbest_max_score_diff": float(max_score_diff),
            "device": str(bundle.device)}


@torch.inference_mode()
def seed_generate_nbest(bundle, audio: np.ndarray, cfg: dict) -> list[str]:
    """Seed 000's ``generate_nbest``: Whisper's generate() on one utterance, distinct decoded texts."""
    feats = bundle.processor(audio, sampling_rate=16000, return_tensors="pt").input_features.to(bundle.device)
    out = bundle.model.generate(feats, num_beams=cfg["num_beams"], num_return_sequences=cfg["num_return_sequences"],
                                max_new_tokens=cfg["max_new_tokens"], return_dict_in_generate=True, output_scores=True,
                                **whisper_generate_kwargs(bundle, cfg["language"], cfg["task"]))
    texts = []
    for seq in out.sequences:
        text = bundle.processor.decode(seq, skip_special_tokens=True).strip().lower()
        if text not in texts:
            texts.append(text)
    return texts


def seed_loop_grid(nbest: pd.DataFrame, manifest: pd.DataFrame, embeddings: dict, bundle, p: dict,
                   alphas: np.ndarray) -> list[float]:
    """Seed 001's grid search: every alpha re-encodes every hypothesis with CLIP and re-scores with jiwer."""
    norm = normaliser(p["text"])
    meta = manifest.set_index("utt_id")
    groups = list(nbest.sort_values(["utt_id", "rank"]).groupby("utt_id", sort=True))
    wers = []
    for alpha in alphas:
        refs, hyps = [], []
        for utt, g in groups:
            texts = g["text"].fillna("").tolist()
            asr = masked_softmax(g["asr_score"].to_numpy()[None], np.ones((1, len(g)), bool))[0]
            image = meta.at[utt, "image_id"]
            if isinstance(image, str) and image in embeddings:
                with torch.inference_mode():
                    cos = clip_text_embeddings(bundle, [clip_text(t, p["text"]) for t in texts]) @ embeddings[image]
                clip = masked_softmax(p["fusion"]["tau"] * cos[None], np.ones((1, len(g)), bool))[0]
                score = (1 - alpha) * asr + alpha * clip
            else:
                score = asr
            refs.append(norm(meta.at[utt, "text"]))
            hyps.append(norm(texts[int(np.argmax(score))]))
        wers.append(jiwer.wer(refs, hyps))
    return wers


def bench_grid(p: dict, manifest: pd.DataFrame, split: str) -> dict:
    bundle = load_from_params("clip", p["models"])
    embeddings = load_embeddings("data/cache/clip_image_embeddings.npz")
    asr_nbest = pd.read_parquet("data/nbest/asr_nbest.parquet")
    ids = set(manifest.loc[manifest["split"] == split, "utt_id"])
    asr_nbest = asr_nbest[asr_nbest["utt_id"].isin(ids)]
    alphas = alpha_grid(p["fusion"])

    def vectorised():
        scored = add_clip_scores(asr_nbest, manifest, embeddings, bundle, p["text"], progress=False)
        nb = to_arrays(scored, manifest.set_index("utt_id")["text"], p["text"])
        return grid_wer(choose(fuse(nb.asr, nb.clip, nb.valid, alphas, p["fusion"]["tau"])), nb.errors, nb.ref_words)

    fast, t_fast = timed(vectorised, repeats=5)
    slow, t_slow = timed(lambda: seed_loop_grid(asr_nbest, manifest, embeddings, bundle, p, alphas))
    slow = np.array(slow)
    return {"grid_split": split, "grid_alphas": len(alphas), "grid_utts": len(ids), "grid_loop_s": t_slow,
            "grid_vectorised_s": t_fast, "grid_vectorised_speedup": t_slow / t_fast,
            "grid_identical_wer": bool(np.allclose(fast, slow, atol=1e-12)),
            "grid_identical_best_alpha": bool(alphas[np.argmin(fast)] == alphas[np.argmin(slow)])}


PIPELINE_OUTPUTS = ("data/processed/manifest.parquet", "data/nbest/asr_nbest.parquet",
                    "data/cache/clip_image_embeddings.npz")


def measure(p: dict, utts: int = 96, grid_split: str = "dev") -> dict:
    """Both comparisons on the pipeline's outputs under the current folder (FileNotFoundError before a run)."""
    missing = [f for f in PIPELINE_OUTPUTS if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"run the pipeline first (snakemake --cores 2); missing: {', '.join(missing)}")
    torch.manual_seed(p["seed"])
    manifest = pd.read_parquet("data/processed/manifest.parquet")
    return {**bench_nbest(p, manifest, utts), **bench_grid(p, manifest, grid_split),
            "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--utts", type=int, default=96, help="utterances for the n-best comparison")
    ap.add_argument("--grid-split", default="dev")
    ap.add_argument("--out", type=Path, default=Path("results/benchmarks/rescoring.json"))
    args = ap.parse_args(argv)
    try:
        result = measure(config.load(args.params), args.utts, args.grid_split)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    write_json(args.out, result)
    print(f"{'benchmark':<34}{'naive s':>10}{'fast s':>10}{'ratio':>9}  check")
    print(f"{'n-best, batched vs seed loop':<34}{result['nbest_seed_loop_s']:>10.2f}{result['nbest_batched_s']:>10.2f}"
          f"{result['nbest_batched_speedup']:>8.1f}x  same best hypothesis: {result['nbest_same_best_as_seed_loop']}; "
          f"distinct per utterance {result['nbest_seed_loop_mean_distinct']:.1f} vs {result['nbest_mean_distinct']:.1f}")
    print(f"{'n-best, batched vs batches of one':<34}{result['nbest_loop_s']:>10.2f}{result['nbest_batched_s']:>10.2f}"
          f"{result['nbest_batching_alone_speedup']:>8.1f}x  same hypotheses: {result['nbest_same_hypotheses']}")
    print(f"{'alpha grid, vectorised vs loop':<34}{result['grid_loop_s']:>10.2f}{result['grid_vectorised_s']:>10.3f}"
          f"{result['grid_vectorised_speedup']:>8.1f}x  identical WER per alpha: {result['grid_identical_wer']}, "
          f"best alpha: {result['grid_identical_best_alpha']}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
