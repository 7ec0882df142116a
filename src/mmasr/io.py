"""Atomic writers and the shared rejects table.

Every output is written to a temporary file beside its final path and renamed into place, so a
killed job or a full disk never leaves a valid-looking output behind (rename is atomic on POSIX).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

REJECT_COLUMNS = ["id", "path", "kind", "stage", "reason", "detail"]


_TMP_TOKEN = r"[a-z0-9_]{8}"  # tempfile's random part: 8 characters from this alphabet


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _umask()  # the process's umask, read once (os.umask can only be read by setting it)


_HIDDEN: dict[tuple[str, int], list[str]] = {}  # (folder, inode) -> its dot-names when this process first wrote there


def _stale_temporaries(folder: Path, name: str, suffixes: tuple[str, ...]) -> list[Path]:
    """Temporaries an earlier, killed writer of ``folder/name`` left behind (``.NAME.XXXXXXXX<suffix>``).

    The folder is listed once per process (a sorted index of its dot-names), not once per write, so
    writing n files into one folder stays O(n log n). Only temporaries of the same final name are
    returned: another job writing a different file into the same folder is never disturbed.
    """
    try:
        key = (os.path.abspath(folder), folder.stat().st_ino)
        names = _HIDDEN.get(key)
        if names is None:
            with os.scandir(folder) as entries:
                names = _HIDDEN[key] = sorted(e.name for e in entries if e.name.startswith("."))
    except OSError:
        return []
    pattern = re.compile(re.escape(f".{name}.") + _TMP_TOKEN + "(" + "|".join(map(re.escape, suffixes)) + ")$")
    prefix = f".{name}."
    found = []
    for i in range(bisect.bisect_left(names, prefix), len(names)):
        if not names[i].startswith(prefix):
            break
        if pattern.match(names[i]):
            found.append(folder / names[i])
    return found


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the destination's folder; rename it to ``path`` on success.

    On any exception (a full disk, a permission error, a bug in the writer) the temporary file is
    removed and nothing new appears at ``path``: a file already there stays as it was. Temporaries
    left by a writer that was killed outright (SIGKILL cannot be cleaned up after) are removed the
    next time the same path is written. The file gets the usual permissions (0666 less the umask),
    not the owner-only mode of a temporary file.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else final.suffix + ".tmp"
    for stale in _stale_temporaries(final.parent, final.name, (suffix,)):
        _remove(stale)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole.

    A folder already at ``path`` is first renamed aside, then the new one is renamed into place and
    the old one deleted, so ``path`` is at every moment either the old folder or the complete new
    one (or briefly absent), never a half-deleted or half-written one. On any exception the
    temporary folder is removed and ``path`` is left as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_temporaries(final.parent, final.name, (".tmp", ".old")):
        _remove(stale)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~UMASK)
        if final.exists() or final.is_symlink():
            old = tmp.with_name(tmp.name[: -len(".tmp")] + ".old")
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
            _remove(old)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as pretty, key-sorted JSON (stable bytes for git and ``dvc metrics diff``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_parquet(path: str | os.PathLike, df: pd.DataFrame, metadata: dict[str, str] | None = None) -> None:
    """Write a DataFrame to Parquet atomically, with optional key/value file metadata."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_csv(path: str | os.PathLike, df: pd.DataFrame) -> None:
    """Write a DataFrame as CSV atomically, floats with 6 decimals (stable bytes for ``dvc plots diff``)."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6f")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``mmasr.*`` key/value metadata of a Parquet file (model, decoding settings, ...)."""
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if k.startswith(b"mmasr.")}


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def reject(id_: str | None, path: str | None, kind: str, stage: str, reason: str, detail: str = "") -> dict:
    """One row of the rejects table: what was not used, where, and why."""
    return {"id": id_, "path": path, "kind": kind, "stage": stage, "reason": reason, "detail": detail}


def rejects_frame(rows: list[dict]) -> pd.DataFrame:
    """The rejects table with a fixed schema, also when empty."""
    return pd.DataFrame(rows, columns=REJECT_COLUMNS).astype("string")
