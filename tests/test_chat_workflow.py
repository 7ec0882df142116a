"""The issue-28 acceptance: a generated CHAT corpus (tests/chat_corpus.py) runs end to end, from
`snakemake --cores 2 --configfile config/tiny.yaml config/chat.yaml` to the fusion results, with the default split
policy."""

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
def test_chat_corpus_runs_to_fusion_with_the_default_split(tmp_path):
    work = project_copy(tmp_path / "work")
    corpus = write_chat_corpus(tmp_path / "corpus", n_speakers=8)
    (work / "config" / "chat.yaml").write_text(json.dumps({"data": chat_data_cfg(corpus)}))
    # What is CHAT's own runs: ingest, cutting segments from long recordings, the split, fusion over shared
    # pictures. The stages after the manifest (projector, CLAP, probe, report) read it through the same contract
    # whatever the source: the tiny and TORGO runs cover them (this run went to the report until issue 26's CI cut).
    snakemake(work, "--configfile", "config/tiny.yaml", "config/chat.yaml", "--", "results/metrics/fusion.json")
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
