"""Small demo text models: a decoder-only LM (the frozen LM of the SLAM-ASR style projector model)
and a BERT text encoder (the frozen text tower of the CLAP-style audio-text model).

Why it exists
-------------
Like :mod:`mmasr.demo.models`, the embedded offline demo must exercise the same ``from_pretrained``
code path that real checkpoints take (e.g. ``HuggingFaceTB/SmolLM3-3B``, ``bert-base-uncased``),
without any download. The two models are built here in Hugging Face format from a seeded random
init and then trained on the demo corpus's **train split only** (no dev/test transcript is ever
read), with the loop conventions of :mod:`mmasr.demo.pretrain` (whose pieces are reused, not copied).

* LM: ``SmolLM3ForCausalLM`` (tied embeddings, grouped-query attention, RoPE) with a GPT-2 style
  byte-level BPE tokenizer learned by :func:`mmasr.demo.models.learn_bpe` so that every demo word
  (with and without its leading space) and every piece of :data:`PROJECTOR_PROMPT` is one token,
  while any other text still tokenizes through the 256 byte symbols. Special tokens:
  ``<|end_of_text|>`` (eos), ``<|begin_of_text|>`` (bos, defined for ``generate()`` from nothing but
  never added automatically) and ``<|pad|>`` (its own id, so a collator masking padding never
  masks the eos). It is trained on exactly what the projector model feeds it after the audio:
  ``lm_prompt_ids(tok) + lm_caption_ids(tok, caption) + [eos]``, i.e. the token sequence of
  ``PROJECTOR_PROMPT + " " + caption + eos`` with the loss on the caption tokens and the eos only
  (:func:`mmasr.demo.pretrain.teacher_forcing_arrays`). No bos is prepended: the projector model puts
  the projected audio embeddings first. The caption tokens carry their leading space
  (``" a red bear"``), so ``tok.decode(ids, skip_special_tokens=True).strip()`` is the caption.
* Text encoder: ``BertModel`` with a ``BertTokenizer`` (WordPiece, lower-casing) whose vocabulary
  holds [PAD] [UNK] [CLS] [SEP] [MASK], the demo words, and single characters (``a``, ``##a``,
  digits, punctuation) as fallback. It is trained as ``BertForMaskedLM`` (BERT's 80/10/10
  masking of ``mask_prob`` of the tokens; a caption of three words would often get no masked token
  at 15 %, so one token is masked where the draw picked none). The trained folder holds the
  *encoder* as a plain ``BertModel`` (``AutoModel.from_pretrained`` gives it without missing or
  unexpected weights); the MLM head lives only in the checkpoints. Its pooler (dense + tanh, BERT's
  next-sentence head input) is not trained by MLM: it is a seeded random init, so CLAP pooling
  should use the [CLS] hidden state or a mean over ``last_hidden_state``/``hidden_states``.

The loss floors are set by the corpus, not the models: captions are "<count> <colour> <noun>" drawn
uniformly, so after the prompt the LM cannot beat ln 3 + ln 4 + ln 12 nats per caption (about
1.24 nats per token over the three words and eos), and BERT a masked-token loss of about 1.4.

Determinism, resuming: as in :mod:`mmasr.demo.pretrain` (seeded, deterministic CPU kernels, batches and
masks a pure function of ``(seed, step)``, atomic checkpoints with a fingerprint of config, seed,
init model, data and code, bit-identical weights after a resume). The same ``(cfg, seed)`` gives
byte-identical files, both for the random init and for the trained model.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from mmasr.config import ParamsError, schema_defaults, validate_section
from mmasr.demo.models import (bpe_vocab, bytes_to_unicode, demo_vocabulary, learn_bpe, seeded_init,
                               write_vocab_merges)
from mmasr.io import atomic_dir
from mmasr.models.loading import model_revision, quiet_hf_progress
from mmasr.demo.pretrain import caption_token_ids, save_hf_model, whisper_training_items
from mmasr.training import streams
from mmasr.training.loop import Trainer, adamw, batch_indices, code_digest, data_digest, fingerprint, mean_tail_loss, \
    optimise, run_steps, set_determinism
from mmasr.training.losses import IGNORE, token_cross_entropy, teacher_forcing_arrays, token_loss

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CONFIG",
    "PROJECTOR_PROMPT",
    "LM_EOS", "LM_BOS", "LM_PAD",
    "BERT_SPECIAL_TOKENS",
    "validate_config",
    "training_texts",
    "build_lm_tokenizer",
    "bert_vocabulary",
    "build_bert_tokenizer",
    "lm_prompt_ids",
    "lm_caption_ids",
    "mlm_mask",
    "build_demo_lm",
    "build_demo_text_encoder",
    "train_lm",
    "train_text_encoder",
]

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

# The params `pretrain.lm` / `pretrain.text_encoder` sections (architecture and training), defaults as
# declared in workflow/schemas/params.schema.yaml.
DEFAULT_CONFIG: dict[str, dict[str, Any]] = {k: schema_defaults()["pretrain"][k] for k in ("lm", "text_encoder")}

PROJECTOR_PROMPT = "USER: Transcribe speech to text. \n ASSISTANT:"

LM_EOS, LM_BOS, LM_PAD = "<|end_of_text|>", "<|begin_of_text|>", "<|pad|>"
BERT_SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")



def validate_config(cfg: dict | None) -> dict[str, dict[str, Any]]:
    """``cfg`` = ``{"lm": ..., "text_encoder": ...}`` (the params sections ``pretrain.lm`` and
    ``pretrain.text_encoder``; either may be missing, partial or None) validated against the schema with
    every default filled in (:func:`mmasr.config.validate_section`, cross-field rules included). Raises
    :class:`mmasr.config.ParamsError` (a ValueError) naming the key."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULT_CONFIG))
    if unknown:
        raise ParamsError(f"invalid parameters\n  demo text models: key 'pretrain.{unknown[0]}': not a demo text "
                          f"model section (known: {', '.join(DEFAULT_CONFIG)})")
    return {name: _section(cfg.get(name), name) for name in DEFAULT_CONFIG}


