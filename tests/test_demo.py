"""Tests of the synthetic demo corpus generator (mmasr.demo.corpus)."""

from __future__ import annotations

import csv
import hashlib
import itertools
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from scipy.signal import butter, sosfilt

from mmasr import config
from mmasr.demo import corpus as demo
from mmasr.demo.corpus import (
    DEFAULT_CONFIG,
    DEFECT_KINDS,
    LEXICON,
    MINIMAL_PAIRS,
    NOUNS,
    PARTNER,
    all_phrases,
    build_speakers,
    draw_picture,
    draw_scene,
    plan_scene,
    generate_demo_corpus,
    stop_voicing_cues,
    synthesize_utterance,
    validate_config,
    voicing_cue,
)

SMALL = {
    "n_impaired_speakers": 2,
    "n_control_speakers": 2,
    "utts_per_speaker": 6,
    "image_size": 64,
    "stereo_fraction": 0.5,
    "flac_fraction": 0.5,
}
N_REGULAR = 4 * 6


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    a = generate_demo_corpus(base / "a", SMALL, seed=0, progress=False)
    # same seed through a process pool: must not change a single byte
    a2 = generate_demo_corpus(base / "a2", SMALL, seed=0, progress=False, workers=2)
    b = generate_demo_corpus(base / "b", SMALL, seed=1, progress=False)
    return a.parent, a2.parent, b.parent


@pytest.fixture(scope="module")
def corpus(corpora) -> Path:
    return corpora[0]


@pytest.fixture(scope="module")
def rows(corpus) -> list[dict[str, str]]:
    return read_csv(corpus / "manifest.csv")


@pytest.fixture(scope="module")
def defects(corpus) -> dict[str, dict[str, str]]:
    return {r["defect"]: r for r in read_csv(corpus / "defects.csv")}


# ------------------------------------------------------------------ determinism


def test_same_seed_is_byte_identical_with_and_without_pool(corpora):
    a, a2, _ = corpora
    ha, ha2 = tree_hashes(a), tree_hashes(a2)
    assert ha == ha2
    assert len(ha) > N_REGULAR  # audio + images + csvs


def test_different_seed_gives_different_corpus(corpora):
    a, _, b = corpora
    ha, hb = tree_hashes(a), tree_hashes(b)
    common = set(ha) & set(hb)
    assert any(ha[k] != hb[k] for k in common)
    assert [r["text"] for r in read_csv(a / "manifest.csv")] != [r["text"] for r in read_csv(b / "manifest.csv")]


def test_no_temporary_directory_left_behind(corpora):
    parent = corpora[0].parent
    assert sorted(p.name for p in parent.iterdir()) == ["a", "a2", "b"]


def test_a_failed_rewrite_keeps_the_old_corpus_and_leaves_no_temporary(tmp_path, monkeypatch):
    cfg = {"n_impaired_speakers": 1, "n_control_speakers": 1, "utts_per_speaker": 1, "defects": False}
    out = generate_demo_corpus(tmp_path / "corpus", cfg, seed=3, progress=False).parent
    before = tree_hashes(out)

    def broken(path, *args):
        raise OSError("disk full")

    monkeypatch.setattr(demo, "_write_csv", broken)
    with pytest.raises(OSError, match="disk full"):
        generate_demo_corpus(out, cfg, seed=4, progress=False)
    assert tree_hashes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


# ------------------------------------------------------------------ manifest


def test_manifest_layout(corpus, rows):
    raw = (corpus / "manifest.csv").read_bytes()
    assert b"\r" not in raw
    assert raw.split(b"\n", 1)[0] == b"utt_id,speaker,group,audio_path,text,image_path"
    assert len(rows) == N_REGULAR + len(DEFECT_KINDS)
    ids = [r["utt_id"] for r in rows]
    assert ids == sorted(ids)
    assert {r["speaker"] for r in rows} == {"F01", "M01", "FC01", "MC01"}
    for r in rows:
        assert r["utt_id"].startswith(r["speaker"] + "_")
        assert r["group"] == ("control" if "C" in r["speaker"] else "impaired")
        assert not Path(r["audio_path"]).is_absolute() and r["audio_path"].startswith("audio/")
        assert r["audio_path"].endswith((".wav", ".flac"))
        assert r["image_path"].startswith("images/") and r["image_path"].endswith(".png")
        assert (corpus / r["audio_path"]).is_file()


