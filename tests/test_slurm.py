"""Cluster execution: the tiny config's rescoring results (TARGETS) through a real one-node SLURM
cluster (tests/cluster/slurm_up.sh)
and `snakemake --workflow-profile workflow/profiles/slurm`, compared with a local run of the same
config; the n-best shards' retries; the SLURM profile's resources.

The SLURM tests skip, saying why, where no cluster can be started (SLURM not installed, not root);
`.ci/run` installs and starts one, so they run in CI, and under CI=true a missing cluster fails them. Every `mmasr` call goes through a test double
(tests/cluster/mmasr_shim.sh) that records the SLURM job it ran in and the GPU SLURM granted it, and
fails n-best shard 1 on purpose: locally on every call (the run fails; the next run re-does only that
shard), on the cluster in its first SLURM job (which fails; Snakemake submits a second one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import IN_CI, REPO, missing_prerequisite
from tests.test_workflow import job_counts, project_copy

pytestmark = pytest.mark.slow

SLURM_UP = REPO / "tests" / "cluster" / "slurm_up.sh"
SHIM = REPO / "tests" / "cluster" / "mmasr_shim.sh"
PROFILE = "workflow/profiles/slurm"
CONFIG = ["--configfile", "config/tiny.yaml", "config/shards.yaml"]
# The runs build the rescoring results (16 Snakemake jobs, 17 SLURM jobs with the resubmitted shard: data, the demo
# models' builds and pre-training, the encoder pass, two n-best shards reading its states, their merge, CLIP and LM
# scores, fusion), not the whole DAG: each SLURM job pays ~10 s of start-up (sbatch, two
# Snakemake processes, status checks) whatever it does, and the other rules (projector, CLAP, probe, report, ...) add
# only more of the same kinds of job (GPU and CPU jobs, trainings). Every rule's SLURM resources, torchrun's one-node
# GPUs included, are still checked, in the dry runs below (test_slurm_profile_resolves_..., test_training_on_...).
TARGETS = ["results/metrics/fusion.json"]
SHARDS = 2
FAULT_SHARD = "1"
NBEST_RETRIES = 1  # workflow/rules/nbest.smk
LOCAL_CORES = 2
TIMING_KEY = re.compile(r"(_seconds|_s|wall)$")  # wall-clock fields: the only ones allowed to differ
RUN_TIMEOUT_S = 1800


@dataclass
class Run:
    work: Path
    output: str = ""
    returncode: int | None = None
    notes: dict = field(default_factory=dict)


@dataclass
class Runs:
    local: Run
    slurm: Run | None  # None where no cluster could be started
    skip_reason: str = ""


# --- helpers -------------------------------------------------------------------------------------------


def workdir(root: Path, name: str) -> Path:
    """A scratch copy of the project, with the tiny config and two n-best shards (scatter/gather)."""
    work = project_copy(root / name)
    (work / "config" / "shards.yaml").write_text(f"nbest:\n  shards: {SHARDS}\n")
    return work


def environment(work: Path, **extra: str) -> dict[str, str]:
    """The submitting shell's environment (SLURM jobs inherit it: sbatch --export=ALL): the `mmasr` test
    double first on PATH, then this interpreter's environment. No GPU is granted except by SLURM."""
    shim_dir = work / ".shim"
    shim_dir.mkdir(exist_ok=True)
    shutil.copy(SHIM, shim_dir / "mmasr")
    venv_bin = Path(sys.executable).parent
    real = shutil.which("mmasr", path=str(venv_bin)) or shutil.which("mmasr")
    assert real, "the mmasr command is not installed"
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES" and not k.startswith("SLURM_")}
    env.update(PATH=os.pathsep.join([str(shim_dir), str(venv_bin), os.environ.get("PATH", "")]),
               MMASR_REAL=real, MMASR_CALL_LOG=str(work / "mmasr_calls.tsv"), **extra)
    return env


