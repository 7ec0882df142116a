"""Every model the pipeline uses, loaded by name: Whisper (n-best lists) and CLIP (pictures).

Why one module
--------------
Demo and real checkpoints must go through the same code: a name is either a local folder written
by ``save_pretrained`` (the demo models built by :mod:`mmasr.demo.models`, or a user's copy of a
checkpoint) or a Hugging Face hub id (``openai/whisper-small``). Both are loaded with
``from_pretrained``; local folders with ``local_files_only=True``, hub ids from the local HF cache
first and from the network only when the cache lacks them (and offline mode is off), so a filled
cache always gives the same commit. ``trust_remote_code`` is passed only when explicitly True.
A failure names the model, how the name was read (local folder or hub id) and what to do.

Each loaded model comes as a :class:`ModelBundle` with its revision (a content hash of a local
folder, or the cached commit of a hub id) for provenance, and helpers compute what callers need:
CLIP image/text embeddings (unit norm), Whisper log-mel features, and the decoder prompt that
``generate()`` forces (so callers can strip it and re-score hypotheses consistently).

Precision and memory
--------------------
Weights load in the dtype :func:`resolve_dtype` picks (params ``models.dtype``): under ``auto``, frozen
models go bfloat16 on CUDA (half the memory of float32: a 3 B LM in ~6 GB) and float32 elsewhere;
models that are trained keep float32 master weights. transformers 5 always loads on the meta
device and fills the weights straight from the (memory-mapped) checkpoint, so there is no
``low_cpu_mem_usage`` switch to set (it is accepted and ignored). Every loaded model is logged
once: parameters, dtype, device, memory, and the process's peak RSS (:func:`describe_model`).

Checkpoints that do not fit the model
-------------------------------------
transformers fills weights missing from a checkpoint with random values and drops unexpected
ones, with only a warning. Here a missing weight or a shape mismatch is an error naming the keys,
unexpected weights are a warning naming them, and a task head a base model does not use (a
``*ForCTC`` checkpoint's ``lm_head``, BERT's pre-training ``cls``) is one info line
(:func:`check_loading_info`). Renamed legacy keys that transformers converts itself (weight-norm
``weight_g``/``weight_v``, ``LayerNorm.gamma``/``beta``) load as usual.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import numpy as np
import torch

from mmasr.memory import peak_rss_bytes

log = logging.getLogger(__name__)

__all__ = [
    "ModelBundle",
    "ModelLoadError",
    "CheckpointMismatchError",
    "pick_device",
    "autocast",
    "DTYPE_NAMES",
    "resolve_dtype",
    "check_loading_info",
    "split_unexpected_keys",
    "format_keys",
    "parameter_count",
    "model_memory_bytes",
    "parameter_dtypes",
    "format_count",
    "describe_model",
    "float32_output_layer",
    "model_revision",
    "is_local_name",
    "load_whisper",
    "load_clip",
    "load_lm",
    "load_audio_encoder",
    "load_text_encoder",
    "AUDIO_ENCODER_TYPES",
    "TEXT_ENCODER_TYPES",
    "clip_image_embeddings",
    "clip_text_embeddings",
    "pooled_features",
    "whisper_features",
    "whisper_prompt_ids",
    "whisper_generate_kwargs",
    "describe_prompt",
    "quiet_hf_progress",
]

_BUILD_HINT = ("build the embedded demo models (`mmasr build-demo-models`, the workflow's build_demo_models "
               "rule) or point to a local folder written by save_pretrained")
LOCAL_HINT = f"Hint: {_BUILD_HINT}."
HUB_HINT = (f"Hint: no network here? {_BUILD_HINT[0].upper()}{_BUILD_HINT[1:]}, "
            "or fill the HF cache where there is a network.")

# Files whose bytes define a checkpoint's behaviour (config, weights, tokenizer, preprocessing).
# Deliberately not "every file": training logs or READMEs in the folder must not change the revision.
_REVISION_PATTERNS = (
    "config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "normalizer.json", "*.safetensors", "*.safetensors.index.json",
    "pytorch_model*.bin", "pytorch_model*.bin.index.json", "*.model", "*.tiktoken",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says which, how it was looked up, and the fix."""


class CheckpointMismatchError(ModelLoadError):
    """The checkpoint's weights do not fit the model (missing or mis-shaped keys); the message names them."""


@dataclass
class ModelBundle:
    """A loaded model with its processor, where it runs, and what exactly it is."""

    name: str  # as given (hub id or local path)
    revision: str  # "sha256:<12 hex>" for a local folder, the commit hash for a hub id, or "unknown"
    model: Any
    processor: Any
    device: torch.device


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA, then MPS, then CPU. Otherwise the named device (``cpu``, ``mps``, ``cuda``,
    ``cuda:N``), which must be available here: a run asked to use a GPU must not silently use the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, mps, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available on this machine "
                               "(no GPU, or a CPU-only PyTorch); use device: auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type == "mps" and not _mps_available():
        raise RuntimeError(f"device {name!r} requested but MPS is not available; use device: auto or cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}: use auto, cpu, mps, cuda or cuda:N")
    return device


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (where supported), a no-op elsewhere: CPU and MPS run in float32,
    which keeps CPU results exactly reproducible."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# Weight precision
