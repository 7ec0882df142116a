import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mmasr.training.losses import IGNORE
from mmasr.projector.speech_lm import Projector, assemble, n_trainable, stack_frames


def test_stack_frames_drops_the_tail_and_concatenates_k_frames():
    frames = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)
    stacked, lengths = stack_frames(frames, torch.tensor([7, 4]), k=3)
    assert stacked.shape == (2, 2, 9) and lengths.tolist() == [2, 1]
    assert torch.equal(stacked[0, 1], frames[0, 3:6].reshape(-1))  # frames 3, 4, 5 side by side
    with pytest.raises(ValueError, match="k must be >= 1"):
        stack_frames(frames, torch.tensor([7, 4]), k=0)


def test_projector_shapes_and_parameter_count():
    proj = Projector(encoder_dim=16, lm_hidden=24, hidden=32, k=5)
    out, lengths = proj(torch.randn(3, 23, 16), torch.tensor([23, 10, 4]))
    assert out.shape == (3, 4, 24) and lengths.tolist() == [4, 2, 0]
    assert n_trainable(proj) == (16 * 5 * 32 + 32) + (32 * 24 + 24)


def test_assemble_masks_audio_and_prompt_out_of_the_loss():
    embed = torch.nn.Embedding(50, 8)
    audio = torch.randn(2, 3, 8)
    prompt = torch.tensor([10, 11])
    inputs, mask, labels = assemble(audio, torch.tensor([3, 1]), prompt, [[20, 21], [30]], embed, eos_id=2)
    assert inputs.shape == (2, 3 + 2 + 3, 8)
    assert mask.tolist() == [[1] * 8, [1] * 5 + [0] * 3]
    assert labels[0].tolist() == [IGNORE] * 5 + [20, 21, 2]
    assert labels[1].tolist() == [IGNORE] * 3 + [30, 2] + [IGNORE] * 3
    assert torch.equal(inputs[1, :1], audio[1, :1]) and torch.equal(inputs[1, 1:3], embed(prompt))


def test_only_the_projector_learns_through_a_frozen_lm():
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      initializer_range=0.5))  # weights big enough to be steered
    lm.requires_grad_(False)
    proj = Projector(encoder_dim=8, lm_hidden=16, hidden=32, k=2)
    opt = torch.optim.AdamW(proj.parameters(), lr=3e-2)
    frames, lengths = torch.randn(2, 10, 8), torch.tensor([10, 6])
    losses = []
    for _ in range(100):
        audio, a_len = proj(frames, lengths)
        inputs, mask, labels = assemble(audio, a_len, torch.tensor([5, 6]), [[7, 8], [9]], lm.get_input_embeddings(), 2)
        loss = lm(inputs_embeds=inputs, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8  # the audio prefix steers the frozen LM toward the targets
    assert all(p.grad is None for p in lm.parameters())


# ------------------------------------------------------------------ training, decoding, scoring

import json  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mmasr.demo import text_models as demo_text  # noqa: E402
from mmasr.config import validate  # noqa: E402
from mmasr.projector.encoder_cache import FeatureCache, write_index, write_shard  # noqa: E402
from mmasr.models.loading import load_lm  # noqa: E402
from mmasr.training.loop import lr_at  # noqa: E402
from mmasr.projector.speech_lm import (build_speech_lm, decode, epoch_batches, load_trained, micro_batch,  # noqa: E402
                             token_loss_sum, train_projector, wer_table)

TINY_LM = {"hidden_size": 16, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate_size": 32,
           "max_position_embeddings": 64, "copy_fraction": 0.0}
CAPTIONS = ["a red bear", "two goats", "three blue cups", "a pear"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope="module")
def speech_setup(tmp_path_factory):
    """A tiny random LM, a feature cache of random 'encoder frames' and a manifest over them."""
    root = tmp_path_factory.mktemp("projector")
    lm_dir = demo_text.build_demo_lm(root / "lm", TINY_LM, seed=0)
    rng = np.random.default_rng(0)
    rows, arrays, index = [], {}, []
    for split, n in (("train", 12), ("dev", 4), ("test", 4)):
        for i in range(n):
            utt = f"{split}_{i:02d}"
            arrays[utt] = rng.standard_normal((int(rng.integers(7, 30)), 8)).astype(np.float16)
            rows.append({"utt_id": utt, "speaker": f"S{i % 2}", "group": "impaired" if i % 2 else "control",
                         "split": split, "text": CAPTIONS[i % len(CAPTIONS)], "audio_path": "unused.wav"})
            index.append({"utt_id": utt, "shard": "shard-00000.safetensors", "n_frames": arrays[utt].shape[0], "dim": 8})
    cache_dir = root / "features"
    cache_dir.mkdir()
    write_shard(cache_dir / "shard-00000.safetensors", arrays)
    write_index(cache_dir / "index.parquet", index)
    return {"root": root, "lm": lm_dir, "cache": FeatureCache(cache_dir), "manifest": pd.DataFrame(rows)}


def tiny_cfg(**over) -> dict:
    cfg = dict(validate({})["projector"], k=2, hidden=16, steps=6, batch_size=4, warmup=2, eval_every=2,
               checkpoint_every=2, lr=1e-2, bucket_batches=2)
    cfg.update(over)
    return cfg


def test_linear_decay_schedule():
    lrs = [lr_at(s, lr=1.0, warmup=2, total=6, min_lr_ratio=0.0, decay="linear") for s in range(6)]
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 2 / 3, 1 / 3, 0.0])
    with pytest.raises(ValueError, match="decay"):
        lr_at(0, lr=1.0, warmup=0, total=3, min_lr_ratio=0.0, decay="step")