def _descriptions() -> set[str]:
    return {demo.describe(intro, p) for intro in demo.INTROS for p in all_phrases()}


def test_manifest_text_is_a_description_in_the_lexicon(corpus, rows, defects):
    descriptions = _descriptions()
    special = {defects["empty_transcript"]["audio_path"]}
    for r in rows:
        if r["audio_path"] in special:
            assert r["text"] == ""
            continue
        assert r["text"] in descriptions
        assert r["text"] == r["text"].lower()
        assert all(w in LEXICON for w in r["text"].split())
    # regular rows: one utterance per (speaker, index), 6 per speaker
    regular = [r for r in rows if not r["utt_id"].split("_")[1].startswith("9")]
    regular_ids = {r["utt_id"] for r in regular}
    assert {f"{s}_{i:04d}" for s in ("F01", "M01", "FC01", "MC01") for i in range(1, 7)} == regular_ids


def test_each_utterance_has_its_own_picture_and_scenes_csv_describes_it(corpus, rows, defects):
    missing = defects["missing_image"]["audio_path"]
    used = {r["image_path"] for r in rows if r["audio_path"] != missing}
    written = {f"images/{p.name}" for p in (corpus / "images").iterdir()}
    assert used == written
    scenes = {s["image_path"]: s for s in read_csv(corpus / "scenes.csv")}
    assert set(scenes) == written and len(written) == N_REGULAR  # defective rows borrow a picture
    regular = [r for r in rows if not r["utt_id"].split("_")[1].startswith("9")]
    assert all(r["image_path"] == f"images/{r['utt_id']}.png" for r in regular)
    speaker_of = {r["image_path"]: r["speaker"] for r in regular}
    for r in rows:
        if r["audio_path"] == missing or not r["text"]:
            continue
        assert speaker_of[r["image_path"]] == r["speaker"]  # no picture crosses speakers
        img = Image.open(corpus / r["image_path"])
        assert img.size == (64, 64) and img.mode == "RGB"
        scene = scenes[r["image_path"]]
        objects = scene["objects"].split("; ")
        assert 2 <= len(objects) <= 3
        nouns = [o.split()[-1] for o in objects]
        assert len(set(nouns)) == len(nouns)
        described = objects[int(scene["described"])]
        said = " ".join(r["text"].split()[-3:])
        assert (described == said) == (scene["picture_agrees"] == "true")


def test_speakers_say_disjoint_descriptions_in_minimal_pair_units():
    speakers = build_speakers(validate_config({"n_impaired_speakers": 12, "n_control_speakers": 12}), 3)
    pools = demo.description_pools(speakers, 3)
    assert set(pools) == {s.name for s in speakers}
    owner: dict[str, str] = {}
    phrase_speakers: dict[str, set[str]] = {}
    for name, pool in pools.items():
        assert len(pool) == 42  # 504 units / 24 speakers, two descriptions a unit
        texts = {demo.describe(intro, p) for intro, p in pool}
        for intro, p in pool:  # both members of the minimal pair, same intro, count and colour
            assert demo.describe(intro, demo.ObjectPhrase(p.count, p.colour, PARTNER[p.noun])) in texts
            assert owner.setdefault(demo.describe(intro, p), name) == name  # nobody else says it
            phrase_speakers.setdefault(p.text, set()).add(name)
    assert len(owner) == 144 * 7  # every description is somebody's
    assert min(len(v) for v in phrase_speakers.values()) >= 2  # every object phrase by several speakers
    # beyond 252 speakers the pools are shared (two units each)
    many = build_speakers(validate_config({"n_impaired_speakers": 130, "n_control_speakers": 130}), 3)
    shared = demo.description_pools(many, 3)
    assert {len(p) for p in shared.values()} == {4}
    assert len({tuple(map(str, pool)) for pool in shared.values()}) == 252


