"""Demo pre-training: make the small demo Whisper and CLIP models mean something.

Why it exists
-------------
``build_demo_models`` writes *randomly initialised* models, with which every WER is 1.0 and a broken
pipeline looks like a working one. This module trains them on the demo corpus's **train split only**
(no dev/test utterance, caption or picture is ever read by a training loop) and writes them in
Hugging Face format, so that :func:`mmasr.models.loading.load_whisper` / :func:`~mmasr.models.loading.load_clip`
load them exactly like real checkpoints.

* Whisper (the n-best source): teacher-forced cross-entropy on
  ``whisper_prompt_ids(...) + caption tokens + <|endoftext|>``, with the loss on the caption tokens
  and the end-of-text only. Log-mel features are computed once with the model's own feature
  extractor; every step augments them for speaker generalisation (:func:`augment_features`).
* CLIP: symmetric InfoNCE over picture/caption pairs with a learnable logit scale (CLIP's own
  parameter, initialised at ln(1/0.07) by the model config, clamped at ln(100)). Each batch holds
  ``batch_size`` anchor pairs *plus train pairs whose caption differs from an anchor's in exactly
  one word the picture can show* (:func:`one_word_neighbours` over :func:`picture_words`;
  ``hard_negatives_per_anchor`` of them per anchor): for the demo another noun (the minimal-pair
  partner among them: "a red bear" vs "a red pear"), another colour or another count, so the model
  must separate what the n-best lists confuse; captions that differ only in the intro ("i see ...",
  "we got ...") say the same about the picture and are positives of one another. Besides each train
  picture it sees ``fresh_scenes`` new pictures of the caption's object (:func:`fresh_scene_views`).

How it is written
-----------------
Each model's step is a plain function run by the shared loop (:class:`mmasr.training.loop.Trainer`:
schedule, checkpoints, exact resume, CSV log, progress). Which examples a step sees and how they are
augmented is a pure function of ``(seed, tag, step)`` (tags in :mod:`mmasr.training.streams`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from mmasr.io import atomic_dir, atomic_path
from mmasr.metrics.retrieval import retrieval_r1
from mmasr.training import streams
from mmasr.training.loop import Trainer, adamw, batch_indices, code_digest, data_digest, fingerprint, mean_tail_loss, \
    optimise, run_steps, set_determinism
from mmasr.training.losses import (LN_100, soft_targets, symmetric_infonce, teacher_forcing_arrays, token_cross_entropy,
                                   token_loss)

log = logging.getLogger(__name__)

__all__ = [
    "mel_centre_hz",
    "vtlp_positions",
    "augment_features",
    "one_word_neighbours",
    "clip_pool",
    "picture_words",
    "retrieval_r1",
    "whisper_training_items",
    "clip_training_pairs",
    "caption_picture_pairs",
    "caption_token_ids",
    "save_hf_model",
    "train_whisper",
    "train_clip",
    "clip_caption_to_picture_r1",
]

# --------------------------------------------------------------------------------------------
# Pure helpers: augmentation, hard negatives
# --------------------------------------------------------------------------------------------


def _hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    mel = hz / f_sp
    log_region = hz >= min_log_hz
    mel[log_region] = min_log_hz / f_sp + np.log(hz[log_region] / min_log_hz) / logstep
    return mel


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    hz = mel * f_sp
    min_log_mel = min_log_hz / f_sp
    log_region = mel >= min_log_mel
    hz[log_region] = min_log_hz * np.exp(logstep * (mel[log_region] - min_log_mel))
    return hz


def mel_centre_hz(num_mel_bins: int, fmax: float = 8000.0) -> np.ndarray:
    """Centre frequencies (Hz) of Whisper's mel filters (Slaney scale from 0 Hz to ``fmax``)."""
    edges = np.linspace(0.0, _hz_to_mel_slaney(np.array([fmax]))[0], num_mel_bins + 2)
    return _mel_to_hz_slaney(edges[1:-1])


def vtlp_positions(num_mel_bins: int, factor: float, fmax: float = 8000.0) -> np.ndarray:
    """Vocal-tract-length perturbation as a resampling of the mel axis: output bin ``m`` reads the
    (fractional) input bin whose centre frequency is ``f_m / factor``, i.e. every spectral feature
    moves up in frequency by ``factor`` (a shorter vocal tract for ``factor > 1``). Clamped to the
    valid bin range."""
    centres = mel_centre_hz(num_mel_bins, fmax)
    source_hz = centres / factor
    pos = np.interp(_hz_to_mel_slaney(source_hz), _hz_to_mel_slaney(centres), np.arange(num_mel_bins))
    return np.clip(pos, 0.0, num_mel_bins - 1)


