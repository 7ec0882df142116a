"""Fault: a training job (the projector, CLAP) is killed with SIGKILL mid-epoch, between two of its
checkpoints. Its rule's own command, run again, resumes from the newest checkpoint in the state folder
and ends with the same checkpoints, training log and evaluation metrics, byte for byte but for timing
fields, as an uninterrupted run of the same command (CPU, same seed).

Each command is the one the Snakemake rule runs (``workflow/rules/{projector,clap}.smk``), on the
tiny run's inputs, with outputs in a scratch folder and a params file with more, shorter epochs and
frequent checkpoints, so that the kill lands after a checkpoint and well before the end."""

from __future__ import annotations

import hashlib
import math
import re
import signal
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from mmasr.clap.cache import load_cache
from mmasr.clap.train import steps_per_epoch
from mmasr.config import deep_merge
from mmasr.io import read_json
from mmasr.training.loop import saved_step, step_dirs
from tests.conftest import file_digest, kill_when, litter, run, tiny_params
from tests.test_workflow import without_timing

pytestmark = pytest.mark.slow

_RESUMED = re.compile(r"resuming from \S+ \(step (\d+)\)")


def params_file(tiny_run: Path, dest: Path, **sections) -> Path:
    """The tiny run's params with ``sections`` merged over, on the CPU, as a params file."""
    dest.write_text(yaml.safe_dump(deep_merge(tiny_params(tiny_run), {"models": {"device": "cpu"}, **sections})))
    return dest


def newest_checkpoint(folder: Path) -> int:
    """The step of the newest complete checkpoint folder (``step-NNNNNN``; 0 when there is none)."""
    dirs = step_dirs(folder)
    return int(dirs[-1].name.removeprefix("step-")) if dirs else 0


def last_logged_step(log_csv: Path) -> int:
    """The highest step in a training log being appended to (0 when there is none yet)."""
    try:
        lines = log_csv.read_text().splitlines()[1:]
    except FileNotFoundError:
        return 0
    return max((int(line.split(",")[0]) for line in lines if line.split(",")[0].isdigit()), default=0)


def kill_mid_epoch(cmd: list[str], cwd: Path, checkpoints: Path, log_csv: Path, per_epoch: int, total: int,
                   output: Path, ready: Callable[[int], bool] = lambda step: True) -> int:
    """Run ``cmd``; SIGKILL its process group as soon as its newest checkpoint is mid-epoch, its log is past
    that checkpoint and ``ready(checkpoint step)``, or fail if it ends first. Returns the step of the
    checkpoint a rerun resumes from."""
    def between_checkpoints_mid_epoch() -> bool:
        step = newest_checkpoint(checkpoints)
        return 0 < step < total and step % per_epoch != 0 and last_logged_step(log_csv) > step and ready(step)

    proc = kill_when(cmd, cwd, output, between_checkpoints_mid_epoch, "between two checkpoints mid-epoch", 300)
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}, not killed:\n{output.read_text()[-4000:]}"

    step = newest_checkpoint(checkpoints)  # what a rerun resumes from
    state = torch.load(checkpoints / f"step-{step:06d}" / "state.pt", weights_only=True, map_location="cpu")
    assert state["step"] == step and 0 < step < total and step % per_epoch, \
        f"the resumable checkpoint (step {step} of {total}, {per_epoch} steps an epoch) is not mid-epoch"
    logged = last_logged_step(log_csv)
    assert step < logged < total, f"killed at step {logged}, not between checkpoint {step} and the end ({total})"
    assert ready(step), f"the state the run was killed in no longer meets the kill condition (checkpoint {step})"
    return step


