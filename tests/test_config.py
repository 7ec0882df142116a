import json
import re

import numpy as np
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


# ------------------------------------------------------------------ one section on its own (validate_section)


@pytest.mark.parametrize("path", ["demo", "demo_models", "demo_models.whisper", "demo_models.clip", "pretrain.lm",
                                  "pretrain.text_encoder", "split"])
def test_a_section_alone_gets_the_defaults_the_whole_file_gets(path):
    whole = config.validate({})
    for part in path.split("."):
        whole = whole[part]
    assert config.validate_section(path, None) == config.validate_section(path, {}) == whole
    assert list(config.validate_section(path, None)) == list(config.section_schema(path)["properties"])


def test_section_defaults_are_the_schema_file_defaults():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "params.schema.yaml").read_text())
    demo = schema["properties"]["demo"]["properties"]
    assert config.validate_section("demo") == {k: p["default"] for k, p in demo.items()}
    lm = schema["properties"]["pretrain"]["properties"]["lm"]["properties"]
    assert config.validate_section("pretrain.lm") == {k: p["default"] for k, p in lm.items()}


def test_a_partial_section_is_filled_in_schema_order_and_the_input_left_alone():
    given = {"wrong_description_rate": 0.2, "utts_per_speaker": 3}
    out = config.validate_section("demo", given)
    assert given == {"wrong_description_rate": 0.2, "utts_per_speaker": 3}
    assert out == config.validate({"demo": given})["demo"]
    assert list(out) == list(config.section_schema("demo")["properties"])
    assert config.validate_section("seed", 7) == 7
    with pytest.raises(KeyError, match="no section 'demo.nope'"):
        config.validate_section("demo.nope")


@pytest.mark.parametrize(
    "path, section, key, why",
    [
        # demo (formerly mmasr.demo.corpus.validate_config)
        ("demo", {"impaired_rate": 0.5}, "demo.impaired_rate", "less than the minimum of 1"),
        ("demo", {"impaired_rate": 4.5}, "demo.impaired_rate", "greater than the maximum of 4"),
        ("demo", {"utts_per_speaker": 9000}, "demo.utts_per_speaker", "greater than the maximum of 8999"),
        ("demo", {"utts_per_speaker": 3.0}, "demo.utts_per_speaker", "not of type 'integer'"),
        ("demo", {"image_size": 4096}, "demo.image_size", "greater than the maximum of 2048"),
        ("demo", {"sample_rates": [16000, 200000]}, "demo.sample_rates.1", "greater than the maximum of 192000"),
        ("demo", {"impaired_noise_db": -121}, "demo.impaired_noise_db", "less than the minimum of -120"),
        ("demo", {"stereo_fraction": float("nan")}, "demo.stereo_fraction", "not of type 'number'"),
        ("demo", {"n_control_speakers": -1}, "demo.n_control_speakers", "less than the minimum of 0"),
        ("demo", {"n_impaired_speakers": 0, "n_control_speakers": 0}, "demo.n_impaired_speakers", "at least 1"),
        ("demo", {"impaired_voicing_blur": [0.9, 0.1]}, "demo.impaired_voicing_blur", "lo <= hi"),
        ("demo", {"scene_objects": [3, 2]}, "demo.scene_objects", "min <= max"),
        ("demo", {"scene_objects": [1, 5]}, "demo.scene_objects.1", "greater than the maximum of 4"),
        ("demo", {"defects": "yes"}, "demo.defects", "not of type 'boolean'"),
        ("demo", {"n_speakers": 3}, "demo.n_speakers", "'n_speakers' was unexpected"),
        # demo_models (formerly mmasr.demo.models.validate_config)
        ("demo_models", {"whisper": {"d_model": 130}}, "demo_models.whisper.d_model", "divisible"),
        ("demo_models", {"clip": {"image_size": 100}}, "demo_models.clip.image_size", "multiple of"),
        ("demo_models", {"clip": {"max_position_embeddings": 4}}, "demo_models.clip.max_position_embeddings",
         "less than the minimum of 8"),
        ("demo_models.whisper", {"layers": 2}, "demo_models.whisper.layers", "'layers' was unexpected"),
        # pretrain.lm / pretrain.text_encoder (formerly mmasr.demo.text_models.validate_config)
        ("pretrain.lm", {"heads": 3}, "pretrain.lm.hidden_size", "divisible by pretrain.lm.heads=3"),
        ("pretrain.lm", {"kv_heads": 3}, "pretrain.lm.heads", "divisible by pretrain.lm.kv_heads=3"),
        ("pretrain.lm", {"hidden_size": 120, "heads": 8}, "pretrain.lm.hidden_size", "must be even"),
        ("pretrain.lm", {"steps": 0}, "pretrain.lm.steps", "less than the minimum of 1"),
        ("pretrain.lm", {"lr": "x"}, "pretrain.lm.lr", "not of type 'number'"),
        ("pretrain.lm", {"grad_clip": float("inf")}, "pretrain.lm.grad_clip", "not of type 'number'"),
        ("pretrain.text_encoder", {"mask_prob": 1.0}, "pretrain.text_encoder.mask_prob",
         "greater than or equal to the maximum of 1"),
        ("pretrain.text_encoder", {"dropout": 1}, "pretrain.text_encoder.dropout",
         "greater than or equal to the maximum of 1"),
        ("pretrain.text_encoder", {"max_position_embeddings": 7}, "pretrain.text_encoder.max_position_embeddings",
         "less than the minimum of 8"),
        ("seed", -1, "seed", "less than the minimum of 0"),
    ],
)
def test_a_bad_section_value_is_named_alone_and_in_the_whole_file(path, section, key, why):
    with pytest.raises(config.ParamsError, match=f"key '{re.escape(key)}': .*{re.escape(why)}"):
        config.validate_section(path, section)
    whole = section
    for part in reversed(path.split(".")):
        whole = {part: whole}
    with pytest.raises(config.ParamsError, match=f"key '{re.escape(key)}': .*{re.escape(why)}"):
        config.validate(whole)