# --------------------------------------------------------------------------------------------

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")  # params models.dtype
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ROLES = ("frozen", "trained")


def resolve_dtype(name: str | torch.dtype, device: str | torch.device, role: str = "frozen",
                  bf16_supported: bool | None = None) -> torch.dtype:
    """The dtype a model's weights are loaded in.

    ``role="trained"`` (weights an optimiser updates: CLAP phase 2's encoder layers, demo pre-training)
    is float32 whatever ``name`` says: bf16 master weights lose small updates; bf16 autocast on CUDA
    still does the maths. ``role="frozen"`` (inference only): ``auto`` is bfloat16 on a CUDA device
    that supports it (``bf16_supported``, asked of torch when None) and float32 elsewhere (CPU, MPS,
    older GPUs: CPU results stay exactly reproducible); ``float32``/``bfloat16``/``float16`` are taken
    as named, except float16 on the CPU, which is refused (slow, and some CPU kernels lack float16:
    use bfloat16 or float32 there).
    """
    if role not in ROLES:
        raise ValueError(f"unknown model role {role!r}: use {' or '.join(ROLES)}")
    if isinstance(name, torch.dtype):
        name = next((k for k, v in _DTYPES.items() if v == name), str(name))
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown model dtype {name!r}: use {', '.join(DTYPE_NAMES)}")
    if role == "trained":
        return torch.float32
    dev = torch.device(device)
    if name == "auto":
        if dev.type != "cuda":
            return torch.float32
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_supported else torch.float32
    if name == "float16" and dev.type == "cpu":
        raise ValueError("models.dtype float16 on the CPU: slow, and some CPU operations have no float16 kernel; "
                         "use bfloat16 (half the memory too) or float32")
    return _DTYPES[name]


# --------------------------------------------------------------------------------------------
# What a loaded model is: size, precision, memory
# --------------------------------------------------------------------------------------------


def parameter_count(model: torch.nn.Module) -> int:
    """Number of parameters, each tied (shared) tensor counted once, buffers not counted."""
    return sum(p.numel() for p in model.parameters())


def model_memory_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the parameters and buffers (each shared tensor once): the model's own memory,
    without activations or the framework's overhead."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def parameter_dtypes(model: torch.nn.Module) -> dict[str, int]:
    """Parameter count by dtype name, largest first (a model may keep some modules in float32)."""
    counts: dict[str, int] = {}
    for p in model.parameters():
        key = str(p.dtype).removeprefix("torch.")
        counts[key] = counts.get(key, 0) + p.numel()
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def format_count(n: int) -> str:
    """``241_700_000 -> '241.7 M'``, ``3_075_000_000 -> '3.08 B'``, ``950 -> '950'`` (as model sizes are quoted)."""
    for scale, suffix, digits in ((1e9, "B", 2), (1e6, "M", 1), (1e3, "K", 1)):
        if n >= scale:
            return f"{n / scale:.{digits}f} {suffix}"
    return str(n)


def describe_model(bundle: "ModelBundle", kind: str = "model") -> str:
    """One log line: name, revision, parameters, dtype, device, memory of parameters + buffers, and the
    process's peak RSS (plus CUDA memory allocated on a GPU)."""
    model = bundle.model
    dtypes = parameter_dtypes(model)
    dtype = ", ".join(dtypes) if len(dtypes) > 1 else next(iter(dtypes), "no parameters")
    line = (f"loaded {kind} {bundle.name} (revision {bundle.revision}): {format_count(parameter_count(model))} "
            f"parameters, {dtype}, {bundle.device}, {model_memory_bytes(model) / 2**20:.1f} MB parameters+buffers; "
            f"peak RSS {peak_rss_bytes() / 2**20:.1f} MB")
    if bundle.device.type == "cuda":
        line += f", CUDA allocated {torch.cuda.memory_allocated(bundle.device) / 2**20:.1f} MB"
    return line


class _Float32Linear(torch.nn.Module):
    """A float32 copy of an output layer that runs outside autocast: logits computed in float32."""

    def __init__(self, layer: torch.nn.Linear):
        super().__init__()
        self.weight = layer.weight.detach().float()
        self.bias = None if layer.bias is None else layer.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        off = torch.autocast(device_type="cuda", enabled=False) if x.is_cuda else contextlib.nullcontext()
        with off:
            return torch.nn.functional.linear(x.float(), self.weight, self.bias)


@contextlib.contextmanager
def float32_output_layer(model) -> Iterator[None]:
    """Inside, ``model``'s output layer (``get_output_embeddings()``) computes float32 logits from a float32
    copy of its weights, outside autocast, whatever dtype the model was loaded in: scores (log-softmax
    over ~50 k tokens) are then not rounded to bf16. The hidden states feeding it keep the model's
    precision. A no-op for a float32 model off CUDA (nothing would change)."""
    layer = model.get_output_embeddings()
    if not isinstance(layer, torch.nn.Linear) or (layer.weight.dtype == torch.float32 and not layer.weight.is_cuda):
        yield
        return
    model.set_output_embeddings(_Float32Linear(layer))
    try:
        yield
    finally:
        model.set_output_embeddings(layer)


