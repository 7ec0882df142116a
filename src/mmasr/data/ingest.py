"""Ingestion: turn a user's corpus (generic manifest, TORGO tree, or the embedded demo) into one table.

The ingested table has one row per usable input with paths resolved and checked against the data
root; everything not usable becomes a rejects row. Paths are data, never executed or globbed.

Columns: row, utt_id, speaker, group, audio_path, text, image_path, image_id, split, source, recording_id,
task, start, end. ``start``/``end`` (seconds, NaN for a whole file) cut an utterance out of a longer
recording (``recording_id``); preprocess reads each recording once.
"""

from __future__ import annotations

import csv
import hashlib
import re
import unicodedata
from pathlib import Path

import pandas as pd

from mmasr.io import reject, rejects_frame

REQUIRED_COLUMNS = ("audio_path", "text", "speaker")
OPTIONAL_COLUMNS = ("utt_id", "image_path", "group", "split", "start", "end")
INGESTED_COLUMNS = ["row", "utt_id", "speaker", "group", "audio_path", "text", "image_path", "image_id", "split", "source",
                    "recording_id", "task", "start", "end"]
SEGMENT_COLUMNS = ("start", "end")  # seconds from the start of the recording (float; NaN: the whole file)
SPLITS = ("train", "dev", "test")

TORGO_MICS = {"array": "wav_arrayMic", "head": "wav_headMic"}
_TORGO_IMPAIRED = re.compile(r"^[FM]\d+$")
_TORGO_CONTROL = re.compile(r"^[FM]C\d+$")
_PICTURE_FILE = re.compile(r"\.(jpe?g|png|bmp|gif|tiff?)\b|input/images", re.IGNORECASE)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def slug(text: str) -> str:
    """A file-name-safe identifier: runs of other characters become '_'."""
    return _UNSAFE.sub("_", text).strip("_") or "_"


def display_path(path: Path) -> str:
    """A path relative to the working directory when inside it (stable across clones), else absolute."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def resolve_inside(root: Path, base: Path, given: str) -> Path | None:
    """Resolve ``given`` (relative to ``base``, or absolute) and return it only if it lies inside ``root``.

    Symbolic links are followed first, so a link inside the root that points outside is refused too.
    """
    candidate = Path(given)
    resolved = (candidate if candidate.is_absolute() else base / candidate).resolve()
    return resolved if resolved.is_relative_to(root.resolve()) else None


def clean_text(text: str) -> str:
    """A transcript as stored: Unicode NFC (one code point sequence per accented letter, so "café" typed
    two ways is one word) and whitespace runs (tabs, newlines, no-break spaces) as single spaces."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def _read_delimited(path: Path, sep: str) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, records and each record's first line number. Every record must have the header's
    field count: a ragged line would otherwise shift columns silently (pandas takes an extra field
    in the first record as an index column)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=sep)
            header, records, lines, start = None, [], [], 1
            for fields in reader:
                if fields:  # a blank line is no record
                    if header is None:
                        header = fields
                    elif len(fields) != len(header):
                        raise ValueError(f"{path}: line {start}: {len(fields)} fields where the header has "
                                         f"{len(header)} (a stray '{sep}' or quote?)")
                    else:
                        records.append(fields)
                        lines.append(start)
                start = reader.line_num + 1
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: manifest is not UTF-8 text ({exc}); save it as UTF-8") from None
    except csv.Error as exc:
        raise ValueError(f"{path}: line {start}: cannot parse manifest: {exc}") from None
    if header is None:
        raise ValueError(f"{path}: manifest is empty (no header line)")
    return header, records, lines


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV, TSV or Parquet manifest as strings (a transcript 'NA' stays the word 'NA').

    Column names are matched without case or surrounding spaces; extra columns are ignored. The
    ``where`` column says where each record came from ("m.csv row 7": its first line in the file,
    or its 1-based row in a Parquet file), for messages.
    """
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        try:
            df = pd.read_parquet(path).astype("string").fillna("")
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot read Parquet manifest: {exc}") from None
        where = [f"{path.name} row {i + 1}" for i in range(len(df))]
    elif suffix in (".csv", ".tsv", ".tab", ".txt"):
        header, records, lines = _read_delimited(path, "," if suffix == ".csv" else "\t")
        df = pd.DataFrame(records, columns=range(len(header)), dtype=object)
        df.columns = header
        where = [f"{path.name} row {n}" for n in lines]
    else:
        raise ValueError(f"{path}: unsupported manifest format '{suffix}' (use .csv, .tsv or .parquet)")
    df.columns = [str(c).strip().lower() for c in df.columns]
    known = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
    twice = sorted({c for c in df.columns if c in known and list(df.columns).count(c) > 1})
    if twice:
        raise ValueError(f"{path}: manifest has column(s) {', '.join(repr(c) for c in twice)} more than once "
                         f"(names are matched without case)")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: manifest is missing required column(s) {', '.join(repr(c) for c in missing)} "
                         f"(found: {', '.join(df.columns)})")
    df = df.loc[:, [c for c in known if c in df.columns]]
    if df.empty:
        raise ValueError(f"{path}: manifest has a header but no rows")
    for col in OPTIONAL_COLUMNS:
        if col not in df.columns:
            df[col] = ""
    df = df.map(lambda v: v.strip() if isinstance(v, str) else v)
    df["where"] = where
    return df


def image_id_for(image_path: Path, root: Path) -> str:
    """A readable picture id: its path below the data root, without suffix (see :func:`unique_image_ids`)."""
    return slug(str(image_path.relative_to(root.resolve()).with_suffix("")))


def unique_image_ids(rows: list[dict], root: Path) -> None:
    """Where different pictures got the same id ("p1.jpg" and "p1.png", "a b.png" and "a_b.png"), give each
    of them a short hash of its path below the root, so no utterance is shown another one's picture."""
    paths: dict[str, set[str]] = {}
    for r in rows:
        if r["image_id"]:
            paths.setdefault(r["image_id"], set()).add(r["image_path"])
    for r in rows:
        if r["image_id"] and len(paths[r["image_id"]]) > 1:
            rel = Path(r["image_path"]).resolve().relative_to(root.resolve()).as_posix()
            r["image_id"] += "-" + hashlib.sha1(rel.encode()).hexdigest()[:8]


