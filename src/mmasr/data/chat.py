"""TalkBank CHAT input (``data.source: chat``): AphasiaBank, DementiaBank Pitt, CHILDES picture descriptions.

A folder of ``.cha`` transcripts, each the transcript of one long recording (its ``@Media``), is read
with pylangacq (TalkBank's own grammar, via rustling); nothing here parses CHAT markup. Every main-tier
line of the chosen participants becomes one utterance row cut from the recording by its time bullet
(``start``, ``end`` in seconds; preprocess reads each recording once and cuts the segments), with its
task from the last ``@G`` gem before it and the task's picture from ``data.task_pictures``.

Reference text (``data.chat_reference``): ``target`` is pylangacq's token view (``[: target]``
replacements applied; retraced words, fillers ``&-uh``, fragments ``&+pr``, pauses and unintelligible
words removed); ``audible`` is what was said (repetitions, fillers and fragments kept). Events
(``&=laughs``), terminators and pauses are removed from both.

Nothing is dropped silently: an utterance with ``xxx``/``yyy``/``www`` (``unintelligible``), without a
bullet (``missing_bullet``), with a bullet beyond the end of the media (``bullet_outside_media``), with
a bullet that overlaps the same speaker's previous one (``overlapping_bullet``), without words
(``empty_transcript``) or whose media file is missing or unreadable (``missing_audio``,
``unreadable_audio``) becomes a rejects row. A ``.cha`` file that does not parse is an error naming it.
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import soundfile as sf

from mmasr.data.ingest import clean_text, display_path, has_words, image_id_for, resolve_inside, slug
from mmasr.io import reject

log = logging.getLogger(__name__)

UNINTELLIGIBLE = ("xxx", "yyy", "www")
MEDIA_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".WAV", ".FLAC", ".MP3")
REFERENCES = ("target", "audible")
BULLET_TOLERANCE_S = 0.05  # a bullet may end this far past the media's last sample (rounding to ms)
_GEM = re.compile(r"^@G:\s*(.*?)\s*$")


def target_words(tokens) -> list[str]:
    """The words of pylangacq's token view (already the target: replacements applied, retracings, fillers,
    fragments, pauses and unintelligible words removed); terminators and other non-words dropped,
    compounds (``ice+cream``, ``ice_cream``) split."""
    words = []
    for tok in tokens or ():
        word = tok.word or ""
        if word.lower() in UNINTELLIGIBLE or not has_words(word):
            continue
        words.extend(re.sub(r"[+_]", " ", word).split())
    return words


def audible_words(audible: str) -> list[str]:
    """The words of pylangacq's ``audible`` view (what was said): events (``&=laughs``), other speakers'
    interjections (``&*INV:yeah``, shown as ``*INVyeah``), terminators (``.``, ``+...``), and ``xxx``/
    ``yyy``/``www`` removed."""
    words = []
    for tok in (audible or "").split():
        if tok.startswith(("&=", "*", "+")) or tok.lower() in UNINTELLIGIBLE or not has_words(tok):
            continue
        words.extend(re.sub(r"[+_]", " ", tok.lstrip("&")).split())
    return words


def is_unintelligible(audible: str) -> bool:
    """Whether the utterance holds ``xxx``, ``yyy`` or ``www`` (unintelligible, phonological, untranscribed)."""
    return any(tok.lower().strip(".,?!") in UNINTELLIGIBLE for tok in (audible or "").split())


def leading_gem(text: str) -> str | None:
    """The last ``@G`` line before the first main tier: pylangacq 0.23 folds it into the file headers."""
    gem = None
    for line in text.splitlines():
        if line.startswith("*"):
            break
        m = _GEM.match(line)
        if m:
            gem = m.group(1)
    return gem


def parse_chat(path: Path):
    """(file text, pylangacq CHAT) for one ``.cha`` file; a clear ValueError naming the file when it does
    not parse. Parsed strictly from the text (``read_chat(strict=True)`` would also refuse an ``@Media`` name
    other than the file's, which TalkBank corpora have)."""
    import pylangacq

    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 CHAT file ({exc})") from None
    if "@Begin" not in text or not re.search(r"^\*[A-Z0-9]+:", text, re.MULTILINE):
        raise ValueError(f"{path}: malformed CHAT file: no @Begin header or no main-tier line (*PAR: ...)")
    try:
        chat = pylangacq.CHAT.from_strs([text], strict=True)
    except ValueError as exc:
        detail = str(exc).split(": ", 1)[-1]  # pylangacq names an in-memory string by a random id
        raise ValueError(f"{path}: malformed CHAT file: {detail}") from None
    return text, chat


def find_media(name: str, rel_dir: Path, media_root: Path) -> Path | None:
    """The media file named ``name`` (the ``@Media`` header, without suffix) in ``media_root``, under the
    transcript's own sub-folder first, then at the top; None when absent."""
    for folder in (media_root / rel_dir, media_root):
        for suffix in ("", *MEDIA_SUFFIXES):
            cand = folder / f"{name}{suffix}"
            if cand.is_file() and (suffix or cand.suffix):
                return cand
    return None


def read_task_pictures(path: str | Path, root: str | Path | None) -> tuple[dict[str, tuple[str, str]], Path]:
    """``task -> (image_path, image_id)`` from a CSV with columns task, image_path (paths relative to the
    CSV, inside ``root``, default the CSV's folder); an error naming the file for a missing column, a task
    listed twice or a path outside the root."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data.task_pictures not found")
    base = path.resolve().parent
    root_dir = Path(root).resolve() if root else base
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in reader.fieldnames or []]
        if "task" not in fields or "image_path" not in fields:
            raise ValueError(f"{path}: task_pictures needs columns task, image_path (found: {', '.join(fields)})")
        out: dict[str, tuple[str, str]] = {}
        for n, rec in enumerate(reader, start=2):
            rec = {k.strip().lower(): (v or "").strip() for k, v in rec.items() if k}
            task, given = rec["task"], rec["image_path"]
            if not task or not given:
                raise ValueError(f"{path}: line {n}: empty task or image_path")
            if task in out:
                raise ValueError(f"{path}: line {n}: task {task!r} is listed twice")
            image = resolve_inside(root_dir, base, given)
            if image is None:
                raise ValueError(f"{path}: line {n}: picture {given!r} resolves outside the data root {root_dir}")
            out[task] = (display_path(image), image_id_for(image, root_dir))
    return out, root_dir


def _speaker_info(header, code: str, group_field: str, groups: dict[str, str]) -> str:
    """The group of participant ``code`` from its ``@ID`` field ``group_field``, mapped by ``groups``."""
    for p in header.participants:
        if p.code == code:
            value = getattr(p, group_field, None)
            value = "" if value is None else str(value).strip()
            return groups.get(value, value or "unknown")
    return "unknown"


def chat_file_rows(path: Path, root: Path, media_root: Path, participants: tuple[str, ...], group_field: str,
                   groups: dict[str, str], reference: str, pictures: dict[str, tuple[str, str]] | None
                   ) -> tuple[list[dict], list[dict]]:
    """(rows, rejects) of one transcript; see the module docstring."""
    text, chat = parse_chat(path)
    header = chat.headers()[0]
    stem = path.stem
    media_name = (header.media or {}).get("filename") or stem
    rel_dir = path.resolve().parent.relative_to(root)
    media = find_media(media_name, rel_dir, media_root)
    where = display_path(path)
    media_problem, duration = None, None
    if media is None:
        media_problem = ("missing_audio", f"{where}: no media file {media_name}{{{','.join(MEDIA_SUFFIXES[:4])}}} "
                                          f"under {media_root} (its @Media)")
    else:
        try:
            duration = sf.info(str(media)).duration
        except Exception as exc:  # libsndfile's errors do not share one type across formats
            media_problem = ("unreadable_audio", f"{where}: media {media}: cannot read its header: {exc}")
    recording_id = slug(str(rel_dir / stem)) if str(rel_dir) != "." else slug(stem)
    task = leading_gem(text) or ""
    rows, rejects = [], []
    counts: dict[str, int] = {}
    last_end: dict[str, tuple[float, str]] = {}
    for utt in chat.utterances():
        if utt.tokens is None:  # a header between utterances: @G starts a task
            hdr = utt.changeable_header
            if hdr is not None and type(hdr).__name__ == "G":
                task = str(hdr.value or "").strip()
            continue
        code = utt.participant
        if code not in participants:
            continue
        counts[code] = counts.get(code, 0) + 1
        utt_id = f"{recording_id}_{code}_{counts[code]:04d}"
        marks = utt.time_marks
        label = f"{where}: {code} utterance {counts[code]}"
        bullet = "" if marks is None else f" [{marks[0]}_{marks[1]} ms]"
        audio_display = display_path(media) if media is not None else where

        def rej(reason: str, detail: str) -> None:
            rejects.append(reject(utt_id, audio_display, "utterance", "ingest", reason, detail))

        if media_problem:
            rej(media_problem[0], media_problem[1])
            continue
        if is_unintelligible(utt.audible):
            rej("unintelligible", f"{label}{bullet}: holds xxx/yyy/www: {clean_text(utt.audible)!r}")
            continue
        if marks is None:
            rej("missing_bullet", f"{label}: no time bullet, so it cannot be cut from the recording")
            continue
        start, end = marks[0] / 1000.0, marks[1] / 1000.0
        if not 0 <= start < end or end > duration + BULLET_TOLERANCE_S:
            rej("bullet_outside_media", f"{label}{bullet}: outside the media {display_path(media)} "
                                        f"(0-{duration:.3f} s) or empty")
            continue
        if code in last_end and start < last_end[code][0]:
            rej("overlapping_bullet", f"{label}{bullet}: starts before {last_end[code][1]} (the same speaker's "
                                      f"previous utterance) ends at {last_end[code][0]:.3f} s")
            continue
        words = target_words(utt.tokens) if reference == "target" else audible_words(utt.audible)
        ref = clean_text(" ".join(words))
        if not has_words(ref):
            rej("empty_transcript", f"{label}{bullet}: no words in the {reference} view of {clean_text(utt.audible)!r}")
            continue
        last_end[code] = (end, utt_id)
        image_path = image_id = None
        if pictures is not None and task in pictures:
            image_path, image_id = pictures[task]
        rows.append({"utt_id": utt_id, "speaker": f"{slug(stem)}_{code}",
                     "group": _speaker_info(header, code, group_field, groups), "audio_path": display_path(media),
                     "text": ref, "image_path": image_path, "image_id": image_id, "split": None, "source": "chat",
                     "recording_id": recording_id, "task": task or None, "start": start, "end": end})
    return rows, rejects


def ingest_chat(chat_root: str | Path, media_root: str | Path | None = None, participants=("PAR",),
                group_field: str = "group", groups: dict[str, str] | None = None, reference: str = "target",
                task_pictures: str | Path | None = None, root: str | Path | None = None):
    """Read every ``.cha`` file below ``chat_root`` (sorted); return (rows, rejects) as lists of dicts.

    Media are looked up below ``media_root`` (default ``chat_root``). Task names with no picture row, and
    picture rows no transcript uses, are logged with counts; their utterances are kept ASR-only.
    """
    if reference not in REFERENCES:
        raise ValueError(f"data.chat_reference '{reference}' is not one of {', '.join(REFERENCES)}")
    chat_root = Path(chat_root).resolve()
    if not chat_root.is_dir():
        raise FileNotFoundError(f"{chat_root}: data.chat_root is not a folder")
    media_root = Path(media_root).resolve() if media_root else chat_root
    if not media_root.is_dir():
        raise FileNotFoundError(f"{media_root}: data.chat_media_root is not a folder")
    files = sorted(chat_root.rglob("*.cha"))
    if not files:
        raise ValueError(f"{chat_root}: no .cha files below data.chat_root")
    pictures = read_task_pictures(task_pictures, root)[0] if task_pictures else None
    rows, rejects = [], []
    for path in files:
        r, j = chat_file_rows(path, chat_root, media_root, tuple(participants), group_field, groups or {},
                              reference, pictures)
        rows.extend(r)
        rejects.extend(j)
    report_tasks(rows, pictures)
    return rows, rejects


def task_coverage(tasks: list[str | None], pictures: dict[str, tuple[str, str]] | None) -> dict:
    """Which transcript tasks have no picture row, and which picture rows no transcript uses (with counts)."""
    used: dict[str, int] = {}
    for t in tasks:
        used[t or ""] = used.get(t or "", 0) + 1
    listed = set(pictures or {})
    return {"tasks": dict(sorted(used.items())),
            "tasks_without_picture": {t: n for t, n in sorted(used.items()) if t not in listed},
            "pictures_without_task": sorted(listed - set(used))}


def report_tasks(rows: list[dict], pictures: dict[str, tuple[str, str]] | None) -> dict:
    """Log :func:`task_coverage` of the ingested rows: unknown task names and unused picture rows."""
    cov = task_coverage([r["task"] for r in rows], pictures)
    log.info("chat: %d utterances in %d tasks: %s", len(rows), len(cov["tasks"]),
             ", ".join(f"{t or '(no @G)'}: {n}" for t, n in cov["tasks"].items()))
    if pictures is not None and cov["tasks_without_picture"]:
        n = sum(cov["tasks_without_picture"].values())
        log.warning("chat: %d task(s) have no row in data.task_pictures, their %d utterances are rescored ASR-only: %s",
                    len(cov["tasks_without_picture"]), n, ", ".join(t or "(no @G)" for t in cov["tasks_without_picture"]))
    if cov["pictures_without_task"]:
        log.warning("chat: %d task(s) in data.task_pictures occur in no transcript: %s",
                    len(cov["pictures_without_task"]), ", ".join(cov["pictures_without_task"]))
    return cov
