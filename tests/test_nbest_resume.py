"""Fault: Snakemake is killed (SIGKILL to its whole process group: Snakemake, the job's shell and the
running ``mmasr nbest``) in the middle of the sharded n-best. After ``--unlock``, a rerun with
``--rerun-incomplete`` reuses the shards that had finished, leaves no partial or temporary file, and
merges exactly the table an uninterrupted run merges."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

from mmasr.io import read_metadata
from tests.conftest import kill_when, litter, rule_logs, run

pytestmark = pytest.mark.slow

SHARDS = 3
TARGET = "data/nbest/asr_nbest.parquet"
SHARD_FILES = {f"data/nbest/shards/{i}-of-{SHARDS}.parquet" for i in range(SHARDS)}
_JOB = re.compile(r"rule (?P<rule>\w+):\n(?:    .*\n)*?    output: (?P<out>.*)\n(?:    .*\n)*?    jobid: (?P<id>\d+)")
_FINISHED = re.compile(r"Finished jobid: (\d+) \(Rule: nbest\)")


def started(log: str, rule: str = "nbest") -> dict[str, str]:
    """jobid -> output of every job of ``rule`` that Snakemake's log says it started."""
    return {m["id"]: m["out"] for m in _JOB.finditer(log) if m["rule"] == rule}


def rules_run(log: str) -> set[str]:
    return {m["rule"] for m in _JOB.finditer(log)}


def finished(log: str) -> set[str]:
    """Outputs of the n-best jobs Snakemake recorded as complete (it logs that after its metadata)."""
    jobs = started(log)
    return {jobs[j] for j in _FINISHED.findall(log)}


def snakemake_cmd(*extra: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", TARGET, "--cores", "1",
            "--configfile", "config/tiny.yaml", "config/shards.yaml", *extra]


def kill_during_second_shard(work: Path, log_path: Path, timeout_s: float = 600) -> None:
    """Run Snakemake and SIGKILL its process group once one shard has finished and the next one's
    ``mmasr nbest`` is running (its log file exists), or fail with Snakemake's log."""
    def second_shard_running() -> bool:
        text = log_path.read_text()
        done = finished(text)
        return bool(done) and any(out not in done and (work / "results/logs/nbest" / (Path(out).stem + ".log")).exists()
                                  for out in started(text).values())

    kill_when(snakemake_cmd(), work, log_path, second_shard_running, "mid-n-best", timeout_s, lambda: rule_logs(work))


def test_killed_nbest_resumes_reusing_finished_shards(tiny_run, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(tiny_run, work, symlinks=True)  # keeps mtimes and .snakemake: upstream stays up to date
    (work / "config" / "shards.yaml").write_text(f"nbest:\n  shards: {SHARDS}\n")

    # An uninterrupted sharded run: the reference.
    proc = run(snakemake_cmd(), work)
    log = proc.stdout + proc.stderr
    assert rules_run(log) == {"nbest", "nbest_merge"}, f"only the n-best should run here:\n{log[-3000:]}"
    reference, reference_meta = pd.read_parquet(work / TARGET), read_metadata(work / TARGET)
    for rel in ("data/nbest", "results/logs/nbest", "results/benchmarks/nbest"):
        shutil.rmtree(work / rel)

    # Killed while the second shard is being computed.
    kill_log = tmp_path / "killed.log"
    kill_during_second_shard(work, kill_log)
    text = kill_log.read_text()
    done = finished(text)
    killed = {out for out in started(text).values() if out not in done}
    assert 1 <= len(done) < SHARDS and killed, f"not killed mid-n-best: finished {done}, running {killed}"
    for out in killed:  # atomic writes: a killed job leaves nothing at its final path
        assert not (work / out).exists(), f"{out} exists although its job was killed"
    for out in done:  # ... and a finished one a complete file
        assert set(pd.read_parquet(work / out)["utt_id"]) <= set(reference["utt_id"])
    stats = {out: ((work / out).stat().st_ino, (work / out).stat().st_mtime_ns) for out in done}
    assert not (work / TARGET).exists()

    # Recover the way a user would: release the lock a killed Snakemake leaves, then rerun.
    run(snakemake_cmd("--unlock"), work)
    proc = run(snakemake_cmd("--rerun-incomplete"), work)
    log = proc.stdout + proc.stderr
    assert set(started(log).values()) == SHARD_FILES - done, f"finished shards were recomputed:\n{log[-3000:]}"
    assert {out: ((work / out).stat().st_ino, (work / out).stat().st_mtime_ns) for out in done} == stats
    assert {str(p.relative_to(work)) for p in (work / "data/nbest/shards").iterdir()} == SHARD_FILES
    assert litter(work / "data" / "nbest") == []
    pd.testing.assert_frame_equal(pd.read_parquet(work / TARGET), reference)
    assert read_metadata(work / TARGET) == reference_meta