def _resample_axis(x: torch.Tensor, pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Linear interpolation of ``x`` at fractional positions ``pos`` along ``dim``."""
    lo = pos.floor().long().clamp(0, x.shape[dim] - 1)
    hi = (lo + 1).clamp(max=x.shape[dim] - 1)
    w = (pos - lo.to(pos.dtype)).to(x.dtype)
    shape = [1] * x.dim()
    shape[dim] = -1
    w = w.view(shape)
    return x.index_select(dim, lo) * (1 - w) + x.index_select(dim, hi) * w


def augment_features(feats: torch.Tensor, n_frames: Sequence[int], rng: np.random.Generator, aug: dict) -> torch.Tensor:
    """Speaker perturbation and SpecAugment on Whisper log-mel features ``(B, mels, frames)``.

    Per utterance, in this order (every draw from ``rng``; ``aug`` is ``pretrain.whisper.augment``):

    * gain: ``U(-gain_db, gain_db)`` dB. Whisper's features are ``(log10(power) + 4) / 4`` with the
      floor tied to the maximum, so scaling the audio by g dB adds exactly ``g / 40`` everywhere;
    * vocal-tract length: the mel axis is resampled as for a frequency scaling by
      ``U(1 - vtlp, 1 + vtlp)`` (:func:`vtlp_positions`);
    * tempo: the time axis is resampled by ``U(1 - tempo, 1 + tempo)`` (the padding stays floor);
    * ``freq_masks`` bands of ``U{0..freq_mask_width}`` mel bins and ``time_masks`` spans of
      ``U{0..time_mask_width}`` frames (inside the speech, ``n_frames``) set to the utterance mean.

    Returns a new tensor; ``feats`` is left unchanged.
    """
    out = feats.clone()
    B, M, T = out.shape
    for b in range(B):
        x = out[b]
        if aug["gain_db"] > 0:
            x = x + float(rng.uniform(-aug["gain_db"], aug["gain_db"])) / 40.0
        if aug["vtlp"] > 0:
            factor = float(rng.uniform(1 - aug["vtlp"], 1 + aug["vtlp"]))
            x = _resample_axis(x, torch.as_tensor(vtlp_positions(M, factor), dtype=x.dtype), dim=0)
        length = int(n_frames[b])
        if aug["tempo"] > 0:
            rate = float(rng.uniform(1 - aug["tempo"], 1 + aug["tempo"]))
            x = _resample_axis(x, torch.clamp(torch.arange(T, dtype=x.dtype) * rate, max=T - 1), dim=1)
            length = min(T, int(round(length / rate)))
        fill = x.mean()
        for _ in range(aug["freq_masks"]):
            width = int(rng.integers(0, aug["freq_mask_width"] + 1))
            start = int(rng.integers(0, max(1, M - width + 1)))
            x[start:start + width, :] = fill
        for _ in range(aug["time_masks"]):
            width = int(rng.integers(0, min(aug["time_mask_width"], max(0, length // 4)) + 1))
            start = int(rng.integers(0, max(1, length - width + 1)))
            x[:, start:start + width] = fill
        out[b] = x
    return out


def one_word_neighbours(captions: Sequence[str]) -> list[list[int]]:
    """For every caption, the indices of the other captions with the same number of words that
    differ from it in exactly one word (for the demo: another noun, the minimal-pair partner among
    them; another colour; another count)."""
    words = [c.split() for c in captions]
    out: list[list[int]] = [[] for _ in captions]
    by_len: dict[int, list[int]] = {}
    for i, w in enumerate(words):
        by_len.setdefault(len(w), []).append(i)
    for group in by_len.values():
        for a_pos, a in enumerate(group):
            for b in group[a_pos + 1:]:
                if sum(x != y for x, y in zip(words[a], words[b])) == 1:
                    out[a].append(b)
                    out[b].append(a)
    return [sorted(n) for n in out]


def picture_words(caption: str, ignore: frozenset[str] | set[str]) -> str:
    """The caption without the words no picture can show (``ignore``; for the demo its intro words):
    what the caption says about the picture. Two captions with the same picture words describe the
    same thing, so contrastive training treats them as positives, never as (hard) negatives."""
    return " ".join(w for w in caption.split() if w not in ignore)


def clip_pool(anchors: Sequence[int], neighbours: Sequence[Sequence[int]], hard_negatives: bool,
              per_anchor: int | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """A CLIP batch: the anchor pairs plus (``hard_negatives``) their one-word neighbours, all of them
    or ``per_anchor`` drawn (without replacement, with ``rng``) for each anchor; de-duplicated and sorted."""
    pool = set(int(a) for a in anchors)
    if hard_negatives:
        for a in anchors:
            near = neighbours[int(a)]
            if per_anchor is not None and len(near) > per_anchor:
                if rng is None:
                    raise ValueError("clip_pool: per_anchor needs an rng")
                near = [near[int(i)] for i in rng.choice(len(near), per_anchor, replace=False)]
            pool.update(int(n) for n in near)
    return np.asarray(sorted(pool), dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Training data: the train split only
# --------------------------------------------------------------------------------------------


def whisper_training_items(manifest: pd.DataFrame, groups: Sequence[str] | None = None) -> pd.DataFrame:
    """The utterances Whisper trains on: split == "train" and a non-empty transcript, by utt_id; with
    ``groups``, only speakers of those groups (``pretrain.whisper.groups``)."""
    train = manifest[(manifest["split"] == "train") & manifest["text"].fillna("").str.strip().astype(bool)]
    if groups is not None:
        train = train[train["group"].isin(list(groups))]
    if train.empty:
        where = f" of group(s) {', '.join(groups)}" if groups is not None else ""
        raise ValueError(f"no train-split utterances{where} with a transcript in the manifest: nothing to pre-train on")
    return train.sort_values("utt_id").reset_index(drop=True)


def caption_picture_pairs(manifest: pd.DataFrame, split: str, images_dir: str | Path, text_cfg: dict) -> pd.DataFrame:
    """Distinct (caption, image_id) pairs of one split, with the picture's path. ``caption`` is what
    CLIP reads for the reference at scoring time (:func:`mmasr.data.text.clip_text`). Rows without a
    picture id, or whose picture file is missing, are left out."""
    from mmasr.data.text import clip_text

    part = manifest[(manifest["split"] == split) & manifest["image_id"].notna()]
    # Built as Python strings, so a split without any picture gives an empty table with the same columns.
    pairs = pd.DataFrame({"caption": [clip_text(str(t), text_cfg) for t in part["text"].fillna("")],
                          "image_id": [str(i) for i in part["image_id"]]}, columns=["caption", "image_id"], dtype=object)
    pairs = pairs[np.array([bool(c.strip()) for c in pairs["caption"]], dtype=bool)].drop_duplicates()
    pairs["path"] = pd.Series([str(Path(images_dir) / f"{i}.png") for i in pairs["image_id"]], index=pairs.index,
                              dtype=object)
    exists = np.array([Path(p).is_file() for p in pairs["path"]], dtype=bool)
    if (~exists).any():
        log.warning("%d %s pictures missing under %s (left out)", int((~exists).sum()), split, images_dir)
    return pairs[exists].sort_values(["image_id", "caption"]).reset_index(drop=True)


def clip_training_pairs(manifest: pd.DataFrame, images_dir: str | Path, text_cfg: dict) -> pd.DataFrame:
    """The picture/caption pairs CLIP trains on: distinct pairs of the train split only."""
    pairs = caption_picture_pairs(manifest, "train", images_dir, text_cfg)
    if len(pairs) < 2:
        raise ValueError(f"{len(pairs)} train-split picture/caption pairs: contrastive training needs at least 2")
    return pairs


# --------------------------------------------------------------------------------------------
# Writing a trained model
# --------------------------------------------------------------------------------------------


def save_hf_model(bundle, init_dir: str | Path, out_dir: str | Path, extra: dict) -> None:
    """The trained model + processor in Hugging Face format, atomically; tokenizer side files of the
    init folder (vocab.json, merges.txt) are copied over; ``training.json`` records how it was made
    (not part of the model's revision)."""
    from mmasr.models.loading import quiet_hf_progress

    model = bundle.model
    gen = getattr(model, "generation_config", None)
    if gen is not None and model.config.model_type == "whisper":
        gen._from_model_config = False  # else from_pretrained rebuilds it and drops no_timestamps_token_id
    with atomic_dir(out_dir) as tmp:
        with quiet_hf_progress():
            model.save_pretrained(tmp)
        bundle.processor.save_pretrained(tmp)
        for f in Path(init_dir).iterdir():
            if f.is_file() and not (tmp / f.name).exists() and not f.name.endswith((".safetensors", ".bin")):
                shutil.copyfile(f, tmp / f.name)
        (tmp / "training.json").write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# Whisper
# --------------------------------------------------------------------------------------------


def _whisper_features(bundle, paths: Sequence[str], chunk: int = 64) -> torch.Tensor:
    from mmasr.models.loading import whisper_features
    from mmasr.data.audio import read_audio

    feats = []
    for start in range(0, len(paths), chunk):
        audios = [read_audio(p) for p in paths[start:start + chunk]]
        feats.append(whisper_features(bundle, audios)["input_features"].cpu())
    return torch.cat(feats)


def _whisper_eval_loss(model, feats: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor, device) -> float:
    """Mean teacher-forced token loss (no augmentation), in eval mode; restores train mode."""
    was_training = model.training
    model.eval()
    loss = token_loss(lambda rows, x: model(input_features=feats[rows].to(device), decoder_input_ids=x).logits,
                      inputs, labels, device)
    model.train(was_training)
    return loss


def caption_token_ids(tok, texts: Sequence[str], max_len: int, prompt_len: int) -> list[list[int]]:
    """Token ids of each caption (with the leading space a word gets after the prompt); an error naming
    the caption when prompt + caption + end-of-text would not fit the model's ``max_len`` positions."""
    out = []
    for t in texts:
        ids = tok(" " + str(t).strip(), add_special_tokens=False).input_ids
        if prompt_len + len(ids) + 1 > max_len:
            raise ValueError(f"caption {t!r} needs {prompt_len + len(ids) + 1} decoder positions, "
                             f"the model has {max_len}")
        out.append(ids)
    return out


def train_whisper(init_dir: str | Path, manifest: pd.DataFrame, out_dir: str | Path, log_csv: str | Path,
                  checkpoint_dir: str | Path, cfg: dict, seed: int, *, language: str | None = None,
                  task: str = "transcribe", device: str = "auto", max_steps: int | None = None,
                  stop_after: int | None = None, progress: bool = True) -> dict | None:
    """Train the demo Whisper (from ``init_dir``) as an ASR model on the train split of ``manifest``.

    ``cfg`` is ``pretrain.whisper``. ``max_steps`` shortens the run (the schedule is built for it:
    smoke runs). ``stop_after`` stops after that many steps *without* writing anything beyond the
    periodic checkpoints, as a killed run would (tests of resuming). Returns the summary metrics
    (None when stopped early).
    """
    from mmasr.models.loading import load_whisper, pick_device, whisper_prompt_ids

    t0 = time.perf_counter()
    dev = pick_device(device)
    set_determinism(seed, dev)
    steps = run_steps(cfg, max_steps)
    bundle = load_whisper(str(init_dir), device=dev, dtype="float32")  # trained: float32 master weights
    model, tok = bundle.model, bundle.processor.tokenizer
    gen = model.generation_config
    eos = gen.eos_token_id[0] if isinstance(gen.eos_token_id, list) else gen.eos_token_id
    pad = gen.pad_token_id if gen.pad_token_id is not None else eos
    prompt = whisper_prompt_ids(bundle, language, task)
    max_len = int(model.config.max_target_positions)

    train = whisper_training_items(manifest, cfg.get("groups"))
    inputs, labels = teacher_forcing_arrays(prompt, caption_token_ids(tok, train["text"], max_len, len(prompt)), eos, pad)
    log.info("Whisper pre-training on %d train utterances (%d speakers; groups %s), %d steps; prompt %s", len(train),
             train["speaker"].nunique(), ", ".join(sorted(train["group"].astype(str).unique())), steps,
             tok.convert_ids_to_tokens(prompt))
    feats = _whisper_features(bundle, train["audio_path"].tolist())
    frames_per_s = bundle.processor.feature_extractor.sampling_rate / bundle.processor.feature_extractor.hop_length
    n_frames = np.minimum(feats.shape[-1], np.ceil(train["duration_s"].to_numpy(float) * frames_per_s)).astype(int)

    # Held-in / held-out monitoring (never used for any decision): a fixed train subset, and dev.
    eval_sets = {}
    if cfg["eval_every"] > 0:
        held_in = train.iloc[: cfg["eval_utts"]]
        eval_sets["train_loss_noaug"] = (feats[: len(held_in)], inputs[: len(held_in)], labels[: len(held_in)])
        dev_rows = manifest[(manifest["split"] == "dev") & manifest["text"].fillna("").str.strip().astype(bool)]
        dev_rows = dev_rows.sort_values("utt_id").iloc[: cfg["eval_utts"]]
        if len(dev_rows):
            d_in, d_lab = teacher_forcing_arrays(prompt, caption_token_ids(tok, dev_rows["text"], max_len, len(prompt)), eos, pad)
            eval_sets["dev_loss"] = (_whisper_features(bundle, dev_rows["audio_path"].tolist()), d_in, d_lab)

    model.train()
    optimizer = adamw(model, cfg)
    fp = fingerprint("whisper", cfg, seed, steps, prompt, bundle.revision,
                     data_digest(train, ["utt_id", "text", "audio_path", "duration_s"]), str(dev), code_digest(__file__))
    trainer = Trainer("pretrain whisper", model, optimizer, cfg, steps=steps, checkpoint_dir=checkpoint_dir,
                      fingerprint=fp, log_columns=["step", "lr", "loss", "train_loss_noaug", "dev_loss"],
                      items_per_step=cfg["batch_size"], progress=progress)

    def train_step(step: int) -> dict:
        idx = batch_indices(len(train), cfg["batch_size"], step, seed, streams.WHISPER_ORDER)
        rng = np.random.default_rng([seed, streams.WHISPER_AUGMENT, step])
        x = augment_features(feats[idx], n_frames[idx], rng, cfg["augment"]).to(dev)
        y = labels[idx].to(dev)
        logits = model(input_features=x, decoder_input_ids=inputs[idx].to(dev)).logits
        loss = token_cross_entropy(logits, y)
        optimise(loss, model, optimizer, cfg["grad_clip"])
        return {"loss": loss.item()}

    def evaluate(done: int) -> dict:
        return {column: _whisper_eval_loss(model, ef, ei, el, dev) for column, (ef, ei, el) in eval_sets.items()}

    if not trainer.run(train_step, evaluate if eval_sets else None, stop_after=stop_after):
        return None

    rows = trainer.log.rows()
    last_eval = next((r for r in reversed(rows) if r.get("train_loss_noaug")), {})
    summary = {  # final_loss: mean (augmented) training loss of the last 50 steps
        "whisper_steps": steps, "whisper_final_loss": mean_tail_loss(rows),
        "whisper_final_train_loss_noaug": float(last_eval["train_loss_noaug"]) if last_eval else None,
        "whisper_final_dev_loss": float(last_eval["dev_loss"]) if last_eval.get("dev_loss") else None,
        "whisper_n_train_utts": len(train), "whisper_n_train_speakers": int(train["speaker"].nunique()),
        "whisper_train_groups": sorted(train["group"].astype(str).unique()),
        "whisper_n_params": int(sum(p.numel() for p in model.parameters())),
        "whisper_init_revision": bundle.revision,
    }
    save_hf_model(bundle, init_dir, out_dir, {"seed": seed, "config": cfg, "steps": steps, "prompt": prompt,
                                         "init": str(init_dir), "init_revision": bundle.revision,
                                         "train_utts": len(train), "fingerprint": fp})
    trainer.log.publish(log_csv)
    summary["whisper_train_seconds"] = round(time.perf_counter() - t0, 1)
    return summary


# --------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------


def _pixels(bundle, paths: Sequence[str], chunk: int = 64) -> torch.Tensor:
    from PIL import Image

    out = []
    for s in range(0, len(paths), chunk):
        images = []
        for p in paths[s:s + chunk]:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        out.append(bundle.processor.image_processor(images=images, return_tensors="pt")["pixel_values"])
    return torch.cat(out)


# Scenes a fresh picture is drawn from: 1-4 objects, the caption's object always shown as said.
FRESH_SCENE_CONFIG = {"scene_objects": [1, 4], "partner_in_scene": 0.3, "wrong_description_rate": 0.0}


def fresh_scene_views(bundle, captions: Sequence[str], per_caption: int, seed: int, size: int = 128) -> torch.Tensor:
    """``per_caption`` new pictures for every caption that names a demo object (:func:`mmasr.demo.corpus.parse_phrase`),
    drawn by the demo's generator around that object, as CLIP pixel values of shape (captions, per_caption, C, H, W).

    The demo CLIP's stand-in for web-scale pre-training: it sees each train caption with many
    pictures, never one of the corpus's dev/test pictures, and so has to learn what the words look
    like instead of memorising one picture per caption. A caption that names no demo object gets
    black placeholder pictures, which :func:`train_clip` never samples."""
    from PIL import Image

    from mmasr.demo.corpus import draw_scene, parse_phrase, plan_scene

    views = []
    for i, caption in enumerate(captions):
        phrase = parse_phrase(caption)
        images = []
        for k in range(per_caption):
            rng = np.random.default_rng([seed, streams.CLIP_FRESH_SCENES, i, k])
            if phrase is None:
                images.append(Image.new("RGB", (size, size)))
                continue
            images.append(draw_scene(plan_scene(phrase, FRESH_SCENE_CONFIG, rng).objects, size, rng))
        views.append(bundle.processor.image_processor(images=images, return_tensors="pt")["pixel_values"])
    return torch.stack(views)


def _tokens(bundle, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    max_len = int(bundle.model.config.text_config.max_position_embeddings)
    enc = bundle.processor.tokenizer(list(captions), padding=True, truncation=True, max_length=max_len,
                                     return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _clip_embed(model, pixel_values=None, input_ids=None, attention_mask=None) -> torch.Tensor:
    from mmasr.models.loading import pooled_features

    if pixel_values is not None:
        out = model.get_image_features(pixel_values=pixel_values)
    else:
        out = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    return F.normalize(pooled_features(out).float(), dim=-1)


@torch.no_grad()
def _clip_eval_r1(model, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, pairs: pd.DataFrame,
                  device) -> float:
    """Caption->picture R@1 over the distinct pictures and captions of ``pairs`` (in eval mode)."""
    was_training = model.training
    model.eval()
    pics = pairs["image_id"].drop_duplicates().tolist()
    caps = pairs["caption"].drop_duplicates().tolist()
    first_pic = {p: i for i, p in reversed(list(enumerate(pairs["image_id"])))}
    first_cap = {c: i for i, c in reversed(list(enumerate(pairs["caption"])))}
    img = _clip_embed(model, pixel_values=pixels[[first_pic[p] for p in pics]].to(device))
    sel = [first_cap[c] for c in caps]
    txt = _clip_embed(model, input_ids=ids[sel].to(device), attention_mask=mask[sel].to(device))
    model.train(was_training)
    match = _match_matrix(pairs, caps, pics)
    return retrieval_r1((txt @ img.T).cpu().numpy(), match)[0]


def _match_matrix(pairs: pd.DataFrame, captions: Sequence[str], pictures: Sequence[str]) -> np.ndarray:
    cap_index = {c: i for i, c in enumerate(captions)}
    pic_index = {p: j for j, p in enumerate(pictures)}
    match = np.zeros((len(captions), len(pictures)), bool)
    for c, p in zip(pairs["caption"], pairs["image_id"]):
        match[cap_index[c], pic_index[p]] = True
    return match


def train_clip(init_dir: str | Path, manifest: pd.DataFrame, images_dir: str | Path, out_dir: str | Path,
               log_csv: str | Path, checkpoint_dir: str | Path, cfg: dict, seed: int, text_cfg: dict, *,
               device: str = "auto", max_steps: int | None = None, stop_after: int | None = None,
               progress: bool = True) -> dict | None:
    """Train the demo CLIP (from ``init_dir``) contrastively on the train split's picture/caption pairs.

    ``cfg`` is ``pretrain.clip``; ``text_cfg`` the ``text`` section (captions are what CLIP reads at
    scoring time). ``max_steps``/``stop_after`` as in :func:`train_whisper`.

    With fewer than two train pairs (a corpus without pictures, such as TORGO, or pictures for held-out
    speakers only) nothing can be learnt contrastively: the random-init CLIP is written unchanged to
    ``out_dir``, ``log_csv`` gets its header only, and the summary has ``clip_skipped`` true and
    ``clip_skip_reason`` (also logged).
    """
    from mmasr.models.loading import load_clip, pick_device

    t0 = time.perf_counter()
    dev = pick_device(device)
    set_determinism(seed, dev)
    steps = run_steps(cfg, max_steps)
    bundle = load_clip(str(init_dir), device=dev, dtype="float32")  # trained: float32 master weights
    model = bundle.model

    pairs = caption_picture_pairs(manifest, "train", images_dir, text_cfg)
    if len(pairs) < 2:
        return _skip_clip(bundle, init_dir, out_dir, log_csv, manifest, images_dir, text_cfg, pairs, cfg, seed, t0)
    from mmasr.demo.corpus import INTRO_WORDS

    # what each caption says about its picture: hard negatives differ there, never in an intro word
    content = np.asarray([picture_words(c, INTRO_WORDS) for c in pairs["caption"]], dtype=object)
    neighbours = one_word_neighbours(content.tolist())
    log.info("CLIP pre-training on %d train picture/caption pairs (%d pictures), %d steps; %.1f one-word "
             "neighbours per caption", len(pairs), pairs["image_id"].nunique(), steps,
             float(np.mean([len(n) for n in neighbours])))
    pixels = _pixels(bundle, pairs["path"].tolist())
    ids, mask = _tokens(bundle, pairs["caption"].tolist())
    # views[i]: the pair's own picture, then cfg["fresh_scenes"] fresh ones (only for captions naming a demo object)
    views = pixels[:, None]
    n_views = np.ones(len(pairs), dtype=np.int64)
    if cfg["fresh_scenes"]:
        from mmasr.demo.corpus import parse_phrase

        views = torch.cat([views, fresh_scene_views(bundle, pairs["caption"].tolist(), cfg["fresh_scenes"], seed)], 1)
        n_views += cfg["fresh_scenes"] * np.array([parse_phrase(c) is not None for c in pairs["caption"]])
        log.info("CLIP sees %d fresh demo scenes besides the %d train pictures", int(n_views.sum() - len(pairs)),
                 len(pairs))

    eval_sets = {}
    if cfg["eval_every"] > 0:
        eval_sets["train_r1"] = (pixels, ids, mask, pairs)
        dev_pairs = caption_picture_pairs(manifest, "dev", images_dir, text_cfg)
        if len(dev_pairs):
            eval_sets["dev_r1"] = (_pixels(bundle, dev_pairs["path"].tolist()), *_tokens(bundle, dev_pairs["caption"].tolist()),
                                dev_pairs)

    model.train()
    optimizer = adamw(model, cfg)
    fp = fingerprint("clip", cfg, seed, steps, text_cfg, bundle.revision,
                     data_digest(pairs, ["caption", "image_id", "path"]), str(dev), code_digest(__file__))
    trainer = Trainer("pretrain clip", model, optimizer, cfg, steps=steps, checkpoint_dir=checkpoint_dir,
                      fingerprint=fp, log_columns=CLIP_LOG_COLUMNS, items_per_step=min(cfg["batch_size"], len(pairs)),
                      progress=progress)

    def train_step(step: int) -> dict:
        anchors = batch_indices(len(pairs), min(cfg["batch_size"], len(pairs)), step, seed, streams.CLIP_ORDER)
        pool = clip_pool(anchors, neighbours, cfg["hard_negatives"], cfg["hard_negatives_per_anchor"],
                         np.random.default_rng([seed, streams.CLIP_HARD_NEGATIVES, step]))
        rng = np.random.default_rng([seed, streams.CLIP_AUGMENT, step])
        view = (rng.random(len(pool)) * n_views[pool]).astype(np.int64)  # uniform over each pair's views
        px = views[torch.as_tensor(pool), torch.as_tensor(view)]
        if cfg["hflip"]:
            flip = torch.as_tensor(rng.random(len(pool)) < 0.5)
            px = torch.where(flip[:, None, None, None], px.flip(-1), px)
        img = _clip_embed(model, pixel_values=px.to(dev))
        txt = _clip_embed(model, input_ids=ids[pool].to(dev), attention_mask=mask[pool].to(dev))
        pictures = [f"{i}#{v}" for i, v in zip(pairs["image_id"].to_numpy()[pool], view)]
        targets = soft_targets(pictures, content[pool]).to(dev)
        loss = symmetric_infonce(img, txt, model.logit_scale, targets)  # (pictures, captions)
        optimise(loss, model, optimizer, cfg["grad_clip"])
        with torch.no_grad():
            model.logit_scale.clamp_(max=LN_100)
        return {"loss": loss.item(), "logit_scale": float(model.logit_scale.detach().exp()), "pool": len(pool)}

    def evaluate(done: int) -> dict:
        return {column: _clip_eval_r1(model, ep, ei, em, epairs, dev)
                for column, (ep, ei, em, epairs) in eval_sets.items()}

    if not trainer.run(train_step, evaluate if eval_sets else None, stop_after=stop_after):
        return None

    rows = trainer.log.rows()
    last_eval = next((r for r in reversed(rows) if r.get("train_r1")), {})
    summary = {  # final_loss: mean training loss of the last 50 steps
        "clip_steps": steps, "clip_final_loss": mean_tail_loss(rows),
        "clip_logit_scale": float(model.logit_scale.detach().exp()),
        "clip_train_r1": float(last_eval["train_r1"]) if last_eval else None,
        "clip_dev_r1": float(last_eval["dev_r1"]) if last_eval.get("dev_r1") else None,
        "clip_n_train_pairs": len(pairs), "clip_n_train_pictures": int(pairs["image_id"].nunique()),
        "clip_mean_hard_negatives": float(np.mean([len(n) for n in neighbours])),
        "clip_n_params": int(sum(p.numel() for p in model.parameters())),
        "clip_init_revision": bundle.revision, "clip_skipped": False, "clip_skip_reason": None,
    }
    save_hf_model(bundle, init_dir, out_dir, {"seed": seed, "config": cfg, "steps": steps, "init": str(init_dir),
                                         "init_revision": bundle.revision, "train_pairs": len(pairs),
                                         "fingerprint": fp})
    trainer.log.publish(log_csv)
    summary["clip_train_seconds"] = round(time.perf_counter() - t0, 1)
    return summary


CLIP_LOG_COLUMNS = ["step", "lr", "loss", "logit_scale", "pool", "train_r1", "dev_r1"]


def clip_skip_reason(manifest: pd.DataFrame, images_dir: str | Path, text_cfg: dict, n_train_pairs: int) -> str:
    """Why the demo CLIP cannot be pre-trained on this corpus, and what follows from it (one sentence)."""
    held_out = {split: len(caption_picture_pairs(manifest, split, images_dir, text_cfg)) for split in ("dev", "test")}
    why = (f"{'no' if n_train_pairs == 0 else 'only ' + str(n_train_pairs)} train-split (picture, caption) "
           f"pair{'' if n_train_pairs == 1 else 's'} (contrastive training needs at least 2)")
    if not any(held_out.values()):
        return (f"{why}, and no dev or test utterance has a picture either: the demo CLIP keeps its random "
                f"initialisation, and fusion is ASR-only")
    return (f"{why}: the demo CLIP keeps its random initialisation, so the CLIP scores of the "
            f"{held_out['dev']} dev and {held_out['test']} test (picture, caption) pairs come from an untrained "
            f"model; give the train speakers pictures, or name a trained CLIP in models.clip")


def _skip_clip(bundle, init_dir, out_dir, log_csv, manifest, images_dir, text_cfg, pairs, cfg, seed, t0) -> dict:
    """No contrastive pre-training without at least two train pairs: publish the random-init CLIP unchanged
    (the pipeline's later stages load it as usual), an empty loss log and a summary that says why."""
    reason = clip_skip_reason(manifest, images_dir, text_cfg, len(pairs))
    log.warning("CLIP pre-training skipped: %s", reason)
    save_hf_model(bundle, init_dir, out_dir, {"seed": seed, "config": cfg, "steps": 0, "init": str(init_dir),
                                         "init_revision": bundle.revision, "train_pairs": len(pairs),
                                         "skipped": True, "skip_reason": reason})
    with atomic_path(log_csv) as tmp:
        pd.DataFrame(columns=CLIP_LOG_COLUMNS).to_csv(tmp, index=False)
    model = bundle.model
    return {"clip_steps": 0, "clip_final_loss": None, "clip_logit_scale": float(model.logit_scale.detach().exp()),
            "clip_train_r1": None, "clip_dev_r1": None, "clip_n_train_pairs": len(pairs),
            "clip_n_train_pictures": int(pairs["image_id"].nunique()), "clip_mean_hard_negatives": None,
            "clip_n_params": int(sum(p.numel() for p in model.parameters())), "clip_init_revision": bundle.revision,
            "clip_skipped": True, "clip_skip_reason": reason,
            "clip_train_seconds": round(time.perf_counter() - t0, 1)}


def clip_caption_to_picture_r1(bundle, manifest: pd.DataFrame, split: str, images_dir: str | Path,
                               text_cfg: dict) -> dict:
    """Caption->picture R@1 of a loaded CLIP (:func:`mmasr.models.loading.load_clip`) on the distinct
    (caption, picture) pairs of ``split``, with the embedding helpers the pipeline itself uses.
    Every distinct caption ranks every distinct picture of the split; returns r1, chance, counts."""
    from mmasr.models.loading import clip_image_embeddings, clip_text_embeddings
    from PIL import Image

    pairs = caption_picture_pairs(manifest, split, images_dir, text_cfg)
    if pairs.empty:
        return {"r1": None, "chance": None, "n_captions": 0, "n_pictures": 0}
    pics = pairs.drop_duplicates("image_id")
    caps = pairs["caption"].drop_duplicates().tolist()
    images = []
    for p in pics["path"]:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    img = np.concatenate([clip_image_embeddings(bundle, images[s:s + 64]) for s in range(0, len(images), 64)])
    txt = np.concatenate([clip_text_embeddings(bundle, caps[s:s + 64]) for s in range(0, len(caps), 64)])
    r1, chance = retrieval_r1(txt @ img.T, _match_matrix(pairs, caps, pics["image_id"].tolist()))
    return {"r1": r1, "chance": chance, "n_captions": len(caps), "n_pictures": len(pics)}
