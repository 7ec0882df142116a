import re

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from PIL import Image

from mmasr.data.ingest import ingest_manifest
from mmasr.io import rejects_frame
from mmasr.data.preprocess import (Rejected, audio_file_name, clean_image, load_and_clean, peak_normalise, preprocess,
                              resample, speech_bounds, to_mono, trim_silence)
from tests.conftest import tone, write_picture, write_wav


def test_to_mono_averages_channels():
    stereo = np.stack([np.ones(4, np.float32), np.zeros(4, np.float32)], axis=1)
    np.testing.assert_allclose(to_mono(stereo), 0.5)
    assert to_mono(np.ones(3, np.float32)).shape == (3,)


def test_resample_changes_length_and_keeps_the_frequency():
    sr_in, sr_out, f = 44100, 16000, 440.0
    x = np.sin(2 * np.pi * f * np.arange(sr_in) / sr_in).astype(np.float32)
    y = resample(x, sr_in, sr_out)
    assert len(y) == sr_out
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) * sr_out / len(y) - f) < 2.0
    assert resample(x, sr_in, sr_in) is not None and len(resample(x, sr_in, sr_in)) == sr_in


@pytest.mark.parametrize("sr_in", [8000, 22050, 44100, 48000])
def test_resample_matches_torchaudio_in_the_speech_band_and_rejects_aliases_at_least_as_well(sr_in):
    """The scipy polyphase resampler against torchaudio's windowed sinc (what preprocess used before; torch in
    every worker cost ~1 GB each): on tones up to 5 kHz (below 0.35 of the input rate: 8 kHz audio has nothing near
    4 kHz to compare) they agree within 0.006 (unit amplitude; the new one also within 0.006 of the exact tone),
    and above the new Nyquist the scipy output is no louder than torchaudio's."""
    import torch
    import torchaudio.functional as AF

    sr_out, inner = 16000, slice(400, -400)  # edges: each filter's own start-up
    for f in (f for f in (100.0, 440.0, 1000.0, 3000.0, 5000.0) if f < 0.35 * sr_in):
        x = np.sin(2 * np.pi * f * np.arange(sr_in) / sr_in).astype(np.float32)
        y = resample(x, sr_in, sr_out)
        ref = AF.resample(torch.from_numpy(x), sr_in, sr_out).numpy()
        exact = np.sin(2 * np.pi * f * np.arange(sr_out) / sr_out)
        assert y.dtype == np.float32 and len(y) == len(ref) == sr_out
        assert np.max(np.abs(y - ref)[inner]) < 0.006, f
        assert np.max(np.abs(y - exact)[inner]) < 0.006, f
    for f in (9000.0, 12000.0):  # above 8 kHz: must be filtered out, not folded back
        if f < sr_in / 2:
            x = np.sin(2 * np.pi * f * np.arange(sr_in) / sr_in).astype(np.float32)
            y = resample(x, sr_in, sr_out)[inner]
            ref = AF.resample(torch.from_numpy(x), sr_in, sr_out).numpy()[inner]
            assert np.std(y) <= np.std(ref) and 20 * np.log10(np.std(y) / np.std(x)) < -25, f


def test_peak_normalise():
    y = peak_normalise(np.array([0.1, -0.2, 0.05], np.float32), 0.9)
    assert np.max(np.abs(y)) == pytest.approx(0.9)
    assert np.all(peak_normalise(np.zeros(3, np.float32), 0.9) == 0)


def test_trim_removes_leading_and_trailing_silence_but_keeps_padding():
    sr = 16000
    x = tone(1.0, sr, lead=0.5, tail=0.7)
    start, end = speech_bounds(x, sr, threshold_db=40, frame_ms=20, pad_ms=100)
    assert start == pytest.approx(0.4 * sr, abs=0.02 * sr)
    assert end == pytest.approx(1.6 * sr, abs=0.02 * sr)
    assert len(trim_silence(x, sr, 40, 20, 0)) == pytest.approx(1.0 * sr, abs=0.02 * sr)
    assert speech_bounds(np.zeros(sr, np.float32), sr, 40, 20, 0) == (0, 0)


def test_load_and_clean_makes_16k_mono_normalised_trimmed(tmp_path, preprocess_cfg):
    path = write_wav(tmp_path / "x.wav", tone(1.0, 44100, amp=0.2, channels=2), sr=44100)
    res = load_and_clean(path, preprocess_cfg)
    assert res.audio.ndim == 1 and (res.orig_sr, res.orig_channels) == (44100, 2)
    assert np.max(np.abs(res.audio)) == pytest.approx(0.95, abs=1e-4)
    assert len(res.audio) / 16000 == pytest.approx(1.2, abs=0.03)  # 1 s tone + 2 x 100 ms padding