def ingest_manifest(manifest: str | Path, root: str | Path | None = None, source: str = "manifest"):
    """Read a generic manifest; return (ingested table, rejects table).

    Paths are relative to the manifest's folder; each must resolve inside ``root`` (default: that folder).
    """
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: manifest not found")
    base = manifest.resolve().parent
    root_dir = Path(root).resolve() if root else base
    df = read_table(manifest)
    rows, rejects, seen = [], [], {}
    for i, rec in enumerate(df.to_dict("records")):
        where = rec["where"]
        audio_given = rec["audio_path"]
        recording_id = slug(str(Path(audio_given).with_suffix(""))) if audio_given else ""
        start, end = segment_bounds(rec["start"], rec["end"], f"{manifest}: {where}")
        utt_id = rec["utt_id"] or (recording_id if start is None else f"{recording_id}_{round(start * 1000)}_{round(end * 1000)}")
        if not rec["speaker"]:
            rejects.append(reject(utt_id, audio_given, "utterance", "ingest", "missing_speaker", f"{where}: empty speaker"))
            continue
        if rec["split"] and rec["split"] not in SPLITS:
            raise ValueError(f"{manifest}: {where}: split '{rec['split']}' is not one of {', '.join(SPLITS)}")
        audio = resolve_inside(root_dir, base, audio_given) if audio_given else None
        if audio is None:
            reason = "path_outside_root" if audio_given else "missing_audio"
            rejects.append(reject(utt_id, audio_given, "utterance", "ingest", reason,
                                  f"{where}: audio path resolves outside the data root {root_dir}" if audio_given
                                  else f"{where}: empty audio_path"))
            continue
        if utt_id in seen:
            rejects.append(reject(utt_id, audio_given, "utterance", "ingest", "duplicate_id",
                                  f"{where}: utt_id already used by {seen[utt_id]}"))
            continue
        seen[utt_id] = where
        text = clean_text(rec["text"])
        if not has_words(text):
            rejects.append(reject(utt_id, audio_given, "utterance", "ingest", "empty_transcript",
                                  f"{where}: transcript {rec['text']!r} has no words"))
            continue
        image_path = image_id = None
        if rec["image_path"]:
            image = resolve_inside(root_dir, base, rec["image_path"])
            if image is None:
                rejects.append(reject(utt_id, rec["image_path"], "image", "ingest", "path_outside_root",
                                      f"{where}: picture path resolves outside the data root {root_dir}"))
            else:
                image_path, image_id = display_path(image), image_id_for(image, root_dir)
        rows.append({"row": i, "utt_id": utt_id, "speaker": rec["speaker"], "group": rec["group"] or "unknown",
                     "audio_path": display_path(audio), "text": text, "image_path": image_path,
                     "image_id": image_id, "split": rec["split"] or None, "source": source,
                     "recording_id": recording_id if start is not None else utt_id, "task": None,
                     "start": start, "end": end})
    unique_image_ids(rows, root_dir)
    return ingested_frame(rows), rejects_frame(rejects)


def torgo_group(speaker: str) -> str:
    """TORGO naming: F0x/M0x are speakers with dysarthria, FC0x/MC0x are controls."""
    if _TORGO_CONTROL.match(speaker):
        return "control"
    if _TORGO_IMPAIRED.match(speaker):
        return "impaired"
    return "unknown"


def has_words(text: str) -> bool:
    """A transcript needs at least one letter or digit (any script); whitespace or punctuation is empty."""
    return any(ch.isalnum() for ch in text)


