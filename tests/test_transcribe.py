import json

import numpy as np
import pytest
import soundfile as sf

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


def test_the_command_picks_what_fuse_picks_for_the_same_utterance_and_alpha(params, demo_model_dirs, tmp_path):
    """`mmasr transcribe` run as a command, against the pipeline's own route for the same utterance: the
    nbest stage's n-best (run_nbest on the preprocessed audio), the clip_scores stage's cosines and the fuse
    stage's choice at one α (fixed_alpha_choice)."""
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    import pandas as pd
    from PIL import Image

    from mmasr.data.preprocess import load_and_clean
    from mmasr.data.text import normaliser
    from mmasr.models.loading import clip_image_embeddings, load_from_params
    from mmasr.rescoring.clip import clip_scores
    from mmasr.rescoring.fusion import fixed_alpha_choice, to_arrays
    from mmasr.rescoring.nbest import run_nbest

    audio = write_wav(tmp_path / "a.wav", tone(1.2, 22050, freq=180.0), sr=22050)
    picture = write_picture(tmp_path / "p.png")
    # the pipeline's route: preprocess, then the stages' functions on a one-utterance manifest
    samples = load_and_clean(audio, params["preprocess"]).audio
    cleaned = write_wav(tmp_path / "processed.wav", samples, sr=params["preprocess"]["sample_rate"])
    manifest = pd.DataFrame([{"utt_id": "u1", "split": params["nbest"]["splits"][0], "audio_path": str(cleaned),
                              "duration_s": len(samples) / params["preprocess"]["sample_rate"], "image_id": "pic"}])
    nbest = run_nbest(load_from_params("whisper", params["models"]), manifest, params["nbest"],
                      normaliser(params["text"]), progress=False)
    clip = load_from_params("clip", params["models"])
    with Image.open(picture) as img:
        embeddings = {"pic": clip_image_embeddings(clip, [img.convert("RGB")])[0]}
    scored, _, _ = clip_scores(nbest, manifest, embeddings, clip, params["text"], progress=False)
    nb = to_arrays(scored, pd.Series({"u1": "unused"}), params["text"])
    tau = params["fusion"]["tau"]
    picks = {float(a): int(fixed_alpha_choice(nb, a, tau)[0]) for a in np.round(np.linspace(0, 1, 21), 2)}
    # an α at which the picture changes fuse's pick (not Whisper's own first): the command must fuse to match
    alpha = next((a for a, c in picks.items() if c != picks[0.0]), None)
    assert alpha is not None, f"the picture never changes the pick here: {picks}, n-best {scored['text'].tolist()}"

    cfg = {"models": params["models"], "nbest": {"max_new_tokens": params["nbest"]["max_new_tokens"]}}
    mmasr = Path(sys.executable).parent / "mmasr"
    proc = subprocess.run([str(mmasr), "transcribe", str(audio), "--image", str(picture), "--alpha", str(alpha),
                           "--cfg", json.dumps(cfg)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["mode"] == "multimodal" and out["alpha"] == alpha and out["tau"] == tau and "warning" not in out
    assert out["transcription"] == nb.raw[0, picks[alpha]] != nb.raw[0, picks[0.0]]
    # the same hypotheses with the same ASR and CLIP scores as the stages'
    stage = scored.set_index("text")
    assert sorted(h["text"] for h in out["hypotheses"]) == sorted(stage.index)
    for h in out["hypotheses"]:
        assert h["asr_score"] == pytest.approx(stage.at[h["text"], "asr_score"], abs=1e-5)
        assert h["clip_score"] == pytest.approx(stage.at[h["text"], "clip_cos"], abs=1e-5)


# ---------------------------------------------------------------- long recordings (Silero VAD)

LONG_TEXTS = ["the boy is reaching for the cookie jar", "a red bear sits under the tree",
              "the mother is washing the dishes", "water is running over the sink", "the girl laughs at her brother"]
LONG_GAPS_S = [2.0, 6.0, 5.0, 7.0, 4.5, 6.0]  # before, between and after the utterances: 30.5 s of silence
VAD_TOLERANCE_S = 0.35  # speech_pad_ms (0.1 s) + Silero's 32 ms windows + its onset/offset lag, with margin


@pytest.fixture(scope="module")
def long_recording(tmp_path_factory):
    """eSpeak NG utterances separated by silences, about 40 s in all; returns (path, [(start, end) of each
    utterance's speech in seconds])."""
    tts = pytest.importorskip("mmasr.demo.tts")
    if not tts.espeak_available():
        pytest.skip("eSpeak NG does not load here")
    from mmasr.data.preprocess import speech_bounds

    pieces, placed, t = [], [], 0.0
    sr = None
    for gap, text in zip(LONG_GAPS_S, LONG_TEXTS + [None]):
        audio, sr = tts.espeak_synthesise(text, "en-us", rate_wpm=150) if text else (None, sr)
        pieces.append(np.zeros(int(round(gap * sr)), np.float32))
        t += gap
        if text:
            a, b = speech_bounds(audio, sr, threshold_db=40, frame_ms=10, pad_ms=0)
            placed.append((t + a / sr, t + b / sr))
            pieces.append(audio)
            t += len(audio) / sr
    rng = np.random.default_rng(0)
    signal = np.concatenate(pieces)
    signal = signal + rng.normal(0, 1e-4, len(signal)).astype(np.float32)  # a quiet room, not digital silence
    path = write_wav(tmp_path_factory.mktemp("long") / "visit.wav", 0.5 * signal / np.abs(signal).max(), sr=sr)
    return path, placed


def test_a_long_recording_is_cut_by_silero_vad_where_the_speech_is(params, long_recording, tmp_path):
    path, placed = long_recording
    assert sf.info(str(path)).duration > params["transcribe"]["long_after_s"]
    picture = write_picture(tmp_path / "p.png")
    out = transcribe(path, params, image=picture, alpha=0.4)
    assert out["mode"] == "multimodal" and out["duration_s"] == pytest.approx(sf.info(str(path)).duration, abs=1e-3)
    segs = out["segments"]
    assert len(segs) == len(placed), [(s["start"], s["end"]) for s in segs]
    print("VAD minus placed (s):", [(round(s["start"] - a, 3), round(s["end"] - b, 3)) for s, (a, b) in zip(segs, placed)])
    for seg, (start, end) in zip(segs, placed):
        assert abs(seg["start"] - start) <= VAD_TOLERANCE_S and abs(seg["end"] - end) <= VAD_TOLERANCE_S, (seg, start, end)
        hyps = seg["hypotheses"]
        assert seg["transcription"] == hyps[0]["text"]
        for h in hyps:  # each segment rescored with the picture
            assert h["fused_score"] == pytest.approx(0.6 * h["asr_prob"] + 0.4 * h["clip_prob"])
    assert out["transcription"] == " ".join(s["transcription"] for s in segs if s["transcription"])
    assert out["vad"]["model"].startswith("silero-vad 6.2.3")


def test_a_long_recording_without_a_picture_and_a_short_one_keep_their_forms(params, long_recording, tmp_path):
    path, placed = long_recording
    out = transcribe(path, {**params, "transcribe": {**params["transcribe"], "max_segment_s": 4.0},
                            "nbest": {**params["nbest"], "batch_size": 2}})
    assert out["mode"] == "asr_only" and all("fused_score" not in h for s in out["segments"] for h in s["hypotheses"])
    assert all(s["end"] - s["start"] <= 4.0 + 1e-6 for s in out["segments"])
    short = transcribe(write_wav(tmp_path / "short.wav", tone(2.0)), params)
    assert "segments" not in short and "duration_s" not in short


def test_silero_vad_finds_no_speech_in_a_quiet_long_file(params, tmp_path):
    from mmasr.rescoring.vad import merge_close

    hum = 0.01 * np.sin(2 * np.pi * 50 * np.arange(35 * 16000) / 16000).astype(np.float32)
    out = transcribe(write_wav(tmp_path / "hum.wav", hum), params)
    assert out["segments"] == [] and out["transcription"] == "" and "no speech" in out["warning"]
    assert merge_close([(0, 1), (1.5, 2), (5, 6)], 1.0, 30) == [(0, 2), (5, 6)]
    assert merge_close([(0, 1), (1.5, 2)], 1.0, 1.5) == [(0, 1), (1.5, 2)]
