"""Training on several processes (PyTorch DDP under torchrun; gloo on the CPU): the helpers of
mmasr.training.distributed, and the trainers' own commands (`mmasr train-projector`, `mmasr train-clap`
with both phases) on 2 processes against 1 process with the same global batch - the same weights, logs
and optimiser moments to a float tolerance - and 2 processes stopped mid-run then resumed against an
uninterrupted 2-process run - the same bytes. The 2-process runs share two torchrun launches (~10 s each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from mmasr import cli
from mmasr.clap.cache import build_cache
from mmasr.config import validate
from mmasr.models.loading import load_audio_encoder, load_text_encoder
from mmasr.projector.speech_lm import Projector
from mmasr.training import distributed
from mmasr.training.loop import Trainer, adamw, optimise, world_fingerprint
from tests.conftest import REPO, tool_env
from tests.test_clap import clap_cfg, synthetic_cache, tiny_corpus
from tests.test_projector import speech_setup, tiny_cfg  # noqa: F401 (speech_setup: a fixture)

# 2 processes vs 1 on the same global batches: the same sums in another order (each rank's partial sums and
# padding, then gloo's all-reduce), so weights agree to float32 rounding, amplified a little by AdamW over the
# steps (observed max |diff|: projector 5e-7, CLAP heads 9e-8, CLAP phase 2 1.1e-6, on weights up to 2.7),
# inside this tolerance and below what training moves them (checked).
ATOL, RTOL = 1e-5, 1e-4


# ------------------------------------------------------------------ helpers, one process


def test_a_global_batch_is_cut_into_contiguous_parts_in_rank_order():
    batch = np.array([7, 3, 9, 1, 4])
    assert [distributed.shard_batch(batch, r, 2).tolist() for r in range(2)] == [[7, 3, 9], [1, 4]]
    assert distributed.shard_sizes(5, 2) == [3, 2] and distributed.shard_sizes(1, 3) == [1, 0, 0]
    for n, world in ((0, 1), (10, 3), (2, 4), (16, 8), (9, 2)):
        sizes = distributed.shard_sizes(n, world)
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
        parts = [distributed.shard_batch(np.arange(n), r, world) for r in range(world)]
        assert [len(p) for p in parts] == sizes and np.concatenate(parts).tolist() == list(range(n))
    with pytest.raises(ValueError, match="rank 2"):
        distributed.shard_batch(batch, 2, 2)


def test_one_process_needs_no_torchrun_and_every_helper_is_the_identity(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init_from_env("auto") == distributed.Dist()  # no process group
    assert distributed.world_size() == 1 and distributed.is_main() and distributed.local_world_size() == 1
    x = torch.randn(3, 2)
    assert distributed.gather_rows(x, [3]) is x
    assert distributed.all_reduce_sum([1.5, 2]) == [1.5, 2.0]
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}] and distributed.broadcast_object(4) == 4
    assert distributed.rank_seed(13, 0) == 13
    assert len({13, distributed.rank_seed(13, 1), distributed.rank_seed(13, 2), distributed.rank_seed(14, 1)}) == 4
    assert world_fingerprint("abc", 1) == "abc" and world_fingerprint("abc", 2) != world_fingerprint("abc", 3)


def test_the_trainer_on_one_process_wraps_nothing_and_writes_what_it_always_did(tmp_path):
    model = torch.nn.Linear(3, 2)
    cfg = {"lr": 0.1, "warmup": 1, "min_lr_ratio": 0.0, "weight_decay": 0.0, "checkpoint_every": 2, "keep_checkpoints": 1}
    trainer = Trainer("t", model, adamw(model, cfg), cfg, steps=2, checkpoint_dir=tmp_path, fingerprint="fp",
                      log_columns=["step", "lr", "loss"], progress=False)
    assert trainer.module is model and (trainer.world, trainer.rank, trainer.main) == (1, 0, True)
    mine, sizes = trainer.shard([4, 5, 6])
    assert mine.tolist() == [4, 5, 6] and sizes == [3]
    with trainer.no_sync():  # one process: nothing to hold back
        pass

    def step(_: int) -> dict:
        loss = model(torch.ones(2, 3)).pow(2).mean()
        optimise(loss, model, trainer.optimizer, 1.0)
        return {"loss": loss.item()}

    assert trainer.run(step)
    state = torch.load(tmp_path / "step-000002" / "state.pt", weights_only=True)
    assert state["fingerprint"] == "fp" and "rank_rng" not in state  # the one-process format, unchanged


def test_the_torchrun_environment_is_checked(monkeypatch):
    assert distributed.env_world({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == (1, 2, 1)
    with pytest.raises(ValueError, match="inconsistent"):
        distributed.env_world({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="not integers"):
        distributed.env_world({"WORLD_SIZE": "two"})
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="'cuda:0' names one GPU, but 2 processes would share it"):
        distributed.init_from_env("cuda:0")


# ------------------------------------------------------------------ the trainers on 2 processes


@pytest.fixture(scope="module")
def restore_torch():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def torchrun(commands: list[list[str]], work: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    """``commands`` (mmasr argument lists) in order, on ``nproc`` processes of one torchrun launch."""
    path = work / "commands.json"
    path.write_text(json.dumps(commands))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(REPO / "tests" / "torchrun_driver.py"), str(path)]
    env = {**tool_env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def save_bert(folder: Path, dropout: float) -> Path:
    """A tiny BERT text encoder (tests/test_clap.py's) with the given dropout."""
    from transformers import BertConfig, BertModel

    from mmasr.demo.models import demo_vocabulary
    from mmasr.demo.text_models import build_bert_tokenizer

    tok = build_bert_tokenizer(demo_vocabulary(), 32)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=dropout,
                         attention_probs_dropout_prob=dropout)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def runs(speech_setup, demo_model_dirs, tmp_path_factory, restore_torch) -> Path:  # noqa: F811
    """Every trainer run of this module, in one folder: ``<name>1`` on one process (the command as the rules run
    it with training.nproc 1, in this process), ``<name>2`` on two (one torchrun launch for all of them), and
    ``<name>2r`` on two, stopped after a step (--stop-after) and resumed in a second launch."""
    root = tmp_path_factory.mktemp("ddp")
    manifest = root / "manifest.parquet"
    speech_setup["manifest"].to_parquet(manifest)
    # p: 12 train utterances, global batches of 9 then 3 (batch_size x grad_accum): ranks hold 5|4 and 2|1
    # utterances, run as 3 micro-batches each, then 2 and 1 - uneven parts and accumulation under DDP.
    projector = tiny_cfg(steps=8, batch_size=3, grad_accum=3, bucket_batches=2, lr=0.02, warmup=2, eval_every=2,
                         checkpoint_every=3, keep_checkpoints=2)
    # q: batches of 11 then 1 utterance: on the 1-utterance steps rank 1 has nothing to compute
    one_item = tiny_cfg(steps=4, batch_size=11, grad_accum=1, bucket_batches=1, lr=0.02, warmup=1, eval_every=2)
    synthetic_cache(root / "clap_cache")
    # c: 16 steps of 7 pairs, 4|3 per rank
    heads = clap_cfg(hidden_dim=16, embed_dim=8, epochs=4, batch_size=7, warmup=2, lr=0.01, eval_every=3,
                     checkpoint_every=5)
    # e, f: phase 2 on real (tiny) encoders - the demo Whisper's encoder (no dropout) and a BERT without (e) or
    # with dropout (f: drawn per rank, so only resumed-vs-uninterrupted is compared)
    phase2 = clap_cfg(hidden_dim=8, embed_dim=8, epochs=1, batch_size=4, warmup=1, phase2_epochs=3, phase2_layers=1,
                      checkpoint_every=1, eval_every=1)
    corpus = tiny_corpus(root / "audio")
    encoders = {}
    for name, dropout in (("e", 0.0), ("f", 0.1)):
        models = validate({"models": {"audio_encoder": str(demo_model_dirs["whisper"]), "device": "cpu",
                                      "text_encoder": str(save_bert(root / f"bert_{name}", dropout))}})
        build_cache(corpus, load_audio_encoder(models["models"]["audio_encoder"], device="cpu"),
                    load_text_encoder(models["models"]["text_encoder"], device="cpu"), phase2, models["text"],
                    root / f"cache_{name}", progress=False)
        encoders[name] = models["models"]

    def train_projector(name: str, cfg: dict, threads: int, *extra: str) -> list[str]:
        out = root / name
        params = {"seed": 5, "models": {"device": "cpu", "lm": str(speech_setup["lm"])}, "projector": cfg}
        return ["train-projector", "--cfg", json.dumps(params), "--threads", str(threads),
                "--features", str(speech_setup["root"] / "features"), "--manifest", str(manifest),
                "--out", str(out / "model"), "--log-csv", str(out / "log.csv"), "--state-dir", str(out / "state"),
                "--resume", "--quiet", *extra]

    def train_clap(name: str, threads: int, *extra: str) -> list[str]:
        out, kind = root / name, name[0]
        params = {"seed": 3, "models": encoders.get(kind, {"device": "cpu"}), "clap": heads if kind == "c" else phase2}
        cache = root / ("clap_cache" if kind == "c" else f"cache_{kind}")
        return ["train-clap", "--cfg", json.dumps(params), "--threads", str(threads), "--cache", str(cache),
                "--out", str(out / "model"), "--log-csv", str(out / "log.csv"), "--checkpoint-dir", str(out / "state"),
                "--quiet", *extra]

    for argv in (train_projector("p1", projector, 1), train_projector("q1", one_item, 1), train_clap("c1", 1),
                 train_clap("e1", 1)):
        assert cli.main(argv) == 0
    # --threads 2: one torch thread per process, as on one process
    torchrun([train_projector("p2", projector, 2), train_projector("q2", one_item, 2), train_clap("c2", 2),
              train_clap("e2", 2), train_clap("f2", 2), train_projector("p2r", projector, 2, "--stop-after", "5"),
              train_clap("c2r", 2, "--stop-after", "7"), train_clap("f2r", 2, "--stop-after", "3")], root)
    for name in ("p2r", "c2r", "f2r"):
        assert not (root / name / "model").exists(), f"{name} was not stopped"
    proc = torchrun([train_projector("p2r", projector, 2), train_clap("c2r", 2), train_clap("f2r", 2)], root)
    (root / "resumed.log").write_text(proc.stdout + proc.stderr)
    return root