def test_scene_plan_shares_and_rules():
    cfg = validate_config({"scene_objects": [1, 4], "partner_in_scene": 0.5, "wrong_description_rate": 0.2})
    said = demo.ObjectPhrase("two", "red", "bear")
    n_rows, wrong, partner = [], 0, 0
    for i in range(2000):
        scene = plan_scene(said, cfg, np.random.default_rng(i))
        nouns = [o.noun for o in scene.objects]
        assert len(set(nouns)) == len(nouns) and 1 <= len(nouns) <= 4
        shown = scene.objects[scene.described]
        if scene.agrees:
            assert shown == said
            partner += "pear" in nouns
        else:
            wrong += 1
            diff = [(a, b) for a, b in zip((shown.count, shown.colour, shown.noun), ("two", "red", "bear")) if a != b]
            assert diff in ([("pear", "bear")], [(shown.colour, "red")])
        n_rows.append(len(nouns))
    assert 0.17 < wrong / 2000 < 0.23
    multi = sum(1 for k in n_rows if k > 1)
    assert set(n_rows) == {1, 2, 3, 4}
    assert 0.3 < partner / multi < 0.5  # 0.5 of the agreeing multi-object scenes, less the wrong ones
    with pytest.raises(ValueError, match="scene_objects"):
        validate_config({"scene_objects": [3, 2]})
    with pytest.raises(ValueError, match="wrong_description_rate"):
        validate_config({"wrong_description_rate": 1.5})


def test_scene_rows_show_each_object_in_its_colour():
    objects = [demo.ObjectPhrase("a", "red", "bear"), demo.ObjectPhrase("three", "blue", "cup")]
    img = np.asarray(draw_scene(objects, 64, np.random.default_rng(1)), dtype=float)
    top, bottom = img[:32], img[32:]
    red, blue = np.array([205, 45, 45]), np.array([45, 90, 205])

    def share(part, rgb):
        return float((np.abs(part - rgb).sum(axis=2) < 60).mean())

    assert share(top, red) > 0.02 and share(top, blue) < 0.002
    assert share(bottom, blue) > 0.02 and share(bottom, red) < 0.002
    swapped = np.asarray(draw_scene(objects[::-1], 64, np.random.default_rng(1)), dtype=float)
    assert np.abs(swapped - img).mean() > 10


# ------------------------------------------------------------------ audio files


def test_audio_decodes_with_requested_rates_channels_and_formats(corpus, rows, defects):
    defective = {d["audio_path"] for d in defects.values()}
    regular = [r for r in rows if r["audio_path"] not in defective]
    assert len(regular) == N_REGULAR
    kinds = []
    for r in regular:
        info = sf.info(corpus / r["audio_path"])
        x, sr = sf.read(corpus / r["audio_path"], always_2d=True)
        assert sr in DEFAULT_CONFIG["sample_rates"] and sr == info.samplerate
        assert np.isfinite(x).all()
        assert 0.19 <= np.abs(x).max() <= 0.91  # per-utterance peak level 0.2..0.9
        assert 0.8 < len(x) / sr < 3.5
        if x.shape[1] == 2:  # a second, slightly different microphone
            assert not np.array_equal(x[:, 0], x[:, 1])
            assert np.corrcoef(x[:, 0], x[:, 1])[0, 1] > 0.8
        kinds.append((info.format, info.subtype, info.channels))
    assert sum(k[2] == 2 for k in kinds) == round(0.5 * N_REGULAR)
    assert sum(k[0] == "FLAC" for k in kinds) == round(0.5 * N_REGULAR)
    wav_subtypes = [k[1] for k in kinds if k[0] == "WAV"]
    assert "FLOAT" in wav_subtypes and wav_subtypes.count("PCM_16") > wav_subtypes.count("FLOAT")
    assert {r["audio_path"].rsplit(".", 1)[1] for r in regular} == {"wav", "flac"}
    # float WAVs: libsndfile's PEAK chunk would carry the wall-clock time of writing
    peaks = 0
    for r in regular:
        blob = (corpus / r["audio_path"]).read_bytes()
        if b"PEAK" in blob[:200]:
            i = blob.index(b"PEAK")
            assert blob[i + 12:i + 16] == b"\0\0\0\0"
            peaks += 1
    assert peaks == wav_subtypes.count("FLOAT")
    assert {sf.info(corpus / r["audio_path"]).samplerate for r in regular} == {22050, 44100}


