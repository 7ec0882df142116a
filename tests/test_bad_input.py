"""The bad-input corpus through ingest, preprocess and split, as the pipeline's rules run them (the
``mmasr`` commands): every defect gets its reject reason or a clear error naming the file, every
legitimate oddity goes through, and every manifest row is accounted for."""

from __future__ import annotations

import json
import logging
import re
import tracemalloc
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from PIL import Image

from mmasr import cli
from mmasr.config import ParamsError, validate
from mmasr.io import read_json
from mmasr.data.preprocess import Rejected, load_and_clean, preprocess
from tests.badcorpus import KEPT, bad_manifests, build_bad_corpus

MB = 1 << 20


def _run(argv: list[str]) -> None:
    rc = cli.main(argv)
    assert rc == 0, f"mmasr {' '.join(argv[:1])} exited {rc}"


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    """Build the corpus and run ingest -> preprocess -> split on it, tracing Python/numpy memory."""
    base = tmp_path_factory.mktemp("bad")
    corpus = build_bad_corpus(base)
    cfg = json.dumps({"data": {"source": "manifest", "manifest": str(corpus.manifest)}})
    import torchaudio.functional  # noqa: F401  (imported before tracing: its import is not the stage's memory)

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        tracemalloc.start()
        try:
            _run(["ingest", "--cfg", cfg, "--quiet", "--out", "p/ingested.parquet", "--rejects", "p/ingest_rejects.parquet"])
            _run(["preprocess", "--cfg", cfg, "--threads", "1", "--quiet", "--ingested", "p/ingested.parquet",
                  "--ingest-rejects", "p/ingest_rejects.parquet", "--audio-dir", "p/audio", "--image-dir", "p/images",
                  "--out", "p/utterances.parquet", "--images", "p/images.parquet", "--rejects", "p/rejects.parquet",
                  "--metrics", "p/preprocess.json"])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        # the bad corpus's speakers say the same few texts: prompt-disjoint splits would leave no dev utterance
        _run(["split", "--cfg", json.dumps({"split": {"disjoint_text": False}}), "--quiet", "--utterances", "p/utterances.parquet", "--out", "p/manifest.parquet",
              "--summary", "p/split.json"])
    p = base / "p"
    return SimpleNamespace(
        base=base, corpus=corpus, peak=peak, metrics=read_json(p / "preprocess.json"),
        ingested=pd.read_parquet(p / "ingested.parquet"), utts=pd.read_parquet(p / "utterances.parquet"),
        manifest=pd.read_parquet(p / "manifest.parquet"), images=pd.read_parquet(p / "images.parquet"),
        rejects=pd.read_parquet(p / "rejects.parquet"))


def _outcomes(pairs) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for utt_id, outcome in pairs:
        out.setdefault(utt_id, []).append(outcome)
    return {k: sorted(v) for k, v in out.items()}


def test_every_row_has_its_expected_outcome(bad_run):
    c = bad_run.corpus
    utt_rejects = bad_run.rejects[bad_run.rejects["kind"] == "utterance"]
    got = _outcomes([(u, KEPT) for u in bad_run.utts["utt_id"]] + list(zip(utt_rejects["id"], utt_rejects["reason"])))
    expected = _outcomes((r.utt_id, r.outcome) for r in c.rows)
    cases = {r.utt_id: r.case for r in c.rows}
    wrong = [f"  {k} ({cases.get(k, '?')}): expected {expected.get(k)}, got {got.get(k)}"
             for k in sorted(set(expected) | set(got)) if expected.get(k) != got.get(k)]
    assert not wrong, "outcomes differ:\n" + "\n".join(wrong)
    stages = Counter(zip(utt_rejects["id"], utt_rejects["stage"]))
    assert stages == Counter((r.utt_id, c.stage(r)) for r in c.rows if r.outcome != KEPT)


