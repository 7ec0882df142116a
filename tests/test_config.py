import json

import pytest
import yaml

from mmasr import config
from tests.conftest import REPO


def test_defaults_fill_every_section():
    p = config.validate({})
    assert p["seed"] == 13
    assert p["data"]["source"] == "demo"
    assert p["preprocess"]["sample_rate"] == 16000
    assert p["split"]["speakers"] == {"train": [], "dev": [], "test": []}


def test_repo_params_file_is_valid_and_equals_schema_defaults():
    # params.yaml documents every default; drift between it and the schema would confuse users.
    assert config.load(REPO / "params.yaml") == config.validate({})


@pytest.mark.parametrize(
    "params, key",
    [
        ({"seeed": 1}, "seeed"),
        ({"data": {"sourse": "demo"}}, "data.sourse"),
        ({"data": {"source": "youtube"}}, "data.source"),
        ({"demo": {"utts_per_speaker": "many"}}, "demo.utts_per_speaker"),
        ({"split": {"speakers": {"tset": ["F01"]}}}, "split.speakers.tset"),
        ({"preprocess": {"peak": 1.5}}, "preprocess.peak"),
        ({"fusion": {"alpha_start": -0.1}}, "fusion.alpha_start"),
        ({"fusion": {"alpha_stop": 1.5}}, "fusion.alpha_stop"),
        ({"fusion": {"alpha_step": 0}}, "fusion.alpha_step"),
        ({"fusion": {"alpha_start": 0.8, "alpha_stop": 0.2}}, "fusion.alpha_stop"),
        ({"nbest": {"num_beams": 2, "num_return_sequences": 5}}, "nbest.num_return_sequences"),
    ],
)
def test_bad_key_or_type_is_named(params, key):
    with pytest.raises(config.ParamsError, match=f"key '{key}'"):
        config.validate(params)


def test_load_merges_cfg_json_over_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump({"seed": 5, "demo": {"utts_per_speaker": 3}}))
    p = config.load(f, json.dumps({"demo": {"n_control_speakers": 2}}))
    assert (p["seed"], p["demo"]["utts_per_speaker"], p["demo"]["n_control_speakers"]) == (5, 3, 2)


def test_load_reports_missing_and_malformed_files(tmp_path):
    with pytest.raises(config.ParamsError, match="no such parameter file"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(config.ParamsError, match="not valid YAML"):
        config.load(bad)
