"""data.source: chat (TalkBank .cha transcripts + long recordings) and segments cut by preprocess."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from mmasr.data import preprocess as pp
from mmasr.data.chat import audible_words, ingest_chat, leading_gem, read_task_pictures
from mmasr.data.ingest import ingest_manifest
from mmasr.data.sources import ingest
from tests.chat_corpus import PICTURED, chat_data_cfg, chat_text, write_chat_corpus

pytest.importorskip("espeakng_loader")
pytest.importorskip("pylangacq")
from mmasr.demo import tts  # noqa: E402

if not tts.espeak_available():  # pragma: no cover - the wheel is in the test extra
    pytest.skip("eSpeak NG does not load here", allow_module_level=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_chat_corpus(tmp_path_factory.mktemp("chat"))


def expected(corpus, reference):
    """(rows by utt_id, rejects by utt_id) the fixture wrote, for the PAR tier."""
    rows, rejects = {}, {}
    for spk in corpus["speakers"]:
        n = 0
        for u in spk.utts:
            if u.code != "PAR":
                continue
            n += 1
            utt_id = f"{spk.name}_PAR_{n:04d}"
            if u.reject:
                rejects[utt_id] = u.reject
            else:
                rows[utt_id] = {"text": u.target if reference == "target" else u.audible, "task": u.task,
                                "start": u.start_ms / 1000, "end": u.end_ms / 1000, "speaker": f"{spk.name}_PAR",
                                "group": {"Aphasia": "impaired", "Control": "control"}[spk.group],
                                "recording_id": spk.name}
    return rows, rejects


@pytest.mark.parametrize("reference", ["target", "audible"])
def test_chat_rows_match_what_the_fixture_wrote(corpus, reference, caplog):
    with caplog.at_level(logging.INFO, logger="mmasr.data.chat"):
        table, rejects = ingest(chat_data_cfg(corpus, reference))
    want_rows, want_rejects = expected(corpus, reference)
    assert dict(zip(rejects["id"], rejects["reason"])) == want_rejects
    assert set(rejects["reason"]) == {"unintelligible", "missing_bullet", "bullet_outside_media", "overlapping_bullet"}
    assert (rejects["stage"] == "ingest").all() and rejects["detail"].str.contains(r"s\d\d\.cha").all()
    got = table.set_index("utt_id")
    assert set(got.index) == set(want_rows)
    for utt_id, want in want_rows.items():
        row = got.loc[utt_id]
        assert row["text"] == want["text"], utt_id
        assert row["task"] == want["task"] and row["speaker"] == want["speaker"] and row["group"] == want["group"]
        assert row["recording_id"] == want["recording_id"] and row["source"] == "chat"
        assert row["start"] == pytest.approx(want["start"]) and row["end"] == pytest.approx(want["end"])
        assert row["audio_path"].endswith(f"media/{want['recording_id']}.wav")
        if want["task"] == "Cinderella":  # no picture row: ASR-only
            assert pd.isna(row["image_id"]) and pd.isna(row["image_path"])
        else:
            assert row["image_path"].endswith(PICTURED[want["task"]])
    # every speaker describes the same pictures
    per_speaker = table.dropna(subset=["image_id"]).groupby("speaker")["image_id"].apply(frozenset)
    assert per_speaker.nunique() == 1 and len(per_speaker.iloc[0]) == 2
    # the references differ where the markup says they should
    if reference == "target":
        assert not table["text"].str.contains(r"\buh\b|\bth\b|windy|laughs|xxx").any()
        assert table["text"].str.contains("angry").sum() == len(corpus["speakers"])
    else:
        assert table["text"].str.contains(r"\buh\b").sum() == len(corpus["speakers"])
        assert table["text"].str.contains("windy").sum() == len(corpus["speakers"])
    assert "Cinderella" in caplog.text and "ASR-only" in caplog.text and "Refused Umbrella" in caplog.text


def test_audible_words_drop_events_terminators_and_other_speakers():
    assert audible_words("the boy &=laughs the boy uh ba ball +... *INVyeah .") == \
        ["the", "boy", "the", "boy", "uh", "ba", "ball"]


def test_leading_gem_is_read_from_the_text():
    assert leading_gem("@Begin\n@G:\tCookie Theft\n*PAR:\thi . \x150_1\x15\n@G:\tOther\n") == "Cookie Theft"
    assert leading_gem("@Begin\n*PAR:\thi .\n") is None


def test_malformed_cha_names_the_file(tmp_path):
    (tmp_path / "bad.cha").write_text("@UTF8\n@Begin\n*PAR:\tthe boy \x150_1000\x15\n@End\n")  # no terminator
    with pytest.raises(ValueError, match=r"bad\.cha: malformed CHAT file"):
        ingest_chat(tmp_path)
    (tmp_path / "bad.cha").write_text("just some notes\n")
    with pytest.raises(ValueError, match=r"bad\.cha: malformed CHAT file: no @Begin"):
        ingest_chat(tmp_path)
    (tmp_path / "bad.cha").unlink()
    with pytest.raises(ValueError, match="no .cha files"):
        ingest_chat(tmp_path)


def test_missing_media_gives_rejects_naming_it(corpus, tmp_path):
    spk = corpus["speakers"][1]
    (tmp_path / "x.cha").write_text(chat_text(spk).replace(f"@Media:\t{spk.name}", "@Media:\tnowhere"))
    rows, rejects = ingest_chat(tmp_path)
    n_par = sum(u.code == "PAR" for u in spk.utts)
    assert rows == [] and len(rejects) == n_par
    assert {r["reason"] for r in rejects} == {"missing_audio"} and "nowhere" in rejects[0]["detail"]


def test_task_pictures_errors(tmp_path):
    (tmp_path / "p.png").write_bytes(b"")
    (tmp_path / "tp.csv").write_text("task,image_path\nA,p.png\nA,p.png\n")
    with pytest.raises(ValueError, match=r"tp\.csv: line 3: task 'A' is listed twice"):
        read_task_pictures(tmp_path / "tp.csv", None)
    (tmp_path / "tp.csv").write_text("task,picture\nA,p.png\n")
    with pytest.raises(ValueError, match="needs columns task, image_path"):
        read_task_pictures(tmp_path / "tp.csv", None)
    (tmp_path / "tp.csv").write_text("task,image_path\nA,../p.png\n")
    with pytest.raises(ValueError, match="outside the data root"):
        read_task_pictures(tmp_path / "tp.csv", None)


def test_preprocess_cuts_segments_reading_each_recording_once(corpus, tmp_path, preprocess_cfg, monkeypatch):
    table, rejects = ingest(chat_data_cfg(corpus))
    cfg = {**preprocess_cfg, "max_duration_s": 30.0, "max_input_duration_s": 600.0}
    calls = []
    real = pp.decode_audio
    monkeypatch.setattr(pp, "decode_audio", lambda path, c: calls.append(str(path)) or real(path, c))
    utts, images, all_rejects, metrics = pp.preprocess(table, rejects, tmp_path / "audio", tmp_path / "img", cfg,
                                                       progress=False)
    n_rec = len(corpus["speakers"])
    assert len(calls) == n_rec and len(set(calls)) == n_rec  # one decode per recording, not per utterance
    assert all(s.duration_s > 30 for s in corpus["speakers"])  # the recordings are longer than the 30 s limit
    assert len(utts) == len(table) and metrics["n_kept"] == len(table)
    assert {"recording_id", "task", "start", "end"} <= set(utts.columns)
    full = {}
    for rec in utts.to_dict("records"):
        src = rec["orig_audio_path"]
        if src not in full:
            audio, sr = sf.read(src, dtype="float32")
            full[src] = pp.resample(audio, sr, 16000)
        a, b = int(round(rec["start"] * 16000)), int(round(rec["end"] * 16000))
        want = pp.finish_audio(full[src][a:b], cfg, "x")
        got, sr = sf.read(rec["audio_path"], dtype="float32")
        assert sr == 16000 and len(got) == len(want)
        assert np.max(np.abs(got - want)) < 2e-4  # 16-bit PCM rounding
        assert rec["duration_s"] < (rec["end"] - rec["start"]) + 1e-3


def test_segment_outside_recording_is_rejected_in_preprocess(tmp_path, preprocess_cfg):
    sr = 16000
    t = np.arange(sr * 3) / sr
    sf.write(tmp_path / "long.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sr)
    (tmp_path / "m.csv").write_text("audio_path,text,speaker,start,end\nlong.wav,one two,S1,0.5,1.5\n"
                                    "long.wav,three four,S1,1.5,2.5\nlong.wav,five,S1,2.8,9.0\n")
    table, rejects = ingest_manifest(tmp_path / "m.csv")
    assert table["utt_id"].tolist() == ["long_500_1500", "long_1500_2500", "long_2800_9000"]
    assert set(table["recording_id"]) == {"long"}
    utts, _, rej, _ = pp.preprocess(table, rejects, tmp_path / "a", tmp_path / "i",
                                    {**preprocess_cfg, "min_duration_s": 0.1}, progress=False)
    assert utts["utt_id"].tolist() == ["long_1500_2500", "long_500_1500"]
    assert rej["reason"].tolist() == ["bullet_outside_media"] and "long.wav [2.800-9.000 s]" in rej["detail"].iloc[0]


def test_manifest_segment_bounds_are_checked(tmp_path):
    (tmp_path / "m.csv").write_text("audio_path,text,speaker,start,end\na.wav,hi,S1,2.0,1.0\n")
    with pytest.raises(ValueError, match=r"m\.csv row 2: segment start 2.0 s must be >= 0 and before its end"):
        ingest_manifest(tmp_path / "m.csv")
    (tmp_path / "m.csv").write_text("audio_path,text,speaker,start,end\na.wav,hi,S1,x,1.0\n")
    with pytest.raises(ValueError, match="must both be numbers"):
        ingest_manifest(tmp_path / "m.csv")


def test_ingest_chat_is_deterministic(corpus, tmp_path):
    shutil.copytree(corpus["root"], tmp_path / "copy")
    a = ingest(chat_data_cfg(corpus))[0]
    b = ingest(chat_data_cfg({**corpus, "cha_dir": tmp_path / "copy/cha", "media_dir": tmp_path / "copy/media",
                              "task_pictures": tmp_path / "copy/task_pictures.csv", "root": tmp_path / "copy"}))[0]
    cols = ["utt_id", "speaker", "group", "text", "task", "start", "end", "image_id"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