def test_each_defect_is_present_once_and_really_defective(corpus, rows, defects):
    listed = read_csv(corpus / "defects.csv")
    assert [d["defect"] for d in listed] == list(DEFECT_KINDS)
    by_path = {r["audio_path"]: r for r in rows}
    for d in listed:
        assert by_path[d["audio_path"]]["utt_id"] == d["utt_id"]
    path = {k: corpus / d["audio_path"] for k, d in defects.items()}

    assert path["empty_file"].stat().st_size == 0
    assert path["corrupt_header"].stat().st_size > 1000
    with pytest.raises(Exception):
        sf.info(path["corrupt_header"])
    silent, _ = sf.read(path["silent"])
    assert len(silent) > 0 and not np.any(silent)
    assert sf.info(path["nonfinite"]).subtype == "FLOAT"
    nonfinite, _ = sf.read(path["nonfinite"])
    assert np.isnan(nonfinite).any() and np.isfinite(nonfinite).any()
    short, sr = sf.read(path["too_short"])
    assert 0.03 <= len(short) / sr <= 0.08 and np.abs(short).max() > 0.1
    for kind in ("empty_transcript", "missing_image", "duplicate_id"):
        x, sr = sf.read(path[kind])
        assert np.isfinite(x).all() and len(x) / sr > 0.8
    assert by_path[defects["empty_transcript"]["audio_path"]]["text"] == ""
    img = by_path[defects["missing_image"]["audio_path"]]
    assert img["text"] and not (corpus / img["image_path"]).exists()
    dup = by_path[defects["duplicate_id"]["audio_path"]]
    same_id = [r for r in rows if r["utt_id"] == dup["utt_id"]]
    assert len(same_id) == 2 and same_id[0]["audio_path"] != same_id[1]["audio_path"]
    # defective rows use ids of real speakers and look normal
    speakers = {r["speaker"] for r in rows}
    assert all(d["utt_id"].split("_")[0] in speakers for d in listed)


# ------------------------------------------------------------------ lexicon, prompts, pictures


def test_minimal_pairs_differ_in_exactly_one_voicing_phone():
    assert len(MINIMAL_PAIRS) == 6 and len(set(NOUNS)) == 12
    for voiced, voiceless in MINIMAL_PAIRS:
        a, b = LEXICON[voiced], LEXICON[voiceless]
        assert len(a) == len(b)
        diff = [(x, y) for x, y in zip(a, b) if x != y]
        assert len(diff) == 1
        x, y = diff[0]
        assert x in "BDG" and y in "PTK" and demo._STOP_PLACE[x] == demo._STOP_PLACE[y]
    assert LEXICON["cubs"][-1] == "Z" and LEXICON["cups"][-1] == "S"
    assert LEXICON["bears"][-1] == "Z" and LEXICON["goats"][-1] == "S"
    for w in ("a", "two", "three", "red", "green", "blue", "yellow"):
        assert w in LEXICON


def test_phrases_cover_all_combinations():
    phrases = all_phrases()
    assert len(phrases) == 144 and len({p.text for p in phrases}) == 144
    texts = {p.text for p in phrases}
    assert {"a red bear", "two green goats", "three blue cups"} <= texts
    assert LEXICON["got"][1:] == LEXICON["caught"][1:] and (LEXICON["got"][0], LEXICON["caught"][0]) == ("G", "K")
    assert "" in demo.INTROS and len(set(demo.INTROS)) == 7
    assert demo.parse_phrase("we caught two red bears") == demo.ObjectPhrase("two", "red", "bear")
    assert demo.parse_phrase("a red bear") == demo.ObjectPhrase("a", "red", "bear")
    for text in ("a red bears", "two red bear", "red bear", "", "two purple bears", "the dog"):
        assert demo.parse_phrase(text) is None, text


def _foreground(img: Image.Image) -> np.ndarray:
    a = np.asarray(img.convert("RGB"), dtype=float)
    return np.abs(a - a[0, 0]).sum(axis=2) > 60


def test_pictures_of_different_nouns_differ():
    masks = {n: _foreground(draw_picture(n, "blue", 1, 64, np.random.default_rng(5))) for n in NOUNS}
    for m, n in itertools.combinations(NOUNS, 2):
        inter = np.logical_and(masks[m], masks[n]).sum()
        union = np.logical_or(masks[m], masks[n]).sum()
        assert inter / union < 0.8, (m, n, inter / union)
    for n in NOUNS:
        assert 0.05 < masks[n].mean() < 0.7
    # the colour and count are visible too
    red = np.asarray(draw_picture("bear", "red", 1, 64, np.random.default_rng(5)), dtype=float)
    blue = np.asarray(draw_picture("bear", "blue", 1, 64, np.random.default_rng(5)), dtype=float)
    assert np.abs(red - blue).mean() > 10
    three = _foreground(draw_picture("cup", "red", 3, 64, np.random.default_rng(5)))
    assert three.mean() > 0.05


# ------------------------------------------------------------------ speakers and speech


