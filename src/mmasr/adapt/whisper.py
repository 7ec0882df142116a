"""LoRA adaptation of the Whisper named in params (``mmasr adapt-whisper``), on the train split only.

The base weights stay frozen; peft puts rank-r adapters (B·A, scaled by alpha/r, B initialised to zero so the
adapted model starts as the base) on the ``adapt.target_modules`` projections of encoder and decoder. The loss is
teacher-forced cross-entropy of the transcript tokens and eos after Whisper's prompt (the sequence
``mmasr nbest`` scores), summed over the step's tokens. The shared loop (:class:`mmasr.training.loop.Trainer`)
runs it: schedule, clipping, accumulation, dev-loss selection of the best state, exact resume, CSV log. Its
checkpoints hold the adapter weights only (:class:`AdapterWeights`), not the frozen base. The result is written
in Hugging Face format with the best adapters merged (``out/``, which ``models.whisper`` or ``mmasr nbest
--model`` can name) and as a peft adapter folder (``out/adapter``).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from mmasr.data.audio import read_audio
from mmasr.io import atomic_dir
from mmasr.models.loading import ModelBundle, whisper_features, whisper_prompt_ids
from mmasr.training import streams
from mmasr.training.loop import (Trainer, adamw, batch_indices, code_digest, data_digest, fingerprint, run_steps,
                                 saved_step, set_determinism)

log = logging.getLogger(__name__)
LOG_COLUMNS = ["step", "lr", "loss", "tokens", "dev_loss"]


class AdapterWeights(nn.Module):
    """The LoRA A and B layers of a peft model (shared, not copied): what the optimiser sees and a checkpoint holds."""

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        from peft.tuners.lora import LoraLayer

        self.layers = nn.ModuleDict({
            name.replace(".", "__"): nn.ModuleDict({"A": mod.lora_A["default"], "B": mod.lora_B["default"]})
            for name, mod in peft_model.named_modules() if isinstance(mod, LoraLayer)})
        if not self.layers:
            raise ValueError("no LoRA layer was added: adapt.target_modules names no module of this Whisper")


def add_lora(model: nn.Module, cfg: dict, seed: int):
    """The peft model around ``model`` (base frozen) with seeded adapters, and its :class:`AdapterWeights`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # A's init
    lora = LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], target_modules=list(cfg["target_modules"]),
                      lora_dropout=cfg["dropout"], bias="none")
    peft_model = get_peft_model(model, lora)
    return peft_model, AdapterWeights(peft_model)


def transcript_ids(bundle: ModelBundle, text: str) -> list[int]:
    """A transcript as Whisper decodes it after the prompt: ``" " + text`` then eos."""
    tok = bundle.processor.tokenizer
    return tok(" " + str(text).strip(), add_special_tokens=False).input_ids + [int(bundle.model.config.eos_token_id)]


