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

:class:`Trainer` holds that state and runs the loop::

    trainer = Trainer("train projector", model, adamw(model, cfg), cfg, steps=steps,
                      checkpoint_dir=ckpt, fingerprint=fp, log_columns=["step", "lr", "loss"])
    def train_step(step):            # forward, backward, optimiser step; returns the row's numbers
        ...
        return {"loss": loss.item()}
    finished = trainer.run(train_step, evaluate=lambda done: {"dev_loss": ...})
"""

from __future__ import annotations

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

log = logging.getLogger(__name__)

__all__ = [
    "lr_at", "set_lr", "batch_indices", "set_determinism", "code_digest", "fingerprint", "data_digest",
    "step_dirs", "save_checkpoint", "resume_checkpoint", "saved_step", "CsvLog", "optimise", "adamw",
    "mean_tail_loss", "run_steps", "Trainer",
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
                    fp: str, schedule: dict, keep: int, name: str | None = None) -> Path:
    """Write ``step-NNNNNN/{model.safetensors,state.pt}`` atomically; keep the newest ``keep``.
    With ``name`` (e.g. ``best``) the folder is ``name/`` instead, replaced in place, never pruned."""
    from safetensors.torch import save_model

    final = Path(checkpoint_dir) / (name or f"step-{step:06d}")
    state = {"step": step, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
             "fingerprint": fp, "schedule": schedule}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
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
    """

    def __init__(self, desc: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: dict, *,
                 steps: int, checkpoint_dir: str | Path, fingerprint: str, log_columns: Sequence[str],
                 log_path: str | Path | None = None, decay: str = "cosine", first_step: int = 0,
                 items_per_step: int | None = None, schedule_extra: dict | None = None, progress: bool = True):
        self.desc, self.model, self.optimizer, self.cfg = desc, model, optimizer, cfg
        self.steps, self.first_step, self.decay = int(steps), int(first_step), decay
        self.checkpoint_dir = Path(checkpoint_dir)
        self.fingerprint = fingerprint
        self.items_per_step = items_per_step
        self.bar = progress
        self.schedule = {"kind": f"linear warm-up + {decay} decay", "lr": cfg["lr"], "warmup": cfg["warmup"],
                         "total": self.steps - self.first_step, "min_lr_ratio": cfg["min_lr_ratio"],
                         **(schedule_extra or {})}
        self.start = resume_checkpoint(self.checkpoint_dir, model, optimizer, fingerprint) or self.first_step
        path = Path(log_path) if log_path else self.checkpoint_dir / "log.csv"
        # A finished phase leaves the log alone (a later phase's rows follow its own).
        self.log = CsvLog(path, log_columns, self.start if self.start < self.steps else None)

    def eval_due(self, done: int) -> bool:
        """Evaluate after step ``done``: every ``eval_every`` steps of this run's schedule, and at the end."""
        every = self.cfg.get("eval_every", 0)
        return bool(every) and ((done - self.first_step) % every == 0 or done == self.steps)

    def save(self, done: int, name: str | None = None) -> Path:
        """Checkpoint the state after step ``done`` (``name``: a named folder such as ``best``, kept apart)."""
        keep = 1 if name else self.cfg["keep_checkpoints"]
        return save_checkpoint(self.checkpoint_dir, done, self.model, self.optimizer, self.fingerprint,
                               self.schedule, keep, name=name)

    def run(self, train_step: Callable[[int], dict], evaluate: Callable[[int], dict] | None = None, *,
            stop_after: int | None = None) -> bool:
        """Run steps :attr:`start` .. ``steps - 1``: set the step's learning rate, ``train_step(step)``
        (the forward, backward and optimiser step; returns the row's numbers, at least ``loss``),
        ``evaluate(done)`` when due (:meth:`eval_due`; returns more columns), log the row, report
        progress, checkpoint every ``checkpoint_every`` steps and at the end. False when
        ``stop_after`` steps ended the run early, as a kill would (tests of resuming)."""
        progress = Progress(self.steps, self.desc, initial=self.start, bar=self.bar,
                            item_name="items" if self.items_per_step else None)
        with progress:
            for step in range(self.start, self.steps):
                lr = set_lr(self.optimizer, step - self.first_step, self.cfg, self.steps - self.first_step, self.decay)
                row = {"step": step + 1, "lr": lr, **train_step(step)}
                done = step + 1
                if evaluate is not None and self.eval_due(done):
                    row.update(evaluate(done))
                self.log.write(row)
                progress.update(1, items=self.items_per_step, loss=row["loss"], lr=lr)
                if done % self.cfg["checkpoint_every"] == 0 or done == self.steps:
                    self.save(done)
                if stop_after is not None and stop_after <= done < self.steps:
                    return False
        return True