def test_length_buckets_cover_each_example_once_and_group_similar_lengths():
    lengths = np.random.default_rng(1).integers(1, 100, size=37)
    batches = epoch_batches(lengths, batch_size=4, seed=3, epoch=0, bucket_batches=3)
    assert sorted(np.concatenate(batches).tolist()) == list(range(37))
    assert all(np.all(np.diff(lengths[b]) >= 0) for b in batches)  # sorted within a bucket
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    plain = np.mean([np.ptp(lengths[b]) for b in epoch_batches(lengths, 4, 3, 0, bucket_batches=1)])
    assert spread < plain  # less padding than random batches
    # a pure function of (seed, index): the stream continues across epochs the same way every time
    assert np.array_equal(micro_batch(lengths, 4, 12, 3, 3), epoch_batches(lengths, 4, 3, 1, 3)[2])
    assert not np.array_equal(np.concatenate(epoch_batches(lengths, 4, 3, 0, 3)),
                              np.concatenate(epoch_batches(lengths, 4, 3, 1, 3)))


def test_loss_covers_transcript_and_eos_only(speech_setup):
    model = build_speech_lm(load_lm(str(speech_setup["lm"]), device="cpu"), 8, tiny_cfg())
    frames = torch.randn(2, 9, 8)
    lengths = torch.tensor([9, 5])
    targets = [[7, 8, 9], [10]]
    loss, n = model.loss_sum(frames, lengths, targets)
    assert n == (3 + 1) + (1 + 1)  # transcript tokens + eos per row
    embeds, mask, labels = model.inputs(frames, lengths, targets)
    full_logits = model.lm(inputs_embeds=embeds, attention_mask=mask).logits  # every position, as HF computes it
    torch.testing.assert_close(loss, token_loss_sum(full_logits, labels))  # logits only where a label is predicted
    n_audio, n_prompt = [9 // 2, 5 // 2], len(model.prompt_ids)
    for row in range(2):  # audio and prompt positions carry no label
        assert (labels[row, : n_audio[row] + n_prompt] == IGNORE).all()
    logits = torch.randn(2, labels.shape[1], int(labels.max()) + 1, requires_grad=True)
    token_loss_sum(logits, labels).backward()
    predicting = labels[:, 1:] != IGNORE  # position t predicts label t + 1
    grad_rows = logits.grad.abs().sum(-1)
    assert (grad_rows[:, :-1][~predicting] == 0).all() and (grad_rows[:, :-1][predicting] > 0).all()


def test_resume_after_a_kill_equals_an_uninterrupted_run(speech_setup, tmp_path):
    setup, cfg = speech_setup, tiny_cfg()

    def train(name, **kw):
        model = build_speech_lm(load_lm(str(setup["lm"]), device="cpu"), 8, cfg)
        return train_projector(model, setup["cache"], setup["manifest"], tmp_path / name, tmp_path / f"{name}.csv",
                               tmp_path / f"{name}-state", cfg, 5, progress=False, **kw)

    full = train("full")
    assert train("killed", stop_after=3) is None and not (tmp_path / "killed").exists()
    resumed = train("killed", resume=True)
    for which in ("best", "last"):
        a = (tmp_path / "full" / which / "model.safetensors").read_bytes()
        assert a == (tmp_path / "killed" / which / "model.safetensors").read_bytes(), which
    assert (tmp_path / "full.csv").read_text() == (tmp_path / "killed.csv").read_text()
    assert {k: v for k, v in full.items() if k != "train_seconds"} == \
           {k: v for k, v in resumed.items() if k != "train_seconds"}
    log = pd.read_csv(tmp_path / "full.csv")
    assert log["step"].tolist() == list(range(1, 7)) and log["dev_loss"].notna().sum() == 3
    assert full["best_dev_loss"] == pytest.approx(log["dev_loss"].min())
    assert full["n_trainable_params"] == (8 * 2 * 16 + 16) + (16 * 16 + 16)
    # without --resume the old state is discarded: a fresh run again gives the same bytes
    train("killed")
    assert (tmp_path / "killed/last/model.safetensors").read_bytes() == (tmp_path / "full/last/model.safetensors").read_bytes()
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["k"] == 2 and config["encoder_dim"] == 8 and config["prompt"] == cfg["prompt"]


def test_gradient_accumulation_matches_one_big_batch(speech_setup, tmp_path):
    setup = speech_setup
    outs, moments = {}, {}
    for name, over in (("big", {"batch_size": 4, "grad_accum": 1}), ("accum", {"batch_size": 2, "grad_accum": 2})):
        # grad_clip out of reach: clipping rescales the gradient to a fixed norm and would hide a scale error
        cfg = tiny_cfg(steps=1, bucket_batches=1, grad_clip=1e9, **over)
        model = build_speech_lm(load_lm(str(setup["lm"]), device="cpu"), 8, cfg)
        train_projector(model, setup["cache"], setup["manifest"], tmp_path / name, tmp_path / f"{name}.csv",
                        tmp_path / f"{name}-state", cfg, 5, progress=False)
        outs[name] = model.projector.state_dict()
        moments[name] = torch.load(tmp_path / name / "last" / "state.pt", weights_only=True)["optimizer"]["state"]
    # the same 4 utterances as 2 x 2 micro-batches: the update is the same only because the loss is
    # normalised over the step's tokens (averaging per micro-batch would weigh tokens differently)
    for key in outs["big"]:
        torch.testing.assert_close(outs["big"][key], outs["accum"][key], atol=1e-6, rtol=1e-5)
    # AdamW's first update is nearly sign(g) * lr whatever g's scale, so equal weights cannot catch a uniform
    # scale error (e.g. forgetting to divide by the step's tokens or by grad_accum). After one step its
    # moments are (1 - beta1) g and (1 - beta2) g^2: the accumulated gradient itself, compared here.
    big, accum = moments["big"], moments["accum"]
    assert big.keys() == accum.keys() and len(big) == len(outs["big"])
    for name in ("exp_avg", "exp_avg_sq"):
        for i in big:
            assert float(big[i][name].abs().max()) > 0, (name, i)  # a real gradient, not zeros on both sides
            torch.testing.assert_close(accum[i][name], big[i][name], rtol=1e-4, atol=1e-7 * float(big[i][name].abs().max()))


def test_batched_decoding_equals_one_at_a_time(speech_setup, tmp_path):
    setup, cfg = speech_setup, tiny_cfg(steps=4)
    model = build_speech_lm(load_lm(str(setup["lm"]), device="cpu"), 8, cfg)
    train_projector(model, setup["cache"], setup["manifest"], tmp_path / "m", tmp_path / "m.csv", tmp_path / "s", cfg, 5,
                    progress=False)
    trained = load_trained(tmp_path / "m", load_lm(str(setup["lm"]), device="cpu"))
    ids = [f"test_{i:02d}" for i in range(4)]
    frames = [setup["cache"][u] for u in ids]
    from mmasr.projector.speech_lm import pad_frames

    batch = decode(trained, *pad_frames(frames), max_new_tokens=5)
    single = [decode(trained, *pad_frames([f]), max_new_tokens=5)[0] for f in frames]
    assert batch == single  # left padding and the attention mask keep rows independent
    beams = decode(trained, *pad_frames(frames), num_beams=3, max_new_tokens=5)
    assert len(beams) == 4 and all(isinstance(b, str) for b in beams)


def test_a_bfloat16_lm_steers_a_float32_projector(speech_setup):
    """models.dtype bfloat16 (what auto gives on CUDA): the frozen LM in bf16, the projector's weights and
    gradients float32, the loss float32; on the CPU, without autocast, so the casts themselves are tested."""
    torch.manual_seed(0)
    frames, lengths, targets = torch.randn(2, 9, 8), torch.tensor([9, 5]), [[7, 8, 9], [10]]
    models = {dt: build_speech_lm(load_lm(str(speech_setup["lm"]), device="cpu", dtype=dt), 8, tiny_cfg())
              for dt in ("float32", "bfloat16")}
    models["bfloat16"].projector.load_state_dict(models["float32"].projector.state_dict())
    bf = models["bfloat16"]
    assert {p.dtype for p in bf.lm.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bf.projector.parameters()} == {torch.float32}
    loss, _ = bf.loss_sum(frames, lengths, targets)
    loss32, _ = models["float32"].loss_sum(frames, lengths, targets)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(loss32.item(), rel=2e-2)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
               for p in bf.projector.parameters())
    assert all(p.grad is None for p in bf.lm.parameters())
    assert len(decode(bf, frames, lengths, max_new_tokens=3)) == 2


