"""All of the pipeline's benchmarks in one command, measured on this machine in one run (so ratios are fair).

1. The full default pipeline from scratch in a temporary copy of this project (your data/ and results/
   are not touched): ``snakemake --cores N`` with the default profile, timed -> pipeline_wall_s.
2. In that copy, fusion.tau changed in params.yaml (as a user edits it) and Snakemake run again ->
   incremental_tau_wall_s, incremental_tau_fraction (of the full run; target < 0.10) and the rules that
   re-ran (incremental_tau_jobs: browser, fuse, report, scoring, systems_table).
3. Wall seconds and peak memory (max RSS) of every stage, from the copy's Snakemake benchmark files
   (results/benchmarks/<rule>.tsv of the full run) -> stages, peak_rss_mb.
4. Preprocessing throughput: seconds of audio kept / wall seconds of the preprocess job / its processes
   -> preprocess_audio_s_per_wall_s_per_core.
5. The four ratio benchmarks (benchmarks/rescoring.py, projector_cache.py, clap_cache.py) on the copy's
   outputs, in this process, with one torch thread setting (--threads).
   Then (measure_extras; --skip-real-shape, --skip-scaling) the projector cache at the real shape (Whisper
   small's encoder on the 30 s window vs its trimmed cache, SmolLM3 width with 2 layers, random weights) ->
   projector_cache_speedup_real_shape (target >= 10x), and benchmarks/scaling.py (synthetic manifests of
   1k/5k/20k utterances through ingest, preprocess, split, fuse, report) -> scaling_per_utt_ratio_20k
   (target <= 1.3), preprocess_peak_rss_per_worker_mb. projector_cache_speedup is the demo config, no target.
6. Audio-encoder passes per utterance with config/real_whisper.yaml's models (benchmarks/encode_once.py): the four
   encoder stages on the run's utterances, each its own pass (before) and one shared pass (after), counted by the
   stages themselves -> encoder_passes_per_utt_real_whisper {before, after}, encoder_passes_ratio_real_whisper.
6a. The full config/real_whisper.yaml pipeline (--real-whisper-run DIR, --real-whisper-baseline DIR): two finished
   runs of ``snakemake --cores 2 --configfile config/real_whisper.yaml`` from clean checkouts, this code (after) and
   an earlier commit (before), read, not run (each takes most of an hour on 2 cores) -> real_whisper_pipeline_seconds
   {before, after} (first job start to last job end; target: after < 45 min), real_whisper_pipeline_speedup, and
   every rule's wall seconds both ways (details.real_whisper_pipeline), printed as a before/after table.
6b. n-best on the real Whisper tiny.en (benchmarks/nbest_real.py; needs the real-whisper and speech extras):
   the seed's loop, the transformers backend at batch 1 and batched, ctranslate2 float32 and int8 on the same
   eSpeak NG utterances -> nbest_batching_speedup, nbest_ct2_fp32_speedup, nbest_ct2_int8_speedup (against the
   fastest transformers configuration), nbest_ct2_top1_agreement.
7. results/benchmarks.json (atomic write; every number with the device that produced it, ``devices``),
   a table on stdout, and the report re-rendered where results/report.html sits beside the output.

    python benchmarks/run.py [--cores 8] [--out results/benchmarks.json]
    python benchmarks/run.py --skip-pipeline --project DIR    # a finished run: tables and ratios only

With --skip-pipeline nothing is run through Snakemake: pipeline_wall_s is read from DIR's Snakemake
metadata (first job start to last job end) and the incremental re-run is not measured (null).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if (REPO / "src" / "mmasr").is_dir():
    sys.path.insert(0, str(REPO / "src"))  # benchmark this checkout's code, as the pipeline copy runs it
sys.path.insert(0, str(HERE))

import clap_cache  # noqa: E402  (siblings: benchmarks/*.py)
import encode_once  # noqa: E402
import nbest_real  # noqa: E402
import pandas as pd  # noqa: E402
import projector_cache  # noqa: E402
import rescoring  # noqa: E402
import scaling  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from mmasr import config  # noqa: E402
from mmasr.io import write_json  # noqa: E402
from mmasr.models.loading import pick_device  # noqa: E402
from mmasr.report.build import benchmark_table, hms, per_rule_times  # noqa: E402

# What a user's clone holds that a pipeline run needs (the copy gets nothing else: no data, no results).
PROJECT_FILES = ("Snakefile", "params.yaml", "dvc.yaml", ".dvcignore")
PROJECT_DIRS = ("workflow", "src")

CONTRACT_KEYS = ("nbest_batched_speedup", "grid_vectorised_speedup", "projector_cache_speedup", "clap_cache_speedup",
                 "incremental_tau_fraction", "pipeline_wall_s", "device")

# key -> (comparison, threshold, as shown): the targets the issues set for each measure.
TARGETS = {
    "nbest_batched_speedup": (">=", 3.0, ">= 3x"),
    "grid_vectorised_speedup": (">=", 100.0, ">= 100x"),
    "projector_cache_speedup": (">=", 5.0, ">= 5x"),
    "clap_cache_speedup": (">=", 10.0, ">= 10x"),
    "incremental_tau_fraction": ("<", 0.10, "< 10%"),
    **{key: (">=", threshold, shown) for key, (threshold, shown) in nbest_real.TARGETS.items()},
}

# Issue 18 items 4 and 6 (measure_extras): the projector cache at the real shape replaces the demo-config
# target (the demo ratio is still measured and shown, as "demo config"), and the scaling benchmark.
TARGETS.pop("projector_cache_speedup")
TARGETS.update({"projector_cache_speedup_real_shape": (">=", 10.0, ">= 10x"),
                "scaling_per_utt_ratio_20k": ("<=", 1.3, "<= 1.3")})
CONTRACT_KEYS += ("projector_cache_speedup_real_shape", "scaling_per_utt_ratio_20k")
# Issue 29: the whole config/real_whisper.yaml run on a 2-core CPU (its ``after`` value).
TARGETS["real_whisper_pipeline_seconds"] = ("<", 45 * 60.0, "< 45 min (after)")

# Each headline ratio and the benchmark (benchmarks/<name>.py) that measures it.
RATIOS = {"nbest_batched_speedup": "rescoring", "grid_vectorised_speedup": "rescoring",
          "projector_cache_speedup": "projector_cache", "clap_cache_speedup": "clap_cache"}

# The correctness check beside each ratio: a speed-up counts only if both ways give the same results.
RATIO_CHECKS = ("nbest_same_best_as_seed_loop", "nbest_same_hypotheses", "grid_identical_wer",
                "grid_identical_best_alpha", "projector_same_loss_curve", "clap_cache_same_loss")


# --------------------------------------------------------------------------- running the pipeline


def copy_project(src: Path, dest: Path) -> Path:
    """The files of ``src`` that a run needs (sources, workflow, params), without data or results."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
    for name in PROJECT_DIRS:
        shutil.copytree(src / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dest


def pipeline_env(project: Path) -> dict[str, str]:
    """This interpreter's scripts (snakemake, mmasr) first on PATH, and the project's own src/ first on
    PYTHONPATH, so the Snakefile and every job's ``mmasr`` command run the copied code."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    pythonpath = os.pathsep.join(filter(None, [str(project.resolve() / "src"), os.environ.get("PYTHONPATH", "")]))
    return {**os.environ, "PATH": path, "PYTHONPATH": pythonpath}


def run_snakemake(project: Path, cores: int, configfile: str | None, log: Path) -> float:
    """Snakemake in ``project`` (its default profile, ``--cores``); the wall seconds. Output goes to ``log``."""
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(cores), *(["--configfile", configfile] if configfile else [])]
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=project, env=pipeline_env(project), stdout=out, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{' '.join(cmd)} failed in {project} (exit {proc.returncode}); log {log}:\n{tail}")
    return seconds


def set_param(params_file: Path, section: str, key: str, value: float) -> float:
    """Change one ``section.key`` in a params YAML file in place, as a user edits it (the line only, comments
    kept); returns the old value. Checks that nothing else changed."""
    text = params_file.read_text()
    before = yaml.safe_load(text) or {}
    old = config.validate(before)[section][key]
    block = re.search(rf"^{re.escape(section)}:[^\n]*\n(?:(?:[ \t]+[^\n]*|[ \t]*)(?:\n|\Z))*", text, flags=re.M)
    if block is None:
        new_text = f"{text.rstrip()}\n{section}:\n  {key}: {value!r}\n"
    else:
        body, n = re.subn(rf"^([ \t]+{re.escape(key)}:[ \t]*)[^\s#]+", lambda m: m.group(1) + repr(value),
                          block.group(0), count=1, flags=re.M)
        if not n:
            head, _, rest = block.group(0).partition("\n")
            body = f"{head}\n  {key}: {value!r}\n{rest}"
        new_text = text[:block.start()] + body + text[block.end():]
    expected = config.deep_merge(before, {section: {key: value}})
    if yaml.safe_load(new_text) != expected:
        raise ValueError(f"{params_file}: could not change only {section}.{key}")
    params_file.write_text(new_text)
    return old


def tsv_state(bench_dir: Path) -> dict[str, int]:
    """Modification time of every Snakemake benchmark file: a job that runs rewrites its own."""
    return {str(p.relative_to(bench_dir)): p.stat().st_mtime_ns for p in sorted(bench_dir.rglob("*.tsv"))}


def rerun_rules(before: dict[str, int], after: dict[str, int]) -> list[str]:
    """Rules (``fuse``, ``nbest`` for ``nbest/0-of-2.tsv``) whose benchmark file is new or rewritten."""
    return sorted({Path(rel).parts[0].removesuffix(".tsv") for rel, t in after.items() if before.get(rel) != t})


def incremental_tau(project: Path, cores: int, configfile: str | None, log: Path, tau: float | None = None) -> dict:
    """Change only fusion.tau in ``project``'s params.yaml and run Snakemake again: its wall time and the
    rules that re-ran."""
    bench_dir = project / "results" / "benchmarks"
    p = config.load(project / "params.yaml")
    new = float(tau) if tau is not None else p["fusion"]["tau"] / 2
    before = tsv_state(bench_dir)
    old = set_param(project / "params.yaml", "fusion", "tau", new)
    seconds = run_snakemake(project, cores, configfile, log)
    return {"incremental_tau_wall_s": seconds, "incremental_tau_jobs": rerun_rules(before, tsv_state(bench_dir)),
            "incremental_tau_change": f"fusion.tau {old!r} -> {new!r}"}


# --------------------------------------------------------------------------- reading a finished run


def stage_table(bench_dir: Path) -> dict[str, dict]:
    """Per rule (shards summed): jobs, wall seconds, CPU seconds, peak memory (max RSS, MB)."""
    rules = per_rule_times(benchmark_table(bench_dir))
    return {r["rule"]: {"jobs": int(r["jobs"]), "wall_s": round(float(r["s"]), 3),
                        "cpu_s": None if pd.isna(r["cpu_time_s"]) else round(float(r["cpu_time_s"]), 3),
                        "max_rss_mb": None if pd.isna(r["max_rss_mb"]) else round(float(r["max_rss_mb"]), 1)}
            for r in rules.to_dict("records")}


def snakemake_records(project: Path) -> list[dict]:
    """Snakemake's metadata about each output file of the runs in ``project`` (rule, shell command, times)."""
    records = []
    folder = project / ".snakemake" / "metadata"
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return [r for r in records if isinstance(r, dict)]


def rule_threads(records: list[dict], rule: str) -> int | None:
    """The thread count a rule's job ran with (``--threads N`` or ``MMASR_THREADS=N`` in its command)."""
    found = [int(m.group(1)) for r in records if r.get("rule") == rule
             for m in [re.search(r"(?:--threads[ =]|MMASR_THREADS=)(\d+)", r.get("shellcmd") or "")] if m]
    return max(found) if found else None


def metadata_span_s(records: list[dict]) -> float | None:
    """First job start to last job end, over the recorded jobs (a whole run's wall time, if it was one run)."""
    starts = [r["starttime"] for r in records if isinstance(r.get("starttime"), (int, float))]
    ends = [r["endtime"] for r in records if isinstance(r.get("endtime"), (int, float))]
    return float(max(ends) - min(starts)) if starts and ends else None


def throughput(audio_s: float, wall_s: float, cores: int) -> float:
    """Seconds of audio per wall second per core."""
    return audio_s / wall_s / max(1, cores)


def preprocess_measures(project: Path, stages: dict[str, dict], records: list[dict], fallback_threads: int) -> dict:
    manifest = project / "data" / "processed" / "manifest.parquet"
    stage = stages.get("preprocess")
    if stage is None or not manifest.is_file():
        return {}
    audio_s = float(pd.read_parquet(manifest, columns=["duration_s"])["duration_s"].sum())
    threads = rule_threads(records, "preprocess") or fallback_threads
    return {"preprocess_audio_s": round(audio_s, 3), "preprocess_wall_s": stage["wall_s"],
            "preprocess_threads": threads,
            "preprocess_audio_s_per_wall_s_per_core": throughput(audio_s, stage["wall_s"], threads)}


# --------------------------------------------------------------------------- the ratio benchmarks


def load_params(project: Path, configfile: Path | None) -> dict:
    """The project's params.yaml with ``configfile`` merged over it (as ``snakemake --configfile`` does)."""
    extra = yaml.safe_load(configfile.read_text()) if configfile else None
    return config.load(project / "params.yaml", json.dumps(extra) if extra else None)


def describe(device: str, threads: int) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{device} ({threads} threads)"


def ratio_benchmarks(project: Path, p: dict, threads: int, nbest_utts: int, grid_split: str,
                     projector_steps: int | None, clap_repeats: int) -> tuple[dict, dict, dict]:
    """The four ratios on ``project``'s outputs: (flat results, details per benchmark, device per result)."""
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the seed loop's generate() warns about max_length on every call
    try:
        with contextlib.chdir(project):  # the benchmarks and the models named in params use project-relative paths
            details = {
                "rescoring": rescoring.measure(p, nbest_utts, grid_split),
                "projector_cache": projector_cache.measure(p, Path("data/processed/manifest.parquet"),
                                                           Path("data/cache/encoder_features"), projector_steps,
                                                           threads),
                "clap_cache": clap_cache.measure(p, Path("data/cache/clap_embeddings"), clap_repeats),
            }
    finally:
        hf_logging.set_verbosity(verbosity)
    for result in details.values():
        result["device"] = describe(str(result["device"]), threads)
        result.pop("threads", None), result.pop("torch_threads", None)  # one setting for all: the top-level ``threads``
    flat = {key: details[name][key] for key, name in RATIOS.items()}
    devices = {key: details[name]["device"] for key, name in RATIOS.items()}
    flat["ratio_results_identical"] = all(bool(d[k]) for d in details.values() for k in RATIO_CHECKS if k in d)
    return flat, details, devices


def measure_extras(args: argparse.Namespace, p: dict) -> tuple[dict, dict, dict]:
    """Issue 18 items 4 and 6: (flat results, details, device per result). Each can be skipped (None)."""
    flat: dict = {"projector_cache_speedup_real_shape": None, "scaling_per_utt_ratio_20k": None}
    details, devices = {}, {}
    if not args.skip_real_shape:
        print("[extra] the projector cache at the real shape (Whisper small, SmolLM3 width) ...", file=sys.stderr)
        real = projector_cache.measure_real_shape(p, args.real_shape_batch, args.real_shape_steps, args.threads)
        real["device"] = describe(str(real["device"]), args.threads)
        real.pop("threads", None)
        details["projector_cache_real_shape"] = real
        flat.update({k: real[k] for k in ("projector_cache_speedup_real_shape", "real_shape_live_step_seconds",
                                          "real_shape_cached_step_seconds", "projector_real_shape_same_loss_curve")})
        devices["projector_cache_speedup_real_shape"] = real["device"]
    if not args.skip_scaling:
        print(f"[extra] scaling: {args.scaling_sizes} utterances ...", file=sys.stderr)
        sc = scaling.measure(args.scaling_sizes, args.scaling_workers or min(8, args.cores), warmup=args.scaling_warmup)
        details["scaling"] = {k: v for k, v in sc.items() if k != "scaling"}
        flat["scaling_per_size"] = scaling.per_size_rows(sc)  # top level: the report shows each size as a table
        flat.update({k: sc[k] for k in ("scaling_per_utt_ratio_20k", "scaling_marginal_ratio", "scaling_sizes",
                                        "scaling_report_bytes_max", "preprocess_peak_rss_per_worker_mb")})
        for key in ("scaling_per_utt_ratio_20k", "preprocess_peak_rss_per_worker_mb"):
            devices[key] = sc["device"]
    return flat, details, devices
def real_nbest(args: argparse.Namespace, work: Path, details: dict, devices: dict) -> dict:
    """benchmarks/nbest_real.py's ratios (None, said on stderr, when skipped or its extras are missing);
    its full result goes into ``details``, its device into ``devices``."""
    keys = {key: None for key in nbest_real.TARGETS}
    if args.nbest_real_utts <= 0:
        return keys
    print(f"[+] n-best on the real Whisper tiny.en ({args.nbest_real_utts} utterances, five ways) ...", file=sys.stderr)
    try:
        real = nbest_real.measure(args.nbest_real_utts, 16, args.threads, args.nbest_real_rounds,
                                  work / "data" / "cache" / "nbest_real")
    except (ImportError, FileNotFoundError) as exc:
        print(f"      not measured: {exc}", file=sys.stderr)
        return keys
    print(nbest_real.report(real), file=sys.stderr)
    details["nbest_real"] = real
    for key in keys:
        devices[key] = describe(str(real["device"]), args.threads)
    return {key: real[key] for key in keys}


def encoder_passes(args: argparse.Namespace, work: Path, p: dict, details: dict, devices: dict) -> dict:
    """benchmarks/encode_once.py on the run's utterances: audio-encoder passes per utterance with
    config/real_whisper.yaml's models (one encoder for models.whisper and models.audio_encoder), each stage its
    own pass (before) and one shared pass (after), counted by the stages; None when skipped or it fails."""
    keys = {"encoder_passes_per_utt_real_whisper": None, "encoder_passes_ratio_real_whisper": None}
    if args.encoder_passes_utts <= 0:
        return keys
    model = args.encoder_passes_model or p["models"]["whisper"]
    print(f"[+] encoder passes per utterance, real_whisper.yaml's layout ({model}) ...", file=sys.stderr)
    try:
        with contextlib.chdir(work):
            r = encode_once.measure(p, pd.read_parquet("data/processed/manifest.parquet"), model,
                                    work / "data" / "cache" / "bench_encode_once", args.encoder_passes_utts, args.threads)
    except (ImportError, FileNotFoundError, OSError, RuntimeError, ValueError) as exc:
        print(f"      not measured: {exc}", file=sys.stderr)
        return keys
    print(encode_once.report(r), file=sys.stderr)
    details["encoder_passes"] = r
    devices["encoder_passes_ratio_real_whisper"] = f"counted ({r['encoder_passes_utts']} utterances, {model})"
    return {k: r[k] for k in keys}


def pipeline_run(project: Path) -> dict:
    """A finished (or stopped) Snakemake run in ``project``: its commit, wall seconds (first job start to last
    job end), whether it got to the report, and every rule's stage-table row."""
    commit = subprocess.run(["git", "-C", str(project), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or None
    return {"project": str(project), "commit": commit, "seconds": metadata_span_s(snakemake_records(project)),
            "finished": (project / "results" / "report.html").is_file(),
            "stages": stage_table(project / "results" / "benchmarks")}


def real_whisper_pipeline(args: argparse.Namespace, details: dict, devices: dict) -> dict:
    """Issue 29 item 3: the runs named by --real-whisper-run (after) and --real-whisper-baseline (before),
    read from their Snakemake metadata and benchmark files. None where a run is not named."""
    runs = {"before": args.real_whisper_baseline, "after": args.real_whisper_run}
    if not any(runs.values()):
        return {"real_whisper_pipeline_seconds": None, "real_whisper_pipeline_speedup": None}
    read = {}
    for when, project in runs.items():
        if project is not None:
            if not (project / ".snakemake" / "metadata").is_dir():
                raise FileNotFoundError(f"{project}: no Snakemake run there (.snakemake/metadata is missing)")
            read[when] = pipeline_run(project.resolve())
    details["real_whisper_pipeline"] = read
    seconds = {when: read[when]["seconds"] if when in read else None for when in runs}
    finished = all(r["finished"] for r in read.values())
    speedup = seconds["before"] / seconds["after"] if finished and seconds["before"] and seconds["after"] else None
    devices["real_whisper_pipeline_seconds"] = "; ".join(
        f"{when}: {r['commit']}{'' if r['finished'] else ' (did not finish)'}" for when, r in read.items())
    return {"real_whisper_pipeline_seconds": seconds, "real_whisper_pipeline_speedup": speedup}


def pipeline_comparison_rows(runs: dict[str, dict]) -> list[list[str]]:
    """rule | before s | after s, the slowest (before, else after) first, then the whole run's wall seconds."""
    before, after = (runs.get(w, {}).get("stages") or {} for w in ("before", "after"))

    def cell(stages: dict, rule: str) -> str:
        return f"{stages[rule]['wall_s']:.0f}" if rule in stages else ""

    rules = sorted(set(before) | set(after), key=lambda r: (-(before.get(r) or after[r])["wall_s"], r))
    rows = [[rule, cell(before, rule), cell(after, rule)] for rule in rules]

    def total(when: str) -> str:
        r = runs.get(when)
        if not r or r["seconds"] is None:
            return ""
        return f"{r['seconds']:.0f} ({hms(r['seconds'])})" + ("" if r["finished"] else ", did not finish")
    return rows + [["whole run (first job start to last job end)", total("before"), total("after")]]


# --------------------------------------------------------------------------- output


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def target_met(key: str, value) -> bool | None:
    if isinstance(value, dict):  # {before, after}: the target is for after
        value = value.get("after")
    if key not in TARGETS or not isinstance(value, (int, float)):
        return None
    op, threshold, _ = TARGETS[key]
    return {"<": value < threshold, "<=": value <= threshold, ">": value > threshold, ">=": value >= threshold}[op]


def summary_rows(r: dict) -> list[list[str]]:
    """measure | value | target | device, for the printed table."""
    def num(key, text):
        value = r.get(key)
        return "not measured" if value is None else text(value)

    def target(key):
        met = target_met(key, r.get(key))
        return "" if key not in TARGETS else TARGETS[key][2] + ("" if met is None else " (met)" if met else " (MISSED)")

    jobs = r.get("incremental_tau_jobs")
    rows = [
        ("n-best: batched vs seed loop", "nbest_batched_speedup", lambda v: f"{v:.1f}x"),
        ("alpha grid: vectorised vs seed loop", "grid_vectorised_speedup", lambda v: f"{v:.0f}x"),
        ("projector: feature cache vs live encoder (demo config)", "projector_cache_speedup", lambda v: f"{v:.1f}x"),
        ("CLAP: embedding cache vs re-encoding", "clap_cache_speedup", lambda v: f"{v:.0f}x"),
        ("n-best, real tiny.en: batched vs batch 1", "nbest_batching_speedup", lambda v: f"{v:.2f}x"),
        ("n-best, real tiny.en: ctranslate2 float32", "nbest_ct2_fp32_speedup", lambda v: f"{v:.2f}x"),
        ("n-best, real tiny.en: ctranslate2 int8", "nbest_ct2_int8_speedup", lambda v: f"{v:.2f}x"),
        ("n-best, real tiny.en: ct2 top-1 agreement", "nbest_ct2_top1_agreement", lambda v: f"{v:.0%}"),
        ("full pipeline from scratch", "pipeline_wall_s", lambda v: f"{v:.0f} s ({hms(v)})"),
        ("re-run after changing fusion.tau", "incremental_tau_fraction",
         lambda v: f"{v:.1%} ({r['incremental_tau_wall_s']:.1f} s: {', '.join(jobs or [])})"),
        ("preprocessing (audio s / wall s / core)", "preprocess_audio_s_per_wall_s_per_core", lambda v: f"{v:.1f}"),
        ("peak memory (max RSS)", "peak_rss_mb", lambda v: f"{v:.0f} MB ({r.get('peak_rss_rule')})"),
        ("audio-encoder passes/utt, real_whisper layout", "encoder_passes_ratio_real_whisper",
         lambda v: "{before:.2f} before, {after:.2f} after: {v:.2f}x fewer".format(
             v=v, **r["encoder_passes_per_utt_real_whisper"])),
        ("full real_whisper.yaml pipeline, 2-core runs", "real_whisper_pipeline_seconds", pipeline_seconds_text),
        *extra_rows(r),
    ]
    return [[label, num(key, text), target(key), r.get("devices", {}).get(key, "")] for label, key, text in rows]


def pipeline_seconds_text(v: dict) -> str:
    """``{before, after}`` seconds as the summary table shows them."""
    return ", ".join(f"{v[w]:.0f} s {w}" for w in ("before", "after") if v.get(w) is not None) or "not measured"


def extra_rows(r: dict) -> list[tuple]:
    """The rows of measure_extras: the real-shape projector cache and the scaling benchmark."""
    sizes = "/".join(f"{n // 1000}k" if n >= 1000 else str(n) for n in r.get("scaling_sizes") or [])
    return [
        ("projector: feature cache vs live encoder (real shape)", "projector_cache_speedup_real_shape",
         lambda v: f"{v:.1f}x ({r['real_shape_live_step_seconds']:.1f} s vs {r['real_shape_cached_step_seconds']:.2f} s a step)"),
        ("scaling: s/utterance, largest / smallest corpus", "scaling_per_utt_ratio_20k",
         lambda v: f"{v:.2f} ({sizes} utts; report {r['scaling_report_bytes_max'] / 1024:.0f} kB max)"),
        ("preprocess: peak RSS per worker", "preprocess_peak_rss_per_worker_mb", lambda v: f"{v:.0f} MB"),
    ]


def format_table(headers: list[str], rows: list[list]) -> str:
    """A plain-text table: columns padded to their widest cell, a rule under the header."""
    cells = [[str(c) for c in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def stage_rows(stages: dict[str, dict]) -> list[list]:
    ordered = sorted(stages.items(), key=lambda kv: -(kv[1].get("wall_s") or 0))
    return [[rule, s["jobs"], f"{s['wall_s']:.1f}", "" if s["cpu_s"] is None else f"{s['cpu_s']:.1f}",
             "" if s["max_rss_mb"] is None else f"{s['max_rss_mb']:.0f}"] for rule, s in ordered]


def rerender_report(out: Path) -> Path | None:
    """Re-render results/report.html beside ``out`` (``<root>/results/benchmarks.json``), if there is one."""
    out = out.resolve()
    report = out.parent / "report.html"
    if out.parent.name != "results" or not report.is_file():
        return None
    from mmasr.cli import main as mmasr_main

    return report if mmasr_main(["report", "--root", str(out.parent.parent), "--out", str(report)]) == 0 else None


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="snakemake --cores (default: all)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for the ratio benchmarks (default: 2, as the model rules, at most --cores)")
    ap.add_argument("--out", type=Path, default=Path("results/benchmarks.json"))
    ap.add_argument("--project", type=Path, default=REPO,
                    help="the project to copy and run (default: this checkout); with --skip-pipeline, a finished run")
    ap.add_argument("--configfile", type=Path, default=None,
                    help="merged over params.yaml, as snakemake --configfile (e.g. real models, a smaller corpus)")
    ap.add_argument("--skip-pipeline", action="store_true",
                    help="run nothing through Snakemake: read --project's finished run, measure the ratios there")
    ap.add_argument("--workdir", type=Path, default=None, help="where to put the copy (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the copy afterwards (it is kept anyway on failure)")
    ap.add_argument("--tau", type=float, default=None, help="the new fusion.tau for the re-run (default: half)")
    ap.add_argument("--nbest-utts", type=int, default=96, help="utterances for the n-best comparison")
    ap.add_argument("--grid-split", default="dev")
    ap.add_argument("--projector-steps", type=int, default=None, help="default: one epoch of the train split")
    ap.add_argument("--clap-repeats", type=int, default=5, help="cached CLAP epochs timed (median)")
    ap.add_argument("--nbest-real-utts", type=int, default=48,
                    help="eSpeak NG utterances for the real-tiny.en n-best benchmark (0: skip it)")
    ap.add_argument("--nbest-real-rounds", type=int, default=2, help="rounds of the real-tiny.en n-best benchmark")
    ap.add_argument("--encoder-passes-utts", type=int, default=24,
                    help="utterances for the encoder-passes count (benchmarks/encode_once.py; 0: skip it)")
    ap.add_argument("--encoder-passes-model", default=None,
                    help="the encoder it counts with (default: the run's models.whisper, the demo Whisper unless "
                         "--configfile names another; e.g. results/checkpoints/whisper-tiny.en)")
    ap.add_argument("--real-whisper-run", type=Path, default=None,
                    help="a finished `snakemake --cores 2 --configfile config/real_whisper.yaml` run of this code, "
                         "from a clean checkout: its wall and per-rule times are read (nothing is run)")
    ap.add_argument("--real-whisper-baseline", type=Path, default=None,
                    help="the same run of an earlier commit (the before column), read the same way")
    ap.add_argument("--no-report", action="store_true", help="do not re-render results/report.html beside --out")
    ap.add_argument("--skip-real-shape", action="store_true", help="not the real-shape projector benchmark (~5 min)")
    ap.add_argument("--real-shape-batch", type=int, default=4, help="utterances per real-shape projector step")
    ap.add_argument("--real-shape-steps", type=int, default=2, help="steady-state real-shape steps timed each way")
    ap.add_argument("--skip-scaling", action="store_true", help="not the scaling benchmark (~10 min at the default sizes)")
    ap.add_argument("--scaling-sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    ap.add_argument("--scaling-warmup", type=int, default=100, help="utterances of an untimed first scaling run")
    ap.add_argument("--scaling-workers", type=int, default=None, help="preprocess workers (default: --cores, at most 8)")
    args = ap.parse_args(argv)
    args.threads = args.threads or min(2, args.cores)
    return args


def measure(args: argparse.Namespace, work: Path) -> dict:
    """Every measurement; ``work`` is the copy (or, with --skip-pipeline, the finished run)."""
    p = load_params(args.project, args.configfile)
    engine = str(pick_device(p["models"]["device"]))
    result: dict = {"cores": args.cores, "threads": args.threads, "machine": machine(), "devices": {}}
    if args.skip_pipeline:
        run_device = f"{engine} (an earlier run of {work})"
        result.update(pipeline_wall_s=metadata_span_s(snakemake_records(work)),
                      pipeline_wall_source="Snakemake metadata: first job start to last job end",
                      incremental_tau_wall_s=None, incremental_tau_fraction=None, incremental_tau_jobs=None)
        stages = stage_table(work / "results" / "benchmarks")
    else:
        run_device = f"{engine} (snakemake --cores {args.cores})"
        configfile = None
        if args.configfile:
            (work / "config").mkdir(exist_ok=True)
            configfile = f"config/{args.configfile.name}"
            shutil.copy(args.configfile, work / configfile)
        print(f"[1/3] the full pipeline from scratch in {work} (snakemake --cores {args.cores}) ...", file=sys.stderr)
        result["pipeline_wall_s"] = run_snakemake(work, args.cores, configfile, work / "benchmark-full-run.log")
        result["pipeline_wall_source"] = "measured"
        stages = stage_table(work / "results" / "benchmarks")  # before the re-run rewrites fuse's and report's
        print(f"      {result['pipeline_wall_s']:.0f} s; [2/3] again after changing fusion.tau ...", file=sys.stderr)
        result.update(incremental_tau(work, args.cores, configfile, work / "benchmark-tau-run.log", args.tau))
        result["incremental_tau_fraction"] = result["incremental_tau_wall_s"] / result["pipeline_wall_s"]
        p = load_params(work, work / configfile if configfile else None)  # the ratios see the edited tau too
    result["stages"] = stages
    if stages:
        peak = max(stages, key=lambda rule: stages[rule]["max_rss_mb"] or 0)
        result.update(peak_rss_mb=stages[peak]["max_rss_mb"], peak_rss_rule=peak)
    result.update(preprocess_measures(work, stages, snakemake_records(work), args.cores))
    for key in ("pipeline_wall_s", "incremental_tau_wall_s", "incremental_tau_fraction", "peak_rss_mb"):
        result["devices"][key] = run_device
    result["devices"]["preprocess_audio_s_per_wall_s_per_core"] = f"cpu ({result.get('preprocess_threads')} processes)"

    print("[3/3] the ratio benchmarks (n-best, alpha grid, projector cache, CLAP cache) ...", file=sys.stderr)
    flat, details, devices = ratio_benchmarks(work, p, args.threads, args.nbest_utts, args.grid_split,
                                              args.projector_steps, args.clap_repeats)
    result.update(flat, details=details)
    result["devices"].update(devices)
    flat, extra_details, devices = measure_extras(args, p)
    result.update(flat)
    result["details"].update(extra_details)
    result["devices"].update(devices)
    if result.get("projector_real_shape_same_loss_curve") is False:
        result["ratio_results_identical"] = False
    result.update(real_nbest(args, work, details, result["devices"]))
    result.update(encoder_passes(args, work, p, details, result["devices"]))
    result.update(real_whisper_pipeline(args, details, result["devices"]))
    m = result["machine"]
    result["device"] = f"{describe(engine, args.threads)}; {m['cpu_count']} cores: {m['cpu']}"
    result["targets"] = {k: TARGETS[k][2] for k in TARGETS}
    result["targets_missed"] = [k for k in TARGETS if target_met(k, result.get(k)) is False]
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.project = args.project.resolve()
    if args.skip_pipeline:
        work, temporary = args.project, False
    else:
        temporary = args.workdir is None
        work = Path(tempfile.mkdtemp(prefix="mmasr-bench-")) if temporary else args.workdir.resolve()
        if not temporary and work.exists() and any(work.iterdir()):
            print(f"--workdir {work} is not empty", file=sys.stderr)
            return 2
        copy_project(args.project, work)
    try:
        result = measure(args, work)
    except (RuntimeError, FileNotFoundError, ValueError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        if not args.skip_pipeline:
            print(f"the copy is kept for inspection: {work}", file=sys.stderr)
        return 1
    if temporary and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    elif not args.skip_pipeline:
        print(f"the copy is kept: {work}", file=sys.stderr)
    write_json(args.out, result)

    print(format_table(["measure", "value", "target", "device"], summary_rows(result)))
    if result["stages"]:
        print()
        print(format_table(["stage (rule)", "jobs", "wall s", "CPU s", "max RSS MB"], stage_rows(result["stages"])))
    if result["details"].get("real_whisper_pipeline"):
        print("\nconfig/real_whisper.yaml, snakemake --cores 2, wall seconds per rule:")
        print(format_table(["rule", "before", "after"], pipeline_comparison_rows(result["details"]["real_whisper_pipeline"])))
    print(f"\nratio benchmarks give the same results both ways: {'yes' if result['ratio_results_identical'] else 'NO'}")
    print(f"written to {args.out}")
    report = None if args.no_report else rerender_report(args.out)
    if report:
        print(f"report re-rendered: {report}")
    return 0 if result["ratio_results_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
