"""Benchmark: does the cost per utterance of the data stages stay flat as the corpus grows?

For each size (default 1k, 5k, 20k utterances) a synthetic corpus is written: short 16 kHz WAVs (tones
plus noise, 0.5-1.0 s), a few speakers in two groups, three pictures per speaker (so speaker-disjoint splits
are also picture-disjoint), random five-word transcripts, and a manifest CSV (``data.source: manifest``).
The real stages then run on it, each as its own ``mmasr`` subprocess started from this small parent:
``ingest``, ``preprocess`` (``--workers`` processes, as the rule's ``threads``), ``split``, ``fuse`` and
``report``. The n-best and CLIP model stages are left out: ``fuse`` reads a synthetic n-best table of the
pipeline's columns (four hypotheses per dev/test utterance, ``clip_text``/``clip_cos`` as ``clip-scores``
writes them) and CLIP embedding caches of the right format, so the picture-swap control runs too.

Measured per stage: wall seconds, per-utterance milliseconds, and memory, polled every 0.1 s over the stage's
process and its workers: each process's peak RSS (``VmHWM``), the peak of their summed RSS, and the peak
summed USS (memory no other process shares: what the workers really add). Per size also the report's size
in bytes. ``scaling_per_utt_ratio_20k``: total wall seconds per utterance at the largest size over the
smallest (target <= 1.3: flat).

    python benchmarks/scaling.py [--sizes 1000 5000 20000] [--workers 2] [--out results/benchmarks/scaling.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import soundfile as sf
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if (REPO / "src" / "mmasr").is_dir():
    sys.path.insert(0, str(REPO / "src"))  # this checkout's code, in this process and in the stage subprocesses

from mmasr import config  # noqa: E402
from mmasr.io import write_json  # noqa: E402
from mmasr.memory import peak_rss_bytes  # noqa: E402
from mmasr.rescoring.clip import nbest_clip_texts, save_embeddings, save_text_embeddings  # noqa: E402
from mmasr.rescoring.nbest import NBEST_COLUMNS  # noqa: E402

STAGES = ("ingest", "preprocess", "split", "fuse", "report")
SR = 16000
N_SPEAKERS = 20  # 10 impaired + 10 control: splits of 3 dev / 5 test speakers at the default fractions
PICTURES_PER_SPEAKER = 3
WORDS = ("red blue green small big old new happy sad the a dog cat bear pear goat boat house tree car ball girl boy "
         "man woman runs jumps sits eats holds sees park table chair window door garden river hill cup bowl apple "
         "bread book lamp shoe hat coat bird fish horse cow sheep pig duck").split()


# --------------------------------------------------------------------------- the synthetic corpus


def speaker_name(i: int) -> str:
    return f"{'F' if i % 2 else 'FC'}{i:03d}"  # odd: impaired, even: control (TORGO-like names)


def utterance_audio(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """A tone with a harmonic, a little noise and 50 ms of near-silence at each end (trimmed by preprocess)."""
    n = int(seconds * SR)
    t = np.arange(n) / SR
    f0 = rng.uniform(100, 300)
    x = 0.5 * np.sin(2 * np.pi * f0 * t) + 0.2 * np.sin(4 * np.pi * f0 * t) + 0.05 * rng.standard_normal(n)
    pad = np.zeros(int(0.05 * SR))
    return np.concatenate([pad, x, pad]).astype(np.float32)


def generate_corpus(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` utterances under ``root`` and their manifest (``root/manifest.csv``); returns the manifest path."""
    rng = np.random.default_rng(seed)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    (root / "pictures").mkdir(exist_ok=True)
    for s in range(N_SPEAKERS):
        for k in range(PICTURES_PER_SPEAKER):
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            Image.new("RGB", (64, 48), colour).save(root / "pictures" / f"{speaker_name(s)}_{k}.png")
    rows = []
    for i in range(n):
        s = i % N_SPEAKERS
        spk = speaker_name(s)
        name = f"audio/{spk}_{i:06d}.wav"
        sf.write(root / name, utterance_audio(rng, rng.uniform(0.5, 1.0)), SR, subtype="PCM_16")
        rows.append({"audio_path": name, "text": " ".join(rng.choice(WORDS, 5)), "speaker": spk,
                     "image_path": f"pictures/{spk}_{int(rng.integers(PICTURES_PER_SPEAKER))}.png",
                     "group": "impaired" if s % 2 else "control", "utt_id": f"{spk}_{i:06d}"})
    path = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def synthetic_nbest(manifest: pd.DataFrame, text_cfg: dict, seed: int = 0, n_hyps: int = 4, dim: int = 32):
    """An n-best table for the dev/test utterances (the pipeline's columns plus ``clip_text``/``clip_cos``)
    and the two CLIP caches that ``fuse`` reads: ((ids, image vectors), (texts, text vectors)).
    Hypotheses are the reference with 0..3 words replaced; cosines are those of the cached vectors."""
    rng = np.random.default_rng(seed)
    rows = manifest[manifest["split"].isin(["dev", "test"])]
    image_ids = sorted(manifest["image_id"].dropna().unique())
    image_vecs = rng.standard_normal((len(image_ids), dim)).astype(np.float32)
    image_vecs /= np.linalg.norm(image_vecs, axis=1, keepdims=True)
    image_of = dict(zip(image_ids, image_vecs))
    records = []
    for utt, text, image in zip(rows["utt_id"], rows["text"], rows["image_id"]):
        words = str(text).split()
        for rank in range(n_hyps):
            hyp = list(words)
            for j in rng.choice(len(words), min(rank, len(words)), replace=False):
                hyp[j] = str(rng.choice(WORDS))
            hyp_text = " ".join(hyp)
            records.append({"utt_id": utt, "rank": rank, "text": hyp_text, "n_tokens": len(hyp) + 1,
                            "sum_logprob": -0.5 * (rank + 1) * len(hyp), "asr_score": -0.5 * (rank + 1) + 0.1 * rng.standard_normal(),
                            "beam_score": -0.5 * (rank + 1), "token_ids": list(range(len(hyp) + 1)), "complete": True,
                            "image_id": image if isinstance(image, str) else None})
    nbest = pd.DataFrame(records)
    nbest["clip_text"] = nbest_clip_texts(nbest, text_cfg)
    texts = sorted(set(nbest["clip_text"]))
    text_vecs = rng.standard_normal((len(texts), dim)).astype(np.float32)
    text_vecs /= np.linalg.norm(text_vecs, axis=1, keepdims=True)
    text_of = dict(zip(texts, text_vecs))
    nbest["clip_cos"] = [float(text_of[t] @ image_of[i]) if isinstance(i, str) else np.nan for t, i in zip(nbest["clip_text"], nbest["image_id"])]
    return nbest[NBEST_COLUMNS + ["clip_text", "clip_cos"]], (image_ids, image_vecs), (texts, text_vecs)


