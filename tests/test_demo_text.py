"""Demo text models: tokenizers, train-split-only training, loss going down, exact resume, HF loading."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from mmasr import config
from mmasr.demo import text_models as demo_text
from mmasr.demo.corpus import INTROS, all_phrases, describe
from mmasr.demo.models import demo_vocabulary

LM = {"hidden_size": 32, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate_size": 64,
      "max_position_embeddings": 32, "steps": 150, "batch_size": 16, "lr": 5e-3, "warmup": 10,
      "checkpoint_every": 50}
TE = {"hidden_size": 32, "layers": 2, "heads": 4, "intermediate_size": 64, "max_position_embeddings": 16,
      "steps": 120, "batch_size": 16, "lr": 3e-3, "warmup": 10, "checkpoint_every": 50}
TRAIN_CAPTIONS = ["a red bear", "two green goats", "three blue cups", "a yellow pear", "two red bins",
                  "three green darts"]
HELD_OUT = ("purple", "zebras")  # appear only in dev/test rows: must never reach training


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models are latency-bound: one thread is faster and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def manifest() -> pd.DataFrame:
    rows = []
    for i in range(24):
        rows.append({"utt_id": f"u{i:02d}", "speaker": f"S{i % 4}", "group": "impaired" if i % 2 else "control",
                     "text": TRAIN_CAPTIONS[i % len(TRAIN_CAPTIONS)], "split": "train"})
    for i, (split, text) in enumerate([("dev", "a purple bear"), ("dev", "two red zebras"),
                                       ("test", "three purple zebras"), ("test", "a red bear")]):
        rows.append({"utt_id": f"h{i}", "speaker": f"H{i}", "group": "control", "text": text, "split": split})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0).reset_index(drop=True)


@pytest.fixture(scope="module")
def inits(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_text")
    return {"root": root, "lm": demo_text.build_demo_lm(root / "lm_init", LM, seed=0),
            "te": demo_text.build_demo_text_encoder(root / "te_init", TE, seed=0)}


@pytest.fixture
def tokenized_texts(monkeypatch):
    """Every text any tokenizer is asked to encode while the fixture is active."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    seen: list[str] = []
    original = PreTrainedTokenizerBase.__call__

    def spy(self, text=None, *args, **kwargs):
        seen.extend([text] if isinstance(text, str) else list(text or []))
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", spy)
    return seen


def _train(kind: str, inits, name: str, **kw):
    root = inits["root"] / name
    fn, cfg = (demo_text.train_lm, LM) if kind == "lm" else (demo_text.train_text_encoder, TE)
    cfg = {**cfg, **kw.pop("cfg", {})}
    summary = fn(inits[kind], manifest(), root / "out", root / "log.csv", root / "ckpt", cfg, 0, progress=False, **kw)
    return summary, root


def _losses(log_csv) -> np.ndarray:
    return pd.read_csv(log_csv)["loss"].to_numpy(float)


def _assert_train_only(texts: list[str]) -> None:
    assert texts, "the spy saw no tokenizer call"
    for t in texts:
        assert not any(w in t for w in HELD_OUT), f"a dev/test transcript reached training: {t!r}"
    assert {t.strip() for t in texts} >= set(TRAIN_CAPTIONS)


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


def test_tokenizers_round_trip_and_keep_words_whole(inits):
    from transformers import AutoTokenizer, BertTokenizer

    lm_tok = AutoTokenizer.from_pretrained(str(inits["lm"]), local_files_only=True)
    te_tok = AutoTokenizer.from_pretrained(str(inits["te"]), local_files_only=True)
    assert isinstance(te_tok, BertTokenizer)
    assert lm_tok.eos_token_id is not None and lm_tok.pad_token_id is not None and lm_tok.bos_token_id is not None
    assert len({lm_tok.eos_token_id, lm_tok.pad_token_id, lm_tok.bos_token_id}) == 3
    assert lm_tok("a red bear").input_ids == lm_tok("a red bear", add_special_tokens=False).input_ids  # no auto bos

    captions = [describe(intro, p) for p in all_phrases() for intro in INTROS[::3]]
    for caption in captions:
        ids = lm_tok(caption).input_ids
        assert len(ids) == len(caption.split())
        assert lm_tok.decode(ids + [lm_tok.eos_token_id], skip_special_tokens=True) == caption
        seq = demo_text.lm_prompt_ids(lm_tok) + demo_text.lm_caption_ids(lm_tok, caption) + [lm_tok.eos_token_id]
        assert lm_tok.decode(seq, skip_special_tokens=True) == f"{demo_text.PROJECTOR_PROMPT} {caption}"
        enc = te_tok(caption)
        assert len(enc.input_ids) == len(caption.split()) + 2  # [CLS] words [SEP]
        assert te_tok.decode(enc.input_ids, skip_special_tokens=True) == caption

    prompt_ids = demo_text.lm_prompt_ids(lm_tok)
    assert lm_tok.decode(prompt_ids) == demo_text.PROJECTOR_PROMPT
    # USER : _Transcribe _speech _to _text . _\n _ASSISTANT :  -- every piece one token
    assert len(prompt_ids) == 10
    for word in demo_vocabulary():
        assert len(lm_tok(word).input_ids) == 1, word
        assert len(lm_tok(" " + word).input_ids) == 1, word
        assert len(te_tok(word, add_special_tokens=False).input_ids) == 1, word
    # Anything else falls back to bytes (LM) / characters (BERT) and still round-trips.
    odd = "Zebras eat 42 kiwis, naïvely!"
    assert lm_tok.decode(lm_tok(odd).input_ids) == odd
    assert te_tok.unk_token_id not in te_tok("zebras eat 42 kiwis!").input_ids
    assert te_tok.decode(te_tok("zebras eat 42 kiwis!").input_ids, skip_special_tokens=True) == "zebras eat 42 kiwis!"