# --------------------------------------------------------------------------------------------
# Names and revisions
# --------------------------------------------------------------------------------------------


def is_local_name(name_or_path: str | Path) -> bool:
    """True when ``name_or_path`` means a local folder: it exists, or it cannot be a hub id
    (absolute, ``./``, ``~``, more than one ``/``...). ``org/name`` that is not a folder is a hub id."""
    text = str(name_or_path)
    return Path(text).expanduser().exists() or not _HUB_ID.match(text)


def _revision_files(folder: Path) -> list[Path]:
    files = {p for pattern in _REVISION_PATTERNS for p in folder.glob(pattern) if p.is_file()}
    return sorted(files, key=lambda p: p.name)


def _folder_digest(folder: Path) -> str:
    """sha256 over the names and bytes of the files that define the checkpoint (order-independent
    of the file system; independent of the folder's own path and of timestamps)."""
    h = hashlib.sha256()
    for path in _revision_files(folder):
        h.update(path.name.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _cached_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit a hub id (at ``revision``, default main) resolves to in the local HF cache."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("config.json", "preprocessor_config.json", "tokenizer_config.json"):
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
        if isinstance(found, str):
            return Path(found).parent.name  # .../snapshots/<commit>/<filename>
    return None


def model_revision(name_or_path: str | Path, revision: str | None = None) -> str:
    """What exactly a model name refers to, for provenance.

    Local folder: ``"sha256:" + 12 hex digits`` over its config, weight and tokenizer files
    (stable across copies and machines). Hub id: the commit hash ``revision`` (default main)
    resolves to in the local HF cache; a full commit hash given as ``revision`` is returned as is;
    ``"unknown"`` when neither tells.
    """
    path = Path(str(name_or_path)).expanduser()
    if is_local_name(name_or_path):
        return f"sha256:{_folder_digest(path)[:12]}" if path.is_dir() else "unknown"
    if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    try:
        return _cached_commit(str(name_or_path), revision) or "unknown"
    except Exception:  # noqa: BLE001 - a provenance lookup must never break loading
        return "unknown"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """A direct TCP connection to the hub succeeds. Checked before downloading because, without a
    network, huggingface_hub retries every file for minutes. Behind a proxy we cannot tell: assume yes."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlsplit(_hub_endpoint())
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                      timeout=timeout_s):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """Silence transformers' progress bars (weight loading/saving) for the duration: they would
    clutter the pipeline's logs."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _check_local_folder(kind: str, name: str, folder: Path, model_type: str | tuple[str, ...]) -> None:
    where = f"{kind} model {name!r} (treated as a local folder: {folder})"
    if not folder.exists():
        raise ModelLoadError(f"cannot load {where}: the folder does not exist. {LOCAL_HINT}")
    if not folder.is_dir():
        raise ModelLoadError(f"cannot load {where}: it is not a folder. {LOCAL_HINT}")
    config = folder / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"cannot load {where}: it has no config.json, so it is not a saved model. {LOCAL_HINT}")
    try:
        found = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load {where}: unreadable config.json ({exc})") from exc
    allowed = (model_type,) if isinstance(model_type, str) else tuple(model_type)
    if found not in allowed:
        expected = repr(allowed[0]) if len(allowed) == 1 else f"one of {', '.join(allowed)}"
        raise ModelLoadError(f"cannot load {where}: config.json says model_type={found!r}, expected {expected} "
                             "(is this the other model's folder?)")


def _read_config(path: Path) -> dict | None:
    """A config.json as a dict, or None when it is missing or unreadable (reported by the later checks)."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _cached_config(repo_id: str, revision: str | None) -> dict | None:
    """A hub id's config.json from the local HF cache (no download), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - the load itself reports what is wrong with the name
        return None
    return _read_config(Path(found)) if isinstance(found, str) else None


def remote_code_reason(config: dict) -> str | None:
    """Why loading a model with this config.json would run code that ships with the model (``auto_map``
    names its own classes, or its ``model_type`` is not part of the installed transformers), or None."""
    from transformers import CONFIG_MAPPING

    if config.get("auto_map"):
        return f"it ships its own code (auto_map in its config.json: {', '.join(sorted(config['auto_map']))})"
    model_type = config.get("model_type")
    if model_type and model_type not in CONFIG_MAPPING:
        return (f"its model_type {model_type!r} is not part of the installed transformers, so only code shipped "
                "with it could load it")
    return None


def _remote_code_message(kind: str, name: str, reason: str) -> str:
    return (f"cannot load {kind} model {name!r}: {reason}. Loading it means transformers imports and runs that "
            "code: review it (the *.py files beside its config.json), then set models.trust_remote_code: true "
            "to allow it.")


def _refuse_remote_code(kind: str, name: str, config: dict | None, trust_remote_code: bool) -> None:
    reason = remote_code_reason(config) if config is not None else None
    if reason and trust_remote_code is not True:
        raise ModelLoadError(_remote_code_message(kind, name, reason))