def test_wer_table_pools_errors_per_group_and_speaker():
    hyps = pd.DataFrame({"utt_id": ["u1", "u2", "u3"], "speaker": ["A", "A", "B"],
                         "group": ["impaired", "impaired", "control"],
                         "ref": ["a red bear", "two blue goats", "a cup"], "hyp": ["a red pear", "two blue", "A cup."]})
    metrics, table = wer_table(hyps, validate({})["text"])
    assert metrics["test_wer"] == pytest.approx(2 / 8)
    assert (metrics["test_substitutions"], metrics["test_deletions"], metrics["test_insertions"]) == (1, 1, 0)
    assert metrics["test_wer_impaired"] == pytest.approx(2 / 6) and metrics["test_wer_control"] == 0.0
    assert table.set_index(["level", "name"]).loc[("speaker", "A"), "S"] == 1


def test_projector_and_whisper_are_compared_on_the_same_utterances_with_a_paired_interval():
    """eval-projector --limit decodes the first N test utterances: Whisper is scored on those N only, and the
    difference gets a speaker-level interval from the same resamples (mmasr.metrics.intervals)."""
    from mmasr.metrics.intervals import wer_diff_interval
    from mmasr.projector.speech_lm import versus_whisper

    refs = {f"u{i}": r for i, r in enumerate(["a red bear", "two blue goats", "a cup", "one green hat",
                                                 "a big dog", "three cats"])}
    speakers = ["A", "A", "B", "C", "D", "D"]
    groups = ["impaired", "impaired", "impaired", "control", "control", "control"]
    manifest = pd.DataFrame({"utt_id": list(refs), "speaker": speakers, "group": groups, "split": "test",
                             "text": list(refs.values())})
    # Whisper: right on u0..u3, two words wrong on u4 and u5 (outside the decoded subset); rank 1 is worse
    nbest = pd.DataFrame({"utt_id": [u for u in refs for _ in range(2)], "rank": [0, 1] * 6,
                          "asr_score": [-0.1, -0.2] * 6,
                          "text": [t for u, r in refs.items() for t in ((r if u < "u4" else "x y"), "zzz")]})
    limit = manifest.iloc[:4]  # --limit 4
    hyps = pd.DataFrame({"utt_id": limit["utt_id"], "speaker": limit["speaker"], "group": limit["group"],
                         "ref": limit["text"], "hyp": ["a red pear", "two blue goats", "a cup", "one hat"]})
    text = validate({})["text"]
    out = versus_whisper(hyps, nbest, manifest, text, n_resamples=200, seed=0)
    projector = wer_table(hyps, text)[0]["test_wer"]
    assert projector == pytest.approx(2 / 11) and out["n_whisper_compared_utts"] == 4
    assert out["whisper_test_wer_asr"] == 0.0 and out["whisper_test_wer_oracle"] == 0.0
    from mmasr.rescoring.fusion import asr_only_wers
    assert asr_only_wers(nbest, manifest, "test", text)["test_wer_asr"] == pytest.approx(5 / 16)  # all of test
    assert out["test_wer_vs_whisper"] == pytest.approx(projector - 0.0)
    assert out["whisper_test_wer_asr_impaired"] == out["whisper_test_wer_asr_control"] == 0.0
    assert out["test_wer_vs_whisper_impaired"] == pytest.approx(1 / 8)
    assert out["test_wer_vs_whisper_control"] == pytest.approx(1 / 3)
    # one control speaker in the subset: utterance-level; the numbers are those of the interval module
    err_p, err_w, words = np.array([1, 0, 0, 1]), np.zeros(4, np.int64), np.array([3, 3, 2, 3])
    ci = wer_diff_interval(err_w, err_p, words, np.array(speakers[:4]), np.array(groups[:4]), 200, 0)
    assert out["test_wer_vs_whisper_ci_level"] == ci["level"] == "utterance"
    assert (out["test_wer_vs_whisper_ci_low"], out["test_wer_vs_whisper_ci_high"]) == (ci["low"], ci["high"])
    assert out["test_wer_vs_whisper_ci_low"] <= out["test_wer_vs_whisper"] <= out["test_wer_vs_whisper_ci_high"]
    with pytest.raises(ValueError, match="no Whisper n-best list"):
        versus_whisper(hyps, nbest[nbest["utt_id"] != "u2"], manifest, text, 200, 0)