def _write(tmp_path, kind):
    p = tmp_path / f"{kind}.wav"
    if kind == "empty_audio":
        p.write_bytes(b"")
    elif kind == "unreadable_audio":
        p.write_bytes(b"RIFF\x00\x00garbage-not-a-wave-file" * 10)
    elif kind == "silent_audio":
        write_wav(p, np.zeros(16000, np.float32))
    elif kind == "nonfinite_audio":
        x = tone()
        x[100] = np.nan
        write_wav(p, x, subtype="FLOAT")
    elif kind == "too_short":
        write_wav(p, tone(0.05, lead=0, tail=0))
    elif kind == "too_long":
        write_wav(p, tone(3.0, lead=0, tail=0))
    elif kind == "missing_audio":
        pass
    return p


@pytest.mark.parametrize("kind", ["empty_audio", "unreadable_audio", "silent_audio", "nonfinite_audio",
                                  "too_short", "too_long", "missing_audio"])
def test_each_defect_is_rejected_with_its_reason(tmp_path, preprocess_cfg, kind):
    cfg = {**preprocess_cfg, "max_duration_s": 2.0}
    with pytest.raises(Rejected) as err:
        load_and_clean(_write(tmp_path, kind), cfg)
    assert err.value.reason == kind
    assert str(tmp_path) in err.value.detail  # the message names the file


def test_overlong_input_is_rejected_from_the_header_without_decoding(tmp_path, preprocess_cfg, monkeypatch):
    path = write_wav(tmp_path / "long.wav", tone(3.0))
    for method in ("read", "blocks"):
        monkeypatch.setattr(sf.SoundFile, method, lambda *a, **k: pytest.fail("decoded a file that the header rules out"))
    with pytest.raises(Rejected, match="max_input_duration_s") as err:
        load_and_clean(path, {**preprocess_cfg, "max_input_duration_s": 2.0})
    assert err.value.reason == "too_long"


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "CMYK", "LA"])
def test_pictures_are_flattened_to_rgb_png(tmp_path, mode):
    src = write_picture(tmp_path / f"in_{mode}.img", mode=mode, size=(300, 150))
    w, h, orig = clean_image(src, tmp_path / "out.png", max_side=100)
    assert (w, h, orig) == (100, 50, mode)
    with Image.open(tmp_path / "out.png") as img:
        assert img.mode == "RGB" and img.size == (100, 50)


def test_alpha_is_composited_over_white(tmp_path):
    src = tmp_path / "a.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(src)
    clean_image(src, tmp_path / "out.png", 64)
    assert Image.open(tmp_path / "out.png").getpixel((0, 0)) == (255, 255, 255)


def test_bad_pictures_are_rejected(tmp_path):
    with pytest.raises(Rejected) as err:
        clean_image(tmp_path / "none.png", tmp_path / "o.png", 64)
    assert err.value.reason == "missing_image"
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(Rejected) as err:
        clean_image(tmp_path / "bad.png", tmp_path / "o.png", 64)
    assert err.value.reason == "unreadable_image"
    assert not (tmp_path / "o.png").exists()


def test_audio_file_names_are_safe_and_distinct():
    assert audio_file_name("F01_0001") == "F01_0001.wav"
    assert audio_file_name("a/b") != audio_file_name("a_b")
    assert "/" not in audio_file_name("a/b")