def assert_weights_close(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=ATOL, rtol=RTOL, msg=lambda m: f"{key}: {m}")


def assert_logs_close(a: Path, b: Path, exact: list[str]) -> None:
    la, lb = pd.read_csv(a), pd.read_csv(b)
    assert list(la.columns) == list(lb.columns) and len(la) == len(lb)
    pd.testing.assert_frame_equal(la[exact], lb[exact])
    numbers = [c for c in la.columns if c not in exact]
    np.testing.assert_allclose(la[numbers].to_numpy(float), lb[numbers].to_numpy(float), rtol=RTOL, atol=ATOL)


def assert_moments_close(a: Path, b: Path) -> None:
    """AdamW's moments (not invariant to a uniform scale of the gradients, as its updates nearly are), to 1e-3
    relative or 1e-4 of the model's largest moment (some gradients are rounding noise: attention's key bias)."""
    sa = torch.load(a, weights_only=True)["optimizer"]["state"]
    sb = torch.load(b, weights_only=True)["optimizer"]["state"]
    assert sa.keys() == sb.keys() and sa
    for name in ("exp_avg", "exp_avg_sq"):
        scale = max(float(s[name].abs().max()) for s in sa.values())
        for i in sa:
            torch.testing.assert_close(sb[i][name], sa[i][name], rtol=1e-3, atol=1e-4 * scale)