def test_mlm_mask_is_pure_and_bert_like():
    ids = np.array([[2, 10, 11, 12, 3, 0], [2, 13, 3, 0, 0, 0]])
    cand = np.array([[0, 1, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0]], bool)
    kw = dict(mask_prob=0.15, mask_id=4, random_ids=np.arange(5, 20))
    a = demo_text.mlm_mask(ids, cand, np.random.default_rng([1, 2, 3]), **kw)
    b = demo_text.mlm_mask(ids, cand, np.random.default_rng([1, 2, 3]), **kw)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    selected = a[1] != demo_text.IGNORE
    assert not (selected & ~cand).any()  # never a special token or padding
    assert selected.any(axis=1).all()  # short rows still get a target
    assert np.array_equal(a[1][selected], ids[selected])
    assert np.array_equal(a[0][~selected], ids[~selected])
    # Over many draws: about mask_prob selected, of which ~80 % [MASK].
    big = np.tile(np.arange(10, 60), (400, 1))
    x, y = demo_text.mlm_mask(big, np.ones_like(big, bool), np.random.default_rng(0), **kw)
    sel = y != demo_text.IGNORE
    assert 0.13 < sel.mean() < 0.17
    assert 0.75 < (x[sel] == 4).mean() < 0.85


def test_validate_config():
    merged = demo_text.validate_config({"lm": {"steps": 5}})
    assert merged["lm"]["steps"] == 5 and merged["text_encoder"] == demo_text.DEFAULT_CONFIG["text_encoder"]
    assert demo_text.validate_config(None) == demo_text.DEFAULT_CONFIG == {
        k: config.validate_section(f"pretrain.{k}") for k in ("lm", "text_encoder")}
    assert merged["lm"] == config.validate({"pretrain": {"lm": {"steps": 5}}})["pretrain"]["lm"]
    for bad, key in (({"lm": {"nope": 1}}, "pretrain.lm.nope"), ({"other": {}}, "pretrain.other"),
                     ({"lm": {"heads": 3}}, "pretrain.lm.hidden_size"), ({"lm": {"kv_heads": 3}}, "pretrain.lm.heads"),
                     ({"text_encoder": {"mask_prob": 1.5}}, "pretrain.text_encoder.mask_prob"),
                     ({"lm": {"steps": 0}}, "pretrain.lm.steps"), ({"lm": {"lr": "x"}}, "pretrain.lm.lr")):
        with pytest.raises(config.ParamsError, match=f"key '{key}'"):
            demo_text.validate_config(bad)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def test_no_train_split_raises(inits, tmp_path):
    dev_only = manifest().assign(split="dev")
    with pytest.raises(ValueError, match="train"):
        demo_text.train_lm(inits["lm"], dev_only, tmp_path / "o", tmp_path / "l.csv", tmp_path / "c", LM, 0,
                           progress=False)
    with pytest.raises(ValueError, match="train"):
        demo_text.train_text_encoder(inits["te"], dev_only, tmp_path / "o", tmp_path / "l.csv", tmp_path / "c", TE,
                                     0, progress=False)


def _caption_logprob(model, tok, caption: str) -> float:
    prompt = demo_text.lm_prompt_ids(tok)
    target = demo_text.lm_caption_ids(tok, caption) + [tok.eos_token_id]
    ids = torch.tensor([prompt + target])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    return float(logp[len(prompt) - 1:].gather(1, ids[0, len(prompt):, None]).sum())