def test_voicing_cue_gap_shrinks_by_blur():
    for voiced, voiceless in (("B", "P"), ("D", "T"), ("G", "K")):
        assert voicing_cue(voiced, 0.0) < 0.02 and 0.06 <= voicing_cue(voiceless, 0.0) <= 0.08
        gap0 = voicing_cue(voiceless, 0.0) - voicing_cue(voiced, 0.0)
        for blur in (0.0, 0.3, 0.6, 0.8, 1.0):
            gap = voicing_cue(voiceless, blur) - voicing_cue(voiced, blur)
            assert gap == pytest.approx((1 - blur) * gap0)
            # the midpoint stays put: cues move toward ambiguity, not in one direction
            mid = (voicing_cue(voiceless, blur) + voicing_cue(voiced, blur)) / 2
            assert mid == pytest.approx((voicing_cue(voiceless, 0) + voicing_cue(voiced, 0)) / 2)
        v, u = stop_voicing_cues(voiced, 0.7), stop_voicing_cues(voiceless, 0.7)
        assert v.voice_bar > u.voice_bar and v.aspiration < u.aspiration
        assert v.vowel_scale > u.vowel_scale and v.closure_s < u.closure_s
    with pytest.raises(ValueError):
        voicing_cue("S", 0.0)


def test_speakers():
    cfg = validate_config({"n_impaired_speakers": 8, "n_control_speakers": 8})
    spk = build_speakers(cfg, 0)
    assert [s.name for s in spk] == ["F01", "M01", "F02", "M02", "F03", "M03", "F04", "M04",
                                     "FC01", "MC01", "FC02", "MC02", "FC03", "MC03", "FC04", "MC04"]
    for s in spk:
        assert (180 <= s.f0 <= 230) if s.sex == "F" else (100 <= s.f0 <= 130)
        assert 0.88 <= s.formant_scale <= 1.12
        if s.group == "impaired":
            assert 0.6 <= s.voicing_blur <= 0.8 and s.noise_db == -20
            assert s.duration_scale >= 0.9 * 1.3
        else:
            assert s.voicing_blur == 0 and s.noise_db < -40 and s.duration_scale <= 1.1
    # a speaker's voice does not depend on how many other speakers there are
    few = build_speakers({"n_impaired_speakers": 1, "n_control_speakers": 1}, 0)
    assert few[0] == spk[0] and few[1] == spk[8]


