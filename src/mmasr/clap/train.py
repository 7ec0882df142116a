"""CLAP-style audio-text model: frozen encoders, trained projection heads, retrieval evaluation.

What it does
------------
Speech and its transcript are mapped into one space where an utterance lies next to what was said
(seed 003, LAION-CLAP). Each side is a frozen encoder whose hidden states are pooled
(:mod:`mmasr.models.layers`: a mean over the audio frames, the ``[CLS]`` state or a token mean for text;
optionally the four quartile layers concatenated, seed 004) followed by a projection head, a
two-layer MLP (``in -> hidden_dim -> GELU -> embed_dim``; 768 -> 256 -> 256 for HuBERT-base and
BERT-base) whose output is L2-normalised. The loss is the symmetric InfoNCE of CLIP with a
learnable logit scale initialised at ln(1/0.07) and clamped at ln(100).

* Phase 1 trains the heads only, on **cached** pooled embeddings (``mmasr clap-embeddings``): each
  encoder runs once per utterance and once per distinct text, and an epoch is a few matrix
  products (``benchmarks/clap_cache.py`` measures it against re-encoding every step).
* Phase 2 (optional, ``clap.phase2_epochs``) also trains the last ``phase2_layers`` transformer
  layers of both encoders, at ``phase2_encoder_lr`` (the heads keep ``lr``); inputs are re-encoded
  every step. The fine-tuned encoder weights are stored beside the heads and used for evaluation.

Duplicate transcripts (one prompt read by many speakers) are not wrong answers: within a batch,
pairs with the same text are all positives of one another (soft targets), and retrieval ranks the
*distinct* texts, a hit being the text equal to the reference. Evaluation covers the whole test
candidate set in both directions (audio->text over the distinct test texts, text->audio over every
test utterance): R@1/5/10, mAP@10, mean and median rank of the first correct candidate; for the
trained heads and for the untrained ("zero-shot") heads they started from, beside chance level.
Ties are broken against the model (an incorrect candidate scoring the same ranks first), so a
collapsed model scores at or below chance, never above (:mod:`mmasr.metrics.retrieval`).

Each phase is a step function run by the shared loop (:class:`mmasr.training.loop.Trainer`): the
learning rate a pure function of the step, batches a pure function of ``(seed, step)``, atomic
checkpoints of weights (safetensors), optimizer, step and RNG with a fingerprint of config, data and
code; a killed run resumes to the same final weights.

Under torchrun (``training.nproc`` > 1) each rank embeds its part of the step's batch and gathers the
others' embeddings with their gradients (:func:`mmasr.training.distributed.gather_rows`), so the InfoNCE
logits are the whole batch's, as on one process; DDP averages the heads' (and encoder layers')
gradients. Rank 0 writes the checkpoints, the log and the model.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmasr.clap.cache import ClapCache, load_cache
from mmasr.io import atomic_path
from mmasr.training import distributed, streams
from mmasr.training.loop import Trainer, adamw, batch_indices, code_digest, fingerprint, mean_tail_loss, optimise, \
    set_determinism
from mmasr.training.losses import LN_100, soft_targets, symmetric_infonce

log = logging.getLogger(__name__)

__all__ = [
    "LOGIT_SCALE_INIT",
    "ProjectionHead",
    "ClapHeads",
    "batch_loss",
    "clap_loss",
    "heads_from_cache",
    "heads_step",
    "load_encoders",
    "set_phase2_mode",
    "train_clap",
]

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
TRAIN_LOG_COLUMNS = ["step", "lr", "train_loss", "logit_scale", "dev_loss", "phase"]


# --------------------------------------------------------------------------------------------
# Model and loss
# --------------------------------------------------------------------------------------------


class ProjectionHead(torch.nn.Module):
    """Linear -> GELU -> Linear, L2-normalised output."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(in_dim, hidden_dim)
        self.fc2 = torch.nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc2(F.gelu(self.fc1(x))), dim=-1)


