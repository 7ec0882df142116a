"""The language-model term: lm_score against a direct log-probability, and the simplex-grid fusion."""

import numpy as np
import pandas as pd
import pytest
import torch

from mmasr.config import validate
from mmasr.rescoring.fusion import (alpha_grid, choose, fuse, fuse_simplex, grid_wer, run_fusion, simplex_grid,
                                    to_arrays)
from mmasr.rescoring.lm import context_ids, lm_scores, load_lm_cache, save_lm_cache, target_ids

P = validate({})
FUSION, TEXT = P["fusion"], P["text"]
NOUNS = ("bear", "pear", "goat", "boat")


# ---------------------------------------------------------------- the LM score


@pytest.fixture(scope="module")
def lm_bundle(tmp_path_factory):
    from mmasr.demo.text_models import build_demo_lm
    from mmasr.models.loading import load_lm

    folder = build_demo_lm(tmp_path_factory.mktemp("lm") / "lm", {"hidden_size": 32, "intermediate_size": 64,
                                                                   "layers": 2, "heads": 4, "kv_heads": 2}, seed=0)
    return load_lm(str(folder), device="cpu")


def direct_logprob(model, tok, prefix: str, text: str) -> float:
    """Token by token, no batch, no padding: mean log p of " text" + eos after the prefix."""
    ctx = tok(prefix, add_special_tokens=False).input_ids
    tgt = (tok(" " + text, add_special_tokens=False).input_ids if text else []) + [tok.eos_token_id]
    total, ids = 0.0, list(ctx)
    with torch.no_grad():
        for t in tgt:
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
            total += float(torch.log_softmax(logits, -1)[t])
            ids.append(t)
    return total / len(tgt)


def test_lm_score_equals_a_direct_log_probability(lm_bundle, tmp_path):
    prefix = P["fusion"]["lm_prefix"]
    texts = ["a red bear", "three blue boats on a very long line of words", "", "a red bear"]
    nb = pd.DataFrame({"utt_id": ["u0", "u0", "u1", "u1"], "rank": [0, 1, 0, 1], "text": texts})
    scored, distinct, scores = lm_scores(nb, lm_bundle, prefix, batch_size=2, progress=False)
    assert distinct == sorted(set(texts)) and len(scores) == 3  # each distinct text scored once
    for text, got in zip(texts, scored["lm_score"]):
        assert got == pytest.approx(direct_logprob(lm_bundle.model, lm_bundle.processor, prefix, text), abs=1e-4)
    assert scored["lm_score"].iloc[0] == scored["lm_score"].iloc[3]
    tok = lm_bundle.processor
    for text, n, total in zip(texts, scored["lm_n_tokens"], scored["lm_logprob"]):  # the total the log-linear form weighs
        n_direct = len((tok(" " + text, add_special_tokens=False).input_ids if text else [])) + 1
        assert n == n_direct
        assert total == pytest.approx(n_direct * direct_logprob(lm_bundle.model, tok, prefix, text), abs=1e-3)
    save_lm_cache(tmp_path / "c.npz", distinct, scores)
    cache = load_lm_cache(tmp_path / "c.npz")
    assert cache == pytest.approx(dict(zip(distinct, scores)), abs=1e-5)


def test_empty_prefix_conditions_on_bos_and_off_gives_nan(lm_bundle):
    tok = lm_bundle.processor
    assert context_ids(tok, "") == [tok.bos_token_id]
    assert target_ids(tok, "")[-1] == tok.eos_token_id
    nb = pd.DataFrame({"utt_id": ["u0"], "rank": [0], "text": ["a red bear"]})
    off, texts, _ = lm_scores(nb, None, "", 4, progress=False)
    assert off["lm_score"].isna().all() and off["lm_logprob"].isna().all() and texts == []


# ---------------------------------------------------------------- the simplex


def test_simplex_grid_holds_the_one_and_two_term_systems_as_edges():
    w = simplex_grid(0.05)
    assert len(w) == 21 * 22 // 2 and np.allclose(w.sum(axis=1), 1) and (w >= 0).all()
    edge = w[w[:, 2] == 0]
    assert np.array_equal(edge[:, 1], alpha_grid(FUSION)) and np.array_equal(edge[:, 0], 1 - alpha_grid(FUSION))
    assert [1, 0, 0] in w.tolist() and [0, 1, 0] in w.tolist() and [0, 0, 1] in w.tolist()
    assert (w[:, 2][1:] >= w[:, 2][:-1]).all()  # ordered by w_lm first: ties prefer no LM