def moved(trained: dict, init: dict) -> float:
    """How far training moved the least-moved tensor (its largest change)."""
    return min(float((trained[k] - init[k]).abs().max()) for k in init)


def same_bytes(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


@pytest.mark.slow
def test_the_projector_on_two_processes_trains_what_one_does(runs):
    for name in ("p", "q"):
        for which in ("best", "last"):
            assert_weights_close(runs / f"{name}1/model/{which}/model.safetensors",
                                 runs / f"{name}2/model/{which}/model.safetensors")
        assert_logs_close(runs / f"{name}1/log.csv", runs / f"{name}2/log.csv", exact=["step", "tokens"])
        assert_moments_close(runs / f"{name}1/model/last/state.pt", runs / f"{name}2/model/last/state.pt")
        one, two = (json.loads((runs / f"{name}{n}/model/training.json").read_text()) for n in (1, 2))
        assert (one["n_processes"], two["n_processes"]) == (1, 2) and one["best_step"] == two["best_step"]
    assert pd.read_csv(runs / "p2/log.csv")["step"].tolist() == list(range(1, 9))  # rank 0 alone logs
    # training moved every weight far more than the tolerance: the runs agree on more than their start
    fresh = Projector(8, 16, hidden=16, k=2)  # 8-dim features, the tiny LM's 16, tiny_cfg's hidden and k
    fresh.reset_parameters(5)  # the run's seed: its initial weights
    assert moved(load_file(str(runs / "p2/model/last/model.safetensors")), fresh.state_dict()) > 100 * ATOL


@pytest.mark.slow
def test_clap_on_two_processes_trains_what_one_does(runs):
    for name, last in (("c", "phase1/step-000016"), ("e", "phase2/step-000004")):
        assert_weights_close(runs / f"{name}1/model/model.safetensors", runs / f"{name}2/model/model.safetensors")
        assert same_bytes(runs / f"{name}1/model/init.safetensors", runs / f"{name}2/model/init.safetensors")
        assert_logs_close(runs / f"{name}1/log.csv", runs / f"{name}2/log.csv", exact=["step", "phase"])
        assert_moments_close(runs / f"{name}1/state/{last}/state.pt", runs / f"{name}2/state/{last}/state.pt")
        init, trained = (load_file(str(runs / f"{name}1/model/{n}.safetensors")) for n in ("init", "model"))
        assert moved(trained, init) > 10 * ATOL
    # phase 2 trained the last layer of each encoder too
    assert any(k.startswith("text_encoder.encoder.layer.1.") for k in load_file(str(runs / "e2/model/model.safetensors")))


@pytest.mark.slow
def test_two_processes_stopped_and_resumed_end_as_an_uninterrupted_run(runs):
    resumed = (runs / "resumed.log").read_text()
    assert "p2r/state/step-000003 (step 3)" in resumed and "c2r/state/phase1/step-000005 (step 5)" in resumed, resumed
    assert "f2r/state/phase2/step-000003 (step 3)" in resumed  # phase 2, its encoder dropout drawn per rank
    for which in ("best", "last"):
        assert same_bytes(runs / f"p2/model/{which}/model.safetensors", runs / f"p2r/model/{which}/model.safetensors")
    for name in ("c", "f"):
        assert same_bytes(runs / f"{name}2/model/model.safetensors", runs / f"{name}2r/model/model.safetensors")
    for name in ("p", "c", "f"):
        assert same_bytes(runs / f"{name}2/log.csv", runs / f"{name}2r/log.csv")