@pytest.mark.parametrize("path, section", [
    ("demo", {"n_impaired_speakers": 1, "n_control_speakers": 0}),  # one group may be empty
    ("demo", {"impaired_rate": 1, "impaired_noise_db": -120, "utts_per_speaker": 8999, "image_size": 2048}),
    ("demo", {"sample_rates": (16000, 192000), "scene_objects": [4, 4], "impaired_voicing_blur": [1, 1]}),
    ("demo", {"utts_per_speaker": np.int64(3), "stereo_fraction": np.float64(0.5)}),
    ("pretrain.text_encoder", {"max_position_embeddings": 8, "dropout": 0}),
])
def test_the_edges_of_the_ranges_are_accepted(path, section):
    config.validate_section(path, section)


@pytest.mark.parametrize("path", sorted((REPO / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_real_model_configs_ask_for_twice_the_beams_they_keep(path):
    """A real Whisper's beams often differ only in case or punctuation and collapse after normalisation, so a
    config that names a real model (models.whisper) asks for at least twice the beams it keeps (5 of 5 left
    lists of 1-3 hypotheses). A test rather than a schema rule: the demo's one-token-per-word Whisper keeps 5 of 5."""
    override = yaml.safe_load(path.read_text()) or {}
    if "whisper" not in (override.get("models") or {}):
        pytest.skip(f"{path.name} names no Whisper")
    n = config.load([REPO / "params.yaml", path])["nbest"]
    assert n["num_beams"] >= 2 * n["keep"] and n["num_return_sequences"] >= 2 * n["keep"], (
        f"{path.name}: nbest asks for {n['num_beams']} beams, returns {n['num_return_sequences']}, keeps {n['keep']}")