def snakemake(work: Path, args: list[str], env: dict[str, str], timeout: float = RUN_TIMEOUT_S) -> tuple[int, str]:
    """Run Snakemake; return its exit status and output (stdout and stderr together)."""
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", *args], cwd=work, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # Snakemake cancels its SLURM jobs when interrupted
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        queue = subprocess.run(["squeue", "-t", "all"], capture_output=True, text=True).stdout if shutil.which("squeue") else ""
        raise AssertionError(f"snakemake {' '.join(args)} did not finish within {timeout} s:\n{out[-5000:]}\n{queue}")
    return proc.returncode, out


def explain(run: Run) -> str:
    logs = "".join(f"\n--- {p}\n{p.read_text()[-2000:]}" for p in sorted((run.work / "results" / "logs").rglob("*.log")))
    return f"exit {run.returncode}:\n{run.output[-5000:]}{logs[-10000:]}"


def calls(work: Path) -> pd.DataFrame:
    """Every `mmasr` call the test double saw: command, shard, slurm_job, cuda ("-" where none)."""
    return pd.read_csv(work / "mmasr_calls.tsv", sep="\t", names=["command", "shard", "slurm_job", "cuda"],
                       dtype=str, keep_default_na=False)


def job_resources(output: str) -> dict[str, list[dict[str, str]]]:
    """rule -> the resources of each of its jobs, as Snakemake lists them (dry run or real run)."""
    jobs: dict[str, list[dict[str, str]]] = {}
    rule = None
    for line in output.splitlines():
        line = line.strip()
        if m := re.fullmatch(r"(?:local)?rule (\w+):", line):
            rule = m.group(1)
        elif rule and line.startswith("resources:"):
            pairs = line.removeprefix("resources:").strip().split(", ")
            jobs.setdefault(rule, []).append(dict(p.split("=", 1) for p in pairs))
            rule = None
    return jobs


def slurm_jobs(work: Path) -> pd.DataFrame:
    """The SLURM log of every job (results/logs/slurm/rule_<rule>/[<wildcards>/]<jobid>.log) and its
    state as SLURM reports it (`squeue -t all` keeps finished jobs for MinJobAge)."""
    logdir = work / "results" / "logs" / "slurm"
    rows = []
    for path in sorted(logdir.rglob("*.log")):
        parts = path.relative_to(logdir).parts
        rows.append({"rule": parts[0].removeprefix("rule_"), "wildcards": "/".join(parts[1:-1]),
                     "slurm_job": path.stem, "log": str(path.relative_to(work))})
    jobs = pd.DataFrame(rows, columns=["rule", "wildcards", "slurm_job", "log"])
    if len(jobs):
        out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i %T", "-j", ",".join(jobs["slurm_job"])],
                             capture_output=True, text=True).stdout
        states = dict(line.split() for line in out.splitlines() if line.strip())
        jobs["state"] = jobs["slurm_job"].map(states).fillna("?")
    return jobs.sort_values("slurm_job", key=lambda s: s.astype(int)).reset_index(drop=True)


