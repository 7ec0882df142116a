"""Audio and picture preprocessing: decode, mono, 16 kHz, peak-normalise, trim, duration bounds.

Each step is a small pure function on arrays; ``preprocess`` runs them over the ingested table in a
process pool and records every input it cannot use in the rejects table, with the reason.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import struct
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from PIL import Image, UnidentifiedImageError

from mmasr.data.ingest import display_path, slug
from mmasr.progress import track
from mmasr.io import atomic_dir, atomic_path, reject, rejects_frame
from mmasr.memory import peak_rss_bytes

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["utt_id", "speaker", "group", "audio_path", "duration_s", "text", "image_id", "split", "source"]
SEGMENT_KEYS = ["recording_id", "task", "start", "end"]
IMAGE_COLUMNS = ["image_id", "path", "width", "height", "orig_path", "orig_mode"]


class Rejected(Exception):
    """An input that cannot be used; ``reason`` is a short stable code, ``detail`` says why in words."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------- pure audio steps

def to_mono(audio: np.ndarray) -> np.ndarray:
    """Average the channels of a (frames, channels) array; a 1-D array is already mono."""
    return audio if audio.ndim == 1 else audio.mean(axis=1, dtype=np.float64).astype(np.float32)


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited polyphase resampling (scipy.signal.resample_poly: a Kaiser-windowed sinc, beta 5, at the
    rate ratio reduced by their gcd). Against torchaudio's windowed-sinc resample, which this replaced (importing
    torch cost every preprocess worker ~1 GB resident), it is flatter in the passband and rejects more above the
    new Nyquist (tests/test_preprocess.py compares the two)."""
    if orig_sr == target_sr:
        return audio.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    g = math.gcd(int(orig_sr), int(target_sr))
    return resample_poly(np.asarray(audio, dtype=np.float32), target_sr // g, orig_sr // g).astype(np.float32, copy=False)


def peak_normalise(audio: np.ndarray, peak: float) -> np.ndarray:
    """Scale so the largest absolute sample equals ``peak`` (silence is returned unchanged)."""
    top = float(np.max(np.abs(audio))) if audio.size else 0.0
    return audio if top == 0.0 else (audio * (peak / top)).astype(np.float32)


def speech_bounds(audio: np.ndarray, sr: int, threshold_db: float, frame_ms: float, pad_ms: float) -> tuple[int, int]:
    """Sample range [start, end) from the first to the last frame within ``threshold_db`` of the loudest
    frame (RMS over ``frame_ms``), widened by ``pad_ms`` on each side. Empty range for silence."""
    frame = max(1, int(round(sr * frame_ms / 1000)))
    n_frames = len(audio) // frame
    if n_frames == 0:
        return 0, len(audio)
    rms = np.sqrt(np.mean(audio[: n_frames * frame].astype(np.float64).reshape(n_frames, frame) ** 2, axis=1))
    if rms.max() == 0.0:
        return 0, 0
    level_db = 20 * np.log10(np.maximum(rms, 1e-12) / rms.max())
    voiced = np.flatnonzero(level_db > -threshold_db)
    pad = int(round(sr * pad_ms / 1000))
    return max(0, voiced[0] * frame - pad), min(len(audio), (voiced[-1] + 1) * frame + pad)


def trim_silence(audio: np.ndarray, sr: int, threshold_db: float, frame_ms: float, pad_ms: float) -> np.ndarray:
    start, end = speech_bounds(audio, sr, threshold_db, frame_ms, pad_ms)
    return audio[start:end]


# ---------------------------------------------------------------- one file

@dataclass(frozen=True)
class AudioResult:
    audio: np.ndarray
    orig_sr: int
    orig_channels: int


READ_BLOCK_S = 10.0  # audio is decoded this many seconds at a time and mixed down to mono as it comes
_PLACEHOLDER_SIZES = (0, 0xFFFFFFFF)  # data sizes streaming writers leave when the length is unknown


def wav_data_shortfall(path: str | Path) -> tuple[int, int] | None:
    """For a RIFF/WAVE file whose ``data`` chunk promises more bytes than the file holds (a copy cut
    short), return (promised, present); None for a complete file or any other format.

    libsndfile reads such a file without complaint, silently returning only the samples present.
    """
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        size = os.fstat(f.fileno()).st_size
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk_id, n = struct.unpack("<4sI", f.read(8))
            if chunk_id == b"data":
                present = size - pos - 8
                return (n, present) if n not in _PLACEHOLDER_SIZES and n > present else None
            pos += 8 + n + (n & 1)  # chunks are word-aligned
    return None


def _read_mono(snd: sf.SoundFile, path: Path) -> np.ndarray:
    """Decode block by block into one preallocated mono array: memory is one mono copy plus one block,
    whatever the channel count. NaN/Inf anywhere rejects the file."""
    sr, frames = snd.samplerate, snd.frames
    out = np.empty(frames, dtype=np.float32)
    pos = 0
    try:
        for block in snd.blocks(blocksize=max(1, int(sr * READ_BLOCK_S)), dtype="float32", always_2d=True):
            bad = ~np.isfinite(block)
            if bad.any():
                first = pos + int(np.flatnonzero(bad.any(axis=1))[0])
                raise Rejected("nonfinite_audio", f"{path}: {int(bad.sum())} NaN/Inf samples in the block from "
                                                  f"{pos / sr:.2f} s (the first at {first / sr:.3f} s)")
            if pos + len(block) > frames:
                raise Rejected("unreadable_audio", f"{path}: more samples than the header's {frames} frames")
            out[pos:pos + len(block)] = to_mono(block)
            pos += len(block)
    except Rejected:
        raise
    except Exception as exc:  # a decoder error part-way (a FLAC or MP3 cut short, garbage in the stream)
        raise Rejected("unreadable_audio", f"{path}: cannot decode after {pos / sr:.2f} s: {exc}") from None
    return out[:pos]


def decode_audio(path: str | Path, cfg: dict) -> tuple[np.ndarray, int, int]:
    """Decode one file to mono at its own rate: (samples, sample rate, channels); raise Rejected with the
    reason when it cannot be used.

    Everything that can be decided from the header (length, truncation) is decided before any sample
    is decoded, so a multi-hour file costs no memory.
    """
    path = Path(path)
    if not path.exists():
        raise Rejected("missing_audio", f"{path}: no such file")
    if not path.is_file():
        raise Rejected("unreadable_audio", f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise Rejected("empty_audio", f"{path}: file is empty (0 bytes)")
    try:
        snd = sf.SoundFile(str(path))
    except Exception as exc:  # libsndfile's errors do not share one type across formats
        raise Rejected("unreadable_audio", f"{path}: cannot decode: {exc}") from None
    with snd:
        sr, channels, frames = snd.samplerate, snd.channels, snd.frames
        if frames == 0 or sr <= 0:
            raise Rejected("empty_audio", f"{path}: no audio frames")
        if frames / sr > cfg["max_input_duration_s"]:
            # Decided from the header alone: a multi-hour file is never loaded into memory.
            raise Rejected("too_long", f"{path}: {frames / sr:.1f} s exceeds "
                                       f"preprocess.max_input_duration_s={cfg['max_input_duration_s']}")
        shortfall = wav_data_shortfall(path) if snd.format in ("WAV", "WAVEX") else None
        if shortfall:
            raise Rejected("truncated_audio", f"{path}: the header promises {shortfall[0]} bytes of samples but the "
                                              f"file holds {shortfall[1]} (a copy cut short?)")
        mono = _read_mono(snd, path)
    if mono.size == 0:
        raise Rejected("empty_audio", f"{path}: no audio frames")
    return mono, sr, channels


def check_not_silent(audio: np.ndarray, cfg: dict, label: str) -> None:
    if audio.size == 0:
        raise Rejected("empty_audio", f"{label}: no audio frames")
    if float(np.max(np.abs(audio))) < cfg["silence_peak"]:
        raise Rejected("silent_audio", f"{label}: peak below preprocess.silence_peak={cfg['silence_peak']}")


def finish_audio(audio: np.ndarray, cfg: dict, label: str) -> np.ndarray:
    """Resampled audio trimmed, checked against the duration bounds and peak-normalised."""
    audio = trim_silence(audio, cfg["sample_rate"], cfg["trim_db"], cfg["trim_frame_ms"], cfg["trim_pad_ms"])
    duration = len(audio) / cfg["sample_rate"]
    if duration < cfg["min_duration_s"]:
        raise Rejected("too_short", f"{label}: {duration:.3f} s after trimming < preprocess.min_duration_s={cfg['min_duration_s']}")
    if duration > cfg["max_duration_s"]:
        raise Rejected("too_long", f"{label}: {duration:.1f} s after trimming > preprocess.max_duration_s={cfg['max_duration_s']}")
    return peak_normalise(audio, cfg["peak"])


def load_and_clean(path: str | Path, cfg: dict) -> AudioResult:
    """Decode one file and apply every step; raise Rejected with the reason when it cannot be used."""
    mono, sr, channels = decode_audio(path, cfg)
    check_not_silent(mono, cfg, str(path))
    mono = resample(mono, sr, cfg["sample_rate"])
    return AudioResult(finish_audio(mono, cfg, str(path)), sr, channels)


def audio_file_name(utt_id: str) -> str:
    """A safe, collision-free file name for an utterance id."""
    name = slug(utt_id)
    if name != utt_id:  # two ids can slug to the same name; a short hash keeps them apart
        name += "-" + hashlib.sha1(utt_id.encode()).hexdigest()[:8]
    return name + ".wav"


def _process_utterance(job: tuple[dict, str, str, dict]) -> dict:
    """Worker: clean one utterance and write it as 16-bit PCM, or return its rejects row."""
    rec, out_dir, final_dir, cfg = job
    # which process did the work, and its peak memory so far: the stage logs the workers' peaks
    worker = {"pid": os.getpid(), "peak_rss": peak_rss_bytes()}
    try:
        result = load_and_clean(rec["audio_path"], cfg)
    except Rejected as exc:
        return {"reject": reject(rec["utt_id"], rec["audio_path"], "utterance", "preprocess", exc.reason, exc.detail),
                **worker}
    return {"row": _write_result(rec, result.audio, out_dir, final_dir, cfg, result.orig_sr, result.orig_channels),
            **worker}


def _write_result(rec: dict, audio: np.ndarray, out_dir: str, final_dir: str, cfg: dict, orig_sr: int,
                  channels: int) -> dict:
    name = audio_file_name(rec["utt_id"])
    with atomic_path(Path(out_dir) / name, suffix=".tmp.wav") as tmp:
        sf.write(str(tmp), audio, cfg["sample_rate"], subtype="PCM_16", format="WAV")
    return {**rec, "audio_path": str(Path(final_dir) / name), "duration_s": round(len(audio) / cfg["sample_rate"], 4),
            "orig_audio_path": rec["audio_path"], "orig_sample_rate": orig_sr, "orig_channels": channels}


def segment_slice(start_s: float, end_s: float, n_samples: int, sr: int) -> tuple[int, int]:
    """Sample range [a, b) of the segment from ``start_s`` to ``end_s`` seconds in a recording of
    ``n_samples`` at ``sr``; Rejected (``bullet_outside_media``) when it does not lie inside it (a 50 ms
    rounding margin at the end is clipped)."""
    a, b = int(round(start_s * sr)), int(round(end_s * sr))
    if a < 0 or a >= b or a >= n_samples or b > n_samples + int(0.05 * sr):
        raise Rejected("bullet_outside_media", f"segment {start_s:.3f}-{end_s:.3f} s is not inside the recording "
                                               f"(0-{n_samples / sr:.3f} s)")
    return a, min(b, n_samples)


def _process_recording(job: tuple[list[dict], str, str, dict]) -> list[dict]:
    """Worker: the segments (rows with start/end) of one long recording, decoded and resampled once; one
    result per segment, as :func:`_process_utterance` gives."""
    recs, out_dir, final_dir, cfg = job
    path = recs[0]["audio_path"]
    out = []
    try:
        mono, sr, channels = decode_audio(path, cfg)
        audio = resample(mono, sr, cfg["sample_rate"])
        del mono
    except Rejected as exc:
        return [{"reject": reject(r["utt_id"], path, "utterance", "preprocess", exc.reason, exc.detail),
                 "pid": os.getpid(), "peak_rss": peak_rss_bytes()} for r in recs]
    for rec in recs:
        label = f"{path} [{rec['start']:.3f}-{rec['end']:.3f} s]"
        try:
            a, b = segment_slice(rec["start"], rec["end"], len(audio), cfg["sample_rate"])
            seg = audio[a:b]
            check_not_silent(seg, cfg, label)
            res = {"row": _write_result(rec, finish_audio(seg, cfg, label), out_dir, final_dir, cfg, sr, channels)}
        except Rejected as exc:
            detail = exc.detail if exc.detail.startswith(str(path)) else f"{label}: {exc.detail}"
            res = {"reject": reject(rec["utt_id"], path, "utterance", "preprocess", exc.reason, detail)}
        out.append({**res, "pid": os.getpid(), "peak_rss": peak_rss_bytes()})
    return out


def _process_job(job: tuple) -> list[dict]:
    """Worker entry: a whole-file utterance, or all segments of one recording (a list of rows)."""
    return _process_recording(job) if isinstance(job[0], list) else [_process_utterance(job)]


def audio_jobs(todo: list[dict], out_dir: str, final_dir: str, cfg: dict) -> list[tuple]:
    """One job per whole-file utterance and one per recording holding segments (rows with ``start``), so a
    long recording is decoded once for all its utterances."""
    jobs, by_recording = [], {}
    for rec in todo:
        if rec.get("start") is None:
            jobs.append((rec, out_dir, final_dir, cfg))
        else:
            by_recording.setdefault(rec["audio_path"], []).append(rec)
    jobs.extend((recs, out_dir, final_dir, cfg) for _, recs in sorted(by_recording.items()))
    return jobs


def worker_peak_rss(results: list[dict], main_pid: int) -> dict[int, int]:
    """Each worker process's largest reported peak RSS (bytes), by pid; the main process's own rows left out."""
    peaks: dict[int, int] = {}
    for res in results:
        if res["pid"] != main_pid and res["peak_rss"] is not None:
            peaks[res["pid"]] = max(peaks.get(res["pid"], 0), res["peak_rss"])
    return peaks


# ---------------------------------------------------------------- pictures

_EXIF_ORIENTATION = 0x0112
_ORIENT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit grey (``I;16``, ``I``) scaled to 8 bits, float grey (``F``, 0..1) likewise;
    Pillow's own conversion would clip them to white. Other modes are returned unchanged."""
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img, dtype=np.float64) / 257.0
    elif img.mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        a = a * 255.0 if a.size and a.max() <= 1.0 else a
    else:
        return img
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def clean_image(src: str | Path, dst: Path, max_side: int) -> tuple[int, int, str]:
    """Decode a picture, flatten it to RGB (alpha over white; CMYK, grey, 16-bit grey, palette converted),
    turn it upright by its EXIF orientation, shrink it to fit ``max_side`` and save it as PNG.

    Raise Rejected when it is missing or undecodable, or ``image_too_large`` when it has more pixels
    than Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) even after JPEG draft
    decoding at reduced size: such a file would take gigabytes to decode.
    """
    src = Path(src)
    if not src.exists():
        raise Rejected("missing_image", f"{src}: no such file")
    if not src.is_file():
        raise Rejected("unreadable_image", f"{src}: not a regular file")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, with a clear reason
            with Image.open(src) as img:
                mode = img.mode
                img.draft("RGB", (max_side, max_side))  # JPEG: decode at reduced size, cheap for huge files
                if limit and img.width * img.height > limit:
                    raise Rejected("image_too_large", f"{src}: {img.width}x{img.height} pixels exceeds the decoding "
                                                      f"limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS)")
                orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
                img = to_8bit(img)
                img.thumbnail((max_side, max_side))
                if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                    rgba = img.convert("RGBA")
                    rgb = Image.new("RGB", rgba.size, (255, 255, 255))
                    rgb.paste(rgba, mask=rgba.getchannel("A"))
                else:
                    rgb = img.convert("RGB")
                if orientation in _ORIENT:
                    rgb = rgb.transpose(_ORIENT[orientation])
    except Image.DecompressionBombError as exc:
        raise Rejected("image_too_large", f"{src}: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise Rejected("unreadable_image", f"{src}: cannot decode picture: {exc}") from None
    with atomic_path(dst, suffix=".tmp.png") as tmp:
        rgb.save(tmp, format="PNG")
    return rgb.width, rgb.height, mode


# ---------------------------------------------------------------- the stage

def preprocess(ingested: pd.DataFrame, ingest_rejects: pd.DataFrame, audio_dir: str | Path, image_dir: str | Path,
               cfg: dict, require_image: bool = False, workers: int = 1, progress: bool = True):
    """Run the stage. Returns (utterances, images, rejects, metrics)."""
    rejects = ingest_rejects.to_dict("records")
    audio_dir, image_dir = Path(audio_dir), Path(image_dir)

    images, bad_images = [], {}
    with atomic_dir(image_dir) as tmp_images:
        unique = ingested.dropna(subset=["image_id"]).drop_duplicates("image_id")
        for rec in unique.to_dict("records"):
            try:
                w, h, mode = clean_image(rec["image_path"], tmp_images / f"{rec['image_id']}.png", cfg["max_image_side"])
            except Rejected as exc:
                bad_images[rec["image_id"]] = exc.reason
                rejects.append(reject(rec["image_id"], rec["image_path"], "image", "preprocess", exc.reason, exc.detail))
                continue
            images.append({"image_id": rec["image_id"], "path": display_path(image_dir.resolve() / f"{rec['image_id']}.png"),
                           "width": w, "height": h, "orig_path": rec["image_path"], "orig_mode": mode})

    todo = []
    for rec in ingested.to_dict("records"):
        rec = {k: (None if pd.isna(v) else v) for k, v in rec.items()}
        if rec["image_id"] in bad_images:
            if require_image:
                rejects.append(reject(rec["utt_id"], rec["audio_path"], "utterance", "preprocess", bad_images[rec["image_id"]],
                                      f"picture {rec['image_path']} unusable and data.require_image is set"))
                continue
            rec["image_id"] = None  # kept for ASR-only use; the picture itself is in rejects
        elif require_image and rec["image_id"] is None:
            rejects.append(reject(rec["utt_id"], rec["audio_path"], "utterance", "preprocess", "missing_image",
                                  "no picture and data.require_image is set"))
            continue
        todo.append(rec)

    final_audio_dir = display_path(audio_dir.resolve())
    kept = []
    with atomic_dir(audio_dir) as tmp_audio:
        jobs = audio_jobs(todo, str(tmp_audio), final_audio_dir, cfg)
        bar = dict(desc="preprocess audio", total=len(jobs), unit="file", bar=progress)
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                results = [r for rs in track(pool.map(_process_job, jobs, chunksize=8), **bar) for r in rs]
        else:
            results = [r for job in track(jobs, **bar) for r in _process_job(job)]
    for res in results:
        (kept.append(res["row"]) if "row" in res else rejects.append(res["reject"]))
    peaks = worker_peak_rss(results, os.getpid())
    if peaks:
        # the workers' own account (benchmarks/scaling.py reads it): polling the process tree misses short-lived ones
        log.info("preprocess: %d worker processes, peak RSS up to %.1f MB each", len(peaks), max(peaks.values()) / 2**20)

    utterances = pd.DataFrame(kept)
    extra = ["orig_audio_path", "orig_sample_rate", "orig_channels"]
    extra += [c for c in SEGMENT_KEYS if c in utterances.columns]  # recording_id, task, start, end: pooled later
    if utterances.empty:
        utterances = pd.DataFrame(columns=MANIFEST_COLUMNS + extra)
    utterances = utterances[[c for c in MANIFEST_COLUMNS if c in utterances.columns] + extra].sort_values("utt_id")
    utterances = utterances.reset_index(drop=True)
    images_df = pd.DataFrame(images, columns=IMAGE_COLUMNS).sort_values("image_id").reset_index(drop=True)
    rejects_df = rejects_frame(rejects).sort_values(["kind", "reason", "id", "path"], na_position="first")
    rejects_df = rejects_df.reset_index(drop=True)
    return utterances, images_df, rejects_df, preprocess_metrics(utterances, rejects_df, images_df)


def preprocess_metrics(utterances: pd.DataFrame, rejects: pd.DataFrame, images: pd.DataFrame) -> dict:
    """Counts for results/metrics/preprocess.json (no timings: the same inputs give the same bytes)."""
    utt_rejects = rejects[rejects["kind"] == "utterance"]
    img_rejects = rejects[rejects["kind"] == "image"]
    n_rejected = len(utt_rejects)
    return {
        "n_input": len(utterances) + n_rejected,
        "n_kept": len(utterances),
        "n_rejected": n_rejected,
        "rejected_by_reason": {k: int(v) for k, v in utt_rejects["reason"].value_counts().sort_index().items()},
        "audio_hours": round(float(utterances["duration_s"].sum()) / 3600, 6) if len(utterances) else 0.0,
        "n_images": len(images),
        "n_images_rejected": len(img_rejects),
        "images_rejected_by_reason": {k: int(v) for k, v in img_rejects["reason"].value_counts().sort_index().items()},
        "n_kept_without_image": int(utterances["image_id"].isna().sum()) if len(utterances) else 0,
        "kept_by_group": {k: int(v) for k, v in utterances["group"].value_counts().sort_index().items()} if len(utterances) else {},
        "n_speakers": int(utterances["speaker"].nunique()) if len(utterances) else 0,
    }