def loss_sum(model: nn.Module, bundle: ModelBundle, audios: list[np.ndarray], targets: list[list[int]],
             prompt: list[int]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of every transcript token and eos of a batch, and how many tokens that is."""
    cfg = bundle.model.config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    longest = max(len(t) for t in targets)
    inputs = torch.full((len(targets), len(prompt) + longest), pad, dtype=torch.long)
    labels = torch.full((len(targets), longest), -100, dtype=torch.long)
    for i, t in enumerate(targets):
        inputs[i, :len(prompt) + len(t)] = torch.tensor(prompt + t)
        labels[i, :len(t)] = torch.tensor(t)
    feats = whisper_features(bundle, audios)["input_features"].float()
    out = model(input_features=feats, decoder_input_ids=inputs[:, :-1].to(bundle.device))
    logits = out.logits[:, len(prompt) - 1:].float()  # position p predicts token p + 1
    labels = labels.to(bundle.device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum"), int((labels >= 0).sum())


def items(manifest: pd.DataFrame, split: str, bundle: ModelBundle, limit: int | None = None) -> pd.DataFrame:
    part = manifest[(manifest["split"] == split) & manifest["text"].fillna("").str.strip().ne("")]
    part = part.sort_values("utt_id").head(limit) if limit else part.sort_values("utt_id")
    part = part.reset_index(drop=True)
    return part.assign(target=[transcript_ids(bundle, t) for t in part["text"]])


def adapt_whisper(bundle: ModelBundle, manifest: pd.DataFrame, out_dir: str | Path, log_csv: str | Path,
                  state_dir: str | Path, cfg: dict, nbest_cfg: dict, seed: int, *, resume: bool = False,
                  max_steps: int | None = None, stop_after: int | None = None, progress: bool = True,
                  provenance: dict | None = None) -> dict | None:
    """Train LoRA adapters on ``bundle``'s Whisper (``cfg``: the params ``adapt`` section) on the train split;
    keep the state with the lowest dev loss; write ``out_dir`` (merged HF model + ``adapter/``) and the log.
    Returns the summary, or None when ``stop_after`` stopped it as a kill would."""
    t0 = time.perf_counter()
    dev = bundle.device
    set_determinism(seed, dev)
    prompt = whisper_prompt_ids(bundle, nbest_cfg["language"], nbest_cfg["task"])
    train = items(manifest, "train", bundle)
    dev_items = items(manifest, "dev", bundle, cfg["eval_utts"] or None)
    if train.empty:
        raise ValueError("no train utterances with a transcript: the adapters have nothing to learn from")
    base_digest = {k: float(v.double().sum()) for k, v in list(bundle.model.state_dict().items())[:4]}
    peft_model, adapters = add_lora(bundle.model, cfg, seed)
    peft_model.train()
    optimizer = adamw(adapters, cfg)
    steps = run_steps(cfg, max_steps)
    fp = fingerprint("adapt", cfg, seed, steps, prompt, provenance or {}, base_digest,
                     data_digest(train, ["utt_id", "text", "audio_path"]), str(dev), code_digest(__file__))
    state = Path(state_dir)
    if not resume and state.exists():
        log.info("starting afresh: removing the previous adaptation state in %s (use --resume to continue it)", state)
        shutil.rmtree(state)
    per_step = cfg["batch_size"] * cfg["grad_accum"]
    trainer = Trainer("adapt whisper", adapters, optimizer, cfg, steps=steps, checkpoint_dir=state, fingerprint=fp,
                      log_columns=LOG_COLUMNS, decay="cosine", items_per_step=per_step,
                      schedule_extra={"grad_accum": cfg["grad_accum"]}, progress=progress)
    trainer.resume_best()
    n_train = sum(p.numel() for p in adapters.parameters())
    n_base = sum(p.numel() for p in peft_model.parameters()) - n_train
    log.info("LoRA r=%d alpha=%g on %s: %d adapter parameters (%.2f%% of %d frozen); %d train / %d dev utterances",
             cfg["rank"], cfg["alpha"], ",".join(cfg["target_modules"]), n_train, 100 * n_train / max(1, n_base), n_base,
             len(train), len(dev_items))

    def batch_loss(frame: pd.DataFrame) -> tuple[torch.Tensor, int]:
        return loss_sum(peft_model, bundle, [read_audio(p) for p in frame["audio_path"]], frame["target"].tolist(),
                        prompt)

    def train_step(step: int) -> dict:
        idx = batch_indices(len(train), per_step, step, seed, streams.ADAPT_ORDER)
        parts = [train.iloc[p] for p in np.array_split(idx, cfg["grad_accum"]) if len(p)]
        n_tokens = int(train["target"].iloc[idx].map(len).sum())
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for part in parts:  # accumulation: the summed losses over the step's tokens = one big batch
            loss, _ = batch_loss(part)
            (loss / n_tokens).backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(adapters.parameters(), cfg["grad_clip"])
        optimizer.step()
        return {"loss": total / n_tokens, "tokens": n_tokens}

    @torch.no_grad()
    def evaluate(done: int) -> dict:
        peft_model.eval()
        total, count = 0.0, 0
        for start in range(0, len(dev_items), cfg["batch_size"]):
            loss, n = batch_loss(dev_items.iloc[start:start + cfg["batch_size"]])
            total, count = total + float(loss), count + n
        peft_model.train()
        dev_loss = total / max(1, count)
        trainer.keep_if_best(done, dev_loss)
        return {"dev_loss": dev_loss}

    if not trainer.run(train_step, evaluate if len(dev_items) else None, stop_after=stop_after):
        return None
    best_dir = trainer.finish_best()
    from safetensors.torch import load_model

    load_model(adapters, str(best_dir / "model.safetensors"), strict=True)
    rows = trainer.log.rows()
    summary = {"steps": steps, "best_step": saved_step(best_dir), "best_dev_loss": None if math.isinf(trainer.best_dev_loss) else trainer.best_dev_loss,
               "first_dev_loss": next((float(r["dev_loss"]) for r in rows if r.get("dev_loss")), None),
               "final_train_loss": float(np.mean([float(r["loss"]) for r in rows[-20:]])),
               "n_adapter_params": n_train, "n_base_params": n_base, "n_train_utts": len(train),
               "n_dev_utts": len(dev_items), "train_seconds": round(time.perf_counter() - t0, 1),
               "fingerprint": fp, **(provenance or {})}
    peft_model.eval()
    with atomic_dir(out_dir) as tmp:
        peft_model.save_pretrained(str(tmp / "adapter"))  # peft format: adapter_config.json + adapter_model.safetensors
        merged = peft_model.merge_and_unload()  # W + (alpha/r)·B·A in place: a plain Whisper again
        merged.save_pretrained(str(tmp))
        bundle.processor.save_pretrained(str(tmp))
        (tmp / "adaptation.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    trainer.log.publish(log_csv)
    return summary
