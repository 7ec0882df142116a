"""The issue-28 acceptance: a generated CHAT corpus (tests/chat_corpus.py) runs end to end, from
`snakemake --cores 2 --configfile config/tiny.yaml config/chat.yaml` to the report, with the default split policy."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from mmasr.io import read_json
from tests.chat_corpus import chat_data_cfg, write_chat_corpus
from tests.conftest import project_copy, snakemake

pytest.importorskip("espeakng_loader")
pytest.importorskip("pylangacq")


@pytest.mark.slow
def test_chat_corpus_runs_end_to_end_with_the_default_split(tmp_path):
    work = project_copy(tmp_path / "work")
    corpus = write_chat_corpus(tmp_path / "corpus", n_speakers=8)
    (work / "config" / "chat.yaml").write_text(json.dumps({"data": chat_data_cfg(corpus)}))
    proc = snakemake(work, "--configfile", "config/tiny.yaml", "config/chat.yaml")
    assert "pipeline finished" in proc.stdout + proc.stderr
    manifest = pd.read_parquet(work / "data/processed/manifest.parquet")
    assert set(manifest["source"]) == {"chat"} and manifest["recording_id"].nunique() == 8
    assert set(manifest["task"]) == {"Broken Window", "Cat Rescue", "Cinderella"}
    assert (manifest["duration_s"] < 30).all()
    split = read_json(work / "results/metrics/split.json")
    assert split["disjoint_text"] is True and split["disjoint_picture"] is False
    assert split["test_n_image_in_train"] > 0  # every speaker describes the same pictures: kept, counted
    fusion = read_json(work / "results/metrics/fusion.json")
    assert fusion["test_n_picture_in_train"] > 0 and fusion["n_no_image"] > 0  # Cinderella: ASR-only
    rejects = pd.read_parquet(work / "data/processed/rejects.parquet")
    assert {"unintelligible", "missing_bullet", "bullet_outside_media", "overlapping_bullet"} <= set(rejects["reason"])
    assert (work / "results/report.html").is_file()