def test_simplex_with_w_lm_zero_equals_the_alpha_grid_bit_for_bit():
    rng = np.random.default_rng(0)
    asr, clip, lm = rng.normal(size=(3, 40, 5))
    valid = rng.random((40, 5)) > 0.1
    valid[:, 0] = True
    clip[:7] = np.nan  # utterances without a picture
    w = simplex_grid(0.05)
    edge = w[:, 2] == 0
    two = fuse(asr, clip, valid, alpha_grid(FUSION), 100.0)
    three = fuse_simplex(asr, clip, lm, valid, w[edge], 100.0)
    assert np.array_equal(two, three)
    # and the w_clip = 0, w_lm = 1 corner is the LM alone
    lm_only = fuse_simplex(asr, clip, lm, valid, np.array([[0.0, 0.0, 1.0]]), 100.0)[0]
    assert np.array_equal(choose(lm_only), np.argmax(np.where(valid, lm, -np.inf), axis=1))


def _lm_toy(n_per_split=12, n_speakers=4, lm_right_on_test=True):
    """As test_fusion's pictured toy, with an LM that knows the right noun (a higher lm_score) on dev; on test it
    is right too unless ``lm_right_on_test`` is false."""
    man, nb = [], []
    for split in ("dev", "test"):
        for i in range(n_per_split):
            utt, noun = f"{split}{i:02d}", NOUNS[i % len(NOUNS)]
            other = NOUNS[(i + 1) % len(NOUNS)]
            man.append({"utt_id": utt, "split": split, "text": f"a red {noun}", "speaker": f"{split}-s{i % n_speakers}",
                        "group": "impaired" if i % 2 else "control", "image_id": noun})
            order = [other, noun] if i % 3 else [noun, other]
            for rank, word in enumerate(order):
                right = word == noun
                lm_right = right if (split == "dev" or lm_right_on_test) else not right
                lm = -1.0 if lm_right else -3.0
                nb.append({"utt_id": utt, "rank": rank, "text": f"a red {word}", "asr_score": -0.10 - 0.05 * rank,
                           "n_tokens": 4, "sum_logprob": 4 * (-0.10 - 0.05 * rank),
                           "clip_cos": 0.30 if right else 0.29,  # the picture helps a little (τ·Δ = 1)
                           "lm_score": lm, "lm_logprob": 4 * lm})
    return pd.DataFrame(nb), pd.DataFrame(man)


def test_four_systems_with_intervals_and_alpha_grid_unchanged():
    nb, man = _lm_toy()
    grid, m, _, per_speaker = run_fusion(nb, man, FUSION, TEXT, seed=0)
    grid0, m0, _, _ = run_fusion(nb.drop(columns=["lm_score", "lm_logprob"]), man, FUSION, TEXT, seed=0)
    assert grid.equals(grid0)
    def two_term(d):  # every key that is not about the LM
        return {k: v for k, v in d.items() if "lm" not in k and k != "n_weight_triples"}
    assert two_term(m) == two_term(m0) and len(two_term(m)) > 50
    assert m0["lm_skipped"] and m0["test_wer_asr_lm"] is None
    assert m["test_wer_asr"] > 0 and m["test_wer_asr_lm"] == 0.0 and m["test_wer_asr_clip_lm"] == 0.0
    assert m["weights_asr_lm"][1] == 0.0 and m["weights_asr_lm"][2] > 0
    for name in ("asr_lm", "asr_clip_lm"):
        assert m[f"test_wer_{name}_ci_high"] < 0 and m[f"test_wer_{name}_ci_low"] <= m[f"test_wer_{name}"] - m["test_wer_asr"]
        for group in ("impaired", "control"):
            assert m[f"test_wer_{name}_{group}"] == 0.0
            assert m[f"test_wer_{name}_diff_ci_low_{group}"] <= m[f"test_wer_{name}_diff_ci_high_{group}"] <= 0
    assert "wer_asr_lm" in per_speaker


def test_lm_weights_are_chosen_on_dev_only():
    nb, man = _lm_toy()
    _, base, _, _ = run_fusion(nb, man, FUSION, TEXT, seed=0)
    _, moved, _, _ = run_fusion(_lm_toy(lm_right_on_test=False)[0], man, FUSION, TEXT, seed=0)
    assert moved["weights_asr_lm"] == base["weights_asr_lm"]
    assert moved["weights_asr_clip_lm"] == base["weights_asr_clip_lm"]
    assert moved["dev_wer_asr_clip_lm"] == base["dev_wer_asr_clip_lm"]
    assert moved["test_wer_asr_lm"] > base["test_wer_asr_lm"]


def test_asr_clip_edge_of_the_simplex_equals_the_alpha_grid_result():
    nb, man = _lm_toy()
    grid, m, _, _ = run_fusion(nb, man, FUSION, TEXT, seed=0)
    meta = man.set_index("utt_id")
    dev = to_arrays(nb[nb["utt_id"].str.startswith("dev")], meta["text"], TEXT)
    w = simplex_grid(FUSION["alpha_step"])
    w = w[w[:, 2] == 0]
    wers = grid_wer(choose(fuse_simplex(dev.asr, dev.clip, dev.lm, dev.valid, w, FUSION["tau"])), dev.errors,
                    dev.ref_words)
    assert np.array_equal(wers, grid.loc[grid["split"] == "dev", "wer"].to_numpy())
    assert w[int(np.argmin(wers)), 1] == m["best_alpha"]