def test_every_input_row_is_accounted_for(bad_run):
    c, m = bad_run.corpus, bad_run.metrics
    n_rows = len(c.rows)
    utt_rejects = bad_run.rejects[bad_run.rejects["kind"] == "utterance"]
    assert m["n_input"] == n_rows == m["n_kept"] + m["n_rejected"]
    assert m["n_kept"] == len(bad_run.utts) and m["n_rejected"] == len(utt_rejects)
    assert sum(m["rejected_by_reason"].values()) == m["n_rejected"]
    assert Counter(bad_run.utts["utt_id"]) + Counter(utt_rejects["id"]) == Counter(r.utt_id for r in c.rows)
    # ... and everything kept goes through to the manifest, with a split
    assert sorted(bad_run.manifest["utt_id"]) == c.kept_ids()
    assert bad_run.manifest["split"].isin(["train", "dev", "test"]).all()
    # every distinct picture named by a kept row is cleaned or a reject row (which one: the pictures test)
    pictures = {r.image for r in c.rows if r.image and r.outcome == KEPT}
    assert len(pictures) == len(bad_run.images) + (bad_run.rejects["kind"] == "image").sum()


def test_rejects_say_where_and_why(bad_run):
    c = bad_run.corpus
    for rec in bad_run.rejects.to_dict("records"):
        assert rec["detail"] and rec["reason"], rec
        if rec["stage"] == "preprocess":  # the file is named
            assert Path(rec["path"]).name in rec["detail"], rec
        else:  # the manifest line is named
            assert re.search(r"manifest\.csv row \d+", rec["detail"]), rec
    by_id = bad_run.rejects.set_index("id")
    assert by_id.loc["two_hours", "detail"].endswith("exceeds preprocess.max_input_duration_s=600.0")
    first, second = [r.line for r in c.rows if r.utt_id == "dup"]
    assert first == [r.utt_id for r in c.rows].index("dup") + 3  # a two-line transcript before: lines, not rows
    assert by_id.loc["dup", "detail"] == f"manifest.csv row {second}: utt_id already used by manifest.csv row {first}"
    assert by_id.loc["no_speaker", "detail"] == f"manifest.csv row {c.rows[[r.utt_id for r in c.rows].index('no_speaker')].line}: empty speaker"


def test_kept_audio_is_16k_mono_16bit_and_normalised(bad_run):
    c = bad_run.corpus
    utts = bad_run.utts.set_index("utt_id")
    assert utts["audio_path"].is_unique  # "a/b" and "a_b" do not overwrite each other
    for r in c.rows:
        if r.outcome != KEPT:
            continue
        rec = utts.loc[r.utt_id]
        path = bad_run.base / rec["audio_path"]
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16"), r.case
        audio, _ = sf.read(str(path))
        assert np.max(np.abs(audio)) == pytest.approx(0.95, abs=2e-3), r.case
        assert 1.0 <= rec["duration_s"] <= 1.5, r.case  # 1 s of tone + trim padding, at every input rate
        for key, value in r.expect.items():
            assert rec[key] == value, f"{r.case}: {key} = {rec[key]!r}, expected {value!r}"


def test_pictures_are_rgb_upright_and_small_or_rejected_with_the_utterance_kept(bad_run):
    c = bad_run.corpus
    images = bad_run.images.set_index("image_id")
    utts = bad_run.utts.set_index("utt_id")
    image_rejects = bad_run.rejects[bad_run.rejects["kind"] == "image"]
    assert Counter(zip(image_rejects["id"], image_rejects["reason"])) == c.image_rejects()
    for r in c.rows:
        if r.image_outcome is None:
            continue
        image_id = utts.loc[r.utt_id, "image_id"]
        if r.image_outcome != KEPT:
            assert pd.isna(image_id), f"{r.case}: an unusable picture must leave the utterance ASR-only"
            continue
        rec = images.loc[image_id]  # the utterance's own picture, not another with a similar name
        assert (bad_run.base / rec["orig_path"]).resolve() == (c.root / r.image).resolve(), r.case
        with Image.open(bad_run.base / rec["path"]) as img:
            assert img.mode == "RGB" and img.format == "PNG" and max(img.size) <= 512, r.case
            px = np.asarray(img)
        if r.utt_id == "pic_huge_jpeg":
            assert img.size == (512, 341)
        if r.utt_id == "pic_rotated":  # stored 60x30 with "rotate 90" in EXIF
            assert img.size == (30, 60)
        if r.utt_id == "pic_gray16":  # a 16-bit ramp stays a ramp (not clipped to white)
            assert px[0, 0, 0] < 10 and px[0, -1, 0] > 245 and len(np.unique(px[0, :, 0])) > 30
        if r.utt_id == "pic_rgba":  # (200, 30, 30) at half opacity, over white: light red, not dark red
            assert np.abs(px[0, 0].astype(int) - (228, 143, 143)).max() <= 2, px[0, 0]
        if r.utt_id == "pic_palette_alpha":  # the transparent colour becomes white, not black
            assert tuple(px[0, 0]) == (255, 255, 255)
        if r.utt_id == "pic_cmyk":  # CMYK (0, 200, 200, 0): red
            assert px[0, 0, 0] > 200 and px[0, 0, 1] < 80
    assert len(images) == len(set(images["orig_path"]))  # one row per distinct picture


