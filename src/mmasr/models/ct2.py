"""A CTranslate2 copy of a loaded Hugging Face Whisper, for the n-best stage's ``ctranslate2`` backend.

The copy is made once by ctranslate2's own converter (``TransformersConverter``) from the very files the
pipeline loaded (a local folder, or a hub id's snapshot in the local HF cache: never downloaded), and
cached under ``data/cache/ct2/<revision>-<compute_type>/``, keyed by the model's revision (a content
hash of a local folder, a hub commit) and the compute type it is quantised to. The conversion is
written into a temporary folder and renamed into place under a file lock: a killed conversion leaves
nothing valid-looking, and concurrent n-best shards convert once and share the result.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from mmasr.io import atomic_dir
from mmasr.models.loading import ModelBundle, is_local_name, quiet_hf_progress

log = logging.getLogger(__name__)

DEFAULT_CT2_CACHE = Path("data/cache/ct2")
COMPUTE_TYPES = ("float32", "int8", "float16")  # nbest.compute_type (the schema's choices)
SOURCE_FILE = "mmasr_source.json"  # written last into the converted folder: what it was made from
_INSTALL_HINT = "pip install 'mmasr[real-whisper]' (ctranslate2 4.8.5)"


def _ctranslate2():
    try:
        import ctranslate2
    except ImportError as exc:
        raise ImportError(f"nbest.backend: ctranslate2 needs the ctranslate2 package: {_INSTALL_HINT}") from exc
    return ctranslate2


def ct2_device(bundle: ModelBundle) -> str:
    """The CTranslate2 device for the bundle's torch device (cpu or cuda; MPS has no CTranslate2 backend)."""
    if bundle.device.type not in ("cpu", "cuda"):
        raise ValueError(f"nbest.backend: ctranslate2 runs on cpu or cuda, not {bundle.device} "
                         "(set models.device to cpu, or use nbest.backend: transformers)")
    return bundle.device.type


def check_compute_type(compute_type: str, device: str) -> None:
    """Refuse a compute type this machine's CTranslate2 cannot run (e.g. float16 on a CPU)."""
    if compute_type not in COMPUTE_TYPES:
        raise ValueError(f"nbest.compute_type {compute_type!r} is not one of {', '.join(COMPUTE_TYPES)}")
    supported = _ctranslate2().get_supported_compute_types(device)
    if compute_type not in supported:
        raise ValueError(f"nbest.compute_type {compute_type} is not supported by CTranslate2 on {device} here "
                         f"(supported: {', '.join(sorted(supported))})")


def ct2_cache_dir(revision: str, compute_type: str, cache_root: str | Path = DEFAULT_CT2_CACHE) -> Path:
    """``<cache_root>/<revision>-<compute_type>``, the revision made file-name safe (``sha256:ab..`` -> ``sha256-ab..``)."""
    if not revision or revision == "unknown":
        raise ValueError("cannot cache a CTranslate2 conversion of a model whose revision is unknown")
    return Path(cache_root) / f"{re.sub(r'[^A-Za-z0-9._-]', '-', revision)}-{compute_type}"


def hf_source_dir(bundle: ModelBundle) -> Path:
    """The folder holding the bundle's Hugging Face files: the local folder, or a hub id's cached snapshot."""
    if is_local_name(bundle.name):
        return Path(bundle.name).expanduser()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(bundle.name, revision=bundle.revision, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - re-raised with the model's name and the fix
        raise FileNotFoundError(f"{bundle.name} (revision {bundle.revision}) is not fully in the local HF cache, "
                                f"so it cannot be converted for CTranslate2 offline ({type(exc).__name__}: {exc})") from exc


def is_converted(folder: Path) -> bool:
    """A finished conversion: the source record is written last, inside the atomically renamed folder."""
    return (folder / SOURCE_FILE).is_file() and (folder / "model.bin").is_file()


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock (concurrent shards wait for the one converting)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert_to_ct2(bundle: ModelBundle, compute_type: str, cache_root: str | Path = DEFAULT_CT2_CACHE) -> Path:
    """The bundle's model converted to CTranslate2 at ``compute_type`` (cached; converted on first use)."""
    ct2 = _ctranslate2()
    out = ct2_cache_dir(bundle.revision, compute_type, cache_root)
    if is_converted(out):
        return out
    with _locked(out.with_name(f".{out.name}.lock")):
        if is_converted(out):  # another job converted it while this one waited
            return out
        source = hf_source_dir(bundle)
        log.info("converting %s (revision %s) to CTranslate2 %s in %s", bundle.name, bundle.revision, compute_type, out)
        with atomic_dir(out) as tmp, quiet_hf_progress():
            # The converter wants to create its output folder itself.
            ct2.converters.TransformersConverter(str(source)).convert(str(tmp / "model"), quantization=compute_type)
            for path in (tmp / "model").iterdir():
                path.rename(tmp / path.name)
            (tmp / "model").rmdir()
            (tmp / SOURCE_FILE).write_text(json.dumps(
                {"model": bundle.name, "revision": bundle.revision, "compute_type": compute_type,
                 "ctranslate2": ct2.__version__}, indent=2, sort_keys=True) + "\n")
    return out


@functools.lru_cache(maxsize=4)
def _load(folder: str, device: str, compute_type: str, threads: int):
    return _ctranslate2().models.Whisper(folder, device=device, compute_type=compute_type, intra_threads=threads)


def load_ct2_whisper(bundle: ModelBundle, compute_type: str, cache_root: str | Path = DEFAULT_CT2_CACHE,
                     threads: int | None = None):
    """``ctranslate2.models.Whisper`` for the bundle at ``compute_type``, on the bundle's device (converted
    and cached on first use; loaded once per process). ``threads``: CTranslate2's intra-op threads
    (default: torch's, which ``--threads`` / ``MMASR_THREADS`` set)."""
    import torch

    device = ct2_device(bundle)
    check_compute_type(compute_type, device)
    folder = convert_to_ct2(bundle, compute_type, cache_root)
    return _load(str(folder.resolve()), device, compute_type, int(threads or torch.get_num_threads()))
