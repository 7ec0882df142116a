import json

import pandas as pd

from mmasr.cli import main
from tests.conftest import tone, write_wav


def test_cli_runs_ingest_preprocess_split_from_a_manifest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spk in ("A", "B", "C"):
        write_wav(tmp_path / "c" / f"{spk}.wav", tone())
    (tmp_path / "c" / "m.csv").write_text("audio_path,text,speaker\nA.wav,one,A\nB.wav,two,B\nC.wav,three,C\n")
    cfg = json.dumps({"data": {"source": "manifest", "manifest": "c/m.csv"}})
    assert main(["ingest", "--cfg", cfg]) == 0
    assert main(["preprocess", "--cfg", cfg, "--quiet"]) == 0
    assert main(["split", "--cfg", cfg]) == 0
    manifest = pd.read_parquet("data/processed/manifest.parquet")
    assert sorted(manifest["utt_id"]) == ["A", "B", "C"]
    assert json.loads((tmp_path / "results/metrics/preprocess.json").read_text())["n_kept"] == 3


def test_cli_errors_name_the_problem_and_exit_2(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.csv").write_text("audio_path,text\nA.wav,one\n")
    assert main(["ingest", "--cfg", json.dumps({"data": {"source": "manifest", "manifest": "m.csv"}})]) == 2
    assert "missing required column(s) 'speaker'" in caplog.text
    assert main(["ingest", "--cfg", json.dumps({"data": {"source": "manifest"}})]) == 2
    assert "data.source=manifest needs data.manifest" in caplog.text
    assert main(["split", "--cfg", json.dumps({"split": {"dev_fractoin": 0.1}})]) == 2
    assert "split.dev_fractoin" in caplog.text
    assert not (tmp_path / "data").exists()  # nothing half-written


def test_provenance_hashes_only_the_keys_a_stage_reads():
    """The same hash whether a command got its keys from --cfg (Snakemake; other keys at their defaults)
    or from the whole params file (DVC), and a different one when a key it reads changes."""
    from mmasr.cli import provenance
    from mmasr.config import validate

    keys = ("seed", "pretrain.whisper", "models.device", "nbest.language")
    whole_file = validate({"pretrain": {"clip": {"steps": 3}}, "fusion": {"tau": 5.0}, "nbest": {"max_new_tokens": 9}})
    from_cfg = validate({})
    assert provenance(whole_file, keys)["params_hash"] == provenance(from_cfg, keys)["params_hash"]
    for changed in ({"pretrain": {"whisper": {"steps": 3}}}, {"seed": 1}, {"nbest": {"language": "en"}}):
        assert provenance(validate(changed), keys)["params_hash"] != provenance(from_cfg, keys)["params_hash"], changed
    assert provenance(from_cfg, ("fusion",))["seed"] == from_cfg["seed"]


def test_threads_are_capped_at_the_usable_cores(monkeypatch):
    """`snakemake --cores 8` on a 2-core machine hands a job 8 threads: the command uses at most the cores its
    affinity mask allows, from --threads and from MMASR_THREADS alike, and refuses a count below 1."""
    import os

    import pytest

    from mmasr import cli

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert cli.usable_cores() == 2
    parser = cli.build_parser()
    assert parser.parse_args(["split", "--threads", "8"]).threads == 2
    assert parser.parse_args(["split", "--threads", "1"]).threads == 1
    monkeypatch.setenv("MMASR_THREADS", "8")
    assert cli.build_parser().parse_args(["split"]).threads == 2
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(["split", "--threads", bad])
