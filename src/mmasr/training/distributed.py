"""Several processes training one model: PyTorch's DistributedDataParallel (DDP) under ``torchrun``.

``torchrun --standalone --nproc_per_node N -m mmasr.cli train-projector ...`` starts N processes and
gives each ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous in its environment; :func:`session`
joins them (NCCL with one GPU per process on CUDA, gloo on the CPU). Without torchrun there is one
process, nothing is initialised and every helper here is the identity, so a one-process run computes
exactly what it did before DDP existed.

Each optimiser step's *global* batch is the one a single process would draw (:func:`shard_batch` cuts
it into contiguous parts, one per rank, in rank order); the shared loop
(:class:`mmasr.training.loop.Trainer`) wraps the trainable module in DDP, which averages gradients
over the ranks; only rank 0 writes checkpoints, logs and outputs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

__all__ = [
    "Dist", "env_world", "init_from_env", "session", "world_size", "rank", "is_main", "local_world_size",
    "shard_sizes", "shard_batch", "gather_rows", "all_reduce_sum", "all_gather_objects", "broadcast_object",
    "barrier", "cleanup", "rank_seed",
]


@dataclass(frozen=True)
class Dist:
    """Where this process stands: its rank among ``world`` processes, its rank on this machine, the
    backend (None: one process, no process group) and, on CUDA, the GPU it uses."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0


def env_world(environ: dict | None = None) -> tuple[int, int, int]:
    """``(RANK, WORLD_SIZE, LOCAL_RANK)`` as torchrun sets them; ``(0, 1, 0)`` without torchrun."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank_, local = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise ValueError(f"torchrun's RANK/WORLD_SIZE/LOCAL_RANK are not integers: {exc}") from None
    if world < 1 or not 0 <= rank_ < world or local < 0:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank_} WORLD_SIZE={world} LOCAL_RANK={local}")
    return rank_, world, local


def init_from_env(device: str = "auto") -> Dist:
    """Join the process group torchrun's environment describes. ``device`` is the params' ``models.device``:
    on CUDA (``auto`` with a GPU, or ``cuda``) each process takes the GPU of its local rank and NCCL;
    otherwise (``cpu``, or no GPU) gloo. Without torchrun (``WORLD_SIZE`` unset or 1) nothing is initialised."""
    rank_, world, local = env_world()
    if dist.is_initialized():  # a caller that set the group up itself (e.g. a test driver running several jobs)
        return _current(local)
    if world == 1:
        return Dist()
    if device.startswith("cuda:"):
        raise ValueError(f"models.device {device!r} names one GPU, but {world} processes would share it: use "
                         "auto or cuda (each process takes the GPU of its local rank)")
    if device.startswith("mps"):
        raise ValueError(f"models.device {device!r}: several training processes need CUDA GPUs or the CPU")
    if device in ("auto", "cuda") and torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise ValueError(f"local rank {local} has no GPU: {torch.cuda.device_count()} visible, "
                             f"{world} processes (training.nproc must not exceed the GPUs of the job)")
        torch.cuda.set_device(local)  # "cuda" now means this process's GPU (models, tensors, NCCL)
        cuda = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=cuda)
    elif device == "cuda":
        raise RuntimeError("models.device cuda with several processes, but CUDA is not available here")
    else:
        dist.init_process_group("gloo")
    out = _current(local)
    log.info("process %d of %d (local rank %d), backend %s%s", out.rank, out.world, out.local_rank, out.backend,
             f", {out.device}" if out.device is not None else "")
    return out


def _current(local: int) -> Dist:
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None
    return Dist(dist.get_rank(), dist.get_world_size(), local, backend, device)


def cleanup() -> None:
    """Leave the process group (all ranks together)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[Dist]:
    """:func:`init_from_env` on entry; on a normal exit, wait for every rank and leave the group (only a
    group it created itself). A rank that fails exits at once: torchrun then stops the others."""
    owned = not dist.is_initialized()
    state = init_from_env(device)
    yield state
    if owned:
        cleanup()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the process that writes checkpoints, logs and outputs."""
    return rank() == 0


def local_world_size() -> int:
    """Processes on this machine (torchrun's ``LOCAL_WORLD_SIZE``; 1 without torchrun): they share its CPU threads."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


# --------------------------------------------------------------------------------------------
# Splitting a global batch, and putting it back together
# --------------------------------------------------------------------------------------------


def shard_sizes(n: int, world: int) -> list[int]:
    """Items per rank when ``n`` items are cut into ``world`` contiguous parts (the first ``n mod world`` one larger)."""
    if world < 1 or n < 0:
        raise ValueError(f"need world >= 1 and n >= 0, got world={world}, n={n}")
    base, extra = divmod(n, world)
    return [base + (r < extra) for r in range(world)]


def shard_batch(indices: Sequence[int] | np.ndarray, rank_: int, world: int) -> np.ndarray:
    """This rank's contiguous part of a step's global batch: the parts, in rank order, are the batch
    (so gathering every rank's rows rebuilds the batch in the order one process sees it)."""
    if not 0 <= rank_ < world:
        raise ValueError(f"rank {rank_} is not in 0..{world - 1}")
    indices = np.asarray(indices)
    sizes = shard_sizes(len(indices), world)
    start = sum(sizes[:rank_])
    return indices[start:start + sizes[rank_]]


def gather_rows(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Every rank's rows ``x`` (this rank has ``sizes[rank]``), concatenated in rank order, *with* gradients
    flowing back to each rank's own rows (``torch.distributed.nn.functional.all_gather``). For a loss over
    the whole batch (InfoNCE): every rank computes the global loss, and DDP's averaging of the ranks'
    gradients then gives exactly the one-process gradient. One process: ``x`` itself."""
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    width = max(sizes)
    if x.shape[0] != sizes[rank()]:
        raise ValueError(f"rank {rank()} holds {x.shape[0]} rows, expected {sizes[rank()]}")
    if x.shape[0] < width:  # all_gather needs equal shapes: pad, then drop the padding
        x = torch.cat([x, x.new_zeros((width - x.shape[0], *x.shape[1:]))])
    parts = all_gather(x.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """The sums over the ranks of ``values`` (float64; one process: the values as they are)."""
    if world_size() == 1:
        return [float(v) for v in values]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; one process: ``[obj]``."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (one process: ``obj``)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def rank_seed(seed: int, rank_: int) -> int:
    """Torch's seed on rank ``rank_ > 0`` (dropout draws differ between ranks, as they differ between the
    items of one process's batch); rank 0 keeps ``seed``, so one process is unchanged."""
    if rank_ == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank_]).generate_state(1, dtype=np.uint64)[0] % (2**63))
