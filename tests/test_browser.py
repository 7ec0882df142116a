"""The error browser (results/browser.html): built from a synthetic fusion run, opened in headless Chromium, and read
through the page's own DOM after its script ran (skipped where Debian's `chromium` is missing; a failure under
CI=true). The page's re-fusion must reproduce `fuse`'s choices and WERs exactly."""

from __future__ import annotations

import html
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmasr.config import validate
from mmasr.report.browser import audio_mode, build_browser
from mmasr.report.build import fmt
from mmasr.rescoring.fusion import (choose, fixed_alpha_choice, fuse_simplex, lambda_grid, log_linear_choices, pooled_wer, run_fusion, take,
                                    to_arrays)
from tests.conftest import chromium_flags, tone, write_picture, write_wav

WORDS = ("a", "red", "bear", "pear", "goat", "boat", "big", "small", "the", "on", "hill", "two")
SIZE_BOUND_5000 = 8_000_000  # bytes: the page over 5,000 test utterances (5 hypotheses each, audio linked)


def synthetic(root: Path, n_dev: int, n_test: int, seed: int = 0, audio: str = "wav", n_pictures: int = 4,
              max_hyps: int = 5, lm: bool = True, min_hyps: int = 1) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Random n-best lists with every score fuse uses (rank order = asr_score order, as Whisper's), a manifest with
    two groups and several speakers, and a few pictures shared by the utterances; some utterances have no picture.
    ``audio``: "wav" writes short tones, "empty" empty files (size tests), relative to ``root``."""
    rng = np.random.default_rng(seed)
    pics = []
    for k in range(n_pictures):
        write_picture(root / f"data/processed/images/p{k}.png", size=(80, 60))
        pics.append({"image_id": f"p{k}", "path": f"data/processed/images/p{k}.png"})
    man, nb = [], []
    for split, n in (("dev", n_dev), ("test", n_test)):
        for i in range(n):
            utt = f"{split}{i:05d}"
            ref = " ".join(rng.choice(WORDS, rng.integers(3, 7)))
            path = Path(f"data/processed/audio/{utt}.wav")
            if split == "test":
                if audio == "wav":
                    write_wav(root / path, tone(0.2, freq=150 + 10 * (i % 20), lead=0.05, tail=0.05))
                else:
                    (root / path).parent.mkdir(parents=True, exist_ok=True)
                    (root / path).touch()
            man.append({"utt_id": utt, "speaker": f"{split}-s{i % 5}", "group": "impaired" if i % 3 else "control",
                        "audio_path": str(path), "duration_s": 0.3 if audio == "wav" else 3.0, "text": ref,
                        "image_id": None if i % 7 == 3 else f"p{i % n_pictures}", "split": split, "source": "test"})
            n_h = int(rng.integers(min_hyps, max_hyps + 1))
            asr = np.sort(rng.normal(-0.3, 0.15, n_h))[::-1]
            for rank in range(n_h):
                words = ref.split()
                for _ in range(int(rng.integers(0, 3))):  # a few word edits: substitutions and deletions
                    j = int(rng.integers(0, len(words)))
                    if rng.random() < 0.5 and len(words) > 1:
                        del words[j]
                    else:
                        words[j] = str(rng.choice(WORDS))
                text = " ".join(words) if rank else (ref if rng.random() < 0.2 else " ".join(words))
                n_tok = len(text.split()) + 2
                row = {"utt_id": utt, "rank": rank, "text": text, "asr_score": float(asr[rank]), "n_tokens": n_tok,
                       "sum_logprob": float(asr[rank]) * n_tok + float(rng.normal(0, 0.2)), "clip_text": text,
                       "clip_cos": float(rng.uniform(0.15, 0.25)) + 0.03 * (text == ref) if i % 7 != 3 else np.nan}
                if lm:
                    right = text == ref  # the LM, like the picture, knows a little
                    row.update(lm_score=float(rng.normal(-3, 1)) + 1.0 * right,
                               lm_logprob=float(rng.normal(-12, 3)) + 3.0 * right)
                nb.append(row)
    return pd.DataFrame(nb), pd.DataFrame(man), pd.DataFrame(pics)


def params(**fusion) -> dict:
    p = validate({})
    p["fusion"] = {**p["fusion"], "bootstrap_resamples": 100, **fusion}
    return p


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A synthetic run (LM on, both forms), fused with run_fusion, and its page at results/browser.html."""
    root = tmp_path_factory.mktemp("browser")
    nb, man, images = synthetic(root, n_dev=60, n_test=48)
    p = params()
    _, metrics, changed, _ = run_fusion(nb, man, p["fusion"], p["text"], seed=0)
    out = root / "results" / "browser.html"
    out.parent.mkdir(parents=True)
    out.write_text(build_browser(nb, man, images, metrics, p, out, root), encoding="utf-8")
    test = man[man["split"] == "test"]
    arrays = to_arrays(nb[nb["utt_id"].isin(test["utt_id"])], man.set_index("utt_id")["text"], p["text"])
    return {"root": root, "out": out, "metrics": metrics, "changed": changed, "nb": arrays, "manifest": test, "p": p}


class Dom:
    """The page's DOM after its script ran (``chromium --dump-dom``), read by the attributes the page writes."""

    def __init__(self, text: str):
        self.text = text
        body = re.search(r"<body([^>]*)>", text).group(1)
        self.body = dict(re.findall(r'data-([\w-]+)="([^"]*)"', body))
        assert self.body.get("ready") == "1", "the page's script did not finish"
        tbody = re.search(r'<table id="rows">(.*?)</main>', text, re.S).group(1)
        self.rows = [dict(re.findall(r'data-([\w-]+)="([^"]*)"', m)) for m in re.findall(r'<tr class="utt"([^>]*)>', tbody)]
        wer = re.search(r'<span class="wer" id="wer"([^>]*)>([^<]*)</span>', text)
        self.wer_text, wer_attrs = wer.group(2), dict(re.findall(r'data-([\w-]+)="([^"]*)"', wer.group(1)))
        self.wer = float(wer_attrs["wer"])
        count = dict(re.findall(r'data-([\w-]+)="([^"]*)"', re.search(r'<span id="count"([^>]*)>', text).group(1)))
        self.n_rows, self.n_shown = int(count["rows"]), int(count["shown"])

    @property
    def choices(self) -> list[int]:
        return [int(c) for c in self.body["choices"].split(",")]


def open_page(chromium: str, page: Path, query: str, tmp_path: Path) -> Dom:
    proc = subprocess.run([*chromium_flags(chromium, tmp_path / "profile"), "--dump-dom", page.as_uri() + query],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return Dom(proc.stdout)


def ll_wer(b, weights) -> float:
    nb = b["nb"]
    pick = log_linear_choices(nb.total, nb.clip, nb.lm_total, nb.length, nb.valid, np.array([weights], float),
                              b["p"]["fusion"]["tau"])[0]
    return pooled_wer(take(nb.errors, pick), nb.ref_words)


def test_page_at_dev_weights_shows_fuses_choices_and_wer(built, chromium, tmp_path):
    m, nb = built["metrics"], built["nb"]
    assert m["fusion_form"] == "log_linear" and not m["lm_skipped"]
    dom = open_page(chromium, built["out"], "", tmp_path)
    assert len(dom.rows) == dom.n_rows == dom.n_shown == len(built["manifest"]) == 48
    assert dom.body["dev"] == "1" and dom.body["form"] == "log_linear"
    w = m["weights_fused_log_linear_form"]
    fused = log_linear_choices(nb.total, nb.clip, nb.lm_total, nb.length, nb.valid,
                               np.array([[w["lambda_clip"], 0.0, w["beta"]]]), built["p"]["fusion"]["tau"])[0]
    assert dom.choices == fused.tolist()
    asr = fixed_alpha_choice(nb, 0.0, built["p"]["fusion"]["tau"])
    changed = {str(u) for u in nb.utt_ids[fused != asr]}
    assert changed == set(built["changed"]["utt_id"])  # fuse's own record of the changed choices
    assert dom.wer_text == fmt(m["test_wer_fused"]) and dom.wer == pytest.approx(m["test_wer_fused"], abs=1e-12)
    assert {r["utt"]: int(r["choice"]) for r in dom.rows} == dict(zip(map(str, nb.utt_ids), fused.tolist()))
    assert w["lambda_clip"] > 0 and w["beta"] != 0, "the synthetic data should make the picture and the length count"


def test_log_linear_slider_ends_are_fuses_definitions(built, chromium, tmp_path):
    """λ_clip = 0 at the dev β is the log-linear form without the CLIP term (not Whisper's rank 0); the far end is
    λ_clip = lambda_stop at the dev β. Both are checked against fusion.py's own choices."""
    m, beta = built["metrics"], built["metrics"]["weights_fused_log_linear_form"]["beta"]
    top = float(lambda_grid(built["p"]["fusion"])[-1])
    zero = open_page(chromium, built["out"], "?move=clip:0", tmp_path)  # the slider dragged to its 0 end
    assert zero.body["clip"] == "0" and zero.wer == pytest.approx(ll_wer(built, [0.0, 0.0, beta]), abs=1e-12)
    far = open_page(chromium, built["out"], "?move=clip:max", tmp_path)
    assert float(far.body["clip"]) == top and far.wer == pytest.approx(ll_wer(built, [top, 0.0, beta]), abs=1e-12)
    assert far.wer_text == fmt(ll_wer(built, [top, 0.0, beta]))
    assert open_page(chromium, built["out"], f"?clip={top}", tmp_path).choices == far.choices  # the query form agrees
    w = m["weights_asr_clip_lm_log_linear_form"]  # the LM slider: ASR+CLIP+LM at its dev weights
    assert w["lambda_lm"] > 0
    lm = open_page(chromium, built["out"], f"?clip={w['lambda_clip']}&lm={w['lambda_lm']}&beta={w['beta']}", tmp_path)
    assert lm.wer == pytest.approx(m["test_wer_asr_clip_lm_log_linear_form"], abs=1e-12)
    nb = built["nb"]
    assert lm.choices == log_linear_choices(nb.total, nb.clip, nb.lm_total, nb.length, nb.valid,
                                            np.array([[w["lambda_clip"], w["lambda_lm"], w["beta"]]]), m["tau"])[0].tolist()


def test_seed_form_slider_gives_asr_fused_and_picture_alone(built, chromium, tmp_path):
    m = built["metrics"]
    dev = open_page(chromium, built["out"], "?form=seed", tmp_path)
    assert dev.body["dev"] == "1" and float(dev.body["clip"]) == m["best_alpha"]
    assert dev.wer == pytest.approx(m["test_wer_fused_seed_form"], abs=1e-12)
    assert dev.wer_text == fmt(m["test_wer_fused_seed_form"])
    zero = open_page(chromium, built["out"], "?form=seed&move=clip:0", tmp_path)  # the α slider dragged to 0
    assert zero.wer == pytest.approx(m["test_wer_asr"], abs=1e-12) and zero.wer_text == fmt(m["test_wer_asr"])
    assert zero.choices == fixed_alpha_choice(built["nb"], 0.0, m["tau"]).tolist()
    one = open_page(chromium, built["out"], "?form=seed&move=clip:max", tmp_path)
    assert one.body["clip"] == "1" and one.body["dev"] == "0"
    assert one.wer == pytest.approx(m["test_wer_alpha1"], abs=1e-12) and one.wer_text == fmt(m["test_wer_alpha1"])
    assert m["test_wer_alpha1"] != m["test_wer_asr"]  # the two ends differ, so the check can fail
    w_asr, w_clip, w_lm = m["weights_asr_clip_lm_seed_form"].values()
    assert w_lm > 0 and m["test_wer_asr_clip_lm_seed_form"] != m["test_wer_fused_seed_form"]
    lm = open_page(chromium, built["out"], f"?form=seed&clip={w_clip}&lm={w_lm}", tmp_path)
    assert lm.wer == pytest.approx(m["test_wer_asr_clip_lm_seed_form"], abs=1e-12)
    nb = built["nb"]
    assert lm.choices == choose(fuse_simplex(nb.asr, nb.clip, nb.lm, nb.valid, np.array([[w_asr, w_clip, w_lm]]),
                                             m["tau"]))[0].tolist()


def test_filters_leave_only_matching_rows(built, chromium, tmp_path):
    man = built["manifest"]
    dom = open_page(chromium, built["out"], "?group=control", tmp_path)
    assert {r["group"] for r in dom.rows} == {"control"} and len(dom.rows) == int((man["group"] == "control").sum())
    dom = open_page(chromium, built["out"], "?speaker=test-s2&changed=1", tmp_path)
    changed = set(built["changed"]["utt_id"])
    expect = set(man.loc[man["speaker"] == "test-s2", "utt_id"]) & changed
    assert {r["utt"] for r in dom.rows} == expect and all(r["speaker"] == "test-s2" for r in dom.rows)
    dom = open_page(chromium, built["out"], "?errors=1&sort=err", tmp_path)
    errs = [int(r["errors"]) for r in dom.rows]
    assert errs and min(errs) > 0 and errs == sorted(errs, reverse=True)


def test_page_is_self_contained_with_shared_thumbnails_and_embedded_audio(built):
    text = built["out"].read_text()
    assert text.count("data:image/png;base64,") == 4  # one per picture, not per row
    assert text.count("data:audio/flac;base64,") == 48  # small test set: every utterance embedded
    assert not re.search(r'(src|href)="https?://', text) and "report.html" in text
    size = built["out"].stat().st_size
    print(f"\nbrowser page, synthetic 48 test utterances (audio embedded): {size / 1e3:.0f} kB")


def test_audio_is_linked_above_the_threshold():
    assert audio_mode(np.array([100.0, 150.0]), 8) == "embed"  # 250 s x 32 kB/s = 8.0 MB
    assert audio_mode(np.array([100.0, 151.0]), 8) == "link"
    assert audio_mode(np.array([1.0]), 0) == "link"


def test_five_thousand_utterances_stay_bounded_and_paged(chromium, tmp_path):
    root = tmp_path / "big"
    nb, man, images = synthetic(root, n_dev=100, n_test=5000, seed=1, audio="empty", n_pictures=50, min_hyps=5)
    p = params(swap_permutations=1)
    _, metrics, _, _ = run_fusion(nb, man, p["fusion"], p["text"], seed=0)
    out = root / "results" / "browser.html"
    out.parent.mkdir(parents=True)
    out.write_text(build_browser(nb, man, images, metrics, p, out, root), encoding="utf-8")
    size = out.stat().st_size
    print(f"\nbrowser page, synthetic 5,000 test utterances (audio linked, 50 pictures): {size / 1e6:.2f} MB")
    assert size < SIZE_BOUND_5000
    text = out.read_text()
    assert text.count("data:image/png;base64,") == 50 and "data:audio" not in text
    assert '"a":"../data/processed/audio/test00000.wav"' in text and "data/processed/audio/</code> beside" in text
    start = time.monotonic()
    dom = open_page(chromium, out, "", tmp_path)
    took = time.monotonic() - start
    print(f"opened, re-fused and rendered in headless Chromium in {took:.1f} s")
    assert dom.n_rows == 5000 and dom.n_shown == len(dom.rows) == 100
    assert dom.wer == pytest.approx(metrics["test_wer_fused"], abs=1e-12)
    page3 = open_page(chromium, out, "?page=3", tmp_path)
    assert [r["utt"] for r in page3.rows][0] == "test00200"


def test_cli_writes_the_page(tmp_path):
    from mmasr.cli import main
    from mmasr.io import write_json, write_parquet

    nb, man, images = synthetic(tmp_path, n_dev=20, n_test=10, seed=3)
    p = params()
    _, metrics, _, _ = run_fusion(nb, man, p["fusion"], p["text"], seed=0)
    for name, df in (("nbest", nb), ("manifest", man), ("images", images)):
        write_parquet(tmp_path / f"{name}.parquet", df)
    write_json(tmp_path / "fusion.json", metrics)
    out = tmp_path / "results" / "browser.html"
    assert main(["browser", "--nbest", str(tmp_path / "nbest.parquet"), "--manifest", str(tmp_path / "manifest.parquet"),
                 "--images", str(tmp_path / "images.parquet"), "--metrics", str(tmp_path / "fusion.json"),
                 "--root", str(tmp_path), "--out", str(out), "--quiet"]) == 0
    text = out.read_text()
    assert text.count('"id":"test') == 10 and html.escape("mmasr error browser") in text
