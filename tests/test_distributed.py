"""Training on several processes (PyTorch DDP under torchrun; gloo on the CPU): the helpers of
mmasr.training.distributed, and the trainers' own commands (`mmasr train-projector`, `mmasr train-clap`)
on 2 processes against 1 process with the same global batch - the same weights, logs and optimiser
moments to a float tolerance - and 2 processes stopped mid-run then resumed against an uninterrupted
2-process run - the same bytes."""

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
from mmasr.projector.speech_lm import Projector
from mmasr.training import distributed
from mmasr.training.loop import Trainer, adamw, optimise, world_fingerprint
from tests.conftest import REPO, tool_env
from tests.test_clap import clap_cfg, synthetic_cache
from tests.test_projector import speech_setup, tiny_cfg  # noqa: F401 (speech_setup: a fixture)

# 2 processes vs 1 on the same global batches: the same sums in another order (each rank's partial sums and
# padding, then gloo's all-reduce), so weights agree to float32 rounding, amplified a little by AdamW over the
# steps (observed: max |diff| 1e-7 to 5e-7 on weights of 0.3-2.6), inside this tolerance and far below what
# training moves them (> 100 x ATOL, checked).
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


@pytest.fixture
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
    """AdamW's moments (not invariant to a uniform scale of the gradients, as its updates nearly are)."""
    sa = torch.load(a, weights_only=True)["optimizer"]["state"]
    sb = torch.load(b, weights_only=True)["optimizer"]["state"]
    assert sa.keys() == sb.keys() and sa
    for i in sa:
        for name in ("exp_avg", "exp_avg_sq"):
            ref = sa[i][name]
            torch.testing.assert_close(sb[i][name], ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))