def _section(cfg: dict | None, name: str) -> dict[str, Any]:
    return validate_section(f"pretrain.{name}", cfg)


def training_texts(manifest: pd.DataFrame) -> list[str]:
    """The transcripts both text models train on: the train split only, every group (non-empty, by
    utt_id; :func:`mmasr.demo.pretrain.whisper_training_items` without a group filter: the words say
    nothing of the speaker's group), stripped. Raises ValueError when the manifest has no such row."""
    return [str(t).strip() for t in whisper_training_items(manifest)["text"]]


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


def _byte_level_pieces(text: str) -> list[str]:
    """``text`` split by GPT-2's pre-tokenizer, each piece in byte-level symbols (``" bear"`` -> ``"Ġbear"``)."""
    from tokenizers import pre_tokenizers

    return [p for p, _ in pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str(text)]


def build_lm_tokenizer(words: Sequence[str], prompt: str, max_length: int):
    """A GPT-2 style byte-level BPE tokenizer (``tokenizers`` backend, no automatic special tokens)
    in which every word, with and without its leading space, and every pre-tokenized piece of
    ``prompt`` is one token; ``<|end_of_text|>``, ``<|begin_of_text|>``, ``<|pad|>`` close the vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    forms = [p for w in words for s in (w, " " + w) for p in _byte_level_pieces(s)] + _byte_level_pieces(prompt)
    merges = learn_bpe(forms)
    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    specials = (LM_EOS, LM_BOS, LM_PAD)
    backend = Tokenizer(models.BPE(vocab=bpe_vocab(alphabet, merges, specials), merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=LM_EOS, bos_token=LM_BOS, pad_token=LM_PAD,
                                   unk_token=None, model_max_length=max_length, clean_up_tokenization_spaces=False)


def bert_vocabulary(words: Sequence[str]) -> list[str]:
    """WordPiece vocabulary in id order: BERT's special tokens, the (lower-cased) words, then single
    printable ASCII characters (lower-case; BERT lower-cases its input) and ``##`` + letter/digit,
    so any ASCII word still tokenizes."""
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    pieces = [*BERT_SPECIAL_TOKENS, *(w.lower() for w in words), *chars, *("##" + c for c in chars if c.isalnum())]
    out: list[str] = []
    for p in pieces:
        if p not in out:
            out.append(p)
    return out


def build_bert_tokenizer(words: Sequence[str], max_length: int):
    """A lower-casing WordPiece ``BertTokenizer`` over :func:`bert_vocabulary` (every word one token)."""
    from transformers import BertTokenizer

    vocab = {t: i for i, t in enumerate(bert_vocabulary(words))}
    return BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=max_length)


def lm_prompt_ids(tok) -> list[int]:
    """Token ids of :data:`PROJECTOR_PROMPT` exactly as the LM was trained on them (no bos)."""
    return tok(PROJECTOR_PROMPT, add_special_tokens=False).input_ids


def lm_caption_ids(tok, caption: str) -> list[int]:
    """Token ids of a caption as it follows the prompt in training: ``" " + caption`` (no eos)."""
    return tok(" " + str(caption).strip(), add_special_tokens=False).input_ids


def stretched_prefix(caption: Sequence[int], rng: np.random.Generator, *, max_repeat: int, max_silence: int,
                     silence_id: int) -> list[int]:
    """A caption "spoken" before the prompt: each token repeated 1..``max_repeat`` times (words last
    several audio frames), between 0..``max_silence`` silence tokens at each end."""
    lead, tail = rng.integers(0, max_silence + 1, size=2)
    body = [t for t in caption for _ in range(int(rng.integers(1, max_repeat + 1)))]
    return [silence_id] * int(lead) + body + [silence_id] * int(tail)


# --------------------------------------------------------------------------------------------
# Building (random init)
# --------------------------------------------------------------------------------------------


def _lm_config(c: dict, tok):
    from transformers import SmolLM3Config

    return SmolLM3Config(
        vocab_size=len(tok), hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
        max_position_embeddings=c["max_position_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True, use_cache=True,
    )


def build_demo_lm(out_dir: str | os.PathLike, cfg: dict | None, seed: int) -> Path:
    """Write a randomly initialised tiny ``SmolLM3ForCausalLM`` with its tokenizer and generation
    config to ``out_dir`` (atomically; an existing folder is replaced) and return it. ``cfg`` is the
    ``lm`` section (defaults fill gaps)."""
    from transformers import GenerationConfig, SmolLM3ForCausalLM

    c = _section(cfg, "lm")
    tok = build_lm_tokenizer(demo_vocabulary(), PROJECTOR_PROMPT, c["max_position_embeddings"])
    model = seeded_init(seed, lambda: SmolLM3ForCausalLM(_lm_config(c, tok)))
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, do_sample=False)
    with atomic_dir(out_dir) as tmp:
        with quiet_hf_progress():
            model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_vocab_merges(tmp, tok)
    return Path(out_dir)


def _bert_config(c: dict, tok):
    from transformers import BertConfig

    return BertConfig(vocab_size=len(tok), hidden_size=c["hidden_size"], num_hidden_layers=c["layers"],
                      num_attention_heads=c["heads"], intermediate_size=c["intermediate_size"],
                      max_position_embeddings=c["max_position_embeddings"], hidden_dropout_prob=c["dropout"],
                      attention_probs_dropout_prob=c["dropout"], pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)


def _write_wordpiece_vocab(out: Path, tok) -> None:
    """The classic ``vocab.txt`` (one token per line, in id order) beside ``tokenizer.json``."""
    vocab = tok.get_vocab()
    (out / "vocab.txt").write_text("".join(f"{t}\n" for t in sorted(vocab, key=vocab.get)), encoding="utf-8")


def build_demo_text_encoder(out_dir: str | os.PathLike, cfg: dict | None, seed: int) -> Path:
    """Write a randomly initialised tiny ``BertForMaskedLM`` (the encoder plus the MLM head it is
    trained with) and its ``BertTokenizer`` to ``out_dir`` atomically and return it. ``cfg`` is the
    ``text_encoder`` section (defaults fill gaps)."""
    from transformers import BertForMaskedLM

    c = _section(cfg, "text_encoder")
    tok = build_bert_tokenizer(demo_vocabulary(), c["max_position_embeddings"])
    model = seeded_init(seed, lambda: BertForMaskedLM(_bert_config(c, tok)))
    with atomic_dir(out_dir) as tmp:
        with quiet_hf_progress():
            model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _write_wordpiece_vocab(tmp, tok)
    return Path(out_dir)


# --------------------------------------------------------------------------------------------
# Training helpers
# --------------------------------------------------------------------------------------------


def _texts_digest(texts: Sequence[str]) -> str:
    return data_digest(pd.DataFrame({"text": list(texts)}), ["text"])


def _n_params(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _load_local(kind: str, init_dir: str | Path, model_cls, device: torch.device):
    from transformers import AutoTokenizer

    with quiet_hf_progress():
        model = model_cls.from_pretrained(str(init_dir), local_files_only=True, dtype=torch.float32).to(device)
    tok = AutoTokenizer.from_pretrained(str(init_dir), local_files_only=True)
    log.info("%s init %s (%s)", kind, init_dir, model_revision(init_dir))
    return model, tok


def _lm_batch(captions: Sequence[Sequence[int]], prompt: list[int], eos: int, pad: int, rng: np.random.Generator,
              cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing arrays of one step: ``copy_fraction`` of the rows are preceded by their caption
    "spoken" before the prompt (:func:`stretched_prefix`, silence = the pad token), the rest start at
    the prompt.

    Why: a real LLM copies what its context holds; the tiny demo LM, trained on captions alone, would
    ignore anything before the prompt, and no projector could steer it. With these rows it learns to
    read a caption laid out over time before the prompt, which is what the projector's audio
    positions must become (the projector itself still learns everything about the audio).
    """
    copy = rng.random(len(captions)) < cfg["copy_fraction"]
    prefixes = [stretched_prefix(c, rng, max_repeat=cfg["copy_max_repeat"], max_silence=cfg["copy_max_silence"],
                                 silence_id=pad) if copy[i] else [] for i, c in enumerate(captions)]
    return teacher_forcing_arrays(prompt, captions, eos, pad, prefixes)