def torgo_prompt_problem(text: str) -> str | None:
    """Why a TORGO prompt cannot serve as a transcript, or None when it can."""
    if not has_words(text):
        return "empty_transcript"
    if text.strip().startswith("[") and text.strip().endswith("]"):
        return "instruction_prompt"
    if _PICTURE_FILE.search(text):
        return "picture_prompt"
    return None


def ingest_torgo(root: str | Path, mic: str = "array"):
    """Read a TORGO tree ``<SPK>/Session<N>/{wav_arrayMic,wav_headMic,prompts}/NNNN.{wav,txt}``.

    The preferred microphone is used where a session has it, the other one otherwise.
    Utterance ids are ``<SPK>_S<N>_<mic>_<NNNN>``.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: TORGO root not found")
    order = [mic] + [m for m in TORGO_MICS if m != mic]
    rows, rejects = [], []
    for spk_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        speaker = spk_dir.name
        for session in sorted(spk_dir.glob("Session*")):
            session_no = re.sub(r"\D", "", session.name) or session.name
            prompts = session / "prompts"
            chosen = next((m for m in order if (session / TORGO_MICS[m]).is_dir()), None)
            if chosen is None:
                for txt in sorted(prompts.glob("*.txt")):
                    rejects.append(reject(None, display_path(txt), "utterance", "ingest", "missing_audio",
                                          f"{session}: no wav_arrayMic or wav_headMic folder"))
                continue
            for wav in sorted((session / TORGO_MICS[chosen]).glob("*.wav")):
                utt_id = f"{speaker}_S{session_no}_{chosen}_{wav.stem}"
                prompt = prompts / f"{wav.stem}.txt"
                if not prompt.is_file():
                    rejects.append(reject(utt_id, display_path(wav), "utterance", "ingest", "missing_transcript",
                                          f"no prompt file {prompt.relative_to(root)}"))
                    continue
                text = clean_text(prompt.read_text(errors="replace"))
                problem = torgo_prompt_problem(text)
                if problem:
                    rejects.append(reject(utt_id, display_path(wav), "utterance", "ingest", problem,
                                          f"prompt {prompt.relative_to(root)}: {text[:80]!r}"))
                    continue
                rows.append({"row": len(rows) + len(rejects), "utt_id": utt_id, "speaker": speaker,
                             "group": torgo_group(speaker), "audio_path": display_path(wav), "text": text,
                             "image_path": None, "image_id": None, "split": None, "source": "torgo",
                             "recording_id": utt_id, "task": None, "start": None, "end": None})
    return ingested_frame(rows), rejects_frame(rejects)


def segment_bounds(start: str, end: str, where: str) -> tuple[float | None, float | None]:
    """A manifest row's optional ``start``/``end`` (seconds, as Kaldi ``segments`` and Lhotse supervisions
    give them): both empty for a whole file, else two numbers with 0 <= start < end; an error naming the row."""
    if not start and not end:
        return None, None
    try:
        a, b = float(start), float(end)
    except ValueError:
        raise ValueError(f"{where}: start/end must both be numbers of seconds (got {start!r}, {end!r})") from None
    if not 0 <= a < b:
        raise ValueError(f"{where}: segment start {a} s must be >= 0 and before its end {b} s")
    return a, b


def ingested_frame(rows: list[dict]) -> pd.DataFrame:
    """The ingested table of ``rows`` (dicts with :data:`INGESTED_COLUMNS`), with its column types."""
    df = pd.DataFrame(rows, columns=INGESTED_COLUMNS)
    df["row"] = df["row"].astype("int64")
    for col in INGESTED_COLUMNS[1:]:
        df[col] = df[col].astype("float64" if col in SEGMENT_COLUMNS else "string")
    return df


def ingest(data_cfg: dict, demo_dir: str | Path | None = None):
    """Dispatch on ``data.source`` (demo, manifest, torgo; :func:`mmasr.data.sources.ingest` adds chat and
    lhotse, whose modules import this one); return (ingested, rejects)."""
    source = data_cfg["source"]
    if source == "demo":
        if demo_dir is None:
            raise ValueError("data.source=demo needs the generated demo folder")
        return ingest_manifest(Path(demo_dir) / "manifest.csv", source="demo")
    if source == "manifest":
        if not data_cfg.get("manifest"):
            raise ValueError("data.source=manifest needs data.manifest (path of a CSV, TSV or Parquet file)")
        return ingest_manifest(data_cfg["manifest"], data_cfg.get("root"))
    if source == "torgo":
        if not data_cfg.get("torgo_root"):
            raise ValueError("data.source=torgo needs data.torgo_root (folder holding F01, FC01, ...)")
        return ingest_torgo(data_cfg["torgo_root"], data_cfg.get("torgo_mic", "array"))
    if source in ("chat", "lhotse"):  # their modules import this one: mmasr.data.sources dispatches to them
        raise ValueError(f"data.source={source} is read through mmasr.data.sources.ingest")
    raise ValueError(f"unknown data.source '{source}'")
