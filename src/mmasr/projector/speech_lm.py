"""The SLAM-ASR projector between a frozen speech encoder and a frozen decoder-only LM (seed 002).

Encoder frames (T, D) lose their last ``T mod k`` frames, every ``k`` consecutive frames are stacked
into one vector of ``D·k``, and a two-layer MLP maps it to the LM's hidden size:
Linear(D·k → hidden) · ReLU · Linear(hidden → LM hidden). Stacking cuts the sequence the LM reads
by ``k``; the MLP bridges the two embedding spaces. Only this module trains.

The LM then reads ``[projected audio, prompt, transcript, eos]``; the loss covers the transcript and
the end-of-sequence token only (:func:`assemble`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from mmasr.io import atomic_dir
from mmasr.training import distributed, streams
from mmasr.training.losses import IGNORE, token_cross_entropy
from mmasr.training.loop import Trainer, adamw, code_digest, data_digest, fingerprint, run_steps, saved_step, \
    set_determinism

log = logging.getLogger(__name__)

def stack_frames(frames: torch.Tensor, lengths: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, D) frames with valid ``lengths`` -> (B, T // k, D·k) stacked frames and their lengths
    (``lengths // k``: each utterance drops its own last ``length mod k`` frames)."""
    if k < 1:
        raise ValueError(f"stack size k must be >= 1, got {k}")
    b, t, d = frames.shape
    usable = (t // k) * k
    stacked = frames[:, :usable, :].reshape(b, usable // k, d * k)
    return stacked, torch.div(lengths, k, rounding_mode="floor")


class Projector(nn.Module):
    """Stack ``k`` encoder frames, then Linear(D·k → hidden) · ReLU · Linear(hidden → lm_hidden)."""

    def __init__(self, encoder_dim: int, lm_hidden: int, hidden: int = 2048, k: int = 5):
        super().__init__()
        self.k = k
        self.net = nn.Sequential(nn.Linear(encoder_dim * k, hidden), nn.ReLU(), nn.Linear(hidden, lm_hidden))

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stacked, new_lengths = stack_frames(frames, lengths, self.k)
        return self.net(stacked), new_lengths

    def reset_parameters(self, seed: int) -> None:
        """Seeded re-initialisation (PyTorch's default Linear init), the same for every run of one seed."""
        torch.manual_seed(seed)
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()


def n_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def assemble(audio: torch.Tensor, audio_lengths: torch.Tensor, prompt: torch.Tensor, targets: list[list[int]],
             embed: nn.Embedding, eos_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build the LM's input for a batch: per row ``[audio[:len], prompt, target, eos]``, right-padded.

    ``audio`` (B, A, H) are projected frames with valid ``audio_lengths``; ``prompt`` (P,) token ids;
    ``targets`` the transcript token ids per row; ``embed`` the LM's (frozen) input embeddings.
    Returns ``inputs_embeds`` (B, L, H), ``attention_mask`` (B, L) and ``labels`` (B, L), where the
    labels are the next-token targets aligned with the inputs (HF causal LMs shift them) and
    :data:`IGNORE` everywhere except the transcript tokens and the end-of-sequence token.
    """
    device, dtype = audio.device, audio.dtype
    prompt_emb = embed(prompt.to(device)).to(dtype)
    rows, labels = [], []
    for i, target in enumerate(targets):
        text = torch.tensor(list(target) + [eos_id], device=device, dtype=torch.long)
        a = int(audio_lengths[i])
        row = torch.cat([audio[i, :a], prompt_emb, embed(text).to(dtype)])
        lab = torch.full((row.shape[0],), IGNORE, dtype=torch.long, device=device)
        lab[a + len(prompt):] = text
        rows.append(row)
        labels.append(lab)
    width = max(r.shape[0] for r in rows)
    hidden = audio.shape[-1]
    inputs = torch.zeros(len(rows), width, hidden, device=device, dtype=dtype)
    mask = torch.zeros(len(rows), width, device=device, dtype=torch.long)
    out_labels = torch.full((len(rows), width), IGNORE, device=device, dtype=torch.long)
    for i, (row, lab) in enumerate(zip(rows, labels)):
        inputs[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = 1
        out_labels[i, : lab.shape[0]] = lab
    return inputs, mask, out_labels


# --------------------------------------------------------------------------------------------
# Batching: similar lengths together, a pure function of (seed, micro-batch index)
# --------------------------------------------------------------------------------------------

def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, bucket_batches: int) -> list[np.ndarray]:
    """One epoch's batches of example indices, grouped by similar length.

    The epoch's permutation is cut into buckets of ``batch_size * bucket_batches`` examples; each bucket
    is sorted by length and cut into batches; the batch order is shuffled. Less padding than random
    batches, yet every epoch differs. ``bucket_batches=1`` gives plain random batches.
    """
    if batch_size < 1 or bucket_batches < 1:
        raise ValueError("batch_size and bucket_batches must be >= 1")
    rng = np.random.default_rng([seed, streams.PROJECTOR_ORDER, epoch])
    perm = rng.permutation(len(lengths))
    bucket = batch_size * bucket_batches
    batches = []
    for start in range(0, len(perm), bucket):
        chunk = perm[start:start + bucket]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def micro_batch(lengths: np.ndarray, batch_size: int, index: int, seed: int, bucket_batches: int,
                memo: dict | None = None) -> np.ndarray:
    """The ``index``-th micro-batch of the endless stream of epochs (a resumed run sees the same batches).
    ``memo`` (a dict the caller keeps) holds the current epoch's batches, so they are built once per epoch."""
    per_epoch = math.ceil(len(lengths) / batch_size)
    epoch, within = divmod(index, per_epoch)
    if memo is None or memo.get("epoch") != epoch:
        batches = epoch_batches(lengths, batch_size, seed, epoch, bucket_batches)
        if memo is None:
            return batches[within]
        memo.update(epoch=epoch, batches=batches)
    return memo["batches"][within]


def pad_frames(arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(T_i, D) arrays -> zero-padded float32 (B, max T, D) and the lengths."""
    lengths = torch.tensor([a.shape[0] for a in arrays], dtype=torch.long)
    out = torch.zeros(len(arrays), int(lengths.max()), arrays[0].shape[1], dtype=torch.float32)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = torch.from_numpy(np.asarray(a, dtype=np.float32))
    return out, lengths


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy: position t predicts ``labels[t + 1]`` (IGNORE positions skipped)."""
    return token_cross_entropy(logits[:, :-1], labels[:, 1:], reduction="sum")


# --------------------------------------------------------------------------------------------
# The model: frozen LM + trainable projector
# --------------------------------------------------------------------------------------------


@dataclass
class SpeechLM:
    """What training and decoding share: the projector, the frozen LM and its tokenizer, the prompt."""

    projector: Projector
    lm: nn.Module
    tokenizer: object
    prompt_ids: list[int]
    eos_id: int
    device: torch.device

    def lm_dtype(self) -> torch.dtype:
        """The frozen LM's weight dtype (bf16 under models.dtype auto on CUDA); the projector stays float32."""
        return self.lm.get_input_embeddings().weight.dtype

    def inputs(self, frames: torch.Tensor, lengths: torch.Tensor, targets: list[list[int]]):
        audio, audio_lengths = self.projector(frames.to(self.device), lengths)
        audio = audio.to(self.lm_dtype())  # the LM reads its own dtype; gradients flow back to float32
        prompt = torch.tensor(self.prompt_ids, dtype=torch.long)
        return assemble(audio, audio_lengths, prompt, targets, self.lm.get_input_embeddings(), self.eos_id)

    def loss_sum(self, frames: torch.Tensor, lengths: torch.Tensor, targets: list[list[int]]) -> tuple[torch.Tensor, int]:
        """Summed loss over the transcript tokens and eos of a batch, and how many tokens that is.

        The LM's output layer runs only at the positions that predict a labelled token: most positions
        are audio and prompt, and a real LM's vocabulary (~128 k) makes full logits the largest tensor."""
        from mmasr.models.loading import autocast

        with autocast(self.device):
            embeds, mask, labels = self.inputs(frames, lengths, targets)
            hidden = self.lm.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            targets_next = labels[:, 1:]
            scored = targets_next != IGNORE  # position t predicts labels[t + 1]
            logits = self.lm.get_output_embeddings()(hidden[:, :-1][scored])
        return F.cross_entropy(logits.float(), targets_next[scored], reduction="sum"), int(scored.sum())


def text_ids(tokenizer, text: str) -> list[int]:
    """A transcript's token ids as they follow the prompt: ``" " + text`` (no eos: :func:`assemble` adds it)."""
    return tokenizer(" " + str(text).strip(), add_special_tokens=False).input_ids


def build_speech_lm(lm_bundle, encoder_dim: int, cfg: dict) -> SpeechLM:
    """Freeze the LM and put a fresh projector (``cfg``: the params ``projector`` section) in front of it."""
    lm, tok = lm_bundle.model, lm_bundle.processor
    lm.requires_grad_(False)
    lm.eval()  # frozen: no dropout either
    if tok.eos_token_id is None:
        raise ValueError(f"LM {lm_bundle.name!r}: its tokenizer has no eos token, which ends every transcript")
    projector = Projector(encoder_dim, int(lm.config.hidden_size), hidden=cfg["hidden"], k=cfg["k"]).to(lm_bundle.device)
    prompt = tok(cfg["prompt"], add_special_tokens=False).input_ids
    return SpeechLM(projector, lm, tok, prompt, int(tok.eos_token_id), lm_bundle.device)


# --------------------------------------------------------------------------------------------
# Training (nanoGPT style: one loop, checkpoint + resume)
# --------------------------------------------------------------------------------------------

LOG_COLUMNS = ["step", "lr", "train_loss", "dev_loss", "tokens"]


def labelled_items(manifest: pd.DataFrame, split: str, cache, tokenizer, limit: int | None = None) -> pd.DataFrame:
    """Utterances of ``split`` with a transcript, sorted by id, with their token ids and cached lengths."""
    rows = manifest[(manifest["split"] == split) & manifest["text"].fillna("").str.strip().astype(bool)]
    rows = rows.sort_values("utt_id").reset_index(drop=True)
    if limit:
        rows = rows.iloc[:limit]
    missing = sorted(set(rows["utt_id"]) - set(cache.index.index))
    if missing:
        raise ValueError(f"{len(missing)} {split} utterances have no cached encoder features in {cache.folder} "
                         f"(e.g. {missing[:3]}): re-run `mmasr encode-audio`")
    rows["target"] = [text_ids(tokenizer, t) for t in rows["text"]]
    rows["n_frames"] = cache.index.loc[rows["utt_id"], "n_frames"].to_numpy()
    return rows


@torch.no_grad()
def mean_loss(model: SpeechLM, items: pd.DataFrame, cache, batch_size: int) -> float:
    """Mean token loss (transcript + eos) over ``items``, in length-sorted batches. Several processes:
    each rank takes every world-th batch and the batches' sums are added up in batch order on every
    rank, so the result is the one a single process gets for the same weights."""
    world, rank = distributed.world_size(), distributed.rank()
    order = np.argsort(items["n_frames"].to_numpy(), kind="stable")
    sums = []
    for i, start in enumerate(range(0, len(order), batch_size)):
        if i % world != rank:
            continue
        part = items.iloc[order[start:start + batch_size]]
        frames, lengths = pad_frames(cache.batch(part["utt_id"].tolist()))
        loss, n = model.loss_sum(frames, lengths, part["target"].tolist())
        sums.append((i, float(loss), n))
    if world > 1:
        sums = sorted(s for rank_sums in distributed.all_gather_objects(sums) for s in rank_sums)
    total, count = 0.0, 0
    for _, loss, n in sums:
        total, count = total + loss, count + n
    return total / max(1, count)


def train_projector(model: SpeechLM, cache, manifest: pd.DataFrame, out_dir: str | Path, log_csv: str | Path,
                    state_dir: str | Path, cfg: dict, seed: int, *, resume: bool = False, max_steps: int | None = None,
                    limit: int | None = None, stop_after: int | None = None, progress: bool = True,
                    provenance: dict | None = None) -> dict | None:
    """Train ``model.projector`` on the train split, reading encoder outputs from ``cache``.

    ``cfg`` is the params ``projector`` section. Every ``eval_every`` steps the dev loss is measured
    and, when it is the best so far, the state is saved as ``best``; the newest ``keep_checkpoints``
    step checkpoints are kept for resuming. ``resume`` continues from the newest checkpoint of an
    identical run in ``state_dir`` (otherwise the folder is cleared). ``max_steps``/``limit`` shorten
    the run (smoke tests); ``stop_after`` stops as a kill would. Writes ``out_dir/{best,last}`` with
    the projector's config, and the log; returns the summary (None when stopped).

    Under torchrun every rank runs this: each computes its part of every step's batch through DDP
    (:class:`mmasr.training.loop.Trainer`), the loss scaled by the step's *global* token count, and rank 0
    writes everything; other ranks return None.
    """
    t0 = time.perf_counter()
    dev = model.device
    set_determinism(seed, dev)
    model.projector.reset_parameters(seed)
    steps = run_steps(cfg, max_steps)
    train = labelled_items(manifest, "train", cache, model.tokenizer, limit)
    dev_items = labelled_items(manifest, "dev", cache, model.tokenizer, cfg["eval_utts"] or None)
    if train.empty:
        raise ValueError("no train utterances with a transcript: the projector has nothing to learn from")
    lengths = (train["n_frames"].to_numpy() // cfg["k"]) + train["target"].map(len).to_numpy()

    projector = model.projector
    projector.train()
    optimizer = adamw(projector, cfg)
    fp = fingerprint("projector", cfg, seed, steps, model.prompt_ids, (provenance or {}),
                     data_digest(train, ["utt_id", "text", "n_frames"]), cache.digest, str(dev), code_digest(__file__))
    state = Path(state_dir)
    if not resume and state.exists() and distributed.is_main():
        log.info("starting afresh: removing the previous training state in %s (use --resume to continue it)", state)
        shutil.rmtree(state)
    trainer = Trainer("train projector", projector, optimizer, cfg, steps=steps, checkpoint_dir=state, fingerprint=fp,
                      log_columns=LOG_COLUMNS, decay="linear", items_per_step=cfg["batch_size"] * cfg["grad_accum"],
                      schedule_extra={"grad_accum": cfg["grad_accum"]}, progress=progress)
    trainer.resume_best()
    log.info("projector: %d trainable parameters (%d -> %d, k=%d, hidden %d); LM frozen; %d train / %d dev "
             "utterances; %d steps of %d x %d", n_trainable(projector), projector.net[0].in_features,
             projector.net[-1].out_features, cfg["k"], cfg["hidden"], len(train), len(dev_items), steps,
             cfg["batch_size"], cfg["grad_accum"])

    epoch_memo: dict = {}
    world = trainer.world
    # The forward goes through trainer.module: the projector itself, or its DDP wrapper (the LM is frozen, not wrapped).
    train_model = model if world == 1 else replace(model, projector=trainer.module)

    def train_step(step: int) -> dict:
        # Gradient accumulation: the step's batch of batch_size * grad_accum utterances runs as grad_accum
        # micro-batches whose summed token losses are divided by the step's token count, so the update
        # equals one big batch (only memory differs). Several processes: each rank runs its part of the
        # step's batch as grad_accum micro-batches; its summed loss, divided by the *global* token count and
        # times the world size (DDP averages the ranks' gradients), gives the one-process gradient.
        step_batch = micro_batch(lengths, cfg["batch_size"] * cfg["grad_accum"], step, seed, cfg["bucket_batches"],
                                 epoch_memo)
        n_tokens = int(train["target"].iloc[step_batch].map(len).sum()) + len(step_batch)
        mine, _ = trainer.shard(step_batch)
        batches = [train.iloc[part] for part in np.array_split(mine, cfg["grad_accum"]) if len(part)]
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for j, part in enumerate(batches):
            with trainer.no_sync(sync=j == len(batches) - 1):  # DDP averages once, after the last micro-batch
                frames, frame_lengths = pad_frames(cache.batch(part["utt_id"].tolist()))
                loss, _ = train_model.loss_sum(frames, frame_lengths, part["target"].tolist())
                scaled = loss / n_tokens
                (scaled * world if world > 1 else scaled).backward()
            total += float(loss.detach())
        if not batches:  # a step batch smaller than the world: this rank adds zero gradients to DDP's average
            k = projector.k
            out, _ = trainer.module(torch.zeros(1, k, projector.net[0].in_features // k, device=dev), torch.tensor([k]))
            (out.sum() * 0.0).backward()
        if world > 1:
            total = distributed.all_reduce_sum([total])[0]
        torch.nn.utils.clip_grad_norm_(projector.parameters(), cfg["grad_clip"])
        optimizer.step()
        return {"loss": total / n_tokens, "train_loss": total / n_tokens, "tokens": n_tokens}

    def evaluate(done: int) -> dict:
        projector.eval()
        dev_loss = mean_loss(model, dev_items, cache, cfg["batch_size"])
        projector.train()
        trainer.keep_if_best(done, dev_loss)
        return {"dev_loss": dev_loss}

    if not trainer.run(train_step, evaluate if len(dev_items) else None, stop_after=stop_after):
        return None
    csv_log = trainer.log

    best_dir = trainer.finish_best()
    if not trainer.main:
        return None
    rows = csv_log.rows()
    summary = {
        "steps": steps, "best_dev_loss": None if math.isinf(trainer.best_dev_loss) else trainer.best_dev_loss,
        "best_step": saved_step(best_dir), "final_train_loss": float(np.mean([float(r["train_loss"]) for r in rows[-20:]])),
        "first_dev_loss": next((float(r["dev_loss"]) for r in rows if r.get("dev_loss")), None),
        "n_trainable_params": n_trainable(projector), "n_train_utts": len(train), "n_dev_utts": len(dev_items),
        "n_processes": world, "train_seconds": round(time.perf_counter() - t0, 1),
    }
    config = {"encoder_dim": projector.net[0].in_features // cfg["k"], "lm_hidden": projector.net[-1].out_features,
              "hidden": cfg["hidden"], "k": cfg["k"], "prompt": cfg["prompt"], "prompt_ids": model.prompt_ids,
              "fingerprint": fp, **(provenance or {})}
    with atomic_dir(out_dir) as tmp:
        for name, src in (("best", best_dir), ("last", state / f"step-{steps:06d}")):
            shutil.copytree(src, tmp / name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "training.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    csv_log.publish(log_csv)
    return summary




# --------------------------------------------------------------------------------------------
# Decoding and evaluation
# --------------------------------------------------------------------------------------------


def prefix_embeddings(model: SpeechLM, frames: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[projected audio, prompt]`` per row, *left*-padded (generation appends on the right)."""
    audio, audio_lengths = model.projector(frames.to(model.device), lengths)
    audio = audio.to(model.lm_dtype())
    prompt = model.lm.get_input_embeddings()(torch.tensor(model.prompt_ids, device=model.device)).to(audio.dtype)
    rows = [torch.cat([audio[i, : int(audio_lengths[i])], prompt]) for i in range(len(audio))]
    width = max(r.shape[0] for r in rows)
    embeds = torch.zeros(len(rows), width, audio.shape[-1], dtype=audio.dtype, device=model.device)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=model.device)
    for i, r in enumerate(rows):
        embeds[i, width - r.shape[0]:] = r
        mask[i, width - r.shape[0]:] = 1
    return embeds, mask


@torch.no_grad()
def decode(model: SpeechLM, frames: torch.Tensor, lengths: torch.Tensor, *, num_beams: int = 1,
           max_new_tokens: int = 32) -> list[str]:
    """Transcripts of a batch: greedy (``num_beams=1``) or beam search, stopping at eos."""
    from mmasr.models.loading import autocast

    embeds, mask = prefix_embeddings(model, frames, lengths)
    with autocast(model.device):
        out = model.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                num_beams=num_beams, do_sample=False, eos_token_id=model.eos_id,
                                pad_token_id=model.tokenizer.pad_token_id or model.eos_id)
    # With inputs_embeds, generate() returns the new tokens only.
    return [model.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out.tolist()]


def transcribe_split(model: SpeechLM, cache, manifest: pd.DataFrame, split: str, cfg: dict, *,
                     limit: int | None = None, progress: bool = True) -> pd.DataFrame:
    """Hypotheses for every utterance of ``split`` (utt_id, speaker, group, ref, hyp), batched by length."""
    from mmasr.progress import track

    rows = manifest[manifest["split"] == split].sort_values("utt_id").reset_index(drop=True)
    if limit:
        rows = rows.iloc[:limit]
    if rows.empty:
        raise ValueError(f"no {split} utterances to decode")
    n_frames = cache.index.loc[rows["utt_id"], "n_frames"].to_numpy()
    order = np.argsort(n_frames, kind="stable")
    hyps = [""] * len(rows)
    model.projector.eval()
    bs = cfg["decode_batch_size"]
    for start in track(range(0, len(order), bs), f"decode {split}", items=lambda s: len(order[s:s + bs]),
                       item_name="utts", bar=progress):
        idx = order[start:start + bs]
        frames, lengths = pad_frames(cache.batch(rows["utt_id"].iloc[idx].tolist()))
        for i, text in zip(idx, decode(model, frames, lengths, num_beams=cfg["num_beams"],
                                       max_new_tokens=cfg["max_new_tokens"])):
            hyps[i] = text
    return pd.DataFrame({"utt_id": rows["utt_id"], "speaker": rows["speaker"], "group": rows["group"],
                         "ref": rows["text"].fillna(""), "hyp": hyps})


def wer_table(hyps: pd.DataFrame, text_cfg: dict) -> tuple[dict, pd.DataFrame]:
    """Pooled WER with S/D/I over all utterances, per group and per speaker (icefall-style scoring)."""
    from mmasr.data.text import normaliser
    from mmasr.metrics.wer import count_errors, group_wer_table, pooled_wer

    norm = normaliser(text_cfg)
    sub, dele, ins, words = count_errors([norm(r) for r in hyps["ref"]], [norm(h) for h in hyps["hyp"]])
    errors = sub + dele + ins
    metrics = {"test_wer": pooled_wer(errors, words), "test_substitutions": int(sub.sum()),
               "test_deletions": int(dele.sum()), "test_insertions": int(ins.sum()),
               "test_ref_words": int(words.sum()), "n_test_utts": len(hyps),
               "test_exact_match": float(np.mean(errors == 0)) if len(hyps) else None}
    table = group_wer_table(hyps, words, {"wer": errors}, {"S": sub, "D": dele, "I": ins})
    metrics.update({f"test_wer_{rec['name']}": rec["wer"] for rec in table if rec["level"] == "group"})
    return metrics, pd.DataFrame(table)


def versus_whisper(hyps: pd.DataFrame, nbest: pd.DataFrame, manifest: pd.DataFrame, text_cfg: dict,
                   n_resamples: int, seed: int) -> dict:
    """The projector against Whisper's n-best route on exactly the utterances the projector decoded (all of
    test, or the first ``--limit``): Whisper's ASR-only and oracle WERs there (``whisper_test_wer_asr``,
    ``whisper_test_wer_oracle``, ``whisper_test_wer_asr_{group}``) and projector − Whisper ASR-only with its
    paired interval, speaker-level when every group has 2 speakers (``test_wer_vs_whisper``,
    ``_ci_low``/``_ci_high``/``_ci_level``, and ``_{group}`` forms; :mod:`mmasr.metrics.intervals`).
    Raises ValueError when Whisper has no n-best list for some decoded utterance."""
    from mmasr.rescoring.fusion import asr_only_vs_reference, asr_only_wers

    ids = set(hyps["utt_id"])
    lacking = sorted(ids - set(nbest["utt_id"]))
    if lacking:
        raise ValueError(f"{len(lacking)} decoded test utterance(s) have no Whisper n-best list (e.g. {lacking[0]}): "
                         "the comparison needs the same utterances")
    same = manifest[manifest["utt_id"].isin(ids)]
    one_best = pd.DataFrame({"utt_id": hyps["utt_id"].to_numpy(), "rank": 0, "text": hyps["hyp"].fillna("").to_numpy(),
                             "asr_score": 0.0})
    diff = asr_only_vs_reference(one_best, nbest[nbest["utt_id"].isin(ids)], same, text_cfg, n_resamples, seed)
    whisper = asr_only_wers(nbest, same, "test", text_cfg)
    out = {"whisper_test_wer_asr": diff.pop("test_wer_asr_reference"),
           "whisper_test_wer_oracle": whisper["test_wer_oracle"], "n_whisper_compared_utts": len(ids)}
    for key, value in diff.items():
        if key.startswith("test_wer_asr_reference_"):
            out["whisper_test_wer_asr_" + key.removeprefix("test_wer_asr_reference_")] = value
        else:
            out[key.replace("test_wer_asr_vs_reference", "test_wer_vs_whisper")] = value
    return out


def load_trained(folder: str | Path, lm_bundle, which: str = "best") -> SpeechLM:
    """A trained projector (``folder/{best,last}``, as :func:`train_projector` writes it) in front of the LM."""
    from safetensors.torch import load_model

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: no projector config (train it first with `mmasr train-projector`)")
    config = json.loads(config_path.read_text())
    lm_hidden = int(lm_bundle.model.config.hidden_size)
    if config["lm_hidden"] != lm_hidden:
        raise ValueError(f"{folder}: the projector was trained for an LM with hidden size {config['lm_hidden']}, "
                         f"but {lm_bundle.name!r} has {lm_hidden}")
    model = build_speech_lm(lm_bundle, config["encoder_dim"], {"hidden": config["hidden"], "k": config["k"],
                                                               "prompt": config["prompt"]})
    load_model(model.projector, str(folder / which / "model.safetensors"), strict=True)
    model.projector.eval()
    return model