# --------------------------------------------------------------------------- running and watching a stage


class TreeWatch:
    """Polls a process and its descendants: per-process peak RSS (VmHWM, which the kernel keeps per process),
    and the peaks of the summed RSS and summed USS over time."""

    def __init__(self, pid: int, every_s: float = 0.1) -> None:
        self.root, self.every = psutil.Process(pid), every_s
        self.hwm: dict[int, int] = {}
        self.peak_rss_sum = self.peak_uss_sum = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            rss = uss = 0
            for proc in procs:
                try:
                    info = proc.memory_full_info()
                except psutil.Error:
                    continue
                rss, uss = rss + info.rss, uss + info.uss
                hwm = peak_rss_bytes(proc.pid)
                if hwm:
                    self.hwm[proc.pid] = max(self.hwm.get(proc.pid, 0), hwm)
            self.peak_rss_sum, self.peak_uss_sum = max(self.peak_rss_sum, rss), max(self.peak_uss_sum, uss)
            self._stop.wait(self.every)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        main = self.hwm.get(self.root.pid, 0)
        workers = [v for pid, v in self.hwm.items() if pid != self.root.pid]
        return {"peak_rss_main_mb": main / 2**20, "peak_rss_worker_max_mb": max(workers) / 2**20 if workers else None,
                "n_workers_seen": len(workers), "peak_rss_sum_mb": self.peak_rss_sum / 2**20,
                "peak_uss_sum_mb": self.peak_uss_sum / 2**20}


def stage_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}


def run_stage(name: str, args: list[str], cwd: Path, log: Path) -> dict:
    """``python -m mmasr.cli NAME ARGS`` in ``cwd``, timed and watched; raises with the log's tail on failure."""
    cmd = [sys.executable, "-m", "mmasr.cli", name, "--quiet", *args]
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=stage_env(), stdout=out, stderr=subprocess.STDOUT)
        watch = TreeWatch(proc.pid)
        rc = proc.wait()
        seconds = time.perf_counter() - start
        memory = watch.stop()
    if rc != 0:
        raise RuntimeError(f"mmasr {name} failed in {cwd} (exit {rc}):\n{log.read_text(errors='replace')[-3000:]}")
    return {"wall_s": seconds, **memory, **workers_reported(log.read_text(errors="replace"))}


