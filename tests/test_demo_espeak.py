"""The demo corpus with real English speech (demo.synthesiser: espeak) and the degradations of its
impaired speakers (mmasr.demo.corpus.espeak_utterance); eSpeak NG's repeatability (mmasr.demo.tts)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import correlate, resample_poly

from mmasr import config

from mmasr.demo import corpus as demo

from mmasr.demo import tts as tts
from mmasr.demo.corpus import (
    DEFAULT_CONFIG,
    add_breath_noise,
    band_limit,
    build_speakers,
    espeak_utterance,
    espeak_voice_slot,
    generate_demo_corpus,
    tremor_warp,
    validate_config,
)
from tests.test_demo import read_csv, tree_hashes

pytest.importorskip("espeakng_loader")
if not tts.espeak_available():  # pragma: no cover - the wheel is in the test extra
    pytest.skip("eSpeak NG does not load here", allow_module_level=True)

TINY = {
    "synthesiser": "espeak",
    "n_impaired_speakers": 2,
    "n_control_speakers": 2,
    "utts_per_speaker": 3,
    "image_size": 32,
    "sample_rates": [16000, 22050, 44100],
    "stereo_fraction": 0.5,
    "flac_fraction": 0.5,
}
SR = 22050


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("espeak")
    out = {
        "a": generate_demo_corpus(base / "a", TINY, seed=0, progress=False).parent,
        # a process pool synthesises in another order in other processes: not a byte may change
        "pool": generate_demo_corpus(base / "pool", TINY, seed=0, progress=False, workers=2).parent,
        "b": generate_demo_corpus(base / "b", TINY, seed=1, progress=False).parent,
        "formant": generate_demo_corpus(base / "formant", {**TINY, "synthesiser": "formant"}, seed=0,
                                        progress=False).parent,
    }
    return out


def _active(x: np.ndarray, sr: int, floor_db: float = 40.0) -> np.ndarray:
    """Per-10-ms-frame energies of ``x`` from its first to its last frame within ``floor_db`` of the loudest."""
    hop = int(0.01 * sr)
    frames = x[: len(x) // hop * hop].reshape(-1, hop)
    energy = (frames ** 2).mean(axis=1) + 1e-20
    level = 10 * np.log10(energy)
    on = np.flatnonzero(level > level.max() - floor_db)
    return energy[on[0]:on[-1] + 1]


def _band_energy(x: np.ndarray, sr: int, lo: float, hi: float) -> float:
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / sr)
    return float(spec[(f >= lo) & (f < hi)].sum())


def _clean(speaker: demo.Speaker) -> demo.Speaker:
    """The speaker's voice, rate and pitch with every degradation off (the control condition)."""
    return dataclasses.replace(speaker, espeak=dataclasses.replace(
        speaker.espeak, word_gap_ms=0, pitch_range=50, tremor=0.0, breath=0.0, lowpass_hz=None,
        noise_db=demo.CONTROL_NOISE_DB))


# ------------------------------------------------------------------ the corpus


def test_every_audio_file_decodes_as_planned(corpora):
    root = corpora["a"]
    rows = read_csv(root / "manifest.csv")
    broken = {r["audio_path"] for r in read_csv(root / "defects.csv")
              if r["defect"] in ("empty_file", "corrupt_header")}
    assert len(rows) == 4 * 3 + len(demo.DEFECT_KINDS)
    formats, rates = set(), set()
    for r in rows:
        path = root / r["audio_path"]
        if r["audio_path"] in broken:
            continue
        data, sr = sf.read(io.BytesIO(path.read_bytes()))
        info = sf.info(path)
        formats.add(info.format)
        rates.add(sr)
        assert data.shape[0] > 0.04 * sr  # the too_short defect: 50 ms
        assert np.abs(np.nan_to_num(data)).max() <= 1.0
    assert formats == {"WAV", "FLAC"} and rates <= {16000, 22050, 44100} and len(rates) >= 2


