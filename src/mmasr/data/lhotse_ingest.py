"""``data.source: lhotse``: a Lhotse manifest (a CutSet, or a RecordingSet + SupervisionSet) as ingested rows.

Every corpus with a Lhotse recipe (CMU Kids, CSLU Kids, LibriSpeech, ...) comes in this way. One row per
supervision: its id is the utterance id, its text the transcript, its speaker the speaker; its ``custom``
fields may carry ``image_path`` (the picture, relative to the manifest's folder), ``group`` and ``split``.
A supervision that covers only part of its recording becomes a segment: ``recording_id`` plus ``start`` and
``end`` in seconds from the recording's start (a cut's supervision: from the cut's start plus the cut's
offset), which ``preprocess`` cuts out; one covering the whole recording (within 1 ms) is a whole-file row.

Relative audio paths in the manifest are read relative to the manifest's folder and, like every path,
must resolve inside ``data.root`` (default: that folder). Anything that cannot be used (a supervision
whose recording is missing from the RecordingSet, a missing audio file, a segment outside its
recording, a recording that is not one plain file, a mixed or padding cut) becomes a rejects row.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mmasr.data.ingest import (SPLITS, clean_text, display_path, has_words, image_id_for,
                               ingested_frame, resolve_inside, unique_image_ids)
from mmasr.io import reject, rejects_frame

__all__ = ["ingest_lhotse", "lhotse_inputs", "WHOLE_FILE_TOLERANCE_S"]

WHOLE_FILE_TOLERANCE_S = 1e-3  # a supervision within this of the recording's bounds covers the whole file


def lhotse_inputs(data_cfg: dict) -> list[Path]:
    """The manifest file(s) the params name: ``lhotse_cuts``, or ``lhotse_recordings`` + ``lhotse_supervisions``."""
    cuts, recs, sups = (data_cfg.get(k) for k in ("lhotse_cuts", "lhotse_recordings", "lhotse_supervisions"))
    if cuts and (recs or sups):
        raise ValueError("data.source=lhotse takes data.lhotse_cuts or data.lhotse_recordings + "
                         "data.lhotse_supervisions, not both")
    if cuts:
        return [Path(cuts)]
    if recs and sups:
        return [Path(recs), Path(sups)]
    raise ValueError("data.source=lhotse needs data.lhotse_cuts (a CutSet, e.g. cuts.jsonl.gz) or both "
                     "data.lhotse_recordings and data.lhotse_supervisions")


def _load(path: Path, kind: str):
    from lhotse import load_manifest

    if not path.is_file():
        raise FileNotFoundError(f"{path}: Lhotse {kind} manifest not found")
    try:
        manifest = load_manifest(path)
    except Exception as exc:  # lhotse raises what its JSON / YAML readers raise
        raise ValueError(f"{path}: cannot read as a Lhotse manifest: {exc}") from None
    if type(manifest).__name__ != kind:
        raise ValueError(f"{path}: holds a Lhotse {type(manifest).__name__}, data.source=lhotse expected a {kind} here")
    return manifest


def _pairs(data_cfg: dict):
    """(where, supervision, recording or None, offset s) for every supervision, in manifest order, and the
    manifest path relative paths are read from."""
    files = lhotse_inputs(data_cfg)
    if len(files) == 1:
        cuts = _load(files[0], "CutSet")
        out = []
        for n, cut in enumerate(cuts):
            recording = getattr(cut, "recording", None) if getattr(cut, "has_recording", False) else None
            if recording is None:
                out.append((f"{files[0].name} cut {n + 1} ({cut.id})", None, None, type(cut).__name__))
                continue
            for sup in cut.supervisions:
                out.append((f"{files[0].name} cut {cut.id}", sup, recording, float(cut.start)))
        return out, files[0]
    recordings, supervisions = _load(files[0], "RecordingSet"), _load(files[1], "SupervisionSet")
    out = []
    for sup in supervisions:
        rec = recordings[sup.recording_id] if sup.recording_id in recordings else None
        out.append((f"{files[1].name} supervision {sup.id}", sup, rec, 0.0))
    return out, files[0]


def _audio_problem(recording, root: Path, base: Path) -> tuple[Path | None, str, str]:
    """The recording's audio file inside the root, or None with (reason, detail)."""
    sources = list(recording.sources)
    if len(sources) != 1 or sources[0].type != "file":
        kinds = ", ".join(s.type for s in sources) or "none"
        return None, "unsupported_recording", (f"recording {recording.id}: audio sources {kinds}: the pipeline reads "
                                               f"one audio file per recording")
    if getattr(recording, "transforms", None):
        return None, "unsupported_recording", (f"recording {recording.id} has Lhotse transforms (speed, resampling, "
                                               f"...): give the plain file")
    audio = resolve_inside(root, base, str(sources[0].source))
    if audio is None:
        return None, "path_outside_root", f"recording {recording.id}: {sources[0].source} resolves outside {root}"
    if not audio.is_file():
        return None, "missing_audio", f"recording {recording.id}: audio file {display_path(audio)} not found"
    return audio, "", ""


