"""data.source: lhotse (issue 28 item 5): a Lhotse manifest of the demo corpus gives the demo source's rows;
a missing recording, a missing file, a segment outside its recording are rejects rows or clear errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from mmasr.data.ingest import INGESTED_COLUMNS, ingest_manifest
from mmasr.data.lhotse_ingest import ingest_lhotse
from mmasr.demo.corpus import DEFAULT_CONFIG, generate_demo_corpus

lhotse = pytest.importorskip("lhotse")
from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet  # noqa: E402

TINY = {**DEFAULT_CONFIG, "n_impaired_speakers": 2, "n_control_speakers": 2, "utts_per_speaker": 3, "image_size": 32,
        "sample_rates": [16000, 22050], "stereo_fraction": 0.5, "flac_fraction": 0.5, "defects": False}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return generate_demo_corpus(tmp_path_factory.mktemp("lhotse") / "demo", TINY, seed=3, progress=False).parent


def lhotse_manifests(demo: Path, demo_rows: pd.DataFrame) -> tuple[RecordingSet, SupervisionSet]:
    """A RecordingSet and SupervisionSet of the demo corpus, built with lhotse's own constructors from the
    demo manifest (paths relative to the demo folder, as a recipe writing beside its data would)."""
    recordings, supervisions = [], []
    for rec in pd.read_csv(demo / "manifest.csv", dtype=str, keep_default_na=False).to_dict("records"):
        recording = Recording.from_file(demo / rec["audio_path"], recording_id=rec["utt_id"])
        recording.sources[0].source = rec["audio_path"]  # relative to the manifest's folder
        recordings.append(recording)
        custom = {"group": rec["group"]} | ({"image_path": rec["image_path"]} if rec["image_path"] else {})
        custom |= {"split": rec["split"]} if rec.get("split") else {}
        supervisions.append(SupervisionSegment(id=rec["utt_id"], recording_id=rec["utt_id"], start=0.0,
                                               duration=recording.duration, channel=recording.channel_ids,
                                               text=rec["text"], speaker=rec["speaker"], custom=custom))
    return RecordingSet.from_recordings(recordings), SupervisionSet.from_segments(supervisions)


def same_rows(a: pd.DataFrame, b: pd.DataFrame) -> None:
    keep = [c for c in INGESTED_COLUMNS if c not in ("source", "recording_id")]
    pd.testing.assert_frame_equal(a[keep].reset_index(drop=True), b[keep].reset_index(drop=True))


def test_a_lhotse_manifest_of_the_demo_corpus_gives_the_demo_rows(demo, monkeypatch):
    monkeypatch.chdir(demo.parent)  # display paths are relative to the working directory, as in a project
    want, want_rejects = ingest_manifest(demo / "manifest.csv", source="demo")
    assert len(want) == 12 and want_rejects.empty and want["image_path"].notna().any()
    recordings, supervisions = lhotse_manifests(demo, want)
    recordings.to_file(demo / "recordings.jsonl.gz")
    supervisions.to_file(demo / "supervisions.jsonl.gz")
    got, rejects = ingest_lhotse({"lhotse_recordings": str(demo / "recordings.jsonl.gz"),
                                  "lhotse_supervisions": str(demo / "supervisions.jsonl.gz")})
    assert rejects.empty, rejects.to_dict("records")
    same_rows(got, want)
    assert set(got["source"]) == {"lhotse"}
    assert got["recording_id"].tolist() == want["utt_id"].tolist()
    # the same corpus as one CutSet (cuts.jsonl.gz), the form most recipes write
    CutSet.from_manifests(recordings=recordings, supervisions=supervisions).to_file(demo / "cuts.jsonl.gz")
    cut_rows, cut_rejects = ingest_lhotse({"lhotse_cuts": str(demo / "cuts.jsonl.gz")})
    assert cut_rejects.empty
    same_rows(cut_rows.set_index("utt_id").loc[want["utt_id"]].reset_index().assign(row=want["row"].to_numpy()), want)


def test_missing_recordings_and_files_are_rejects_rows_naming_them(demo, monkeypatch):
    monkeypatch.chdir(demo.parent)
    want, _ = ingest_manifest(demo / "manifest.csv", source="demo")
    recordings, supervisions = lhotse_manifests(demo, want)
    first, second = recordings[0], recordings[1]
    # the first recording's file is not there; the second recording is left out of the RecordingSet
    first.sources[0].source = "audio/gone.wav"
    RecordingSet.from_recordings([first] + [r for r in recordings if r.id not in (first.id, second.id)]).to_file(
        demo / "recordings_missing.jsonl.gz")
    supervisions.to_file(demo / "supervisions_missing.jsonl.gz")
    got, rejects = ingest_lhotse({"lhotse_recordings": str(demo / "recordings_missing.jsonl.gz"),
                                  "lhotse_supervisions": str(demo / "supervisions_missing.jsonl.gz")})
    by_id = rejects.set_index("id")
    assert by_id.loc[first.id, "reason"] == "missing_audio" and "gone.wav" in by_id.loc[first.id, "detail"]
    assert by_id.loc[second.id, "reason"] == "missing_recording"
    assert f"recording {second.id!r} is not in" in by_id.loc[second.id, "detail"]
    assert "recordings_missing.jsonl.gz" in by_id.loc[second.id, "detail"]
    assert len(got) + len(rejects) == len(want)  # nothing lost


def test_bad_manifests_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="needs data.lhotse_cuts"):
        ingest_lhotse({"lhotse_recordings": "r.jsonl.gz"})
    with pytest.raises(FileNotFoundError, match="nope.jsonl.gz: Lhotse CutSet manifest not found"):
        ingest_lhotse({"lhotse_cuts": str(tmp_path / "nope.jsonl.gz")})
    bad = tmp_path / "cuts.jsonl.gz"
    with gzip.open(bad, "wt") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match="cuts.jsonl.gz: cannot read as a Lhotse manifest"):
        ingest_lhotse({"lhotse_cuts": str(bad)})
    sups = tmp_path / "supervisions.jsonl.gz"
    SupervisionSet.from_segments([SupervisionSegment("u1", "r1", 0, 1, text="a", speaker="s")]).to_file(sups)
    with pytest.raises(ValueError, match="holds a Lhotse SupervisionSet, .* expected a CutSet"):
        ingest_lhotse({"lhotse_cuts": str(sups)})


def test_a_supervision_covering_part_of_a_recording_is_a_segment(demo, tmp_path, monkeypatch):
    monkeypatch.chdir(demo.parent)
    rec = Recording.from_file(next((demo / "audio").glob("*.wav")), recording_id="visit1")
    sups = [SupervisionSegment("visit1_a", "visit1", 0.1, 0.4, text="a red bear", speaker="F01",
                               custom={"group": "impaired", "task": "cat"}),
            SupervisionSegment("visit1_b", "visit1", rec.duration - 0.2, 0.5, text="too far", speaker="F01")]
    RecordingSet.from_recordings([rec]).to_file(tmp_path / "recordings.jsonl.gz")
    SupervisionSet.from_segments(sups).to_file(tmp_path / "supervisions.jsonl.gz")
    cfg = {"lhotse_recordings": str(tmp_path / "recordings.jsonl.gz"),
           "lhotse_supervisions": str(tmp_path / "supervisions.jsonl.gz"), "root": "/"}
    got, rejects = ingest_lhotse(cfg)
    row = got.iloc[0]
    assert (row["utt_id"], row["recording_id"], row["start"], row["end"]) == ("visit1_a", "visit1", 0.1, 0.5)
    assert row["group"] == "impaired" and row["task"] == "cat"
    assert rejects.set_index("id").loc["visit1_b", "reason"] == "segment_outside_recording"


def test_the_ingest_command_reads_a_lhotse_source(demo, tmp_path, monkeypatch):
    from mmasr.cli import main

    monkeypatch.chdir(demo.parent)
    want, _ = ingest_manifest(demo / "manifest.csv", source="demo")
    recordings, supervisions = lhotse_manifests(demo, want)
    CutSet.from_manifests(recordings=recordings, supervisions=supervisions).to_file(demo / "cuts2.jsonl.gz")
    cfg = json.dumps({"data": {"source": "lhotse", "lhotse_cuts": str(demo / "cuts2.jsonl.gz")}})
    assert main(["ingest", "--cfg", cfg, "--out", str(tmp_path / "i.parquet"),
                 "--rejects", str(tmp_path / "r.parquet")]) == 0
    got = pd.read_parquet(tmp_path / "i.parquet")
    assert sorted(got["utt_id"]) == sorted(want["utt_id"]) and set(got["source"]) == {"lhotse"}