def test_lm_learns_train_captions_only(inits, tokenized_texts):
    from transformers import AutoModelForCausalLM, AutoTokenizer, SmolLM3ForCausalLM

    summary, root = _train("lm", inits, "lm_full")
    _assert_train_only(tokenized_texts)
    assert summary["lm_n_train_utts"] == 24 and summary["lm_n_train_captions"] == len(TRAIN_CAPTIONS)
    losses = _losses(root / "log.csv")
    assert len(losses) == LM["steps"]
    assert losses[-10:].mean() < 0.3 * losses[:5].mean()

    model = AutoModelForCausalLM.from_pretrained(str(root / "out"), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(root / "out"), local_files_only=True)
    assert isinstance(model, SmolLM3ForCausalLM)
    assert (root / "out" / "model.safetensors").is_file() and (root / "out" / "vocab.json").is_file()
    for caption in TRAIN_CAPTIONS[:3]:
        scrambled = " ".join(reversed(caption.split()))
        assert _caption_logprob(model, tok, caption) > _caption_logprob(model, tok, scrambled) + 3.0
    prompt = torch.tensor([demo_text.lm_prompt_ids(tok)])
    with torch.no_grad():
        out = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    assert tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True).strip() in TRAIN_CAPTIONS
    assert out[0, -1] == tok.eos_token_id
    assert summary["lm_greedy_caption_in_train"]


def test_text_encoder_learns_and_loads_as_bert_model(inits, tokenized_texts):
    from transformers import AutoModel, AutoTokenizer, BertModel

    summary, root = _train("te", inits, "te_full")
    _assert_train_only(tokenized_texts)
    assert summary["text_encoder_n_train_utts"] == 24
    losses = _losses(root / "log.csv")
    assert losses[-10:].mean() < 0.6 * losses[:5].mean()

    model = AutoModel.from_pretrained(str(root / "out"), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(root / "out"), local_files_only=True)
    assert type(model) is BertModel and model.pooler is not None
    enc = tok(["a red bear", "three green darts"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    assert len(out.hidden_states) == TE["layers"] + 1
    assert out.last_hidden_state.shape == (2, enc["input_ids"].shape[1], TE["hidden_size"])
    assert summary["text_encoder_n_params"] == sum(p.numel() for p in model.parameters())
    # The saved encoder is the MLM-trained one: the trained checkpoint's encoder weights match.
    ckpt = load_file(str(sorted((root / "ckpt").glob("step-*"))[-1] / "model.safetensors"))
    saved = model.state_dict()
    for name, value in ckpt.items():
        if name.startswith("bert."):
            assert torch.equal(saved[name[len("bert."):]], value), name


@pytest.mark.parametrize("kind", ["lm", "te"])
def test_resume_is_exact_and_same_seed_gives_same_bytes(inits, kind):
    short = {"steps": 7, "checkpoint_every": 2}
    full, full_root = _train(kind, inits, f"{kind}_uninterrupted", cfg=short)
    assert full is not None
    assert _train(kind, inits, f"{kind}_resumed", cfg=short, stop_after=5)[0] is None  # killed after step 5
    assert not (inits["root"] / f"{kind}_resumed" / "out").exists()
    resumed, res_root = _train(kind, inits, f"{kind}_resumed", cfg=short)  # resumes from step 4
    assert resumed is not None
    a = load_file(str(full_root / "out" / "model.safetensors"))
    b = load_file(str(res_root / "out" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    weights = "out/model.safetensors"
    assert (full_root / weights).read_bytes() == (res_root / weights).read_bytes()
    log_a, log_b = pd.read_csv(full_root / "log.csv"), pd.read_csv(res_root / "log.csv")
    pd.testing.assert_frame_equal(log_a, log_b)


def test_build_is_byte_identical_per_seed(inits, tmp_path):
    for kind, build, cfg in (("lm", demo_text.build_demo_lm, LM), ("te", demo_text.build_demo_text_encoder, TE)):
        again = build(tmp_path / f"{kind}_again", copy.deepcopy(cfg), seed=0)
        other = build(tmp_path / f"{kind}_other", copy.deepcopy(cfg), seed=1)
        for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (again / name).read_bytes() == (inits[kind] / name).read_bytes(), (kind, name)
        assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()


def test_text_encoder_trains_on_what_clap_reads_when_given_the_text_section(inits, tokenized_texts):
    """CLAP embeds normalised transcripts (mmasr.clap.cache.cache_items): with params ``text`` the demo text
    encoder trains on the same strings (whisper_english writes "two" as "2")."""
    from mmasr.config import validate

    summary, _ = _train("te", inits, "te_norm", max_steps=2, text_cfg=validate({})["text"])
    seen = {t.strip() for t in tokenized_texts}
    assert {"2 green goats", "3 blue cups", "a red bear"} <= seen and "two green goats" not in seen
    assert summary["text_encoder_n_train_utts"] == 24
