import json

import pytest

from mmasr.config import validate
from mmasr.rescoring.transcribe import transcribe, tuned_alpha
from tests.conftest import tone, write_picture, write_wav


@pytest.fixture
def params(demo_model_dirs):
    return validate({"models": {"whisper": str(demo_model_dirs["whisper"]), "clip": str(demo_model_dirs["clip"]),
                                "device": "cpu"}, "nbest": {"max_new_tokens": 6}})


def test_any_rate_and_channels_asr_only_with_warning(params, tmp_path):
    audio = write_wav(tmp_path / "a.wav", tone(1.0, 44100, channels=2), sr=44100)
    out = transcribe(audio, params)
    assert out["mode"] == "asr_only" and "no picture" in out["warning"]
    assert out["transcription"] == out["hypotheses"][0]["text"]
    assert sum(h["asr_prob"] for h in out["hypotheses"]) == pytest.approx(1.0)


def test_with_a_picture_is_multimodal_and_uses_the_tuned_alpha(params, tmp_path):
    audio = write_wav(tmp_path / "a.flac", tone(1.0, 22050), sr=22050)
    picture = write_picture(tmp_path / "p.png")
    metrics = tmp_path / "fusion.json"
    metrics.write_text(json.dumps({"best_alpha": 0.35}))
    out = transcribe(audio, params, image=picture, fusion_metrics=metrics)
    assert out["mode"] == "multimodal" and out["alpha"] == 0.35 and "warning" not in out
    hyps = out["hypotheses"]
    assert out["transcription"] == hyps[0]["text"]
    assert [h["fused_score"] for h in hyps] == sorted((h["fused_score"] for h in hyps), reverse=True)
    for h in hyps:
        assert h["fused_score"] == pytest.approx(0.65 * h["asr_prob"] + 0.35 * h["clip_prob"])


def test_a_log_linear_headline_fuses_log_linearly_with_its_dev_weights(params, tmp_path):
    audio = write_wav(tmp_path / "a.flac", tone(1.0, 22050), sr=22050)
    picture = write_picture(tmp_path / "p.png")
    metrics = tmp_path / "fusion.json"
    metrics.write_text(json.dumps({"best_alpha": 0.35, "fusion_form": "log_linear",
                                   "weights_fused_log_linear_form": {"lambda_clip": 0.1, "lambda_lm": 0.0, "beta": 0.5}}))
    out = transcribe(audio, params, image=picture, fusion_metrics=metrics)
    assert out["mode"] == "multimodal" and out["form"] == "log_linear" and "alpha" not in out
    assert (out["lambda_clip"], out["beta"]) == (0.1, 0.5)
    hyps = out["hypotheses"]
    assert out["transcription"] == hyps[0]["text"]
    for h in hyps:
        assert h["fused_score"] == pytest.approx(h["sum_logprob"] + 0.1 * 100.0 * h["clip_score"] + 0.5 * h["n_tokens"])
    assert transcribe(audio, params, image=picture, fusion_metrics=metrics, alpha=0.35)["form"] == "seed"


def test_missing_picture_falls_back_to_asr_only(params, tmp_path):
    audio = write_wav(tmp_path / "a.wav", tone())
    out = transcribe(audio, params, image=tmp_path / "nope.png", alpha=0.5)
    assert out["mode"] == "asr_only" and "not found" in out["warning"]
    out = transcribe(audio, params, image_id="p001", embeddings=tmp_path / "none.npz", alpha=0.5)
    assert out["mode"] == "asr_only" and "no embedding cache" in out["warning"]


def test_unusable_audio_is_a_clear_error(params, tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot transcribe .*bad.wav: empty_audio"):
        transcribe(tmp_path / "bad.wav", params)
    assert tuned_alpha(tmp_path / "missing.json") is None