class ClapHeads(torch.nn.Module):
    """The trained part of phase 1: one projection head per modality and the logit scale."""

    def __init__(self, audio_dim: int, text_dim: int, hidden_dim: int, embed_dim: int):
        super().__init__()
        self.audio = ProjectionHead(audio_dim, hidden_dim, embed_dim)
        self.text = ProjectionHead(text_dim, hidden_dim, embed_dim)
        self.logit_scale = torch.nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    def forward(self, audio_x: torch.Tensor, text_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm audio and text embeddings of pooled encoder embeddings."""
        return self.audio(audio_x), self.text(text_x)

    def dims(self) -> dict:
        return {"audio_dim": self.audio.fc1.in_features, "text_dim": self.text.fc1.in_features,
                "hidden_dim": self.audio.fc1.out_features, "embed_dim": self.audio.fc2.out_features}


def clap_loss(audio: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
              targets: torch.Tensor | None = None) -> torch.Tensor:
    """CLAP's loss: :func:`mmasr.training.losses.symmetric_infonce` over unit-norm audio and text embeddings
    (``targets``, e.g. :func:`mmasr.training.losses.soft_targets` over the texts, makes same-text pairs
    positives of one another; default: the diagonal)."""
    return symmetric_infonce(audio, text, logit_scale, targets)


def _text_targets(text_rows: np.ndarray) -> torch.Tensor:
    keys = [int(r) for r in text_rows]
    return soft_targets(keys, keys)


def batch_loss(audio: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, text_rows: np.ndarray,
               sizes: list[int] | None = None) -> torch.Tensor:
    """The loss of a step's whole batch (``text_rows``: its text rows; same-text pairs are positives). With
    ``sizes`` (several processes) ``audio``/``text`` are this rank's rows of it, gathered with their
    gradients from every rank first, so each rank computes the whole batch's loss."""
    if sizes is not None:
        audio, text = distributed.gather_rows(audio, sizes), distributed.gather_rows(text, sizes)
    return clap_loss(audio, text, logit_scale, _text_targets(text_rows).to(audio.device))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


# Keys of the `clap` section that do not change the trained weights: encoding (they change the cache,
# whose digest is fingerprinted), evaluation, and checkpoint/monitoring bookkeeping.
NON_TRAINING_KEYS = ("layers", "text_pooling", "encode_batch_size", "eval_split", "plot_max_k", "checkpoint_every",
                     "keep_checkpoints", "eval_every")


def _training_cfg(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in NON_TRAINING_KEYS}


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def _chunks(n: int, size: int) -> list[np.ndarray]:
    return [np.arange(s, min(n, s + size)) for s in range(0, n, size)]


@torch.no_grad()
def _dev_loss(embed_batch, n: int, text_rows: np.ndarray, logit_scale: torch.Tensor, batch_size: int) -> float | None:
    """Mean InfoNCE over the dev items in fixed chunks of ``batch_size`` (utt_id order). Several processes:
    each rank takes every world-th chunk, and every rank averages all chunks' losses in chunk order."""
    world, rank = distributed.world_size(), distributed.rank()
    losses = []
    for i, idx in enumerate(_chunks(n, batch_size)):
        if len(idx) < 2 or i % world != rank:
            continue
        a, t = embed_batch(idx)
        losses.append((i, float(clap_loss(a, t, logit_scale, _text_targets(text_rows[idx]).to(a.device)))))
    if world > 1:
        losses = sorted(x for part in distributed.all_gather_objects(losses) for x in part)
    return float(np.mean([loss for _, loss in losses])) if losses else None


def heads_from_cache(cache: ClapCache, cfg: dict, seed: int) -> ClapHeads:
    torch.manual_seed(seed)  # the zero-shot heads are a pure function of the seed and the dims
    return ClapHeads(cache.audio.shape[1], cache.text.shape[1], cfg["hidden_dim"], cfg["embed_dim"])


def phase1_batch(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Train-item indices of a phase-1 step (a pure function of its arguments)."""
    return batch_indices(n, batch_size, step, seed, streams.CLAP_ORDER)


def heads_step(heads: ClapHeads, optimizer: torch.optim.Optimizer, audio_x: torch.Tensor, text_x: torch.Tensor,
               text_rows: np.ndarray, grad_clip: float, *, module: torch.nn.Module | None = None,
               sizes: list[int] | None = None) -> float:
    """One phase-1 update on pooled embeddings (same-text pairs are positives); the loss. Several
    processes: ``audio_x``/``text_x`` are this rank's rows of the batch whose text rows are ``text_rows``,
    ``sizes`` every rank's row count and ``module`` the DDP-wrapped heads (:func:`batch_loss`)."""
    a, t = (module if module is not None else heads)(audio_x, text_x)
    loss = batch_loss(a, t, heads.logit_scale, text_rows, sizes)
    optimise(loss, heads, optimizer, grad_clip)
    with torch.no_grad():
        heads.logit_scale.clamp_(max=LN_100)
    return loss.item()


def _row(loss: float, scale: torch.Tensor, phase: int) -> dict:
    return {"loss": loss, "train_loss": loss, "phase": phase, "logit_scale": float(scale.detach().clamp(max=LN_100).exp())}


def train_clap(cache_dir: str | Path, out_dir: str | Path, log_csv: str | Path, checkpoint_dir: str | Path, cfg: dict,
               seed: int, models_cfg: dict | None = None, *, stop_after: int | None = None,
               progress: bool = True) -> dict | None:
    """Phase 1 (heads on the cache) and, when ``cfg['phase2_epochs'] > 0``, phase 2 (heads and the
    last encoder layers on re-encoded inputs; needs ``models_cfg``, the params ``models`` section,
    naming the encoders the cache was made with). Writes ``out_dir/{model,init}.safetensors`` and
    ``config.json`` and the log CSV; returns the summary (None when ``stop_after`` ended the run
    early, as a kill would)."""
    from safetensors.torch import save_file

    from mmasr.models.loading import pick_device

    t0 = time.perf_counter()
    device = pick_device(models_cfg["device"] if models_cfg else "cpu")
    set_determinism(seed, device)
    cache = load_cache(cache_dir)
    train, dev = cache.split("train"), cache.split("dev")
    if len(train) < 2:
        raise ValueError(f"{cache_dir}: {len(train)} train-split utterances; contrastive training needs at least 2")
    heads = heads_from_cache(cache, cfg, seed).to(device)
    init_state = {k: v.detach().cpu().clone() for k, v in heads.state_dict().items()}
    ckpt_dir = Path(checkpoint_dir)

    # Phase 1: the heads on cached embeddings.
    audio = torch.from_numpy(cache.audio).to(device)
    text = torch.from_numpy(cache.text).to(device)
    tr_rows, tr_text = train.index.to_numpy(), train["text_row"].to_numpy()
    dev_rows, dev_text = dev.index.to_numpy(), dev["text_row"].to_numpy()
    bs = min(cfg["batch_size"], len(train))
    if distributed.world_size() > bs:
        raise ValueError(f"CLAP batches of {bs} pairs cannot be shared by {distributed.world_size()} processes: "
                         "raise clap.batch_size or lower training.nproc")
    steps1 = cfg["epochs"] * steps_per_epoch(len(train), bs)
    log.info("CLAP phase 1: %d train utterances (%d distinct texts), %d dev; %d steps of %d; heads %s",
             len(train), len(set(tr_text)), len(dev), steps1, bs, heads.dims())
    optimizer = adamw(heads, cfg)
    phase1_cfg = {k: v for k, v in _training_cfg(cfg).items() if not k.startswith("phase2_")}
    fp1 = fingerprint("clap.phase1", phase1_cfg, seed, steps1, cache.digest, cache.meta, str(device), code_digest(__file__))
    trainer = Trainer("CLAP phase 1", heads, optimizer, cfg, steps=steps1, checkpoint_dir=ckpt_dir / "phase1",
                      fingerprint=fp1, log_columns=TRAIN_LOG_COLUMNS, log_path=ckpt_dir / "log.csv",
                      items_per_step=bs, progress=progress)

    def dev_embed1(idx):
        return heads.audio(audio[dev_rows[idx]]), heads.text(text[dev_text[idx]])

    def train_step(step: int) -> dict:
        idx = phase1_batch(len(train), bs, step, seed)
        mine, sizes = trainer.shard(idx)
        loss = heads_step(heads, optimizer, audio[tr_rows[mine]], text[tr_text[mine]], tr_text[idx], cfg["grad_clip"],
                          module=trainer.module, sizes=sizes)
        return _row(loss, heads.logit_scale, 1)

    def evaluate(done: int) -> dict:
        return {"dev_loss": _dev_loss(dev_embed1, len(dev), dev_text, heads.logit_scale, bs)}

    heads.train()
    if not trainer.run(train_step, evaluate, stop_after=stop_after):
        return None

    encoder_state: dict[str, torch.Tensor] = {}
    steps2 = 0
    if cfg["phase2_epochs"] > 0:
        if models_cfg is None:
            raise ValueError("clap.phase2_epochs > 0 needs the models section (the encoders to fine-tune)")
        steps2 = cfg["phase2_epochs"] * steps_per_epoch(len(train), bs)
        encoder_state = _phase2(cache, heads, cfg, seed, models_cfg, device, ckpt_dir, steps1, steps2, bs,
                                stop_after, progress)
        if encoder_state is None:
            return None
    if not trainer.main:
        return None

    rows = trainer.log.rows()
    last_dev = next((float(r["dev_loss"]) for r in reversed(rows) if r.get("dev_loss")), None)
    summary = {"clap_steps": steps1 + steps2, "clap_phase1_steps": steps1, "clap_phase2_steps": steps2,
               "clap_final_train_loss": mean_tail_loss(rows, column="train_loss"), "clap_final_dev_loss": last_dev,
               "clap_logit_scale": float(heads.logit_scale.detach().exp()),
               "clap_n_train_utts": len(train), "clap_n_train_texts": int(len(set(tr_text))),
               "clap_n_trainable_params": int(sum(p.numel() for p in heads.parameters()))
               + int(sum(v.numel() for v in encoder_state.values()))}
    config = {"heads": heads.dims(), "cache": cache.meta, "cache_digest": cache.digest, "seed": seed, "config": cfg,
              "fine_tuned_encoders": bool(encoder_state), "summary": summary, "fingerprint": fp1}
    trained = {f"heads.{k}": v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}
    trained.update({k: v.detach().cpu().contiguous() for k, v in encoder_state.items()})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "init.safetensors") as tmp:
        save_file({f"heads.{k}": v.contiguous() for k, v in init_state.items()}, str(tmp))
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(trained, str(tmp))
    with atomic_path(out / "config.json") as tmp:  # last: its presence means the folder is complete
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    trainer.log.publish(log_csv)
    summary["clap_train_seconds"] = round(time.perf_counter() - t0, 1)
    return summary


class _Phase2Model(torch.nn.Module):
    """Both encoders and the heads: raw audio and texts in, unit-norm embeddings and the logit scale out
    (one forward, for DDP)."""

    def __init__(self, audio_bundle, text_bundle, heads: ClapHeads, cache_meta: dict, device):
        super().__init__()
        self.audio_encoder, self.text_encoder, self.heads = audio_bundle.model, text_bundle.model, heads
        self.bundles = (audio_bundle, text_bundle)  # their processors make the inputs
        self.a_layers, self.t_layers = cache_meta["audio_layers"], cache_meta["text_layers"]
        self.pooling, self.run_device = cache_meta["text_pooling"], device

    def forward(self, audios: list[np.ndarray], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from mmasr.models.layers import text_forward, text_inputs
        from mmasr.models.loading import autocast

        audio_bundle, text_bundle = self.bundles
        with autocast(self.run_device):
            a = self.heads.audio(_pooled_audio(audio_bundle, audios, self.a_layers))
            t = self.heads.text(text_forward(self.text_encoder, text_inputs(text_bundle, texts), self.t_layers,
                                             self.pooling))
        # The scale leaves through the outputs (a view: the same number) so that DDP, searching the graph for
        # unused parameters, finds it used; otherwise its gradient would be reduced twice.
        return a.float(), t.float(), self.heads.logit_scale.view(())


def _unfreeze_last(model, n: int) -> tuple[list[str], list[torch.nn.Module]]:
    """Freeze ``model`` except its last ``n`` transformer layers: the names of the trainable parameters and
    the trained layers."""
    from mmasr.models.layers import transformer_layers

    model.requires_grad_(False)
    layers = list(transformer_layers(model))[-n:] if n > 0 else []
    for layer in layers:
        layer.requires_grad_(True)
    return [name for name, p in model.named_parameters() if p.requires_grad], layers


def set_phase2_mode(model: torch.nn.Module, heads: torch.nn.Module, trained_layers: list[torch.nn.Module],
                    training: bool) -> None:
    """Train mode for the heads and the trained layers only; the frozen rest of each encoder stays in eval
    mode, computing what it computed for the cache. A whole encoder in train mode would add dropout to
    frozen layers, HuBERT's SpecAugment masking (``mask_time_prob``) and LayerDrop (``layerdrop``: 0.1 in
    hubert-base-ls960), and transformers 5 collects ``hidden_states`` from the layers that ran, so a
    dropped layer would also shift every later layer index (found at real size: an IndexError)."""
    model.eval()
    if training:
        heads.train()
        for layer in trained_layers:
            layer.train()


def load_encoders(models_cfg: dict, cache_meta: dict, device) -> tuple:
    """The audio and text encoders named by ``models_cfg``, checked against the cache's revisions.

    Always float32, whatever ``models.dtype`` says: phase 2 trains their last layers (float32 master
    weights; bf16 autocast on CUDA does the maths), and evaluation re-encodes with those weights."""
    from mmasr.models.loading import load_audio_encoder, load_text_encoder

    bundles = []
    for kind, loader in (("audio", load_audio_encoder), ("text", load_text_encoder)):
        name = models_cfg[f"{kind}_encoder"]
        bundle = loader(name, device=device, revision=models_cfg.get(f"{kind}_encoder_revision"),
                        trust_remote_code=models_cfg["trust_remote_code"],
                        dtype=torch.float32)
        if bundle.revision != cache_meta[f"{kind}_revision"]:
            raise ValueError(f"{kind} encoder {name!r} is revision {bundle.revision}, but the CLAP cache was made "
                             f"with {cache_meta[f'{kind}_encoder']!r} at {cache_meta[f'{kind}_revision']}: "
                             "rebuild the cache (mmasr clap-embeddings)")
        bundles.append(bundle)
    return tuple(bundles)


def _pooled_audio(bundle, audios: list[np.ndarray], layers: list[int]) -> torch.Tensor:
    """Differentiable pooled audio embeddings (one utterance at a time where batching is inexact)."""
    from mmasr.models.layers import audio_forward, audio_inputs, batchable

    groups = [audios] if batchable(bundle) else [[a] for a in audios]
    out = []
    for group in groups:
        inputs, mask = audio_inputs(bundle, group)
        out.append(audio_forward(bundle.model, inputs, mask, layers))
    return torch.cat(out)


def _phase2(cache: ClapCache, heads: ClapHeads, cfg: dict, seed: int, models_cfg: dict, device, ckpt_dir: Path,
            steps1: int, steps2: int, bs: int, stop_after: int | None, progress: bool) -> dict | None:
    """The heads and the last ``phase2_layers`` layers of both encoders, inputs re-encoded every step.
    Returns the fine-tuned encoder parameters (``audio_encoder.*``, ``text_encoder.*``)."""
    from mmasr.data.audio import read_audio

    audio_bundle, text_bundle = load_encoders(models_cfg, cache.meta, device)
    (audio_names, audio_layers), (text_names, text_layers) = (_unfreeze_last(b.model, cfg["phase2_layers"])
                                                              for b in (audio_bundle, text_bundle))
    trainable = {"audio_encoder": audio_names, "text_encoder": text_names}
    trained_layers = audio_layers + text_layers
    model = _Phase2Model(audio_bundle, text_bundle, heads, cache.meta, device)
    train, dev = cache.split("train"), cache.split("dev")
    train_audio = [read_audio(p) for p in train["audio_path"]]
    dev_audio = [read_audio(p) for p in dev["audio_path"]]
    tr_text, dev_text = train["text_row"].to_numpy(), dev["text_row"].to_numpy()

    groups = []
    for module, scale in ((heads, 1.0), (audio_bundle.model, cfg["phase2_encoder_lr"] / cfg["lr"]),
                          (text_bundle.model, cfg["phase2_encoder_lr"] / cfg["lr"])):
        params = [p for p in module.parameters() if p.requires_grad]
        groups += [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg["weight_decay"], "lr_scale": scale},
                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg["lr"], betas=(0.9, 0.98), eps=1e-8)
    fp2 = fingerprint("clap.phase2", _training_cfg(cfg), seed, steps1, steps2, cache.digest, cache.meta, str(device), code_digest(__file__))
    # global step numbers: the log and the checkpoints continue phase 1's
    trainer = Trainer("CLAP phase 2", model, optimizer, cfg, steps=steps1 + steps2, first_step=steps1,
                      checkpoint_dir=ckpt_dir / "phase2", fingerprint=fp2, log_columns=TRAIN_LOG_COLUMNS,
                      log_path=ckpt_dir / "log.csv", items_per_step=bs,
                      schedule_extra={"encoder_lr": cfg["phase2_encoder_lr"]}, progress=progress,
                      find_unused_parameters=True)  # the pooled layers need not reach every unfrozen layer
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("CLAP phase 2: last %d layers of each encoder + heads (%d trainable parameters), %d steps, encoder lr %g",
             cfg["phase2_layers"], n_trainable, steps2, cfg["phase2_encoder_lr"])

    def dev_embed2(idx):
        return model([dev_audio[i] for i in idx], [cache.texts[r] for r in dev_text[idx]])[:2]

    def train_step(step: int) -> dict:
        idx = batch_indices(len(train), bs, step - steps1, seed, streams.CLAP_PHASE2_ORDER)
        mine, sizes = trainer.shard(idx)
        a, t, scale = trainer.module([train_audio[i] for i in mine], [cache.texts[r] for r in tr_text[mine]])
        loss = batch_loss(a, t, scale, tr_text[idx], sizes)
        optimise(loss, model, optimizer, cfg["grad_clip"])
        with torch.no_grad():
            heads.logit_scale.clamp_(max=LN_100)
        return _row(loss.item(), heads.logit_scale, 2)

    def evaluate(done: int) -> dict:
        set_phase2_mode(model, heads, trained_layers, training=False)
        dev_loss = _dev_loss(dev_embed2, len(dev), dev_text, heads.logit_scale, bs)
        set_phase2_mode(model, heads, trained_layers, training=True)
        return {"dev_loss": dev_loss}

    set_phase2_mode(model, heads, trained_layers, training=True)
    if not trainer.run(train_step, evaluate, stop_after=stop_after):
        return None
    model.eval()
    params = dict(model.named_parameters())
    return {name: params[name].detach() for prefix, names in trainable.items() for name in
            (f"{prefix}.{n}" for n in names)}