def _lm_eval_loss(model, inputs: torch.Tensor, labels: torch.Tensor, device) -> float:
    """Mean teacher-forced loss on the caption tokens and eos, in eval mode (restores train mode)."""
    was_training = model.training
    model.eval()
    loss = token_loss(lambda rows, x: model(input_ids=x).logits, inputs, labels, device, chunk=256)
    model.train(was_training)
    return loss


def mlm_mask(ids: np.ndarray, candidates: np.ndarray, rng: np.random.Generator, *, mask_prob: float, mask_id: int,
             random_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of a padded batch: each ``candidates`` position (not special, not padding) is
    selected with probability ``mask_prob`` (a row with candidates but no selection gets one
    selected uniformly); a selected token becomes ``mask_id`` (80 %), a token from ``random_ids``
    (10 %) or stays (10 %). Returns ``(inputs, labels)`` with labels ``IGNORE`` off the selection.
    Every draw comes from ``rng`` in a fixed order, so the result is a pure function of its inputs."""
    ids = np.asarray(ids)
    candidates = np.asarray(candidates, dtype=bool)
    u = rng.random(ids.shape)
    selected = candidates & (u < mask_prob)
    forced = rng.random(ids.shape)  # one forced pick per empty row: the candidate with the lowest draw
    for r in np.flatnonzero(~selected.any(axis=1) & candidates.any(axis=1)):
        cols = np.flatnonzero(candidates[r])
        selected[r, cols[np.argmin(forced[r, cols])]] = True
    action = rng.random(ids.shape)
    replacement = random_ids[rng.integers(0, len(random_ids), size=ids.shape)]
    inputs = ids.copy()
    inputs[selected & (action < 0.8)] = mask_id
    swap = selected & (action >= 0.8) & (action < 0.9)
    inputs[swap] = replacement[swap]
    labels = np.where(selected, ids, IGNORE)
    return inputs, labels


@torch.no_grad()
def _pseudo_ll_loss(model, ids: torch.Tensor, mask: torch.Tensor, candidates: torch.Tensor, mask_id: int,
                    device) -> float:
    """Mean loss of each word token masked alone (pseudo-log-likelihood), in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for pos in range(ids.shape[1]):
        rows = torch.nonzero(candidates[:, pos]).flatten()
        if not len(rows):
            continue
        x = ids[rows].clone()
        x[:, pos] = mask_id
        logits = model(input_ids=x.to(device), attention_mask=mask[rows].to(device)).logits[:, pos]
        total += float(F.cross_entropy(logits.float(), ids[rows, pos].to(device), reduction="sum"))
        count += len(rows)
    model.train(was_training)
    return total / max(1, count)


# --------------------------------------------------------------------------------------------
# LM
# --------------------------------------------------------------------------------------------


def train_lm(init_dir: str | Path, manifest: pd.DataFrame, out_dir: str | Path, log_csv: str | Path,
             checkpoint_dir: str | Path, cfg: dict | None, seed: int, *, max_steps: int | None = None,
             stop_after: int | None = None, progress: bool = True, device: str = "cpu") -> dict | None:
    """Train the demo LM (from ``init_dir``, :func:`build_demo_lm`) on the train-split transcripts
    as ``PROJECTOR_PROMPT + " " + caption + eos`` with the loss on the caption and eos.

    ``cfg`` is the ``lm`` section. ``max_steps`` shortens the run (the schedule is built for it);
    ``stop_after`` stops after that many steps without writing anything beyond the periodic
    checkpoints, as a killed run would. Writes the model + tokenizer to ``out_dir`` atomically and
    the loss log to ``log_csv``; returns the summary metrics (None when stopped early).
    """
    from transformers import AutoModelForCausalLM

    from mmasr.models.loading import pick_device

    t0 = time.perf_counter()
    cfg = _section(cfg, "lm")
    dev = pick_device(device)
    set_determinism(seed, dev)
    steps = run_steps(cfg, max_steps)
    texts = training_texts(manifest)
    model, tok = _load_local("LM", init_dir, AutoModelForCausalLM, dev)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    prompt = lm_prompt_ids(tok)
    max_len = int(model.config.max_position_embeddings)
    captions = caption_token_ids(tok, texts, max_len, len(prompt))
    longest = len(prompt) + max(map(len, captions)) * (1 + cfg["copy_max_repeat"]) + 2 * cfg["copy_max_silence"] + 1
    if cfg["copy_fraction"] > 0 and longest > max_len:
        raise ValueError(f"demo_text.lm: a caption read before the prompt needs up to {longest} positions, the LM has "
                         f"{max_len} (raise max_position_embeddings or lower copy_max_repeat/copy_max_silence)")
    log.info("LM training on %d train transcripts (%d distinct), %d steps", len(texts), len(set(texts)), steps)

    model.train()
    optimizer = adamw(model, cfg)
    fp = fingerprint("demo_text.lm", cfg, seed, steps, prompt, model_revision(init_dir), _texts_digest(texts),
                     str(dev), code_digest(__file__))
    trainer = Trainer("train lm", model, optimizer, cfg, steps=steps, checkpoint_dir=checkpoint_dir, fingerprint=fp,
                      log_columns=["step", "lr", "loss", "tokens"], items_per_step=cfg["batch_size"], progress=progress)

    def train_step(step: int) -> dict:
        idx = batch_indices(len(texts), cfg["batch_size"], step, seed, streams.LM_ORDER)
        x, y = _lm_batch([captions[i] for i in idx], prompt, eos, pad,
                         np.random.default_rng([seed, streams.LM_COPY, step]), cfg)
        x, y = x.to(dev), y.to(dev)
        logits = model(input_ids=x).logits  # causal: right padding never reaches a real position
        loss = token_cross_entropy(logits, y)
        optimise(loss, model, optimizer, cfg["grad_clip"])
        return {"loss": loss.item(), "tokens": int((y != IGNORE).sum())}

    if not trainer.run(train_step, stop_after=stop_after):
        return None

    distinct = sorted(set(texts))
    d_in, d_lab = teacher_forcing_arrays(
        prompt, caption_token_ids(tok, distinct, int(model.config.max_position_embeddings), len(prompt)), eos, pad)
    model.eval()
    with torch.no_grad():
        greedy = model.generate(input_ids=torch.tensor([prompt], device=dev), attention_mask=None,
                                max_new_tokens=8, do_sample=False)
    model.train()
    greedy_caption = tok.decode(greedy[0, len(prompt):].tolist(), skip_special_tokens=True).strip()
    summary = {
        "lm_steps": steps, "lm_final_loss": mean_tail_loss(trainer.log.rows()),
        "lm_train_caption_loss": _lm_eval_loss(model, d_in, d_lab, dev),
        "lm_greedy_caption": greedy_caption, "lm_greedy_caption_in_train": greedy_caption in set(distinct),
        "lm_n_train_utts": len(texts), "lm_n_train_captions": len(distinct), "lm_n_params": _n_params(model),
        "lm_vocab_size": len(tok), "lm_init_revision": model_revision(init_dir),
    }
    save_hf_model(SimpleNamespace(model=model, processor=tok), init_dir, out_dir,
             {"seed": seed, "config": cfg, "steps": steps, "prompt": PROJECTOR_PROMPT, "prompt_ids": prompt,
              "init": str(init_dir), "init_revision": summary["lm_init_revision"], "train_utts": len(texts),
              "fingerprint": fp})
    trainer.log.publish(log_csv)
    summary["lm_train_seconds"] = round(time.perf_counter() - t0, 1)
    return summary


# --------------------------------------------------------------------------------------------
# Text encoder (BERT, masked-language modelling)
# --------------------------------------------------------------------------------------------


def train_text_encoder(init_dir: str | Path, manifest: pd.DataFrame, out_dir: str | Path, log_csv: str | Path,
                       checkpoint_dir: str | Path, cfg: dict | None, seed: int, *, max_steps: int | None = None,
                       stop_after: int | None = None, progress: bool = True, device: str = "cpu",
                       text_cfg: dict | None = None) -> dict | None:
    """Train the demo BERT (from ``init_dir``, :func:`build_demo_text_encoder`) with masked-language
    modelling on the train-split transcripts and write the *encoder* (a ``BertModel``) with its
    tokenizer to ``out_dir`` atomically. ``cfg`` is the ``text_encoder`` section; the other
    arguments as in :func:`train_lm`. With ``text_cfg`` (params ``text``) the transcripts are normalised
    first, as CLAP reads them (:func:`mmasr.clap.cache.cache_items`: e.g. digits under whisper_english), and
    those that normalise to nothing are left out. Returns the summary metrics (None when stopped early)."""
    from transformers import BertForMaskedLM, BertModel

    from mmasr.models.loading import pick_device

    t0 = time.perf_counter()
    cfg = _section(cfg, "text_encoder")
    dev = pick_device(device)
    set_determinism(seed, dev)
    steps = run_steps(cfg, max_steps)
    texts = training_texts(manifest)
    if text_cfg is not None:
        from mmasr.data.text import normaliser

        norm = normaliser(text_cfg)
        texts = [t for t in map(norm, texts) if t]
        if not texts:
            raise ValueError("every train transcript is empty after normalisation: nothing to pre-train on")
    model, tok = _load_local("text encoder", init_dir, BertForMaskedLM, dev)
    max_len = int(model.config.max_position_embeddings)
    enc = tok(texts, padding=True, return_special_tokens_mask=True, return_tensors="np")
    if enc["input_ids"].shape[1] > max_len:
        raise ValueError(f"a train transcript needs {enc['input_ids'].shape[1]} positions, the text encoder has "
                         f"{max_len}")
    ids, attn = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    candidates = (attn == 1) & (enc["special_tokens_mask"] == 0)
    lengths = attn.sum(axis=1)
    special = {tok.convert_tokens_to_ids(t) for t in BERT_SPECIAL_TOKENS}
    random_ids = np.array([i for i in range(len(tok)) if i not in special], dtype=np.int64)
    log.info("text encoder MLM training on %d train transcripts (%d distinct), %d steps", len(texts),
             len(set(texts)), steps)

    model.train()
    optimizer = adamw(model, cfg)
    fp = fingerprint("demo_text.text_encoder", cfg, seed, steps, model_revision(init_dir), _texts_digest(texts),
                     str(dev), code_digest(__file__))
    trainer = Trainer("train text encoder", model, optimizer, cfg, steps=steps, checkpoint_dir=checkpoint_dir,
                      fingerprint=fp, log_columns=["step", "lr", "loss", "masked"], items_per_step=cfg["batch_size"],
                      progress=progress)

    def train_step(step: int) -> dict:
        idx = batch_indices(len(texts), cfg["batch_size"], step, seed, streams.TEXT_ENCODER_ORDER)
        width = int(lengths[idx].max())
        rng = np.random.default_rng([seed, streams.TEXT_ENCODER_MASK, step])
        x, y = mlm_mask(ids[idx, :width], candidates[idx, :width], rng, mask_prob=cfg["mask_prob"],
                        mask_id=tok.mask_token_id, random_ids=random_ids)
        y_t = torch.from_numpy(y).to(dev)
        logits = model(input_ids=torch.from_numpy(x).to(dev),
                       attention_mask=torch.from_numpy(attn[idx, :width]).to(dev)).logits
        loss = token_cross_entropy(logits, y_t)
        optimise(loss, model, optimizer, cfg["grad_clip"])
        return {"loss": loss.item(), "masked": int((y != IGNORE).sum())}

    if not trainer.run(train_step, stop_after=stop_after):
        return None

    distinct = sorted(set(texts))
    d = tok(distinct, padding=True, return_special_tokens_mask=True, return_tensors="pt")
    d_cand = (d["attention_mask"] == 1) & (d["special_tokens_mask"] == 0)
    pll = _pseudo_ll_loss(model, d["input_ids"], d["attention_mask"], d_cand, tok.mask_token_id, dev)

    # The encoder alone, as a BertModel with a pooler (seeded init: MLM does not train it), so that
    # AutoModel.from_pretrained loads it with no missing or unexpected weights.
    encoder = seeded_init(seed, lambda: BertModel(copy.deepcopy(model.config), add_pooling_layer=True)).to(dev)
    missing, unexpected = encoder.load_state_dict(model.bert.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise RuntimeError(f"BertForMaskedLM -> BertModel mismatch: missing {missing}, unexpected {unexpected}")
    encoder.eval()
    summary = {
        "text_encoder_steps": steps, "text_encoder_final_loss": mean_tail_loss(trainer.log.rows()),
        "text_encoder_train_pll_loss": pll,
        "text_encoder_n_train_utts": len(texts), "text_encoder_n_train_captions": len(distinct),
        "text_encoder_n_params": _n_params(encoder), "text_encoder_n_params_mlm": _n_params(model),
        "text_encoder_vocab_size": len(tok), "text_encoder_init_revision": model_revision(init_dir),
    }
    save_hf_model(SimpleNamespace(model=encoder, processor=tok), init_dir, out_dir,
             {"seed": seed, "config": cfg, "steps": steps, "init": str(init_dir),
              "init_revision": summary["text_encoder_init_revision"], "train_utts": len(texts),
              "pooler": "seeded random init (not trained by MLM)", "fingerprint": fp})
    trainer.log.publish(log_csv)
    summary["text_encoder_train_seconds"] = round(time.perf_counter() - t0, 1)
    return summary