def test_same_seed_is_byte_identical_with_and_without_pool_and_another_seed_differs(corpora):
    ha, hpool, hb = (tree_hashes(corpora[k]) for k in ("a", "pool", "b"))
    assert ha == hpool
    common = set(ha) & set(hb)
    assert any(ha[k] != hb[k] for k in common if k.startswith("audio/"))


def test_only_the_audio_differs_from_the_formant_corpus(corpora):
    esp, formant = tree_hashes(corpora["a"]), tree_hashes(corpora["formant"])
    assert set(esp) == set(formant)
    same = {k for k in esp if esp[k] == formant[k]}
    assert {k for k in esp if not k.startswith("audio/")} <= same  # manifest, defects, pictures
    regular = {r["audio_path"] for r in read_csv(corpora["a"] / "manifest.csv")} - {
        r["audio_path"] for r in read_csv(corpora["a"] / "defects.csv")}
    assert not regular & same  # every utterance is spoken anew


def test_control_audio_is_the_speakers_espeak_voice(corpora):
    defective = {r["audio_path"] for r in read_csv(corpora["a"] / "defects.csv")}
    rows = [r for r in read_csv(corpora["a"] / "manifest.csv")
            if r["group"] == "control" and r["audio_path"] not in defective]
    assert len(rows) == 2 * 3
    for row in rows:
        x, sr = sf.read(corpora["a"] / row["audio_path"], always_2d=True)
        spk = {s.name: s for s in build_speakers(TINY, 0)}[row["speaker"]]
        e = spk.espeak
        raw, native = tts.espeak_synthesise(row["text"], e.voice, e.rate_wpm, e.pitch, pitch_range=e.pitch_range)
        g = np.gcd(sr, native)
        ref = resample_poly(raw.astype(float), sr // g, native // g)
        # the control utterance is eSpeak's speech, padded, with faint noise: it correlates almost perfectly
        xc = correlate(x[:, 0], ref, method="fft")
        assert xc.max() / (np.linalg.norm(x[:, 0]) * np.linalg.norm(ref)) > 0.95, row["utt_id"]


# ------------------------------------------------------------------ speakers and voices


def test_speakers_get_distinct_voices_of_their_sex():
    spk = build_speakers({**TINY, "n_impaired_speakers": 6, "n_control_speakers": 6}, 0)
    assert len({s.espeak.voice for s in spk}) == 12
    assert all(("+f" in s.espeak.voice) == (s.sex == "F") for s in spk)
    # 16 speakers, 8 of them female, 6 female voices: two women borrow a man's voice, with a raised pitch
    spk = build_speakers({**TINY, "n_impaired_speakers": 8, "n_control_speakers": 8}, 0)
    assert len({(s.espeak.voice, s.espeak.pitch) for s in spk}) == 16
    borrowed = [s for s in spk if s.sex == "F" and "+f" not in s.espeak.voice]
    assert len(borrowed) == 2
    for b in borrowed:
        man = next(s for s in spk if s.sex == "M" and s.espeak.voice == b.espeak.voice)
        assert b.espeak.pitch >= man.espeak.pitch + 6
    for s in spk:
        e = s.espeak
        if s.group == "control":
            assert 150 <= e.rate_wpm <= 180 and e.noise_db == demo.CONTROL_NOISE_DB
            assert (e.tremor, e.breath, e.lowpass_hz, e.word_gap_ms) == (0.0, 0.0, None, 0)
        else:
            assert 150 / 1.3 - 1 <= e.rate_wpm <= 180 / 1.3 + 1 and e.noise_db == DEFAULT_CONFIG["impaired_noise_db"]
            assert e.tremor > 0 and e.breath > 0 and 3000 <= e.lowpass_hz <= 4000 and e.word_gap_ms > 0
            assert e.pitch_range < 45
    # a speaker's voice does not depend on how many other speakers there are
    few = build_speakers({**TINY, "n_impaired_speakers": 1, "n_control_speakers": 1}, 0)
    assert few[0] == spk[0] and few[1] == spk[8]
    # the formant synthesiser's speakers carry no eSpeak voice, and are otherwise the same
    formant = build_speakers({"n_impaired_speakers": 8, "n_control_speakers": 8}, 0)
    assert all(f.espeak is None and dataclasses.replace(e, espeak=None) == f for f, e in zip(formant, spk))


def test_voice_slots_are_distinct_for_every_mix_up_to_fourteen_speakers():
    used = demo._FEMALE_VOICES + demo._MALE_VOICES
    assert sorted(used + demo._UNUSED_VOICES) == sorted(tts.ESPEAK_VOICES)
    for n_imp in range(15):
        for n_ctl in range(15 - n_imp):
            slots = [espeak_voice_slot(demo.speaker_name(g, i)[0], g, i)
                     for g, n in (("impaired", n_imp), ("control", n_ctl)) for i in range(n)]
            assert len({v for v, _, _ in slots}) == len(slots), (n_imp, n_ctl)
            assert all(cycle == 0 for _, _, cycle in slots)


def test_beyond_fourteen_speakers_voices_repeat_with_another_pitch_or_rate():
    spk = build_speakers({**TINY, "n_impaired_speakers": 12, "n_control_speakers": 12}, 0)
    keys = [(s.espeak.voice, s.espeak.pitch, s.espeak.rate_wpm) for s in spk]
    assert len(set(keys)) == len(keys)
    assert len({s.espeak.voice for s in spk}) == 14


# ------------------------------------------------------------------ impaired speech


def test_impaired_speech_is_slower_and_band_limited():
    spk = build_speakers({**TINY, "n_impaired_speakers": 2, "n_control_speakers": 2}, 3)
    for text in ("two green goats", "a red bear"):
        stats: dict[str, list[tuple[float, float]]] = {"impaired": [], "control": []}
        for s in spk:
            x = espeak_utterance(text, s, SR, np.random.default_rng(5))
            hi_lo = _band_energy(x, SR, 5000, 10000) / _band_energy(x, SR, 100, 3000)
            stats[s.group].append((len(_active(x, SR)) / 100, hi_lo))
        imp, ctl = (np.array(stats[g]) for g in ("impaired", "control"))
        assert imp[:, 0].mean() > 1.2 * ctl[:, 0].mean()  # slower (rate / 1.3, pauses between words)
        assert imp[:, 1].max() < 0.1 * ctl[:, 1].min()  # little left above the band limit


def test_each_degradation_against_the_same_voice_undegraded():
    s = build_speakers({**TINY, "n_impaired_speakers": 1, "n_control_speakers": 0}, 0)[0]
    text = "three yellow cups"

    def speak(**change) -> np.ndarray:
        voice = dataclasses.replace(_clean(s).espeak, **change)
        return espeak_utterance(text, dataclasses.replace(s, espeak=voice), SR, np.random.default_rng(0))

    def quiet_level(y: np.ndarray) -> float:
        """The quietest frames (the pauses between words) re. the loudest, dB."""
        frames = _active(y, SR, floor_db=50)
        return 10 * np.log10(np.percentile(frames, 10) / frames.max())

    def hi_lo(y: np.ndarray) -> float:
        return _band_energy(y, SR, 5000, 10000) / _band_energy(y, SR, 100, 3000)

    x = speak()
    assert len(_active(speak(word_gap_ms=120), SR)) > len(_active(x, SR)) + 15  # pauses between words
    assert hi_lo(speak(lowpass_hz=3500.0)) < 0.05 * hi_lo(x)  # band limit
    # noise at 20 dB SNR fills the pauses, which are far quieter with the control's 45 dB SNR room noise
    gaps = {"word_gap_ms": 120}
    assert quiet_level(speak(**gaps, noise_db=-20.0)) > quiet_level(speak(**gaps)) + 15
    # the breath noise and the warp are checked on synthetic signals below; here: they are applied
    for change in ({"breath": 0.25}, {"tremor": 0.03}):
        y = speak(**change)
        assert y.shape != x.shape or not np.allclose(y, x, atol=1e-3), change


def test_tremor_warp_wobbles_pitch_and_keeps_the_duration():
    sr, f = 22050, 200.0
    tone = np.sin(2 * np.pi * f * np.arange(2 * sr) / sr)
    assert np.array_equal(tremor_warp(tone, sr, 0.0, 5.0, np.random.default_rng(0)), tone[: len(tone)])
    y = tremor_warp(tone, sr, 0.03, 5.0, np.random.default_rng(0))
    assert abs(len(y) / len(tone) - 1) < 0.03
    up = np.flatnonzero((y[:-1] < 0) & (y[1:] >= 0))  # upward zero crossings: one per cycle
    inst = sr / np.diff(up)
    assert 0.985 * f < inst.mean() < 1.015 * f
    assert inst.max() > 1.01 * f and inst.min() < 0.99 * f  # the pitch wobbles ...
    assert inst.max() < 1.04 * f and inst.min() > 0.96 * f  # ... by at most the depth


def test_breath_noise_follows_the_speech_envelope():
    sr = 22050
    t = np.arange(3 * sr) / sr
    burst = np.where((t > 1) & (t < 2), np.sin(2 * np.pi * 150 * t), 0.0)  # silence, a voiced second, silence
    y = add_breath_noise(burst, sr, 0.2, np.random.default_rng(0))
    noise = y - burst
    inside = noise[int(1.1 * sr):int(1.9 * sr)]
    assert np.abs(noise[: int(0.9 * sr)]).max() < 1e-6  # no breath in the silences
    # inside: noise at 0.2 of the burst's RMS (0.707), between 1 and 6 kHz where the tone has nothing
    assert np.sqrt(np.mean(inside ** 2)) == pytest.approx(0.2 * np.sqrt(0.5), rel=0.15)
    assert _band_energy(y, sr, 1000, 6000) > 100 * _band_energy(burst, sr, 1000, 6000)


def test_band_limit_removes_energy_above_the_cutoff():
    sr = 22050
    white = np.random.default_rng(0).standard_normal(sr)
    y = band_limit(white, sr, 3500.0)
    assert _band_energy(y, sr, 100, 3000) > 0.8 * _band_energy(white, sr, 100, 3000)
    assert _band_energy(y, sr, 6000, 11000) < 10 ** (-25 / 10) * _band_energy(white, sr, 6000, 11000)


# ------------------------------------------------------------------ config and eSpeak NG


def test_synthesiser_default_and_bad_values_are_rejected_with_the_choices():
    assert DEFAULT_CONFIG["synthesiser"] == "formant"
    assert validate_config({"synthesiser": "espeak"})["synthesiser"] == "espeak"
    with pytest.raises(ValueError, match=r"key 'demo.synthesiser': 'festival' is not one of \['formant', 'espeak'\]"):
        validate_config({"synthesiser": "festival"})
    with pytest.raises(config.ParamsError, match=r"key 'demo.synthesiser'.*'festival' is not one of \['formant', 'espeak'\]"):
        config.validate({"demo": {"synthesiser": "festival"}})
    assert config.validate({"demo": {"synthesiser": "espeak"}})["demo"]["synthesiser"] == "espeak"


def test_espeak_is_repeatable_whatever_was_spoken_before():
    assert tts._engine().repeatable
    first = tts.espeak_synthesise("two green goats", "en-us+f2", 150)[0]
    for voice, gap, pitch_range in (("en-us", 0, 50), ("en+m3", 80, 20), ("en-us+f2", 30, 35)):
        tts.espeak_synthesise("three yellow cups and a red bear", voice, 120, word_gap_ms=gap, pitch_range=pitch_range)
        again = tts.espeak_synthesise("two green goats", "en-us+f2", 150)[0]
        assert hashlib.sha256(again.tobytes()).digest() == hashlib.sha256(first.tobytes()).digest()
    with pytest.raises(ValueError, match="pitch_range"):
        tts.espeak_synthesise("a red bear", pitch_range=101)