WORKERS_LINE = re.compile(r"(\d+) worker processes, peak RSS up to ([\d.]+) MB each")


def workers_reported(log_text: str) -> dict:
    """The workers' own account of themselves in a stage's log (``mmasr preprocess`` writes it): the polling
    watch above misses workers that live less than one poll, as on a fast machine at small sizes."""
    found = WORKERS_LINE.search(log_text)
    if not found:
        return {}
    return {"n_workers_seen": int(found[1]), "peak_rss_worker_max_mb": float(found[2])}


def measure_size(work: Path, n: int, workers: int, params: Path, seed: int = 0) -> dict:
    """Generate a corpus of ``n`` utterances in ``work`` and run the stages on it."""
    t0 = time.perf_counter()
    manifest = generate_corpus(work / "corpus", n, seed)
    gen_s = time.perf_counter() - t0
    cfg = json.dumps({"data": {"source": "manifest", "manifest": str(manifest.resolve()), "root": None,
                               "require_image": False}})
    common = ["--params", str(params), "--cfg", cfg]
    (work / "logs").mkdir(exist_ok=True)
    stages = {}
    stages["ingest"] = run_stage("ingest", common, work, work / "logs" / "ingest.log")
    stages["preprocess"] = run_stage("preprocess", [*common, "--threads", str(workers)], work, work / "logs" / "preprocess.log")
    stages["split"] = run_stage("split", common, work, work / "logs" / "split.log")
    p = config.load(params)
    split_manifest = pd.read_parquet(work / "data/processed/manifest.parquet")
    nbest, (image_ids, image_vecs), (texts, text_vecs) = synthetic_nbest(split_manifest, p["text"], seed)
    (work / "data/nbest").mkdir(parents=True, exist_ok=True)
    nbest.to_parquet(work / "data/nbest/nbest.parquet", index=False)
    save_embeddings(work / "data/cache/clip_image_embeddings.npz", image_ids, image_vecs, {"model": "synthetic"})
    save_text_embeddings(work / "data/cache/clip_text_embeddings.npz", texts, text_vecs)
    stages["fuse"] = run_stage("fuse", [*common, "--nbest", "data/nbest/nbest.parquet"], work, work / "logs" / "fuse.log")
    stages["report"] = run_stage("report", [*common, "--root", ".", "--out", "results/report.html"], work,
                                 work / "logs" / "report.log")
    for s in stages.values():
        s["ms_per_utt"] = 1000 * s["wall_s"] / n
    total = sum(s["wall_s"] for s in stages.values())
    return {"n_utts": n, "n_kept": int(len(split_manifest)), "n_nbest_rows": int(len(nbest)),
            "generate_s": gen_s, "total_s": total, "ms_per_utt": 1000 * total / n, "stages": stages,
            "report_bytes": (work / "results/report.html").stat().st_size, "preprocess_workers": workers}


def per_utt_ratio(sizes: dict[int, dict]) -> float:
    """Total seconds per utterance at the largest size over the smallest."""
    small, large = min(sizes), max(sizes)
    return sizes[large]["ms_per_utt"] / sizes[small]["ms_per_utt"]


def stage_ratios(sizes: dict[int, dict]) -> dict[str, float]:
    """Per stage: seconds per utterance at the largest size over the smallest."""
    small, large = min(sizes), max(sizes)
    return {st: sizes[large]["stages"][st]["ms_per_utt"] / sizes[small]["stages"][st]["ms_per_utt"] for st in STAGES}


def marginal_ratio(sizes: dict[int, dict]) -> float | None:
    """Seconds per *added* utterance between the two largest sizes over that between the two smallest: with
    three sizes or more, fixed start-up costs (imports, ~1 s a stage) cancel, so a super-linear stage shows."""
    ns = sorted(sizes)
    if len(ns) < 3:
        return None
    def slope(a, b):
        return (sizes[b]["total_s"] - sizes[a]["total_s"]) / (b - a)
    return slope(ns[-2], ns[-1]) / slope(ns[0], ns[1])