def ingest_lhotse(data_cfg: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the Lhotse manifest(s) ``data_cfg`` names; return (ingested table, rejects table)."""
    pairs, manifest = _pairs(data_cfg)
    base = manifest.resolve().parent
    root = Path(data_cfg["root"]).resolve() if data_cfg.get("root") else base
    rows, rejects, seen = [], [], {}
    for n, (where, sup, recording, offset) in enumerate(pairs):
        if sup is None:
            rejects.append(reject(None, str(manifest), "utterance", "ingest", "unsupported_cut",
                                  f"{where}: a {offset} has no single recording to read"))
            continue
        if recording is None:
            rejects.append(reject(sup.id, None, "utterance", "ingest", "missing_recording",
                                  f"{where}: recording {sup.recording_id!r} is not in {manifest}"))
            continue
        audio, reason, detail = _audio_problem(recording, root, base)
        if audio is None:
            rejects.append(reject(sup.id, str(recording.sources[0].source) if recording.sources else None,
                                  "utterance", "ingest", reason, f"{where}: {detail}"))
            continue
        custom = sup.custom or {}
        if not sup.speaker:
            rejects.append(reject(sup.id, display_path(audio), "utterance", "ingest", "missing_speaker",
                                  f"{where}: no speaker"))
            continue
        if sup.id in seen:
            rejects.append(reject(sup.id, display_path(audio), "utterance", "ingest", "duplicate_id",
                                  f"{where}: supervision id already used by {seen[sup.id]}"))
            continue
        seen[sup.id] = where
        start, end = offset + float(sup.start), offset + float(sup.end)
        if start < -WHOLE_FILE_TOLERANCE_S or end > recording.duration + WHOLE_FILE_TOLERANCE_S:
            rejects.append(reject(sup.id, display_path(audio), "utterance", "ingest", "segment_outside_recording",
                                  f"{where}: {start:.3f}-{end:.3f} s lies outside recording {recording.id} "
                                  f"(0-{recording.duration:.3f} s)"))
            continue
        whole = start <= WHOLE_FILE_TOLERANCE_S and end >= recording.duration - WHOLE_FILE_TOLERANCE_S
        text = clean_text(sup.text or "")
        if not has_words(text):
            rejects.append(reject(sup.id, display_path(audio), "utterance", "ingest", "empty_transcript",
                                  f"{where}: transcript {sup.text!r} has no words"))
            continue
        split = str(custom.get("split") or "") or None
        if split is not None and split not in SPLITS:
            raise ValueError(f"{where}: custom split {split!r} is not one of {', '.join(SPLITS)}")
        image_path = image_id = None
        if custom.get("image_path"):
            image = resolve_inside(root, base, str(custom["image_path"]))
            if image is None:
                rejects.append(reject(sup.id, str(custom["image_path"]), "image", "ingest", "path_outside_root",
                                      f"{where}: picture path resolves outside the data root {root}"))
            else:
                image_path, image_id = display_path(image), image_id_for(image, root)
        rows.append({"row": n, "utt_id": sup.id, "speaker": str(sup.speaker), "group": str(custom.get("group") or "unknown"),
                     "audio_path": display_path(audio), "text": text, "image_path": image_path, "image_id": image_id,
                     "split": split, "source": "lhotse", "recording_id": recording.id,
                     "task": str(custom["task"]) if custom.get("task") else None,
                     "start": None if whole else round(start, 6), "end": None if whole else round(end, 6)})
    unique_image_ids(rows, root)
    return ingested_frame(rows), rejects_frame(rejects)