def test_the_two_hour_file_is_rejected_from_its_header_without_loading_it(bad_run):
    # 2 h at 16 kHz would take 460 MB as float32; everything the stage allocated stayed far below.
    assert bad_run.peak < 100 * MB, f"peak traced memory {bad_run.peak / MB:.0f} MB"
    path = bad_run.corpus.root / "audio" / "two_hours.wav"
    assert path.stat().st_blocks * 512 < MB  # sparse: the test itself costs no disk
    defaults = validate({})
    with pytest.raises(ParamsError, match="max_input_duration_s"):
        validate({"preprocess": {"max_input_duration_s": 7200}})
    cap = 3600.0  # the schema's maximum: a 2-hour file is rejected whatever the params say
    with pytest.raises(Rejected) as err:
        load_and_clean(path, {**defaults["preprocess"], "max_input_duration_s": cap})
    assert err.value.reason == "too_long"


def test_require_image_rejects_utterances_without_a_usable_picture(bad_run, tmp_path, monkeypatch):
    c = bad_run.corpus
    monkeypatch.chdir(bad_run.base)
    ingest_rejects = pd.read_parquet(bad_run.base / "p/ingest_rejects.parquet")
    utts, _, rejects, metrics = preprocess(bad_run.ingested, ingest_rejects, tmp_path / "a", tmp_path / "i",
                                           validate({})["preprocess"], require_image=True, progress=False)
    assert sorted(utts["utt_id"]) == c.kept_ids(require_image=True)
    utt_rejects = rejects[rejects["kind"] == "utterance"]
    assert Counter(zip(utt_rejects["id"], utt_rejects["reason"])) == c.utterance_rejects(require_image=True)
    assert metrics["n_input"] == len(c.rows) == metrics["n_kept"] + metrics["n_rejected"]
    assert utts["image_id"].notna().all()


MANIFEST_CASES = ["missing_column", "extra_columns", "crlf_bom_case", "tsv", "ragged_first_row", "ragged_later_row",
                  "not_utf8", "empty_file", "header_only", "column_twice", "bad_split", "spreadsheet",
                  "broken_parquet", "no_such_manifest"]


def test_manifest_case_list_is_complete(tmp_path):
    assert sorted(c.name for c in bad_manifests(tmp_path)) == sorted(MANIFEST_CASES)


@pytest.mark.parametrize("name", MANIFEST_CASES)
def test_whole_manifest_defects_fail_clearly_odd_manifests_are_read(tmp_path, monkeypatch, caplog, name):
    case = next(c for c in bad_manifests(tmp_path / "m") if c.name == name)
    monkeypatch.chdir(tmp_path)
    cfg = json.dumps({"data": {"source": "manifest", "manifest": str(case.path)}})
    with caplog.at_level(logging.ERROR, logger="mmasr"):
        rc = cli.main(["ingest", "--cfg", cfg, "--quiet", "--out", "out.parquet", "--rejects", "rejects.parquet"])
    if case.error is None:
        assert rc == 0
        df = pd.read_parquet(tmp_path / "out.parquet")
        assert len(df) == case.n_rows
        assert df["text"].str.len().gt(0).all() and df["speaker"].str.startswith("S").all()
    else:
        assert rc == 2
        message = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
        assert str(case.path) in message, message  # names the file ...
        assert re.search(case.error, message), message  # ... and the reason
        assert not (tmp_path / "out.parquet").exists() and not (tmp_path / "rejects.parquet").exists()