def measure(sizes: list[int], workers: int, params: Path = REPO / "params.yaml", workdir: Path | None = None,
            keep: bool = False, warmup: int = 100) -> dict:
    """Each size in turn, after an untimed ``warmup`` run (0: none); the corpora are removed unless ``keep``."""
    results = {}
    if warmup:  # untimed: the first stage processes read Python, torch and pandas from a cold file cache
        work = Path(tempfile.mkdtemp(prefix="mmasr-scaling-warmup-", dir=workdir))
        try:
            measure_size(work, warmup, workers, params.resolve())
        finally:
            shutil.rmtree(work, ignore_errors=True)
    for n in sorted(sizes):
        work = Path(tempfile.mkdtemp(prefix=f"mmasr-scaling-{n}-", dir=workdir))
        try:
            print(f"scaling: {n} utterances in {work} ...", file=sys.stderr, flush=True)
            results[n] = measure_size(work, n, workers, params.resolve())
        finally:
            if not keep:
                shutil.rmtree(work, ignore_errors=True)
    largest = max(results)
    pre = results[largest]["stages"]["preprocess"]
    return {
        "scaling_per_utt_ratio_20k": per_utt_ratio(results) if len(results) > 1 else None,
        "scaling_marginal_ratio": marginal_ratio(results),
        "scaling_stage_ratios": stage_ratios(results) if len(results) > 1 else None,
        "scaling_sizes": sorted(results),
        "scaling_report_bytes_max": max(r["report_bytes"] for r in results.values()),
        "scaling_peak_rss_mb_max": max(s["peak_rss_sum_mb"] for r in results.values() for s in r["stages"].values()),
        "preprocess_peak_rss_per_worker_mb": pre["peak_rss_worker_max_mb"],
        "preprocess_peak_uss_sum_mb": pre["peak_uss_sum_mb"],
        "scaling": {str(n): r for n, r in results.items()},
        "device": f"cpu ({workers} preprocess workers)",
    }


def per_size_rows(result: dict) -> dict[str, dict]:
    """Per size, one flat row (for the report's tables): total and per-stage ms per utterance and peak summed
    RSS, the report's bytes, preprocess's peak RSS per worker."""
    rows = {}
    for n, r in result["scaling"].items():
        row = {"n_kept": r["n_kept"], "n_nbest_rows": r["n_nbest_rows"],
               "preprocess_workers_seen": r["stages"]["preprocess"]["n_workers_seen"], "total_ms_per_utt": r["ms_per_utt"], "total_s": r["total_s"], "report_bytes": r["report_bytes"],
               "preprocess_peak_rss_per_worker_mb": r["stages"]["preprocess"]["peak_rss_worker_max_mb"]}
        for stage in STAGES:
            row[f"{stage}_ms_per_utt"] = r["stages"][stage]["ms_per_utt"]
            row[f"{stage}_peak_rss_mb"] = r["stages"][stage]["peak_rss_sum_mb"]
        rows[n] = row
    return rows


def table(result: dict) -> str:
    lines = [f"{'stage':<12}" + "".join(f"{n:>14}" for n in result["scaling_sizes"]) + "   (ms per utterance; peak RSS MB)"]
    for stage in STAGES:
        cells = [result["scaling"][str(n)]["stages"][stage] for n in result["scaling_sizes"]]
        lines.append(f"{stage:<12}" + "".join(f"{c['ms_per_utt']:>7.2f} {c['peak_rss_sum_mb']:>6.0f}" for c in cells))
    lines.append(f"{'total':<12}" + "".join(f"{result['scaling'][str(n)]['ms_per_utt']:>14.2f}"
                                             for n in result["scaling_sizes"]))
    lines.append(f"{'report kB':<12}" + "".join(f"{result['scaling'][str(n)]['report_bytes'] / 1024:>14.0f}"
                                             for n in result["scaling_sizes"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="preprocess worker processes (the rule's threads, at most the cores)")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--workdir", type=Path, default=None, help="where the corpora go (default: the temporary folder)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--warmup", type=int, default=100, help="utterances of an untimed first run (0: none)")
    ap.add_argument("--out", type=Path, default=Path("results/benchmarks/scaling.json"))
    args = ap.parse_args(argv)
    result = measure(args.sizes, args.workers, args.params, args.workdir, args.keep, args.warmup)
    write_json(args.out, result)
    print(table(result))
    ratio = result["scaling_per_utt_ratio_20k"]
    print(f"per-utterance ratio largest/smallest: {ratio:.2f} (target <= 1.3: {'met' if ratio <= 1.3 else 'MISSED'})"
          if ratio is not None else "one size only: no ratio")
    if result["scaling_marginal_ratio"] is not None:
        print(f"seconds per added utterance, two largest sizes / two smallest: {result['scaling_marginal_ratio']:.2f}")
    print(f"preprocess: peak RSS per worker {result['preprocess_peak_rss_per_worker_mb'] or 0:.0f} MB, "
          f"summed USS {result['preprocess_peak_uss_sum_mb']:.0f} MB ({args.workers} workers)")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
