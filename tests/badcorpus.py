"""The bad-input corpus: a manifest whose rows each carry one defect (or one legitimate oddity), built
in a scratch folder, with the outcome every row must have.

``build_bad_corpus(base)`` writes ``base/corpus/`` (the data root: audio, pictures, ``manifest.csv``
with CRLF line endings and extra columns) and ``base/outside/`` (files the manifest must not reach),
and returns a :class:`BadCorpus` listing, per manifest row, whether the utterance is kept or its
reject reason, and what becomes of its picture. ``bad_manifests(base)`` writes manifests that are
wrong as a whole (a missing column, a ragged line, not UTF-8, ...) with the error each must raise,
and a few odd-but-valid ones that must be read.

Nothing here is large on disk or slow: the 2-hour recording is a sparse file (a WAV header promising
2 h of samples over a hole), the decompression bombs are PNG headers without pixel data.
"""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from tests.conftest import tone, write_picture, write_wav

KEPT = "kept"
INGEST_REASONS = {"missing_speaker", "path_outside_root", "duplicate_id", "empty_transcript"}


@dataclass
class Row:
    """One manifest row and what must become of it."""
    utt_id: str
    case: str                    # what is odd about it, for failure messages
    outcome: str                 # KEPT, or the utterance's reject reason
    audio: str = ""              # as written in the manifest
    text: str = "a red bear"
    speaker: str = "S1"
    image: str = ""              # as written in the manifest
    image_outcome: str | None = None  # KEPT or the picture's reject reason; None: no picture
    expect: dict = field(default_factory=dict)  # manifest values a kept row must have
    line: int = 0                # where the row starts in manifest.csv (set when it is written)


@dataclass
class BadCorpus:
    root: Path
    manifest: Path
    outside: Path
    rows: list[Row]

    def image_id(self, row: Row) -> str:
        from mmasr.data.ingest import image_id_for

        return image_id_for((self.root / row.image).resolve(), self.root)

    @staticmethod
    def stage(row: Row) -> str | None:
        """Which stage rejects the row: ingest (manifest-level problems) or preprocess (the files)."""
        if row.outcome == KEPT:
            return None
        return "ingest" if row.outcome in INGEST_REASONS or not row.audio else "preprocess"

    def outcome(self, row: Row, require_image: bool = False) -> str:
        """The utterance's fate. With data.require_image, a row that passed ingest without a usable picture
        is rejected for that before its audio is looked at."""
        if self.stage(row) == "ingest" or not require_image:
            return row.outcome
        if row.image_outcome in (None, "path_outside_root"):
            return "missing_image"  # no picture reaches preprocessing
        return row.image_outcome if row.image_outcome != KEPT else KEPT

    def kept_ids(self, require_image: bool = False) -> list[str]:
        return sorted(r.utt_id for r in self.rows if self.outcome(r, require_image) == KEPT)

    def utterance_rejects(self, require_image: bool = False) -> Counter:
        return Counter((r.utt_id, self.outcome(r, require_image)) for r in self.rows
                       if self.outcome(r, require_image) != KEPT)

    def image_rejects(self) -> Counter:
        """(id, reason) of every picture reject: the picture id, or the utterance id when the path escapes
        the data root (such a path never becomes a picture id). Pictures sit on rows whose utterance is
        kept, so each reaches the picture stage."""
        out = Counter()
        seen = set()
        for r in self.rows:
            if r.image_outcome in (None, KEPT):
                continue
            if r.image_outcome == "path_outside_root":
                out[(r.utt_id, r.image_outcome)] += 1
            elif self.image_id(r) not in seen:
                seen.add(self.image_id(r))
                out[(self.image_id(r), r.image_outcome)] += 1
        return out

    def kept_image_ids(self) -> list[str]:
        return sorted({self.image_id(r) for r in self.rows if r.image_outcome == KEPT and r.outcome == KEPT})


# ---------------------------------------------------------------- file makers

