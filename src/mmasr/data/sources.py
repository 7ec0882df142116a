"""Every ``data.source`` in one dispatcher: the ones :mod:`mmasr.data.ingest` reads itself (demo, manifest,
torgo) and those read by their own modules on top of its helpers (chat: :mod:`mmasr.data.chat`; lhotse:
:mod:`mmasr.data.lhotse_ingest`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mmasr.data import ingest as base
from mmasr.io import rejects_frame

__all__ = ["ingest", "ingest_chat_source"]


def ingest_chat_source(data_cfg: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``data.source: chat``: the params ``data`` section -> (ingested, rejects)."""
    from mmasr.data.chat import ingest_chat

    if not data_cfg.get("chat_root"):
        raise ValueError("data.source=chat needs data.chat_root (folder of .cha transcripts)")
    rows, rejects = ingest_chat(
        data_cfg["chat_root"], data_cfg.get("chat_media_root"), tuple(data_cfg.get("chat_participants") or ("PAR",)),
        data_cfg.get("chat_group_field", "group"), data_cfg.get("chat_groups") or {},
        data_cfg.get("chat_reference", "target"), data_cfg.get("task_pictures"), data_cfg.get("root"))
    return base.ingested_frame([{"row": i, **r} for i, r in enumerate(rows)]), rejects_frame(rejects)


def ingest(data_cfg: dict, demo_dir: str | Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Dispatch on ``data.source``; return (ingested, rejects)."""
    if data_cfg["source"] == "chat":
        return ingest_chat_source(data_cfg)
    if data_cfg["source"] == "lhotse":
        from mmasr.data.lhotse_ingest import ingest_lhotse

        return ingest_lhotse(data_cfg)
    return base.ingest(data_cfg, demo_dir)