def _stage(tmp_path, require_image=False, workers=1):
    root = tmp_path / "corpus"
    write_wav(root / "ok1.wav", tone(1.0, 22050, channels=2), sr=22050)
    write_wav(root / "ok2.wav", tone(1.0, 16000))
    write_wav(root / "ok3.wav", tone(1.0, 44100), sr=44100)
    _write(root, "silent_audio")
    write_picture(root / "good.png")
    (root / "broken.png").write_bytes(b"not a picture")
    (root / "m.csv").write_text(
        "utt_id,audio_path,text,speaker,group,image_path\n"
        "u1,ok1.wav,a red bear,S1,impaired,good.png\n"
        "u2,ok2.wav,two blue cups,S2,control,broken.png\n"
        "u3,ok3.wav,   ,S2,control,good.png\n"
        "u4,silent_audio.wav,a pea,S1,impaired,missing.png\n"
        "u4,ok2.wav,dup,S1,impaired,\n")
    ingested, rejects = ingest_manifest(root / "m.csv")
    cfg = __import__("mmasr.config", fromlist=["validate"]).validate({})["preprocess"]
    return preprocess(ingested, rejects, tmp_path / "audio", tmp_path / "images", cfg,
                      require_image=require_image, workers=workers, progress=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_stage_keeps_good_rows_and_accounts_for_every_input(tmp_path, monkeypatch, caplog, workers):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO", logger="mmasr.data.preprocess"):
        utts, images, rejects, metrics = _stage(tmp_path, workers=workers)
    # the workers' own account of their memory: none in one process, 1 or 2 pool processes (who did the 4 jobs)
    lines = [r.getMessage() for r in caplog.records if "worker processes" in r.getMessage()]
    if workers == 1:
        assert lines == []
    else:
        assert len(lines) == 1 and re.match(r"preprocess: [12] worker processes, peak RSS up to \d+\.\d MB each$", lines[0])
    assert utts["utt_id"].tolist() == ["u1", "u2"]
    assert utts["image_id"].tolist()[0] == "good" and pd.isna(utts["image_id"].tolist()[1])  # broken picture -> ASR-only
    for path in utts["audio_path"]:
        audio, sr = sf.read(path)
        assert sr == 16000 and audio.ndim == 1 and sf.info(path).subtype == "PCM_16"
    assert images["image_id"].tolist() == ["good"]
    got = sorted(zip(rejects["kind"], rejects["reason"], rejects["id"]))
    assert got == [("image", "missing_image", "missing"), ("image", "unreadable_image", "broken"),
                   ("utterance", "duplicate_id", "u4"), ("utterance", "empty_transcript", "u3"),
                   ("utterance", "silent_audio", "u4")]
    assert metrics["n_input"] == 5 and metrics["n_kept"] == 2 and metrics["n_rejected"] == 3
    assert metrics["rejected_by_reason"] == {"duplicate_id": 1, "empty_transcript": 1, "silent_audio": 1}
    assert metrics["n_kept_without_image"] == 1
    assert sorted(p.name for p in (tmp_path / "audio").iterdir()) == ["u1.wav", "u2.wav"]


def test_require_image_rejects_utterances_without_a_usable_picture(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    utts, _, rejects, _ = _stage(tmp_path, require_image=True)
    assert utts["utt_id"].tolist() == ["u1"]
    assert ("u2", "unreadable_image") in set(zip(rejects["id"], rejects["reason"]))


def test_empty_input_gives_empty_tables(tmp_path, preprocess_cfg):
    from mmasr.data.ingest import ingested_frame

    utts, images, rejects, metrics = preprocess(ingested_frame([]), rejects_frame([]), tmp_path / "a", tmp_path / "i",
                                                preprocess_cfg, progress=False)
    assert utts.empty and images.empty and rejects.empty and metrics["n_input"] == 0


def _wav_bytes(tmp_path, seconds=1.0):
    return write_wav(tmp_path / "src.wav", tone(seconds)).read_bytes()


def test_truncation_is_read_from_the_wav_header(tmp_path, preprocess_cfg):
    from mmasr.data.preprocess import wav_data_shortfall

    full = _wav_bytes(tmp_path)
    data_at = full.index(b"data")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full[:-1000])
    assert wav_data_shortfall(cut) == (len(full) - data_at - 8, len(full) - data_at - 8 - 1000)
    with pytest.raises(Rejected, match="promises") as err:
        load_and_clean(cut, preprocess_cfg)
    assert err.value.reason == "truncated_audio"
    # Not truncated: a chunk after the samples, or the "length unknown" size a streaming recorder leaves.
    trailing = tmp_path / "trailing.wav"
    trailing.write_bytes(full + b"LIST\x04\x00\x00\x00INFO")
    streamed = tmp_path / "streamed.wav"
    streamed.write_bytes(full[: data_at + 4] + b"\xff\xff\xff\xff" + full[data_at + 8:])
    for path in (trailing, streamed, tmp_path / "src.wav"):
        assert wav_data_shortfall(path) is None, path.name
        assert load_and_clean(path, preprocess_cfg).audio.size > 0, path.name
    flac = tmp_path / "x.flac"
    sf.write(str(flac), tone(), 16000)
    assert wav_data_shortfall(flac) is None


def test_many_channels_are_mixed_down_block_by_block(tmp_path, preprocess_cfg, monkeypatch):
    import mmasr.data.preprocess as pp

    x = tone(1.0, 48000, channels=6)
    path = write_wav(tmp_path / "6ch.wav", x, sr=48000)
    monkeypatch.setattr(pp, "READ_BLOCK_S", 0.1)  # many blocks
    blocked = load_and_clean(path, preprocess_cfg).audio
    c = preprocess_cfg
    whole = resample(to_mono(sf.read(str(path), dtype="float32")[0]), 48000, c["sample_rate"])  # decoded at once
    expected = peak_normalise(trim_silence(whole, c["sample_rate"], c["trim_db"], c["trim_frame_ms"], c["trim_pad_ms"]),
                              c["peak"])
    np.testing.assert_array_equal(blocked, expected)


def test_high_bit_depth_grey_pictures_keep_their_tones():
    from mmasr.data.preprocess import to_8bit

    ramp16 = Image.fromarray(np.array([[0, 257 * 128, 65535]], dtype=np.uint16))
    assert np.asarray(to_8bit(ramp16)).tolist() == [[0, 128, 255]]
    ramp_f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_8bit(ramp_f)).tolist() == [[0, 128, 255]]
    rgb = Image.new("RGB", (2, 2))
    assert to_8bit(rgb) is rgb


def test_worker_peaks_are_the_largest_per_pool_process_and_leave_out_the_main_one():
    from mmasr.data.preprocess import worker_peak_rss

    results = [{"pid": 7, "peak_rss": 100}, {"pid": 8, "peak_rss": 50}, {"pid": 7, "peak_rss": 300},
               {"pid": 7, "peak_rss": 200}, {"pid": 1, "peak_rss": 999}, {"pid": 8, "peak_rss": None}]
    assert worker_peak_rss(results, main_pid=1) == {7: 300, 8: 50}
    assert worker_peak_rss([{"pid": 1, "peak_rss": 5}], main_pid=1) == {}