def same_bytes(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


@pytest.mark.slow
def test_two_processes_train_what_one_does_and_resume_exactly(speech_setup, tmp_path, restore_torch):  # noqa: F811
    # --- inputs: the projector's tiny LM and encoder-feature cache (tests/test_projector.py), CLAP's synthetic cache
    manifest = tmp_path / "manifest.parquet"
    speech_setup["manifest"].to_parquet(manifest)
    # 12 train utterances, global batches of 9 then 3 (batch_size x grad_accum): ranks hold 5|4 and 2|1
    # utterances, run as 3 micro-batches each, then 2 and 1 - uneven parts and accumulation under DDP.
    projector = tiny_cfg(steps=8, batch_size=3, grad_accum=3, bucket_batches=2, lr=0.02, warmup=2, eval_every=2,
                         checkpoint_every=3, keep_checkpoints=2)
    # batches of 11 then 1 utterance: on the 1-utterance steps rank 1 has nothing to compute
    one_item = tiny_cfg(steps=4, batch_size=11, grad_accum=1, bucket_batches=1, lr=0.02, warmup=1, eval_every=2)
    synthetic_cache(tmp_path / "clap_cache")
    clap = clap_cfg(hidden_dim=16, embed_dim=8, epochs=4, batch_size=7, warmup=2, lr=0.01, eval_every=3,
                    checkpoint_every=5)  # 16 steps of 7 pairs: 4|3 per rank

    def train_projector(name: str, cfg: dict, threads: int, *extra: str) -> list[str]:
        out = tmp_path / name
        params = {"seed": 5, "models": {"device": "cpu", "lm": str(speech_setup["lm"])}, "projector": cfg}
        return ["train-projector", "--cfg", json.dumps(params), "--threads", str(threads),
                "--features", str(speech_setup["root"] / "features"), "--manifest", str(manifest),
                "--out", str(out / "model"), "--log-csv", str(out / "log.csv"), "--state-dir", str(out / "state"),
                "--resume", "--quiet", *extra]

    def train_clap(name: str, threads: int, *extra: str) -> list[str]:
        out = tmp_path / name
        params = {"seed": 3, "models": {"device": "cpu"}, "clap": clap}
        return ["train-clap", "--cfg", json.dumps(params), "--threads", str(threads), "--cache",
                str(tmp_path / "clap_cache"), "--out", str(out / "model"), "--log-csv", str(out / "log.csv"),
                "--checkpoint-dir", str(out / "state"), "--quiet", *extra]

    # --- one process: the commands as the rules run them with training.nproc 1 (here, in this process)
    for argv in (train_projector("p1", projector, 1), train_projector("q1", one_item, 1), train_clap("c1", 1)):
        assert cli.main(argv) == 0
    # --- two processes (--threads 2: one torch thread each), and each trainer stopped after a step, then resumed
    torchrun([train_projector("p2", projector, 2), train_projector("q2", one_item, 2), train_clap("c2", 2),
              train_projector("p2r", projector, 2, "--stop-after", "5"), train_clap("c2r", 2, "--stop-after", "7")],
             tmp_path)
    assert not (tmp_path / "p2r" / "model").exists() and not (tmp_path / "c2r" / "model").exists()  # stopped
    assert (tmp_path / "p2r/state/step-000003").is_dir() and (tmp_path / "c2r/state/phase1/step-000005").is_dir()
    proc = torchrun([train_projector("p2r", projector, 2), train_clap("c2r", 2)], tmp_path)
    resumed = proc.stdout + proc.stderr
    assert "resuming from" in resumed and "(step 3)" in resumed and "(step 5)" in resumed, resumed[-3000:]

    # --- 2 processes == 1 process (tolerance), and rank 0 alone wrote (one log row per step)
    for name in ("p", "q"):
        for which in ("best", "last"):
            assert_weights_close(tmp_path / f"{name}1/model/{which}/model.safetensors",
                                 tmp_path / f"{name}2/model/{which}/model.safetensors")
        assert_logs_close(tmp_path / f"{name}1/log.csv", tmp_path / f"{name}2/log.csv", exact=["step", "tokens"])
        assert_moments_close(tmp_path / f"{name}1/model/last/state.pt", tmp_path / f"{name}2/model/last/state.pt")
        one, two = (json.loads((tmp_path / f"{name}{n}/model/training.json").read_text()) for n in (1, 2))
        assert (one["n_processes"], two["n_processes"]) == (1, 2) and one["best_step"] == two["best_step"]
    assert pd.read_csv(tmp_path / "p2/log.csv")["step"].tolist() == list(range(1, 9))
    assert_weights_close(tmp_path / "c1/model/model.safetensors", tmp_path / "c2/model/model.safetensors")
    assert same_bytes(tmp_path / "c1/model/init.safetensors", tmp_path / "c2/model/init.safetensors")
    assert_logs_close(tmp_path / "c1/log.csv", tmp_path / "c2/log.csv", exact=["step", "phase"])
    assert_moments_close(tmp_path / "c1/state/phase1/step-000016/state.pt", tmp_path / "c2/state/phase1/step-000016/state.pt")
    # ... and training moved every weight tensor far more than the tolerance: they agree on more than the init
    init, trained = (load_file(str(tmp_path / f"c1/model/{n}.safetensors")) for n in ("init", "model"))
    assert min(float((trained[k] - init[k]).abs().max()) for k in init) > 100 * ATOL
    fresh = Projector(8, 16, hidden=projector["hidden"], k=projector["k"])  # 8-dim features, the tiny LM's 16
    fresh.reset_parameters(5)  # the run's seed: its initial weights
    trained = load_file(str(tmp_path / "p2/model/last/model.safetensors"))
    assert min(float((trained[k] - v).abs().max()) for k, v in fresh.state_dict().items()) > 100 * ATOL

    # --- a 2-process run stopped and resumed == the uninterrupted 2-process run, byte for byte
    for which in ("best", "last"):
        assert same_bytes(tmp_path / f"p2/model/{which}/model.safetensors", tmp_path / f"p2r/model/{which}/model.safetensors")
    assert same_bytes(tmp_path / "c2/model/model.safetensors", tmp_path / "c2r/model/model.safetensors")
    for name in ("p", "c"):
        assert same_bytes(tmp_path / f"{name}2/log.csv", tmp_path / f"{name}2r/log.csv")