def start_cluster() -> dict | str:
    """Start (or find) the one-node cluster: its node's CPUs and memory, or why there is none."""
    if not shutil.which("bash"):
        return "no bash to run tests/cluster/slurm_up.sh"
    proc = subprocess.run(["bash", str(SLURM_UP), "--no-install"], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return f"no SLURM cluster here: {lines[-1] if lines else f'slurm_up.sh exited {proc.returncode}'}"
    partitions = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout.split()
    if "main" not in [p.rstrip("*") for p in partitions]:
        return f"the SLURM cluster here has no partition `main` (the profile's default), only {partitions}"
    node = subprocess.run(["scontrol", "-o", "show", "node"], capture_output=True, text=True).stdout.split("\n")[0]
    fields = dict(kv.split("=", 1) for kv in node.split() if "=" in kv)
    return {"cpus": int(fields["CPUTot"]), "mem_mb": int(fields["RealMemory"])}


def run_local(work: Path, cores: int) -> Run:
    """Three local runs: shard 1 always fails (the run fails, everything else finishes); a dry run;
    the run that completes. The completed run is the reference for the SLURM run."""
    run = Run(work)
    shard0 = work / f"data/nbest/shards/0-of-{SHARDS}.parquet"
    base = [*TARGETS, "--cores", str(cores), *CONFIG]
    code, out = snakemake(work, [*base, "--keep-going"],
                          environment(work, MMASR_FAULT_SHARD=FAULT_SHARD, MMASR_FAULT="always"))
    run.notes["failing"] = (code, out)
    run.notes["failing_log"] = (work / f"results/logs/nbest/{FAULT_SHARD}-of-{SHARDS}.log").read_text()
    run.notes["calls_after_failure"] = calls(work)
    run.notes["shard0_after_failure"] = shard0.stat().st_mtime_ns if shard0.exists() else None
    run.notes["shard1_after_failure"] = (work / f"data/nbest/shards/{FAULT_SHARD}-of-{SHARDS}.parquet").exists()
    code, out = snakemake(work, [*base, "-n"], environment(work))
    run.notes["dry_run"] = (code, out)
    run.returncode, run.output = snakemake(work, base, environment(work))
    return run


def run_slurm(work: Path, cluster: dict, cores: int) -> Run:
    """The tiny config on the cluster with the SLURM profile. The flags are what this accounting-free
    one-node cluster needs: squeue for job states, no account, status checks sooner, and no job may
    ask for more memory than the node has; threads are capped as in the local run (`threads:` decides
    MMASR_THREADS, and results are bit-identical only for equal thread counts)."""
    run = Run(work)
    args = [*TARGETS, "--workflow-profile", PROFILE, *CONFIG, "--slurm-status-command", "squeue", "--slurm-no-account",
            "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1",
            "--max-threads", str(cores),
            "--resources", f"mem_mb={cluster['mem_mb']}"]
    run.returncode, run.output = snakemake(
        work, args, environment(work, MMASR_FAULT_SHARD=FAULT_SHARD, MMASR_FAULT="first-job"))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    """The local and the SLURM run, side by side (the SLURM run spends much of its time waiting: job
    start-up, status checks, the one GPU slot)."""
    root = tmp_path_factory.mktemp("cluster")
    cluster = start_cluster()
    if isinstance(cluster, str) and IN_CI:
        missing_prerequisite(cluster)  # fails at once, before the local run's minutes
    cores = min(LOCAL_CORES, cluster["cpus"]) if isinstance(cluster, dict) else LOCAL_CORES
    with ThreadPoolExecutor(max_workers=2) as pool:
        local = pool.submit(run_local, workdir(root, "local"), cores)
        slurm = pool.submit(run_slurm, workdir(root, "slurm"), cluster, cores) if isinstance(cluster, dict) else None
        return Runs(local.result(), slurm.result() if slurm else None, "" if slurm else cluster)


def finished_slurm_run(runs: Runs) -> Run:
    if runs.slurm is None:
        missing_prerequisite(runs.skip_reason)
    assert runs.slurm.returncode == 0, explain(runs.slurm)
    return runs.slurm


# --- the profile (no cluster needed) ----------------------------------------------------------------


def test_slurm_profile_resolves_and_asks_gpus_for_beam_search_and_training(tmp_path):
    work = workdir(tmp_path, "dry")
    code, out = snakemake(work, ["--workflow-profile", PROFILE, "-n", *CONFIG], environment(work))
    assert code == 0, out[-5000:]
    assert job_counts(out)["nbest"] == SHARDS
    jobs = job_resources(out)
    profile = yaml.safe_load((REPO / PROFILE / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    rules = {m for f in (REPO / "workflow" / "rules").glob("*.smk") for m in re.findall(r"^rule (\w+):", f.read_text(), re.M)}
    assert set(profile["set-resources"]) <= rules, "the profile names rules that do not exist"
    for rule, resources in jobs.items():
        for res in resources:
            assert {"slurm_partition", "mem_mb", "runtime"} <= set(res), (rule, res)
    model_rules = ["nbest", "encode_audio", "train_projector", "eval_projector", "clap_embeddings", "train_clap",
                   "eval_retrieval", "layer_embeddings"]
    for rule in model_rules + [r for r in rules if r.startswith("pretrain_demo_")]:
        assert jobs[rule][0].get("gpu") == "1", (rule, jobs[rule][0])
        assert int(jobs[rule][0]["mem_mb"]) > int(profile["default-resources"]["mem_mb"]), rule
    for rule in ("make_demo", "ingest", "preprocess", "split", "nbest_merge", "fuse", "train_probe", "report"):
        assert "gpu" not in jobs[rule][0], (rule, jobs[rule][0])


def test_training_on_several_gpus_asks_for_them_on_one_node(tmp_path):
    """training.nproc: 4 - the trainers' jobs ask SLURM for 4 GPUs on one node and run torchrun; others are unchanged."""
    work = workdir(tmp_path, "dry")
    (work / "config" / "nproc.yaml").write_text("training:\n  nproc: 4\n")
    code, out = snakemake(work, ["--workflow-profile", PROFILE, "-n", "-p", *CONFIG, "config/nproc.yaml"],
                          environment(work))
    assert code == 0, out[-5000:]
    jobs = job_resources(out)
    for rule, sub in (("train_projector", "train-projector"), ("train_clap", "train-clap")):
        assert (jobs[rule][0]["gpu"], jobs[rule][0]["nodes"]) == ("4", "1"), jobs[rule][0]
        assert f"torchrun --standalone --nproc_per_node 4 -m mmasr.cli {sub} " in out
    assert jobs["eval_projector"][0]["gpu"] == "1" and "nodes" not in jobs["eval_projector"][0]
    assert "mmasr eval-projector " in out


# --- retries, locally (no cluster needed) ------------------------------------------------------------


def test_failed_shard_is_retried_and_a_finished_shard_is_not_recomputed(runs):
    local = runs.local
    code, out = local.notes["failing"]
    assert code != 0 and "injected failure of n-best shard 1" in local.notes["failing_log"], out[-3000:]
    first = local.notes["calls_after_failure"]
    nbest = first[first["command"] == "nbest"]
    assert (nbest["shard"] == FAULT_SHARD).sum() == 1 + NBEST_RETRIES, "shard 1 was not retried `retries:` times"
    assert (nbest["shard"] == "0").sum() == 1 and local.notes["shard0_after_failure"] is not None
    assert not local.notes["shard1_after_failure"]
    code, out = local.notes["dry_run"]
    todo = job_counts(out)
    assert code == 0 and todo["nbest"] == 1, todo  # only the failed shard ...
    assert not {"make_demo", "preprocess", "split", "pretrain_demo_whisper"} & set(todo), todo  # ... and what follows it
    assert local.returncode == 0, explain(local)
    shard0 = local.work / f"data/nbest/shards/0-of-{SHARDS}.parquet"
    assert shard0.stat().st_mtime_ns == local.notes["shard0_after_failure"]
    every = calls(local.work)
    assert ((every["command"] == "nbest") & (every["shard"] == "0")).sum() == 1


# --- the SLURM run -----------------------------------------------------------------------------------


def test_every_job_ran_as_a_slurm_job_with_the_resources_it_asked_for(runs):
    slurm = finished_slurm_run(runs)
    jobs = slurm_jobs(slurm.work)
    seen = calls(slurm.work)
    seen_gpu = seen.groupby("slurm_job")["cuda"].first()
    jobs["cuda"] = jobs["slurm_job"].map(seen_gpu).fillna("(no mmasr call)")
    print(f"\nSLURM jobs of the tiny run's targets ({len(jobs)}):\n{jobs.drop(columns='log').to_string(index=False)}")
    expected = {rule: n for rule, n in job_counts(slurm.output).items() if rule != "all"}
    expected["nbest"] += 1  # shard 1's first job fails and is submitted again
    assert jobs.groupby("rule").size().to_dict() == expected
    assert (jobs["state"] == "COMPLETED").sum() == len(jobs) - 1, jobs
    assert set(jobs.loc[jobs["state"] != "COMPLETED", "state"]) == {"FAILED"}
    # every mmasr command ran inside one of those SLURM jobs, and every job ran its command
    assert (seen["slurm_job"] != "-").all() and set(seen["slurm_job"]) == set(jobs["slurm_job"])
    # a job that asked for a GPU got one from SLURM (CUDA_VISIBLE_DEVICES); no other job did
    resources = job_resources(slurm.output)
    for job in jobs.itertuples():
        wants_gpu = resources[job.rule][0].get("gpu", "0") != "0"
        assert (job.cuda != "-") == wants_gpu, job
    for rule in expected:  # each rule's own log: results/logs/<rule>.log or results/logs/<rule>/<wildcards>.log
        logs = slurm.work / "results/logs"
        assert (logs / f"{rule}.log").is_file() or any((logs / rule).glob("*.log")), rule
    for shard in range(SHARDS):  # the rule's own log and SLURM's, both named by shard
        assert (slurm.work / f"results/logs/nbest/{shard}-of-{SHARDS}.log").is_file()
        assert set(jobs.loc[jobs["rule"] == "nbest", "wildcards"]) == {f"{s}_{SHARDS}" for s in range(SHARDS)}


def test_a_failed_shard_is_a_new_slurm_job_and_finished_shards_are_not_resubmitted(runs):
    slurm = finished_slurm_run(runs)
    jobs = slurm_jobs(slurm.work)
    nbest = jobs[jobs["rule"] == "nbest"]
    print(f"\nn-best shard jobs:\n{nbest.drop(columns='log').to_string(index=False)}")
    assert list(nbest.loc[nbest["wildcards"] == f"0_{SHARDS}", "state"]) == ["COMPLETED"]
    assert list(nbest.loc[nbest["wildcards"] == f"{FAULT_SHARD}_{SHARDS}", "state"]) == ["FAILED", "COMPLETED"]
    seen = calls(slurm.work)
    shard_calls = seen.loc[(seen["command"] == "nbest") & (seen["shard"] == FAULT_SHARD), "slurm_job"]
    first, second = nbest.loc[nbest["wildcards"] == f"{FAULT_SHARD}_{SHARDS}", "slurm_job"]
    per_job = shard_calls.value_counts().to_dict()
    print(f"shard {FAULT_SHARD}: mmasr nbest calls per SLURM job: {per_job}")
    # retries: the command is re-run inside the failing job, then the job is submitted again, once
    assert per_job[first] >= 1 + NBEST_RETRIES and per_job[second] == 1 and set(per_job) == {first, second}
    shard0_calls = seen.loc[(seen["command"] == "nbest") & (seen["shard"] == "0"), "slurm_job"]
    assert list(shard0_calls) == list(nbest.loc[nbest["wildcards"] == f"0_{SHARDS}", "slurm_job"])
    assert "Error in rule nbest" in (slurm.work / nbest.loc[nbest["slurm_job"] == first, "log"].item()).read_text()


def comparable(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not TIMING_KEY.search(k)}


def test_slurm_outputs_equal_the_local_run(runs):
    slurm = finished_slurm_run(runs)
    local = runs.local
    assert local.returncode == 0, explain(local)
    names = sorted(p.name for p in (local.work / "results/metrics").glob("*.json"))
    assert names and names == sorted(p.name for p in (slurm.work / "results/metrics").glob("*.json"))
    for name in names:
        assert comparable(slurm.work / "results/metrics" / name) == comparable(local.work / "results/metrics" / name), name
    for rel in ["data/nbest/nbest.parquet", *(f"data/nbest/shards/{s}-of-{SHARDS}.parquet" for s in range(SHARDS))]:
        pd.testing.assert_frame_equal(pd.read_parquet(slurm.work / rel), pd.read_parquet(local.work / rel), obj=rel)
        assert pq.read_schema(slurm.work / rel).metadata == pq.read_schema(local.work / rel).metadata, rel
    print(f"\n{len(names)} metrics files equal (timing fields aside): {', '.join(names)}; n-best lists equal")
