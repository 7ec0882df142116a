"""One plain training loop (nanoGPT style) that every trainer runs with its own step and evaluation.

State is the model, the AdamW optimiser, the step and torch's RNG. The learning rate is a pure
function of the step (:func:`lr_at`: linear warm-up, cosine or linear decay), so the step *is* the
scheduler state; which examples a step sees is a pure function of ``(seed, tag, step)``
(:func:`batch_indices`, tags in :mod:`mmasr.training.streams`), so resuming needs no data-loader
state. Every ``checkpoint_every`` steps the state is written atomically (a temporary folder renamed
into place) as ``model.safetensors`` + ``state.pt``; a killed run started again resumes from the
newest checkpoint and ends with bit-identical weights on the CPU (``torch.use_deterministic_algorithms``,
float32). A checkpoint carries a fingerprint of the config, seed, init model, data and code, and is
only resumed by an identical run.

Under ``torchrun`` (:mod:`mmasr.training.distributed`) the same loop runs on every rank: the trainable
module is wrapped in DistributedDataParallel (:attr:`Trainer.module`), each rank computes its part of
the step's global batch (:meth:`Trainer.shard`), rank 0 alone writes checkpoints and the log while the
others wait, and a resumed run loads the same checkpoint on every rank (each its own RNG state). The
number of processes is part of the fingerprint: a resumed run is exact for the same number.

:class:`Trainer` holds that state and runs the loop::

    trainer = Trainer("train projector", model, adamw(model, cfg), cfg, steps=steps,
                      checkpoint_dir=ckpt, fingerprint=fp, log_columns=["step", "lr", "loss"])
    def train_step(step):            # forward, backward, optimiser step; returns the row's numbers
        ...
        return {"loss": loss.item()}
    finished = trainer.run(train_step, evaluate=lambda done: {"dev_loss": ...})
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mmasr.io import atomic_dir, atomic_path
from mmasr.progress import Progress
from mmasr.training import distributed

log = logging.getLogger(__name__)

__all__ = [
    "lr_at", "set_lr", "batch_indices", "set_determinism", "code_digest", "fingerprint", "world_fingerprint",
    "data_digest", "step_dirs", "save_checkpoint", "resume_checkpoint", "load_checkpoint", "rank_rng_state",
    "set_rank_rng", "saved_step", "CsvLog", "optimise", "adamw", "mean_tail_loss", "run_steps", "Trainer",
]


# --------------------------------------------------------------------------------------------
# Schedule and batches: pure functions of the step
# --------------------------------------------------------------------------------------------


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_lr_ratio: float, decay: str = "cosine") -> float:
    """Learning rate of (0-based) ``step``: linear warm-up from ``lr/warmup`` to ``lr`` over
    ``warmup`` steps, then ``decay`` (cosine or linear) to ``min_lr_ratio * lr`` at the last step (``total - 1``)."""
    if total < 1:
        raise ValueError("total steps must be >= 1")
    if decay not in ("cosine", "linear"):
        raise ValueError(f"decay must be cosine or linear, got {decay!r}")
    if step < warmup:
        return lr * (step + 1) / warmup
    decay_steps = total - 1 - warmup
    if decay_steps <= 0:
        return lr
    progress = min(1.0, (step - warmup) / decay_steps)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * shape)


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: dict, total: int, decay: str = "cosine") -> float:
    """Set every parameter group's learning rate for ``step`` (:func:`lr_at` with ``cfg``'s ``lr``,
    ``warmup`` and ``min_lr_ratio``), times the group's ``lr_scale`` if it has one; return the base rate."""
    lr = lr_at(step, lr=cfg["lr"], warmup=cfg["warmup"], total=total, min_lr_ratio=cfg["min_lr_ratio"], decay=decay)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def batch_indices(n: int, batch_size: int, step: int, seed: int, tag: int = 0) -> np.ndarray:
    """The example indices of ``step``: the steps walk through an endless stream of epochs, each a
    fresh permutation of ``range(n)`` drawn from ``default_rng([seed, tag, epoch])``. A pure function
    of its arguments, so a resumed run sees exactly the batches an uninterrupted run would."""
    if n < 1 or batch_size < 1:
        raise ValueError("need n >= 1 and batch_size >= 1")
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, tag, epoch]).permutation(n)
        out.extend(perm[offset: offset + batch_size - len(out)].tolist())
    return np.asarray(out, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Determinism and fingerprints
# --------------------------------------------------------------------------------------------


def set_determinism(seed: int, device: torch.device) -> None:
    """Seed torch and ask for deterministic kernels (strict on the CPU; warn-only elsewhere)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_flush_denormal(True)  # Adam's tiny second moments as denormals make CPU steps ~5x slower
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")


def code_digest(path: str | Path) -> str:
    """sha256 (16 hex) of a source file: fingerprints name the training code they belong to."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def fingerprint(*parts: Any) -> str:
    """sha256 (16 hex) of the JSON of ``parts`` and of this module's source: a checkpoint resumes
    only into the same config, seed, init model, data and loop code. Each trainer adds
    :func:`code_digest` of its own module to ``parts``, so editing one trainer leaves the others'
    checkpoints resumable."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def world_fingerprint(fp: str, world: int) -> str:
    """The fingerprint of a run of ``fp`` on ``world`` processes (``fp`` itself for one)."""
    return fp if world == 1 else fingerprint(fp, "world", world)


def data_digest(frame: pd.DataFrame, columns: Sequence[str]) -> str:
    """sha256 (16 hex) of ``frame``'s ``columns`` as CSV: the training data in a fingerprint."""
    return hashlib.sha256(frame[list(columns)].to_csv(index=False).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def step_dirs(checkpoint_dir: Path) -> list[Path]:
    """The complete ``step-NNNNNN`` checkpoint folders, oldest first."""
    return sorted(p for p in Path(checkpoint_dir).glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))


def save_checkpoint(checkpoint_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    fp: str, schedule: dict, keep: int, name: str | None = None, rank_rng: list | None = None) -> Path:
    """Write ``step-NNNNNN/{model.safetensors,state.pt}`` atomically; keep the newest ``keep``.
    With ``name`` (e.g. ``best``) the folder is ``name/`` instead, replaced in place, never pruned.
    ``rank_rng``: every rank's RNG state (several processes), restored rank by rank on resume."""
    from safetensors.torch import save_model

    final = Path(checkpoint_dir) / (name or f"step-{step:06d}")
    state = {"step": step, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
             "fingerprint": fp, "schedule": schedule}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    if rank_rng is not None:
        state["rank_rng"] = rank_rng
    with atomic_dir(final) as tmp:
        save_model(model, str(tmp / "model.safetensors"))  # handles tied weights (Whisper's proj_out)
        torch.save(state, tmp / "state.pt")
    if name:
        return final
    for old in step_dirs(checkpoint_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resume_checkpoint(checkpoint_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      fp: str) -> int:
    """Load the newest checkpoint with fingerprint ``fp`` into ``model``/``optimizer`` and torch's
    RNG; return its step (0 when there is none). Checkpoints of another run are removed."""
    from safetensors.torch import load_model

    if not checkpoint_dir.is_dir():
        return 0
    for tmp in [*checkpoint_dir.glob(".*.tmp"), *checkpoint_dir.glob(".*.old")]:  # left by a run killed while writing
        shutil.rmtree(tmp, ignore_errors=True)
    for path in reversed(step_dirs(checkpoint_dir)):
        try:
            state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
        except (OSError, RuntimeError, EOFError) as exc:
            log.warning("skipping unreadable checkpoint %s (%s)", path, exc)
            continue
        if state.get("fingerprint") != fp:
            log.warning("removing checkpoint %s: it belongs to another run (config, data, init model or code differ)", path)
            shutil.rmtree(path, ignore_errors=True)
            continue
        load_model(model, str(path / "model.safetensors"), strict=True)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        log.info("resuming from %s (step %d)", path, state["step"])
        return int(state["step"])
    return 0


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> int:
    """Load the checkpoint ``folder`` (one :func:`resume_checkpoint` chose on rank 0) into ``model``/``optimizer``
    and rank ``rank``'s own RNG state; return its step."""
    from safetensors.torch import load_model

    state = torch.load(Path(folder) / "state.pt", weights_only=True, map_location="cpu")
    load_model(model, str(Path(folder) / "model.safetensors"), strict=True)
    optimizer.load_state_dict(state["optimizer"])
    rng = state.get("rank_rng")
    if rng is None or rank >= len(rng):
        raise ValueError(f"{folder}: no RNG state for rank {rank} (written by a run with another number of processes)")
    set_rank_rng(rng[rank])
    return int(state["step"])


def rank_rng_state() -> dict:
    """This process's RNG state: the CPU generator and, on CUDA, its current GPU's."""
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rank_rng(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def saved_step(folder: Path) -> int:
    """The step a checkpoint folder holds (0 when there is none)."""
    if not (Path(folder) / "state.pt").is_file():
        return 0
    return int(torch.load(Path(folder) / "state.pt", weights_only=True, map_location="cpu")["step"])


# --------------------------------------------------------------------------------------------
# The log, the update, the optimiser
# --------------------------------------------------------------------------------------------


class CsvLog:
    """The training log, written row by row into the checkpoint folder (``log.csv``) so a killed run
    keeps it; on resume, rows after the resumed step are dropped. :meth:`publish` copies it
    atomically to the declared output at the end. ``resume_step=None`` opens an existing log as it is."""

    def __init__(self, path: Path, columns: Sequence[str], resume_step: int | None):
        self.path, self.columns = Path(path), list(columns)
        if resume_step is None:
            if self.path.is_file():
                return
            resume_step = 0
        rows = []
        if resume_step > 0 and self.path.is_file():
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow({k: _csv_value(row.get(k)) for k in self.columns})

    def publish(self, dest: str | Path) -> None:
        with atomic_path(dest) as tmp:
            shutil.copyfile(self.path, tmp)

    def rows(self) -> list[dict]:
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def optimise(loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> None:
    """One update: clear the gradients, backpropagate, clip the gradient norm, step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


def adamw(model: torch.nn.Module, cfg: dict) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices/embeddings only (nanoGPT): not on biases, norms or
    CLIP's logit scale. Only parameters that require gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(0.9, 0.98), eps=1e-8)


def mean_tail_loss(rows: list[dict], n: int = 50, column: str = "loss") -> float | None:
    """Mean training loss of the last ``n`` logged steps (the final loss, less noisy than one step)."""
    tail = [float(r[column]) for r in rows[-n:]]
    return float(np.mean(tail)) if tail else None


def run_steps(cfg: dict, max_steps: int | None) -> int:
    """The steps a run takes: ``cfg['steps']``, or fewer with ``max_steps`` (smoke runs; the schedule
    is built for the shorter run)."""
    return min(cfg["steps"], max_steps) if max_steps else cfg["steps"]


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


class Trainer:
    """The state of one training run and its loop.

    ``model`` is what is checkpointed (the whole trainable module), ``cfg`` the params section (``lr``,
    ``warmup``, ``min_lr_ratio``, ``checkpoint_every``, ``keep_checkpoints``, optional ``eval_every``).
    ``steps`` is the global step the run ends at; ``first_step`` the one it starts from when there is
    no checkpoint (a second phase continues the first's numbering; its schedule counts from there).
    Construction resumes from the newest checkpoint of an identical run (:attr:`start`) and opens the
    CSV log (``log_path``, default ``checkpoint_dir/log.csv``), truncated to the resumed step.

    Under torchrun (:mod:`mmasr.training.distributed`) every rank builds the same Trainer: rank 0 picks
    the checkpoint and every rank loads it; :attr:`module` is ``model`` wrapped in DistributedDataParallel
    (its parameters that require gradients; ``find_unused_parameters`` where some may get none), which the
    step's forward must go through; :meth:`shard` gives each rank its part of the global batch. Only rank 0
    (:attr:`main`) writes. With one process :attr:`module` is ``model`` and nothing else changes.
    """

    def __init__(self, desc: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: dict, *,
                 steps: int, checkpoint_dir: str | Path, fingerprint: str, log_columns: Sequence[str],
                 log_path: str | Path | None = None, decay: str = "cosine", first_step: int = 0,
                 items_per_step: int | None = None, schedule_extra: dict | None = None, progress: bool = True,
                 find_unused_parameters: bool = False):
        self.desc, self.model, self.optimizer, self.cfg = desc, model, optimizer, cfg
        self.steps, self.first_step, self.decay = int(steps), int(first_step), decay
        self.checkpoint_dir = Path(checkpoint_dir)
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.main = self.rank == 0
        # A run on N processes sums in another order: it resumes only from a run on as many.
        self.fingerprint = world_fingerprint(fingerprint, self.world)
        self.items_per_step = items_per_step
        self.bar = progress
        self.schedule = {"kind": f"linear warm-up + {decay} decay", "lr": cfg["lr"], "warmup": cfg["warmup"],
                         "total": self.steps - self.first_step, "min_lr_ratio": cfg["min_lr_ratio"],
                         **(schedule_extra or {})}
        path = Path(log_path) if log_path else self.checkpoint_dir / "log.csv"
        resumed = 0
        if self.main:
            resumed = resume_checkpoint(self.checkpoint_dir, model, optimizer, self.fingerprint)
            start = resumed or self.first_step
            # A finished phase leaves the log alone (a later phase's rows follow its own).
            self.log = CsvLog(path, log_columns, start if start < self.steps else None)
        if self.world > 1:
            resumed = distributed.broadcast_object(resumed)  # also: rank 0 has cleaned the folder and written the log
            if not self.main:
                if resumed:
                    load_checkpoint(self.checkpoint_dir / f"step-{resumed:06d}", model, optimizer, self.rank)
                else:
                    torch.manual_seed(distributed.rank_seed(torch.initial_seed(), self.rank))
                self.log = CsvLog(path, log_columns, None)  # read-only here: rank 0 writes it
        self.start = resumed or self.first_step
        self.best_dev_loss = math.inf  # see resume_best / keep_if_best
        self.module = model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            device = next(model.parameters()).device
            self.module = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=find_unused_parameters)

    def shard(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, list[int]]:
        """This rank's contiguous part of a step's global batch, and every rank's part size (rank order)."""
        indices = np.asarray(indices)
        return distributed.shard_batch(indices, self.rank, self.world), distributed.shard_sizes(len(indices), self.world)

    def no_sync(self, sync: bool = False):
        """Context of a backward pass: with ``sync`` False (not the step's last micro-batch) DDP keeps the
        gradients local, to be averaged with the last one's; one process: nothing."""
        if sync or self.world == 1:
            return contextlib.nullcontext()
        return self.module.no_sync()

    def eval_due(self, done: int) -> bool:
        """Evaluate after step ``done``: every ``eval_every`` steps of this run's schedule, and at the end."""
        every = self.cfg.get("eval_every", 0)
        return bool(every) and ((done - self.first_step) % every == 0 or done == self.steps)

    def save(self, done: int, name: str | None = None) -> Path:
        """Checkpoint the state after step ``done`` (``name``: a named folder such as ``best``, kept apart).
        Several processes: every rank calls it (their RNG states are gathered), rank 0 writes, all wait."""
        keep = 1 if name else self.cfg["keep_checkpoints"]
        rank_rng = distributed.all_gather_objects(rank_rng_state()) if self.world > 1 else None
        final = Path(self.checkpoint_dir) / (name or f"step-{done:06d}")
        if self.main:
            final = save_checkpoint(self.checkpoint_dir, done, self.model, self.optimizer, self.fingerprint,
                                    self.schedule, keep, name=name, rank_rng=rank_rng)
        distributed.barrier()
        return final

    # The state with the lowest dev loss, kept as ``best/`` beside the step checkpoints.

    @property
    def best_dir(self) -> Path:
        return Path(self.checkpoint_dir) / "best"

    def resume_best(self) -> float:
        """The lowest dev loss logged so far (inf when none), to compare later evaluations with; a ``best``
        state saved after the step this run resumes from is removed (the steps after it are re-made).
        Several processes: rank 0 reads and removes, every rank gets its answer."""
        best = math.inf
        if self.main:
            dev_losses = [float(r["dev_loss"]) for r in self.log.rows() if r.get("dev_loss")]
            best = min(dev_losses) if dev_losses else math.inf
            if self.start == 0 or saved_step(self.best_dir) > self.start:
                shutil.rmtree(self.best_dir, ignore_errors=True)
        self.best_dev_loss = distributed.broadcast_object(best)
        return self.best_dev_loss

    def keep_if_best(self, done: int, dev_loss: float) -> None:
        """Save the state after step ``done`` as ``best`` when ``dev_loss`` is the lowest so far."""
        if dev_loss < self.best_dev_loss:
            self.best_dev_loss = dev_loss
            self.save(done, name="best")

    def finish_best(self) -> Path:
        """The ``best`` folder after :meth:`run`; with no dev set (no evaluation) the last state is the best known."""
        if distributed.broadcast_object(not self.best_dir.is_dir()):
            self.save(self.steps, name="best")
        return self.best_dir

    def run(self, train_step: Callable[[int], dict], evaluate: Callable[[int], dict] | None = None, *,
            stop_after: int | None = None) -> bool:
        """Run steps :attr:`start` .. ``steps - 1``: set the step's learning rate, ``train_step(step)``
        (the forward, backward and optimiser step; returns the row's numbers, at least ``loss``),
        ``evaluate(done)`` when due (:meth:`eval_due`; returns more columns), log the row, report
        progress, checkpoint every ``checkpoint_every`` steps and at the end. False when
        ``stop_after`` steps ended the run early, as a kill would (tests of resuming). Several processes:
        every rank runs it; rank 0 logs and reports."""
        progress = Progress(self.steps, self.desc, initial=self.start, bar=self.bar,
                            item_name="items" if self.items_per_step else None) if self.main else None
        with progress if progress is not None else contextlib.nullcontext():
            for step in range(self.start, self.steps):
                lr = set_lr(self.optimizer, step - self.first_step, self.cfg, self.steps - self.first_step, self.decay)
                row = {"step": step + 1, "lr": lr, **train_step(step)}
                done = step + 1
                if evaluate is not None and self.eval_due(done):
                    row.update(evaluate(done))
                if progress is not None:
                    self.log.write(row)
                    progress.update(1, items=self.items_per_step, loss=row["loss"], lr=lr)
                if done % self.cfg["checkpoint_every"] == 0 or done == self.steps:
                    self.save(done)
                if stop_after is not None and stop_after <= done < self.steps:
                    return False
        return True