def _load(kind: str, name: str, model_type: str | tuple[str, ...], revision: str | None, trust_remote_code: bool,
          load: Callable[[str, dict], tuple[Any, Any]]) -> tuple[Any, Any, str]:
    """Run ``load(source, from_pretrained_kwargs)`` for a local folder or a hub id, with clear errors.

    Hub ids are tried from the local cache first, then (unless offline) from the network.
    """
    # Always explicit: left out, transformers would ask on a terminal whether to run a model's own code.
    extra: dict[str, Any] = {"trust_remote_code": trust_remote_code is True}
    if is_local_name(name):
        folder = Path(name).expanduser()
        _refuse_remote_code(kind, name, _read_config(folder / "config.json"), trust_remote_code)
        _check_local_folder(kind, name, folder, model_type)
        if revision:
            log.warning("%s model %s is a local folder: revision %r is ignored", kind, name, revision)
        where = f"{kind} model {name!r} (treated as a local folder: {folder})"
        try:
            model, processor = load(str(folder), {"local_files_only": True, **extra})
        except CheckpointMismatchError as exc:
            raise CheckpointMismatchError(f"cannot load {where}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - re-raised with the model's name and the hint
            raise ModelLoadError(f"cannot load {where}: {type(exc).__name__}: {exc}") from exc
        return model, processor, model_revision(folder)

    kw = {"revision": revision, **extra} if revision else dict(extra)
    _refuse_remote_code(kind, name, _cached_config(name, revision), trust_remote_code)
    try:
        model, processor = load(name, {"local_files_only": True, **kw})
    except CheckpointMismatchError as exc:  # found, but its weights do not fit: downloading again would not help
        raise CheckpointMismatchError(f"cannot load {kind} model {name!r} (a Hugging Face hub id, from the HF "
                                      f"cache): {exc}") from exc
    except Exception as cache_exc:  # noqa: BLE001 - not (fully) cached: fall through to the network
        if _offline():
            raise ModelLoadError(
                f"cannot load {kind} model {name!r} (treated as a Hugging Face hub id): it is not in the local "
                f"HF cache and offline mode (HF_HUB_OFFLINE) is on ({type(cache_exc).__name__}: {cache_exc}). "
                f"{HUB_HINT}") from cache_exc
        if not _hub_reachable():
            raise ModelLoadError(
                f"cannot load {kind} model {name!r} (treated as a Hugging Face hub id): it is not in the local "
                f"HF cache and the hub ({_hub_endpoint()}) cannot be reached ({type(cache_exc).__name__}: "
                f"{cache_exc}). {HUB_HINT}") from cache_exc
        try:
            model, processor = load(name, kw)
        except CheckpointMismatchError as exc:
            raise CheckpointMismatchError(f"cannot load {kind} model {name!r} (a Hugging Face hub id): {exc}") from exc
        except Exception as exc:  # noqa: BLE001
            if trust_remote_code is not True and "trust_remote_code" in str(exc):  # its config came from the hub
                reason = "it ships its own code (transformers says so)"
                raise ModelLoadError(_remote_code_message(kind, name, reason)) from exc
            raise ModelLoadError(
                f"cannot load {kind} model {name!r} (treated as a Hugging Face hub id"
                f"{f' at revision {revision!r}' if revision else ''}): {type(exc).__name__}: {exc}. "
                f"{HUB_HINT}") from exc
    return model, processor, model_revision(name, revision)


# Task heads that other checkpoints of a model family carry on top of the base model (``*ForCTC``'s
# ``lm_head``, BERT pre-training's ``cls``, Whisper's ``proj_out``, wav2vec 2.0 pre-training's quantizer...):
# loading such a checkpoint as the base model drops them, as intended.
BASE_MODEL_HEADS = ("lm_head", "cls", "classifier", "pre_classifier", "qa_outputs", "proj_out", "projector",
                    "vocab_transform", "vocab_layer_norm", "vocab_projector", "discriminator_predictions",
                    "generator_predictions", "generator_lm_head", "quantizer", "project_q", "project_hid")
KEYS_SHOWN = 20  # keys named in a message before "... and N more"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def format_keys(keys, limit: int = KEYS_SHOWN) -> str:
    """Sorted keys, comma-separated, the first ``limit`` of them and then ``... and N more``."""
    keys = sorted(str(k) for k in keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def split_unexpected_keys(keys, base_model: bool) -> tuple[list[str], list[str]]:
    """Unexpected checkpoint keys -> (task-head keys a base model rightly drops, the others).

    Only a base model (``AutoModel``: HubertModel, BertModel...) drops heads as intended; for a model
    with its own head every unexpected key is suspicious."""
    benign, other = [], []
    for key in sorted(keys):
        (benign if base_model and key.split(".", 1)[0] in BASE_MODEL_HEADS else other).append(key)
    return benign, other


def check_loading_info(info: dict, model, source: str) -> None:
    """Judge transformers' ``output_loading_info`` for ``model`` loaded from ``source``.

    Missing weights (transformers would fill them with random values) and shape mismatches raise
    :class:`CheckpointMismatchError` naming the keys; unexpected weights (dropped) are a warning
    naming them, or one info line when they are a task head that a base model does not use."""
    cls = type(model).__name__
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or ())
    problems = []
    if missing:
        problems.append(f"{_n(len(missing), 'weight')} of {cls} missing from the checkpoint (transformers would "
                        f"fill them with random values): {format_keys(missing)}")
    if mismatched:
        shapes = [f"{key} (checkpoint {tuple(ckpt)}, model {tuple(want)})" for key, ckpt, want in mismatched]
        problems.append(f"{_n(len(mismatched), 'weight')} with another shape in the checkpoint than {cls} "
                        f"expects: {format_keys(shapes)}")
    if problems:
        raise CheckpointMismatchError(
            f"{'; '.join(problems)}. Is {source} a checkpoint of another architecture or size (compare its "
            "config.json with its weights), or were its weights saved under other (renamed) keys?")
    unexpected = info.get("unexpected_keys") or ()
    if unexpected:
        heads, other = split_unexpected_keys(unexpected, base_model=getattr(model, "base_model", model) is model)
        if heads:
            log.info("%s: %s of a task head (%s) not part of %s, dropped", source, _n(len(heads), "weight"),
                     ", ".join(sorted({k.split(".", 1)[0] for k in heads})), cls)
        if other:
            log.warning("%s: %s in the checkpoint not used by %s, dropped: %s (another architecture, or renamed "
                        "keys?)", source, _n(len(other), "weight"), cls, format_keys(other))


class _LoadReportFilter(logging.Filter):
    """Holds back transformers' own load report (a coloured table of the same keys that
    :func:`check_loading_info` names), keeping its text for an error that refers to it."""

    def __init__(self) -> None:
        super().__init__()
        self.reports: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" in message:
            self.reports.append(re.sub(r"\x1b\[[0-9;]*m", "", message))
            return False
        return True


def _from_pretrained(model_cls, source: str, kw: dict, dtype: torch.dtype = torch.float32):
    """``model_cls.from_pretrained`` in ``dtype``, refusing checkpoints whose weights do not fit
    (:func:`check_loading_info`). Shape mismatches are let through transformers (ignore_mismatched_sizes)
    only so that they come back in the loading info, where they are refused with their names."""
    hf_logger = logging.getLogger("transformers.modeling_utils")
    report = _LoadReportFilter()
    hf_logger.addFilter(report)
    try:
        with quiet_hf_progress():
            model, info = model_cls.from_pretrained(source, dtype=dtype, output_loading_info=True,
                                                    ignore_mismatched_sizes=True, **kw)
    except RuntimeError as exc:
        if report.reports:  # transformers raised "look at the above report": put the report in the error
            raise RuntimeError(f"{exc}\n{report.reports[-1]}") from exc
        raise
    finally:
        hf_logger.removeFilter(report)
    check_loading_info(info, model, source)
    return model


def _bundle(kind: str, name: str, revision: str, model, processor, device: torch.device) -> ModelBundle:
    model.eval().to(device)
    bundle = ModelBundle(name=str(name), revision=revision, model=model, processor=processor, device=device)
    log.info("%s", describe_model(bundle, kind))
    return bundle


def _device_and_dtype(device: str | torch.device, dtype: str | torch.dtype) -> tuple[torch.device, torch.dtype]:
    """Resolved before loading, so that a wrong device or dtype fails before minutes of loading."""
    dev = device if isinstance(device, torch.device) else pick_device(device)
    return dev, resolve_dtype(dtype, dev)


def load_whisper(name_or_path: str, device: str | torch.device = "auto", revision: str | None = None,
                 trust_remote_code: bool = False, dtype: str | torch.dtype = "float32") -> ModelBundle:
    """``WhisperForConditionalGeneration`` + ``WhisperProcessor``, in eval mode on ``device``, weights in
    ``dtype`` (:func:`resolve_dtype`; float32 unless asked: trainers call the loaders directly)."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    dev, dt = _device_and_dtype(device, dtype)  # fail before loading

    def load(source: str, kw: dict):
        processor = WhisperProcessor.from_pretrained(source, **kw)
        return _from_pretrained(WhisperForConditionalGeneration, source, kw, dt), processor

    model, processor, rev = _load("Whisper", str(name_or_path), "whisper", revision, trust_remote_code, load)
    return _bundle("Whisper", name_or_path, rev, model, processor, dev)


def load_clip(name_or_path: str, device: str | torch.device = "auto", revision: str | None = None,
              trust_remote_code: bool = False, dtype: str | torch.dtype = "float32") -> ModelBundle:
    """``CLIPModel`` + ``CLIPProcessor``, in eval mode on ``device``, weights in ``dtype``.

    The image processor is pinned to transformers' PIL backend: the default would switch to the
    torchvision backend (slightly different resizing) whenever torchvision happens to be installed.
    """
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, CLIPProcessor

    dev, dt = _device_and_dtype(device, dtype)

    def load(source: str, kw: dict):
        images = AutoImageProcessor.from_pretrained(source, backend="pil", **kw)
        tokenizer = AutoTokenizer.from_pretrained(source, **kw)
        processor = CLIPProcessor(image_processor=images, tokenizer=tokenizer)
        return _from_pretrained(CLIPModel, source, kw, dt), processor

    model, processor, rev = _load("CLIP", str(name_or_path), "clip", revision, trust_remote_code, load)
    return _bundle("CLIP", name_or_path, rev, model, processor, dev)


def load_lm(name_or_path: str, device: str | torch.device = "auto", revision: str | None = None,
            trust_remote_code: bool = False, dtype: str | torch.dtype = "float32") -> ModelBundle:
    """A decoder-only LM (``AutoModelForCausalLM``, e.g. SmolLM3) + its tokenizer, in eval mode on ``device``,
    weights in ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev, dt = _device_and_dtype(device, dtype)

    def load(source: str, kw: dict):
        tokenizer = AutoTokenizer.from_pretrained(source, **kw)
        return _from_pretrained(AutoModelForCausalLM, source, kw, dt), tokenizer

    model_type = None
    if is_local_name(name_or_path):  # read as JSON: AutoConfig could run (or prompt for) the folder's own code
        model_type = (_read_config(Path(name_or_path).expanduser() / "config.json") or {}).get("model_type")
    model, tokenizer, rev = _load("LM", str(name_or_path), model_type or "causal LM", revision, trust_remote_code, load)
    return _bundle("LM", name_or_path, rev, model, tokenizer, dev)


# Frozen encoders of the CLAP model and the probe: speech encoders whose hidden states are pooled
# (HuBERT family, a Whisper checkpoint's encoder, AST; EAT, which runs its own code, only with
# models.trust_remote_code), and BERT-family text encoders.
AUDIO_ENCODER_TYPES = ("hubert", "wav2vec2", "wavlm", "data2vec-audio", "whisper", "audio-spectrogram-transformer",
                       "eat")
TEXT_ENCODER_TYPES = ("bert", "roberta", "distilbert", "xlm-roberta", "electra", "deberta-v2", "mpnet",
                      "camembert", "modernbert")
# For an EAT checkpoint (worstchan/EAT-*) without a preprocessor_config.json: its published extraction
# recipe (github.com/cwx-worst-one/EAT, feature_extract.py: the features are computed by hand) is AST's
# Kaldi fbank, 128 bins, 25/10 ms Hanning windows, dither 0, zero-padded/cut to 1024 frames (10.24 s,
# the clip length it was pre-trained on), then (x - mean) / (2 std) with these values.
EAT_FBANK = {"num_mel_bins": 128, "max_length": 1024, "mean": -4.268, "std": 4.569}
_BEATS = ("BEATs is not supported: it is not part of transformers and its checkpoints are plain PyTorch "
          "files that need Microsoft's unilm code to build the model (no config.json, no from_pretrained). "
          "Use an AST (MIT/ast-finetuned-audioset-10-10-0.4593), EAT or HuBERT-family encoder instead.")


def _refuse_beats(name: str) -> None:
    config = _read_config(Path(name).expanduser() / "config.json") if is_local_name(name) else None
    model_type = str((config or {}).get("model_type", "")).lower()
    if re.search("beats", Path(name).name, re.IGNORECASE) or model_type == "beats":
        raise ModelLoadError(f"cannot load audio encoder {name!r}: {_BEATS}")


def _eat_feature_extractor(source: str, kw: dict, config):
    """The checkpoint's own feature extractor if it has one, else EAT's published fbank recipe."""
    from transformers import ASTFeatureExtractor, AutoFeatureExtractor

    try:
        return AutoFeatureExtractor.from_pretrained(source, **kw)
    except (OSError, ValueError):
        settings = {**EAT_FBANK, "num_mel_bins": int(getattr(config, "mel_bins", EAT_FBANK["num_mel_bins"]))}
        log.info("audio encoder %s has no feature extractor: using EAT's published fbank recipe %s", source, settings)
        return ASTFeatureExtractor(sampling_rate=16000, **settings)


def load_audio_encoder(name_or_path: str, device: str | torch.device = "auto", revision: str | None = None,
                       trust_remote_code: bool = False, dtype: str | torch.dtype = "float32") -> ModelBundle:
    """A speech encoder and its feature extractor, in eval mode on ``device``, weights in ``dtype``.

    HuBERT family (``facebook/hubert-base-ls960``, wav2vec 2.0, WavLM, data2vec-audio) and AST
    (``MIT/ast-finetuned-audioset-10-10-0.4593``): ``AutoModel`` + ``AutoFeatureExtractor`` (a ``*ForCTC`` or
    ``ASTForAudioClassification`` checkpoint loads as its base model). Whisper (the demo model,
    ``openai/whisper-small``): the encoder of ``WhisperModel`` (the decoder is dropped) +
    ``WhisperFeatureExtractor``. EAT (``worstchan/EAT-base_epoch30_pretrain``) ships its own model code:
    it loads only with ``trust_remote_code=True`` (``models.trust_remote_code``), with its feature
    extractor or else :data:`EAT_FBANK`. BEATs is refused (not in transformers).
    ``bundle.model.config.model_type`` tells which.
    """
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, WhisperFeatureExtractor, WhisperModel

    dev, dt = _device_and_dtype(device, dtype)
    _refuse_beats(str(name_or_path))

    def load(source: str, kw: dict):
        config = AutoConfig.from_pretrained(source, **kw)
        if config.model_type not in AUDIO_ENCODER_TYPES:
            raise ValueError(f"model_type {config.model_type!r} is not a supported audio encoder "
                             f"({', '.join(AUDIO_ENCODER_TYPES)})")
        if config.model_type == "whisper":
            return _from_pretrained(WhisperModel, source, kw, dt).get_encoder(), WhisperFeatureExtractor.from_pretrained(source, **kw)
        if config.model_type == "eat":
            try:
                model = _from_pretrained(AutoModel, source, kw, dt)
            except AttributeError as exc:
                if "all_tied_weights_keys" not in str(exc):
                    raise
                raise ValueError("its own model code was written for transformers 4: its model class never calls "
                                 "self.post_init() at the end of __init__, which transformers 5 needs ("
                                 f"{exc}). Use a revision or a local copy of the checkpoint whose modeling file "
                                 "does") from exc
            return model, _eat_feature_extractor(source, kw, config)
        return _from_pretrained(AutoModel, source, kw, dt), AutoFeatureExtractor.from_pretrained(source, **kw)

    model, processor, rev = _load("audio encoder", str(name_or_path), AUDIO_ENCODER_TYPES, revision,
                                  trust_remote_code, load)
    return _bundle("audio encoder", name_or_path, rev, model, processor, dev)


def load_text_encoder(name_or_path: str, device: str | torch.device = "auto", revision: str | None = None,
                      trust_remote_code: bool = False, dtype: str | torch.dtype = "float32") -> ModelBundle:
    """A BERT-family text encoder (``AutoModel``) and its tokenizer, in eval mode on ``device``, weights in
    ``dtype``."""
    from transformers import AutoModel, AutoTokenizer

    dev, dt = _device_and_dtype(device, dtype)

    def load(source: str, kw: dict):
        return _from_pretrained(AutoModel, source, kw, dt), AutoTokenizer.from_pretrained(source, **kw)

    model, processor, rev = _load("text encoder", str(name_or_path), TEXT_ENCODER_TYPES, revision,
                                  trust_remote_code, load)
    return _bundle("text encoder", name_or_path, rev, model, processor, dev)


# --------------------------------------------------------------------------------------------
# CLIP helpers
# --------------------------------------------------------------------------------------------


def pooled_features(features: Any) -> torch.Tensor:
    """The projected CLIP features as a tensor: transformers 5 returns ``BaseModelOutputWithPooling`` (projected features in ``pooler_output``)
    from ``get_image_features``/``get_text_features``; 4.x returned the tensor itself."""
    if isinstance(features, torch.Tensor):
        return features
    pooled = getattr(features, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    raise TypeError(f"unexpected CLIP feature output {type(features).__name__}")


def _unit_rows(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy().astype(np.float32, copy=False)


def _clip_dim(bundle: ModelBundle) -> int:
    return int(bundle.model.config.projection_dim)


@torch.inference_mode()
def clip_image_embeddings(bundle: ModelBundle, images: list) -> np.ndarray:
    """(n, d) float32 L2-normalised CLIP embeddings of PIL images (one forward pass: batch outside)."""
    if not images:
        return np.zeros((0, _clip_dim(bundle)), np.float32)
    pixels = bundle.processor.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
    with autocast(bundle.device):
        out = bundle.model.get_image_features(pixel_values=pixels["pixel_values"].to(bundle.device,
                                                                                    dtype=bundle.model.dtype))
    return _unit_rows(pooled_features(out))


@torch.inference_mode()
def clip_text_embeddings(bundle: ModelBundle, texts: list[str]) -> np.ndarray:
    """(n, d) float32 L2-normalised CLIP embeddings of texts (truncated to the text tower's length)."""
    if not texts:
        return np.zeros((0, _clip_dim(bundle)), np.float32)
    max_len = int(bundle.model.config.text_config.max_position_embeddings)
    enc = bundle.processor.tokenizer(list(texts), padding=True, truncation=True, max_length=max_len,
                                     return_tensors="pt")
    with autocast(bundle.device):
        out = bundle.model.get_text_features(input_ids=enc["input_ids"].to(bundle.device),
                                             attention_mask=enc["attention_mask"].to(bundle.device))
    return _unit_rows(pooled_features(out))


# --------------------------------------------------------------------------------------------
# Whisper helpers
# --------------------------------------------------------------------------------------------


def whisper_features(bundle: ModelBundle, audios: list[np.ndarray], sr: int = 16000) -> dict[str, torch.Tensor]:
    """Log-mel ``input_features`` (n, num_mel_bins, frames) for 1-D float audio at ``sr``, on the
    model's device, padded to the model's window (longer audio is refused). No attention mask: Whisper's encoder
    attends to the padding by design, and short-form ``generate()`` does not use one."""
    fe = bundle.processor.feature_extractor
    if sr != fe.sampling_rate:
        raise ValueError(f"audio at {sr} Hz, but {bundle.name} expects {fe.sampling_rate} Hz (resample first)")
    if not audios:
        raise ValueError("whisper_features needs at least one audio array")
    arrays = [np.asarray(a, dtype=np.float32) for a in audios]
    for i, a in enumerate(arrays):
        if a.ndim != 1:
            raise ValueError(f"audio {i}: expected a 1-D mono array, got shape {a.shape}")
    longest = max(len(a) for a in arrays)
    if longest > fe.n_samples:  # Whisper would silently drop the rest
        raise ValueError(f"audio of {longest / sr:.2f} s is longer than {bundle.name}'s {fe.n_samples / sr:.1f} s "
                         "window; split it, or let preprocessing reject it (preprocess.max_duration_s)")
    feats = fe(arrays, sampling_rate=sr, return_tensors="pt")
    return {"input_features": feats["input_features"].to(bundle.device, dtype=bundle.model.dtype)}


def _language_code(language: str) -> str:
    """``en``, ``english`` or ``<|en|>`` -> ``en`` (Whisper's own table)."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    lang = language.strip().lower()
    if lang.startswith("<|") and lang.endswith("|>"):
        lang = lang[2:-2]
    if lang in LANGUAGES:
        return lang
    if lang in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[lang]
    raise ValueError(f"unknown Whisper language {language!r}")


def _english_only(gen) -> bool:
    """English-only checkpoints (``*.en``, the demo model) have no language table, or say so."""
    return getattr(gen, "is_multilingual", None) is False or not getattr(gen, "lang_to_id", None)


def _forced_after_start(gen) -> list[int]:
    """Consecutive ``forced_decoder_ids`` from position 1 (legacy configs such as ``*.en``)."""
    out: list[int] = []
    for position, token in getattr(gen, "forced_decoder_ids", None) or []:
        if position != len(out) + 1 or token is None:
            break
        out.append(int(token))
    return out


def whisper_generate_kwargs(bundle: ModelBundle, language: str | None, task: str = "transcribe") -> dict:
    """The language/task arguments to pass to ``generate()`` so it forces :func:`whisper_prompt_ids`:
    none for English-only models (which refuse them), ``language``/``task`` for multilingual ones."""
    whisper_prompt_ids(bundle, language, task)  # validates the combination
    if _english_only(bundle.model.generation_config):
        return {}
    return {"language": _language_code(language), "task": task or "transcribe"}


def whisper_prompt_ids(bundle: ModelBundle, language: str | None, task: str = "transcribe") -> list[int]:
    """The decoder prompt ``generate()`` forces before the transcript (no timestamps).

    Multilingual: ``[<|startoftranscript|>, <|lang|>, <|task|>, <|notimestamps|>]``; a language is
    required (without one, generate() detects it per utterance, so no fixed prompt exists).
    English-only (``*.en``, the demo model): ``[<|startoftranscript|>, <|notimestamps|>]``; the
    language may be omitted or English, the task must be ``transcribe``.
    """
    gen = bundle.model.generation_config
    prompt = [int(gen.decoder_start_token_id)]
    if _english_only(gen):
        if language is not None and _language_code(language) != "en":
            raise ValueError(f"{bundle.name} is an English-only Whisper; it cannot transcribe language {language!r}")
        if task not in (None, "transcribe"):
            raise ValueError(f"{bundle.name} is an English-only Whisper; task {task!r} is not available")
        prompt += _forced_after_start(gen)
    else:
        if language is None:
            raise ValueError(f"{bundle.name} is multilingual: name the language (e.g. nbest.language: en); "
                             "without one generate() detects it per utterance")
        lang_token = f"<|{_language_code(language)}|>"
        if lang_token not in gen.lang_to_id:
            raise ValueError(f"{bundle.name} has no language token {lang_token}")
        task = task or "transcribe"
        if task not in getattr(gen, "task_to_id", {}):
            raise ValueError(f"{bundle.name} has no task {task!r} (known: {sorted(getattr(gen, 'task_to_id', {}))})")
        prompt += [int(gen.lang_to_id[lang_token]), int(gen.task_to_id[task])]
    no_ts = getattr(gen, "no_timestamps_token_id", None)
    if no_ts is not None and prompt[-1] != no_ts:
        prompt.append(int(no_ts))
    return prompt


def describe_prompt(bundle: ModelBundle, ids: list[int]) -> list[str]:
    """Token strings of a prompt (for logs and reports)."""
    return bundle.processor.tokenizer.convert_ids_to_tokens(list(ids))



def load_from_params(kind: str, models_cfg: dict, role: str = "frozen") -> ModelBundle:
    """Load ``models.<kind>`` (whisper, clip, lm, audio_encoder or text_encoder) with the revision, device,
    dtype and remote-code setting that the params ``models`` section gives. ``role``: ``frozen``
    (inference only: ``models.dtype`` applies) or ``trained`` (float32, see :func:`resolve_dtype`)."""
    loader = {"whisper": load_whisper, "clip": load_clip, "lm": load_lm, "audio_encoder": load_audio_encoder,
              "text_encoder": load_text_encoder}[kind]
    device = pick_device(models_cfg["device"])
    dtype = resolve_dtype(models_cfg.get("dtype", "auto"), device, role)
    return loader(models_cfg[kind], device=device, revision=models_cfg.get(f"{kind}_revision"),
                  trust_remote_code=models_cfg["trust_remote_code"], dtype=dtype)