def sparse_wav(path: Path, seconds: float, sr: int = 16000) -> Path:
    """A valid 16-bit mono WAV header promising ``seconds`` of samples, over a sparse hole (no disk used)."""
    n_bytes = int(seconds * sr) * 2
    header = (b"RIFF" + struct.pack("<I", 36 + n_bytes) + b"WAVE"
              + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sr, sr * 2, 2, 16)
              + b"data" + struct.pack("<I", n_bytes))
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + n_bytes)
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return path


def _pictures(pics: Path) -> None:
    pics.mkdir(parents=True, exist_ok=True)
    write_picture(pics / "rgb.png")
    write_picture(pics / "gray.png", mode="L")
    write_picture(pics / "cmyk.jpg", mode="CMYK")
    write_picture(pics / "rgba.png", mode="RGBA")
    Image.fromarray(np.tile(np.linspace(0, 65535, 64), (32, 1)).astype(np.uint16)).save(pics / "gray16.png")
    pal = Image.new("P", (40, 20), 0)
    pal.putpalette([0, 0, 0] + [0, 0, 255] * 255)
    pal.save(pics / "palette_alpha.png", transparency=0)
    Image.new("RGB", (6000, 4000), (20, 160, 40)).save(pics / "huge.jpg", quality=70)
    Image.new("RGB", (3000, 2000), (160, 20, 40)).save(pics / "huge.png")
    png_header_only(pics / "bomb.png", 40000, 40000)            # beyond PIL's hard limit
    png_header_only(pics / "many_pixels.png", 10000, 10000)    # beyond its warning limit
    (pics / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    jpeg = (pics / "huge.jpg").read_bytes()
    (pics / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (pics / "not_a_picture.jpg").write_text("<html><body>404 Not Found</body></html>\n")
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: the picture is stored sideways
    Image.new("RGB", (60, 30), (200, 200, 0)).save(pics / "rotated.jpg", exif=exif)


def _audio(audio: Path, outside: Path) -> None:
    audio.mkdir(parents=True, exist_ok=True)
    write_wav(audio / "ok_pcm16.wav", tone(1.0, 16000))
    write_wav(audio / "ok_pcm8.wav", tone(1.0, 22050), sr=22050, subtype="PCM_U8")
    write_wav(audio / "ok_float32_hot.wav", 6.0 * tone(1.0, 44100), sr=44100, subtype="FLOAT")  # peak 3.0
    sf.write(str(audio / "ok_pcm24.flac"), tone(1.0, 48000), 48000, subtype="PCM_24")
    write_wav(audio / "ok_8k.wav", tone(1.0, 8000), sr=8000)
    write_wav(audio / "ok_96k.wav", tone(1.0, 96000), sr=96000)
    write_wav(audio / "ok_6ch.wav", tone(1.0, 48000, channels=6), sr=48000)
    rng = np.random.default_rng(0)
    (audio / "corrupt.wav").write_bytes(b"RIFF\x24\x10\x00\x00WAVEfmt " + rng.bytes(2000))
    (audio / "not_audio.wav").write_text("<!DOCTYPE html><html><body>Moved Permanently</body></html>\n")
    full = (audio / "ok_pcm16.wav").read_bytes()
    (audio / "truncated.wav").write_bytes(full[: len(full) // 2])
    (audio / "truncated_header.wav").write_bytes(full[:30])
    sf.write(str(audio / "whole.flac"), tone(1.0, 16000), 16000)
    flac = (audio / "whole.flac").read_bytes()
    (audio / "truncated.flac").write_bytes(flac[: len(flac) // 2])
    (audio / "whole.flac").unlink()
    (audio / "zero_length.wav").write_bytes(b"")
    sf.write(str(audio / "header_only.wav"), np.zeros(0, np.float32), 16000)
    x = tone(1.0)
    x[8000:8010] = np.nan
    write_wav(audio / "nan.wav", x, subtype="FLOAT")
    y = tone(1.0)
    y[100], y[9000] = np.inf, -np.inf
    write_wav(audio / "inf.wav", y, subtype="FLOAT")
    sparse_wav(audio / "two_hours.wav", 2 * 3600)
    (audio / "a_folder.wav").mkdir()
    write_wav(outside / "secret.wav", tone(1.0))
    write_picture(outside / "secret.png")
    (audio / "link_out.wav").symlink_to(outside / "secret.wav")
    (audio / "link_in.wav").symlink_to(audio / "ok_pcm16.wav")


def build_bad_corpus(base: Path) -> BadCorpus:
    base = base.resolve()
    root, outside = base / "corpus", base / "outside"
    outside.mkdir(parents=True, exist_ok=True)
    _audio(root / "audio", outside)
    _pictures(root / "pics")
    ok = "audio/ok_pcm16.wav"
    rows = [
        # --- audio: legitimate oddities, all kept as 16 kHz mono 16-bit
        Row("ok_pcm16", "plain 16 kHz 16-bit mono", KEPT, ok, expect={"orig_sample_rate": 16000, "orig_channels": 1}),
        Row("ok_pcm8", "8-bit unsigned PCM at 22.05 kHz", KEPT, "audio/ok_pcm8.wav",
            expect={"orig_sample_rate": 22050, "orig_channels": 1}),
        Row("ok_float32_hot", "32-bit float beyond full scale (peak 3.0)", KEPT, "audio/ok_float32_hot.wav",
            expect={"orig_sample_rate": 44100}),
        Row("ok_pcm24_flac", "24-bit FLAC at 48 kHz", KEPT, "audio/ok_pcm24.flac", expect={"orig_sample_rate": 48000}),
        Row("ok_8k", "8 kHz telephone rate", KEPT, "audio/ok_8k.wav", speaker="S2", expect={"orig_sample_rate": 8000}),
        Row("ok_96k", "96 kHz", KEPT, "audio/ok_96k.wav", speaker="S2", expect={"orig_sample_rate": 96000}),
        Row("ok_6ch", "6 channels (5.1)", KEPT, "audio/ok_6ch.wav", speaker="S2",
            expect={"orig_sample_rate": 48000, "orig_channels": 6}),
        # --- audio: defects
        Row("corrupt", "RIFF header then garbage", "unreadable_audio", "audio/corrupt.wav"),
        Row("not_audio", "an HTML page named .wav", "unreadable_audio", "audio/not_audio.wav"),
        Row("truncated", "WAV cut in half (header promises twice the samples)", "truncated_audio", "audio/truncated.wav"),
        Row("truncated_header", "WAV cut inside its header", "unreadable_audio", "audio/truncated_header.wav"),
        Row("truncated_flac", "FLAC cut in half", "unreadable_audio", "audio/truncated.flac"),
        Row("zero_length", "0-byte file", "empty_audio", "audio/zero_length.wav"),
        Row("header_only", "valid header, no frames", "empty_audio", "audio/header_only.wav"),
        Row("nan", "NaN samples", "nonfinite_audio", "audio/nan.wav"),
        Row("inf", "+Inf and -Inf samples", "nonfinite_audio", "audio/inf.wav"),
        Row("two_hours", "2-hour recording (sparse file)", "too_long", "audio/two_hours.wav"),
        Row("missing", "no such file", "missing_audio", "audio/nowhere.wav"),
        Row("a_folder", "the path is a folder", "unreadable_audio", "audio/a_folder.wav"),
        Row("no_audio_path", "empty audio_path", "missing_audio", ""),
        # --- transcripts
        Row("text_empty", "empty transcript", "empty_transcript", ok, text=""),
        Row("text_whitespace", "whitespace transcript", "empty_transcript", ok, text=" \t  "),
        Row("text_punctuation", "punctuation only", "empty_transcript", ok, text="?! ... -- ;"),
        Row("text_symbols", "symbols only", "empty_transcript", ok, text="\U0001F642 \u266A"),
        Row("text_french", "accents, one of them a combining character", KEPT, ok, speaker="S3",
            text="Ça va,  cafe\u0301 CRÈME!", expect={"text": "Ça va, café CRÈME!"}),
        Row("text_chinese", "CJK", KEPT, ok, speaker="S3", text="你好，世界", expect={"text": "你好，世界"}),
        Row("text_hindi", "Devanagari with combining vowel signs", KEPT, ok, speaker="S3", text="नमस्ते दुनिया",
            expect={"text": "नमस्ते दुनिया"}),
        Row("text_multiline", "a quoted newline inside the transcript", KEPT, ok, speaker="S3", text="a red\nbear",
            expect={"text": "a red bear"}),
        # --- ids
        Row("dup", "first row with a repeated id", KEPT, ok, speaker="S4", text="two green goats",
            expect={"text": "two green goats"}),
        Row("dup", "second row with the same id", "duplicate_id", "audio/ok_8k.wav", speaker="S4", text="other"),
        Row("a/b", "id with a slash", KEPT, ok, speaker="S4"),
        Row("a_b", "id that slugs like the one before", KEPT, ok, speaker="S4"),
        Row("no_speaker", "empty speaker", "missing_speaker", ok, speaker=""),
        # --- paths
        Row("escape_relative", "../ out of the data root", "path_outside_root", "../outside/secret.wav"),
        Row("escape_absolute", "absolute path outside the root", "path_outside_root", str(outside / "secret.wav")),
        Row("escape_symlink", "symbolic link to a file outside the root", "path_outside_root", "audio/link_out.wav"),
        Row("absolute_inside", "absolute path inside the root", KEPT, str(root / ok), speaker="S4"),
        Row("symlink_inside", "symbolic link within the root", KEPT, "audio/link_in.wav", speaker="S4"),
        # --- pictures: converted to RGB and kept, or rejected while the utterance stays (ASR-only)
        Row("pic_rgb", "RGB picture", KEPT, ok, speaker="S5", image="pics/rgb.png", image_outcome=KEPT),
        Row("pic_rgb_again", "the same picture for a second utterance", KEPT, ok, speaker="S5",
            image="pics/rgb.png", image_outcome=KEPT),
        Row("pic_gray", "grayscale", KEPT, ok, speaker="S5", image="pics/gray.png", image_outcome=KEPT),
        Row("pic_gray16", "16-bit grayscale", KEPT, ok, speaker="S5", image="pics/gray16.png", image_outcome=KEPT),
        Row("pic_cmyk", "CMYK JPEG", KEPT, ok, speaker="S5", image="pics/cmyk.jpg", image_outcome=KEPT),
        Row("pic_rgba", "alpha channel", KEPT, ok, speaker="S5", image="pics/rgba.png", image_outcome=KEPT),
        Row("pic_palette_alpha", "palette with a transparent colour", KEPT, ok, speaker="S5",
            image="pics/palette_alpha.png", image_outcome=KEPT),
        Row("pic_huge_jpeg", "6000x4000 JPEG", KEPT, ok, speaker="S6", image="pics/huge.jpg", image_outcome=KEPT),
        Row("pic_huge_png", "3000x2000 PNG", KEPT, ok, speaker="S6", image="pics/huge.png", image_outcome=KEPT),
        Row("pic_rotated", "EXIF orientation 6 (stored sideways)", KEPT, ok, speaker="S6", image="pics/rotated.jpg",
            image_outcome=KEPT),
        Row("pic_bomb", "decompression bomb (40000x40000 header)", KEPT, ok, speaker="S6", image="pics/bomb.png",
            image_outcome="image_too_large"),
        Row("pic_many_pixels", "10000x10000 header: over the decoding limit", KEPT, ok, speaker="S6",
            image="pics/many_pixels.png", image_outcome="image_too_large"),
        Row("pic_corrupt", "PNG signature then garbage", KEPT, ok, speaker="S6", image="pics/corrupt.png",
            image_outcome="unreadable_image"),
        Row("pic_truncated", "JPEG cut short", KEPT, ok, speaker="S6", image="pics/truncated.jpg",
            image_outcome="unreadable_image"),
        Row("pic_not_a_picture", "HTML named .jpg", KEPT, ok, speaker="S6", image="pics/not_a_picture.jpg",
            image_outcome="unreadable_image"),
        Row("pic_missing", "no such picture", KEPT, ok, speaker="S6", image="pics/nowhere.png",
            image_outcome="missing_image"),
        Row("pic_outside", "picture path out of the data root", KEPT, ok, speaker="S6",
            image="../outside/secret.png", image_outcome="path_outside_root"),
    ]
    for r in rows:
        r.expect.setdefault("speaker", r.speaker)
        r.expect.setdefault("orig_channels", 1)
        assert r.image_outcome is None or r.outcome == KEPT, "pictures only on kept rows (see image_rejects)"
    groups = {"S1": "impaired", "S2": "impaired", "S3": "impaired", "S4": "control", "S5": "control", "S6": "control"}
    manifest = root / "manifest.csv"
    lines = ["Utt_ID,Audio_Path,Text,Speaker,Group,Image_Path,Notes,Duration"]  # mixed case; two extra columns
    for r in rows:
        fields = [r.utt_id, r.audio, r.text, r.speaker, groups.get(r.speaker, ""), r.image, r.case, "1.0"]
        r.line = 1 + sum(1 + line.count("\n") for line in lines)
        lines.append(",".join(_csv_field(f) for f in fields))
    manifest.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8"))  # CRLF line endings
    return BadCorpus(root, manifest, outside, rows)


def _csv_field(value: str) -> str:
    return '"' + value.replace('"', '""') + '"' if any(c in value for c in ',"\n\r') else value


# ---------------------------------------------------------------- manifests wrong (or odd) as a whole

@dataclass
class ManifestCase:
    name: str
    path: Path
    error: str | None      # a regex the error message must match; None: the manifest must be read
    n_rows: int = 0        # rows ingested when it is read


def bad_manifests(base: Path) -> list[ManifestCase]:
    base.mkdir(parents=True, exist_ok=True)
    write_wav(base / "a.wav", tone())
    write_wav(base / "b.wav", tone())
    cases = []

    def case(name, content: bytes | str, error: str | None, n_rows: int = 0, suffix: str = ".csv"):
        path = base / f"{name}{suffix}"
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        cases.append(ManifestCase(name, path, error, n_rows))

    case("missing_column", "audio_path,text\na.wav,a bear\n", r"missing required column\(s\) 'speaker'")
    case("extra_columns", "audio_path,text,speaker,mic,age\na.wav,a bear,S1,array,7\n", None, 1)
    case("crlf_bom_case", b"\xef\xbb\xbfAUDIO_PATH,Text,Speaker\r\na.wav,a bear,S1\r\n\r\nb.wav,a pear,S2\r\n", None, 2)
    case("tsv", "audio_path\ttext\tspeaker\na.wav\ta, bear\tS1\n", None, 1, suffix=".tsv")
    case("ragged_first_row", "audio_path,text,speaker\na.wav,a bear,S1,extra\na.wav,b,S2\n",
         r"line 2: 4 fields where the header has 3")
    case("ragged_later_row", "audio_path,text,speaker\na.wav,a bear,S1\na.wav,b\n",
         r"line 3: 2 fields where the header has 3")
    case("not_utf8", "audio_path,text,speaker\na.wav,caf\xe9,S1\n".encode("latin-1"), r"not UTF-8")
    case("empty_file", b"", r"manifest is empty")
    case("header_only", "audio_path,text,speaker\n", r"header but no rows")
    case("column_twice", "audio_path,text,speaker,Text\na.wav,a,S1,b\n", r"column\(s\) 'text' more than once")
    case("bad_split", "audio_path,text,speaker,split\na.wav,a,S1,validation\n", r"split 'validation' is not one of")
    case("spreadsheet", b"PK\x03\x04", r"unsupported manifest format '.xlsx'", suffix=".xlsx")
    case("broken_parquet", b"PAR1 not really", r"cannot read Parquet manifest", suffix=".parquet")
    cases.append(ManifestCase("no_such_manifest", base / "nowhere.csv", r"manifest not found"))
    return cases
