"""LoRA adaptation of Whisper: only the adapters train, the base is untouched, a killed run resumes exactly."""

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from mmasr.adapt.whisper import adapt_whisper
from mmasr.config import validate
from tests.conftest import processed_corpus

P = validate({})
CFG = {**P["adapt"], "steps": 6, "batch_size": 2, "grad_accum": 2, "warmup": 1, "eval_every": 3,
       "checkpoint_every": 2, "lr": 0.01}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    man = processed_corpus(root / "audio", n=8)
    man.loc[:3, "split"] = "train"
    man.loc[4:5, "split"] = "dev"
    return man


def _load(demo_model_dirs):
    from mmasr.models.loading import load_whisper

    return load_whisper(str(demo_model_dirs["whisper"]), device="cpu")


def test_only_adapters_train_and_the_base_is_unchanged(demo_model_dirs, corpus, tmp_path):
    bundle = _load(demo_model_dirs)
    base = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    summary = adapt_whisper(bundle, corpus, tmp_path / "out", tmp_path / "log.csv", tmp_path / "state", CFG,
                            P["nbest"], seed=0, progress=False)
    # The checkpoint holds adapter weights only, and they moved (B starts at zero).
    ckpt = load_file(tmp_path / "state" / "best" / "model.safetensors")
    assert ckpt and all(".A." in k or ".B." in k for k in ckpt)
    assert any(v.abs().sum() > 0 for k, v in ckpt.items() if ".B." in k)
    assert summary["n_adapter_params"] == sum(v.numel() for v in ckpt.values()) < summary["n_base_params"] / 10
    # The peft adapter folder's base weights are the untouched base; the merged model differs exactly where adapted.
    adapter_cfg = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == CFG["rank"] and set(adapter_cfg["target_modules"]) == set(CFG["target_modules"])
    merged = load_file(tmp_path / "out" / "model.safetensors")
    changed = {k for k in base if k in merged and not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith(tuple(f"{m}.weight" for m in CFG["target_modules"])) for k in changed)
    assert {k.rsplit(".", 2)[-2] for k in changed} == set(CFG["target_modules"])  # every target module moved
    from peft import PeftModel

    fresh = _load(demo_model_dirs)
    wrapped = PeftModel.from_pretrained(fresh.model, str(tmp_path / "out" / "adapter"))
    for name, p in wrapped.named_parameters():
        assert ("lora_" in name) or not p.requires_grad
    base_again = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                  for k, v in wrapped.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base_again[k], base[k]) for k in base if k in base_again)
    log = pd.read_csv(tmp_path / "log.csv")
    assert len(log) == CFG["steps"] and log["dev_loss"].notna().sum() == 2


ARGS = dict(cfg=CFG, nbest_cfg=P["nbest"], seed=0, progress=False)


@pytest.fixture(scope="module")
def uninterrupted(demo_model_dirs, corpus, tmp_path_factory):
    """One adaptation run to the end: the reference the other runs are compared with."""
    out = tmp_path_factory.mktemp("uninterrupted")
    summary = adapt_whisper(_load(demo_model_dirs), corpus, out / "a", out / "a.csv", out / "sa", **ARGS)
    return out, summary


def test_a_killed_adaptation_resumes_to_the_uninterrupted_result(demo_model_dirs, corpus, uninterrupted, tmp_path):
    ref, _ = uninterrupted
    stopped = adapt_whisper(_load(demo_model_dirs), corpus, tmp_path / "b", tmp_path / "b.csv", tmp_path / "sb",
                            stop_after=3, **ARGS)
    assert stopped is None and not (tmp_path / "b").exists()
    adapt_whisper(_load(demo_model_dirs), corpus, tmp_path / "b", tmp_path / "b.csv", tmp_path / "sb", resume=True,
                  **ARGS)
    a, b = load_file(ref / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pd.testing.assert_frame_equal(pd.read_csv(ref / "a.csv"), pd.read_csv(tmp_path / "b.csv"))


def test_adapters_learn_from_train_and_are_selected_on_dev_only(demo_model_dirs, corpus, uninterrupted, tmp_path):
    ref, summary = uninterrupted
    # The kept state is the one with the lowest dev loss in the log (not the last step's).
    log = pd.read_csv(ref / "a.csv").dropna(subset=["dev_loss"])
    assert summary["best_step"] == int(log.loc[log["dev_loss"].idxmin(), "step"])
    assert summary["best_dev_loss"] == pytest.approx(log["dev_loss"].min(), rel=1e-6)
    # Test utterances (here with other transcripts and audio) change nothing: neither training nor selection sees them.
    changed = corpus.copy()
    test = changed["split"] == "test"
    assert test.any()
    changed.loc[test, "text"] = "three green boats"
    changed.loc[test, "audio_path"] = changed.loc[~test, "audio_path"].iloc[0]
    adapt_whisper(_load(demo_model_dirs), changed, tmp_path / "c", tmp_path / "c.csv", tmp_path / "sc", **ARGS)
    a, c = load_file(ref / "a" / "model.safetensors"), load_file(tmp_path / "c" / "model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)
    pd.testing.assert_frame_equal(pd.read_csv(ref / "a.csv"), pd.read_csv(tmp_path / "c.csv"))
