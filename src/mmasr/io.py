"""Atomic writers and the shared rejects table.

Every output is written to a temporary file beside its final path and renamed into place, so a
killed job or a full disk never leaves a valid-looking output behind (rename is atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

REJECT_COLUMNS = ["id", "path", "kind", "stage", "reason", "detail"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the destination's folder; rename it to ``path`` on success.

    On any exception the temporary file is removed and nothing appears at ``path``.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{final.name}.", suffix=suffix if suffix is not None else final.suffix + ".tmp",
        dir=final.parent,
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
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