def _speech_span_s(x: np.ndarray, sr: int) -> float:
    hop = int(0.01 * sr)
    frames = x[: len(x) // hop * hop].reshape(-1, hop)
    level = 20 * np.log10(np.sqrt((frames ** 2).mean(axis=1)) + 1e-12)
    active = np.flatnonzero(level > level.max() - 40)
    return (active[-1] - active[0] + 1) * hop / sr


def test_impaired_speech_is_slower_and_silences_are_quiet():
    spk = build_speakers({"n_impaired_speakers": 2, "n_control_speakers": 2}, 3)
    impaired = [s for s in spk if s.group == "impaired"]
    control = [s for s in spk if s.group == "control"]
    for text in ("two green goats", "a yellow cub"):
        spans = {}
        for group in (impaired, control):
            spans[group[0].group] = np.mean([
                _speech_span_s(synthesize_utterance(text, s, 22050, np.random.default_rng(k)), 22050)
                for s in group for k in range(2)])
        assert spans["impaired"] > 1.12 * spans["control"]
        assert 0.6 < spans["control"] < 1.3
    x = synthesize_utterance("a red bear", control[0], 22050, np.random.default_rng(0))
    assert np.abs(x[: int(0.1 * 22050)]).max() < 0.01  # leading silence is (nearly) silent
    assert np.abs(x).max() == pytest.approx(1.0)


def _low_band_level_after_release(spk, noun: str, seed: int, sr: int = 22050) -> float:
    """dB (re. peak) of < 500 Hz energy 15-50 ms after the noun's initial stop release:
    voicing already (voiced stop) vs. still aspiration (voiceless stop)."""
    words = ["a", "red", noun]
    segs, _, _ = demo.plan_segments(words, spk, np.random.default_rng(seed))
    x = synthesize_utterance(" ".join(words), spk, sr, np.random.default_rng(seed))
    release = [s for s in segs if s.burst is not None and s.phone == LEXICON[noun][0]][-1]
    i0, i1 = int((release.start + 0.015) * sr), int((release.start + 0.05) * sr)
    low = sosfilt(butter(4, 500, fs=sr, output="sos"), x)
    return 20 * np.log10(np.sqrt(np.mean(low[i0:i1] ** 2)) / np.abs(x).max())


def test_voicing_cue_is_in_the_audio_clear_for_controls_blurred_for_impaired():
    spk = build_speakers({"n_impaired_speakers": 2, "n_control_speakers": 2}, 0)
    contrast = {}
    for s in spk:
        bear = np.mean([_low_band_level_after_release(s, "bear", k) for k in range(2)])
        pear = np.mean([_low_band_level_after_release(s, "pear", k) for k in range(2)])
        contrast.setdefault(s.group, []).append(bear - pear)
    assert min(contrast["control"]) > 12  # early voicing after /b/, aspiration after /p/
    assert 1 < max(contrast["impaired"]) < min(contrast["control"])  # confusable, not identical


# ------------------------------------------------------------------ config and directory handling


def test_default_config_keys():
    assert set(DEFAULT_CONFIG) == {
        "n_impaired_speakers", "n_control_speakers", "utts_per_speaker", "image_size",
        "sample_rates", "stereo_fraction", "flac_fraction", "impaired_rate",
        "impaired_voicing_blur", "impaired_noise_db", "defects", "synthesiser", "scene_objects",
        "partner_in_scene", "wrong_description_rate"}
    assert validate_config({}) == DEFAULT_CONFIG
    assert validate_config({"utts_per_speaker": 3})["utts_per_speaker"] == 3


@pytest.mark.parametrize("bad", [
    {"n_speakers": 3}, {"stereo_fraction": 1.5}, {"sample_rates": []},
    {"impaired_voicing_blur": [0.9, 0.1]}, {"utts_per_speaker": 0}, {"defects": "yes"},
])
def test_config_validation_names_the_key(bad):
    (key,) = bad
    with pytest.raises(config.ParamsError, match=f"key 'demo.{key}'"):
        validate_config(bad)


def test_config_is_the_schema_section_and_the_schema_says_what_the_generator_honours():
    # One validator: the demo section of the schema (its defaults, ranges and cross-field rules).
    given = {"utts_per_speaker": 3, "impaired_rate": 2.0}
    assert validate_config(given) == config.validate_section("demo", given) == config.validate({"demo": given})["demo"]
    assert DEFAULT_CONFIG == config.schema_defaults()["demo"] == validate_config(None)
    props = config.section_schema("demo")["properties"]
    assert props["utts_per_speaker"]["maximum"] == demo.MAX_UTTS_PER_SPEAKER  # ids 9001.. are the defects'
    assert props["scene_objects"]["items"]["maximum"] == demo.MAX_SCENE_OBJECTS
    assert tuple(props["synthesiser"]["enum"]) == demo.SYNTHESISERS
    # impaired_rate: impaired speakers are slower (>= 1), at most 4 times; both ends build speakers
    assert (props["impaired_rate"]["minimum"], props["impaired_rate"]["maximum"]) == (1, 4)
    for rate in (1, 4):
        (s,) = build_speakers({"impaired_rate": rate, "n_impaired_speakers": 1, "n_control_speakers": 0}, 0)
        assert 0.9 * rate <= s.duration_scale <= 1.1 * rate
    for rate in (0.99, 4.01):
        with pytest.raises(config.ParamsError, match="key 'demo.impaired_rate'"):
            validate_config({"impaired_rate": rate})
        with pytest.raises(config.ParamsError, match="key 'demo.impaired_rate'"):
            config.validate({"demo": {"impaired_rate": rate}})


def test_replaces_existing_dir_without_defects(tmp_path):
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    cfg = {"n_impaired_speakers": 1, "n_control_speakers": 1, "utts_per_speaker": 2,
           "defects": False, "stereo_fraction": 0.0, "flac_fraction": 0.0, "sample_rates": [16000]}
    manifest = generate_demo_corpus(out, cfg, seed=7, progress=False)
    assert manifest == out.resolve() / "manifest.csv"
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
    rows = read_csv(manifest)
    assert [r["utt_id"] for r in rows] == ["F01_0001", "F01_0002", "FC01_0001", "FC01_0002"]
    assert read_csv(out / "defects.csv") == []
    for r in rows:
        info = sf.info(out / r["audio_path"])
        assert (info.samplerate, info.channels, info.format) == (16000, 1, "WAV")
    with pytest.raises(config.ParamsError, match="key 'seed': -1 is less than the minimum of 0"):
        generate_demo_corpus(out, cfg, seed=-1, progress=False)