def contents(obj: object) -> object:
    """A loaded ``torch.save`` object with its tensors as (dtype, shape, digest of the bytes): comparable with ==."""
    if isinstance(obj, torch.Tensor):
        data = obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return str(obj.dtype), tuple(obj.shape), hashlib.sha256(data).hexdigest()
    if isinstance(obj, dict):
        return {k: contents(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [contents(v) for v in obj]
    return obj


def tree(folder: Path) -> dict[str, object]:
    """Every file under ``folder``: JSON without its timing fields, ``.pt`` files by their tensors' bytes
    (torch.save writes a new serialisation id every time), anything else by its digest."""
    def summary(path: Path) -> object:
        if path.suffix == ".json":
            return without_timing(read_json(path))
        if path.suffix == ".pt":
            return contents(torch.load(path, weights_only=True, map_location="cpu"))
        return file_digest(path)

    return {str(p.relative_to(folder)): summary(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def killed_and_resumed_equals_uninterrupted(tiny_run: Path, tmp_path: Path, train: Callable[[Path], list[str]],
                                            evaluate: Callable[[Path], list[str]], checkpoints: str, per_epoch: int,
                                            total: int, ready: Callable[[Path, int], bool] = lambda state, step: True
                                            ) -> dict[str, object]:
    """``train(out)`` then ``evaluate(out)`` into ``full/`` uninterrupted, and into ``killed/`` with the first
    training run SIGKILLed mid-epoch (:func:`kill_mid_epoch`, once ``ready(checkpoint folder, step)`` too) and
    then run again. Checks that the kill left no final output, that the rerun resumed from the newest
    checkpoint and left no temporary file, and that both folders hold the same files (state, model, log,
    metrics: equal but for timing). Returns ``full/``'s files."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = run(train(full), tiny_run)
    assert not _RESUMED.search(proc.stdout + proc.stderr), "the uninterrupted run resumed from something"
    run(evaluate(full), tiny_run)

    step = kill_mid_epoch(train(killed), tiny_run, killed / checkpoints, killed / "state" / "log.csv", per_epoch,
                          total, tmp_path / "killed.log", lambda step: ready(killed / checkpoints, step))
    assert not (killed / "model").exists() and not (killed / "train_log.csv").exists(), \
        f"a killed run wrote final outputs: {sorted(p.name for p in killed.iterdir())}"

    proc = run(train(killed), tiny_run)
    resumed = [int(s) for s in _RESUMED.findall(proc.stdout + proc.stderr)]
    assert resumed == [step], f"the rerun did not resume from step {step}:\n{proc.stderr[-3000:]}"
    assert litter(killed) == []
    run(evaluate(killed), tiny_run)

    expected = tree(full)
    assert tree(killed) == expected
    log = pd.read_csv(full / "train_log.csv")
    assert log["step"].tolist() == list(range(1, total + 1))
    return expected


def test_projector_killed_mid_epoch_resumes_to_the_uninterrupted_result(tiny_run, tmp_path):
    steps, batch_size = 120, 2
    params = params_file(tiny_run, tmp_path / "params.yaml",
                         projector={"steps": steps, "batch_size": batch_size, "bucket_batches": 2, "grad_accum": 1,
                                    "warmup": 10, "eval_every": 4, "checkpoint_every": 7, "keep_checkpoints": 2})
    manifest = pd.read_parquet(tiny_run / "data/processed/manifest.parquet")
    n_train = int(((manifest["split"] == "train") & manifest["text"].fillna("").str.strip().astype(bool)).sum())
    common = ["--params", str(params), "--threads", "1", "--features", "data/cache/encoder_features",
              "--manifest", "data/processed/manifest.parquet", "--quiet"]

    def train(out: Path) -> list[str]:  # rule train_projector
        return ["mmasr", "train-projector", *common, "--out", str(out / "model"), "--log-csv",
                str(out / "train_log.csv"), "--state-dir", str(out / "state"), "--resume"]

    def evaluate(out: Path) -> list[str]:  # rule eval_projector
        return ["mmasr", "eval-projector", *common, "--model", str(out / "model"),
                "--nbest", "data/nbest/asr_nbest.parquet", "--hyps", str(out / "hyps.parquet"),
                "--per-speaker", str(out / "per_speaker.csv"), "--metrics", str(out / "metrics.json")]

    def best_after(state: Path, step: int) -> bool:
        """The dev loss improved after the newest checkpoint: the rerun must drop that ``best`` and make it again."""
        try:
            return saved_step(state / "best") > step
        except (OSError, RuntimeError, EOFError):  # being replaced right now
            return False

    files = killed_and_resumed_equals_uninterrupted(tiny_run, tmp_path, train, evaluate, "state",
                                                    math.ceil(n_train / batch_size), steps, best_after)
    assert {"model/best/model.safetensors", "model/last/model.safetensors", "model/best/state.pt",
            "model/config.json", "train_log.csv", "hyps.parquet", "per_speaker.csv"} <= set(files)
    assert files["model/training.json"]["steps"] == steps and files["metrics.json"]["test_wer"] is not None


def test_clap_killed_mid_epoch_resumes_to_the_uninterrupted_result(tiny_run, tmp_path):
    epochs, batch_size = 150, 2
    params = params_file(tiny_run, tmp_path / "params.yaml",
                         clap={"epochs": epochs, "batch_size": batch_size, "phase2_epochs": 0, "warmup": 20,
                               "eval_every": 10, "checkpoint_every": 7, "keep_checkpoints": 2})
    per_epoch = steps_per_epoch(len(load_cache(tiny_run / "data/cache/clap_embeddings").split("train")), batch_size)
    common = ["--params", str(params), "--threads", "1", "--cache", "data/cache/clap_embeddings", "--quiet"]

    def train(out: Path) -> list[str]:  # rule train_clap
        return ["mmasr", "train-clap", *common, "--out", str(out / "model"), "--log-csv", str(out / "train_log.csv"),
                "--checkpoint-dir", str(out / "state")]

    def evaluate(out: Path) -> list[str]:  # rule eval_retrieval
        return ["mmasr", "eval-retrieval", *common, "--checkpoint", str(out / "model"),
                "--metrics", str(out / "metrics.json"), "--curve", str(out / "recall_at_k.csv")]

    files = killed_and_resumed_equals_uninterrupted(tiny_run, tmp_path, train, evaluate, "state/phase1", per_epoch,
                                                    epochs * per_epoch)
    assert {"model/model.safetensors", "model/init.safetensors", "train_log.csv", "recall_at_k.csv"} <= set(files)
    assert files["model/config.json"]["summary"]["clap_steps"] == epochs * per_epoch
    assert files["metrics.json"]["a2t_r1"] is not None
