"""The shared training machinery: schedule, batches, losses, random streams, the loop (checkpoint,
exact resume, stop as a kill would, log), and progress lines."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from mmasr.progress import Progress, format_duration, progress_every_s
from mmasr.training import streams
from mmasr.training.loop import (CsvLog, Trainer, adamw, batch_indices, lr_at, mean_tail_loss, optimise, run_steps,
                                 saved_step, step_dirs)
from mmasr.training.losses import IGNORE, teacher_forcing_arrays, token_loss

# ------------------------------------------------------------------ pure helpers


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    kw = dict(lr=1e-3, warmup=10, total=111, min_lr_ratio=0.1)  # decay over steps 10..110
    assert lr_at(0, **kw) == pytest.approx(1e-4)
    assert lr_at(4, **kw) == pytest.approx(5e-4)
    assert lr_at(9, **kw) == pytest.approx(1e-3)
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    assert lr_at(60, **kw) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, **kw) == pytest.approx(1e-4)
    lrs = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(0, lr=1.0, warmup=0, total=1, min_lr_ratio=0.0) == 1.0


def test_batches_are_a_pure_function_of_the_step_and_cover_each_epoch():
    a = [batch_indices(10, 4, s, seed=1) for s in range(5)]
    b = [batch_indices(10, 4, s, seed=1) for s in reversed(range(5))][::-1]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    stream = np.concatenate(a)  # 20 indices = two epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert not np.array_equal(batch_indices(10, 4, 0, seed=2), a[0])


def test_teacher_forcing_puts_loss_on_caption_and_eos_only():
    inputs, labels = teacher_forcing_arrays([50, 51], [[7, 8, 9], [7]], eos=99, pad=99)
    assert inputs.tolist() == [[50, 51, 7, 8, 9], [50, 51, 7, 99, 99]]
    assert labels.tolist() == [[-100, 7, 8, 9, 99], [-100, 7, 99, -100, -100]]


def test_random_stream_tags_are_distinct():
    tags = streams.all_tags()
    assert len(tags) >= 13 and len(set(tags.values())) == len(tags)
    assert streams.PROJECTOR_ORDER != streams.CLAP_ORDER  # they once shared 301: the same permutations


def test_token_loss_averages_over_labelled_positions_in_any_chunking():
    torch.manual_seed(0)
    logits = torch.randn(5, 4, 7)
    labels = torch.tensor([[1, 2, IGNORE, IGNORE]] * 3 + [[IGNORE, 3, 4, 5]] * 2)
    inputs = torch.zeros(5, 4, dtype=torch.long)
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE).item()
    for chunk in (1, 2, 64):
        got = token_loss(lambda rows, x: logits[rows], inputs, labels, "cpu", chunk=chunk)
        assert got == pytest.approx(want, rel=1e-6)


def test_run_steps_and_tail_loss():
    assert run_steps({"steps": 100}, None) == 100 and run_steps({"steps": 100}, 7) == 7
    rows = [{"loss": str(v), "train_loss": str(2 * v)} for v in range(10)]
    assert mean_tail_loss(rows, n=4) == pytest.approx(7.5)
    assert mean_tail_loss(rows, n=2, column="train_loss") == pytest.approx(17.0)
    assert mean_tail_loss([]) is None


# ------------------------------------------------------------------ the loop

CFG = {"lr": 0.2, "warmup": 2, "min_lr_ratio": 0.1, "weight_decay": 0.01, "grad_clip": 1.0, "checkpoint_every": 3,
       "keep_checkpoints": 2, "eval_every": 4}


def _run(tmp, stop_after=None, steps=10):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = adamw(model, CFG)
    x = torch.randn(32, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    trainer = Trainer("toy", model, opt, CFG, steps=steps, checkpoint_dir=tmp, fingerprint="fp",
                      log_columns=["step", "lr", "loss", "dev"], progress=False)

    def train_step(step):
        idx = batch_indices(32, 8, step, seed=3, tag=streams.CLAP_ORDER)
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        optimise(loss, model, opt, CFG["grad_clip"])
        return {"loss": loss.item()}

    evaluated = []

    def evaluate(done):
        evaluated.append(done)
        with torch.no_grad():
            return {"dev": float(torch.nn.functional.mse_loss(model(x), y))}

    finished = trainer.run(train_step, evaluate, stop_after=stop_after)
    return trainer, model, finished, evaluated


def test_trainer_logs_evaluates_checkpoints_and_learns(tmp_path):
    trainer, model, finished, evaluated = _run(tmp_path)
    rows = trainer.log.rows()
    assert finished and [int(r["step"]) for r in rows] == list(range(1, 11))
    assert evaluated == [4, 8, 10]  # every eval_every steps and the last
    assert [bool(r["dev"]) for r in rows] == [s in (4, 8, 10) for s in range(1, 11)]
    assert float(rows[0]["lr"]) == pytest.approx(lr_at(0, lr=0.2, warmup=2, total=10, min_lr_ratio=0.1))
    assert float(rows[-1]["lr"]) == pytest.approx(0.02)
    assert float(rows[-1]["dev"]) < 0.5 * float(rows[3]["dev"])
    assert [p.name for p in step_dirs(tmp_path)] == ["step-000009", "step-000010"]  # keep_checkpoints = 2
    assert saved_step(tmp_path / "step-000010") == 10 and saved_step(tmp_path / "missing") == 0


def test_trainer_stopped_then_resumed_equals_uninterrupted(tmp_path):
    _, whole, _, _ = _run(tmp_path / "a")
    _, _, finished, _ = _run(tmp_path / "b", stop_after=7)  # as a kill after step 7: last checkpoint at 6
    assert not finished
    trainer, resumed, finished, evaluated = _run(tmp_path / "b")
    assert finished and trainer.start == 6 and evaluated == [8, 10]
    assert [int(r["step"]) for r in trainer.log.rows()] == list(range(1, 11))  # step 7's row was dropped and redone
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_a_finished_log_is_left_alone(tmp_path):
    log = CsvLog(tmp_path / "log.csv", ["step", "loss"], 0)
    for s in (1, 2, 3):
        log.write({"step": s, "loss": 0.5})
    again = CsvLog(tmp_path / "log.csv", ["step", "loss"], None)  # a finished phase: rows after it stay
    assert len(again.rows()) == 3
    truncated = CsvLog(tmp_path / "log.csv", ["step", "loss"], 2)
    assert [r["step"] for r in truncated.rows()] == ["1", "2"]
    fresh = CsvLog(tmp_path / "new.csv", ["step", "loss"], None)
    assert fresh.rows() == []


# ------------------------------------------------------------------ progress


def test_progress_logs_a_line_per_interval_and_one_at_the_end(caplog):
    now = [0.0]
    caplog.set_level(logging.INFO, logger="mmasr.progress")
    p = Progress(100, "train toy", initial=20, item_name="utts", every_s=30, clock=lambda: now[0], terminal=False)
    for _ in range(10):
        now[0] += 5.0
        p.update(1, items=8, loss=1.23456, lr=1e-3)
    p.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2  # at 30 s, then the final line at 50 s
    assert lines[0] == "train toy: 26/100 steps (26%) | loss 1.235 lr 0.001 | 1.6 utts/s | 0:00:30 elapsed, ETA 0:06:10"
    assert lines[1].startswith("train toy: 30/100 steps (30%)") and "ETA 0:05:50" in lines[1]
    p.close()
    assert len(caplog.records) == 2  # closing twice logs once


def test_progress_with_a_terminal_shows_a_bar_and_no_lines(caplog, capsys):
    caplog.set_level(logging.INFO, logger="mmasr.progress")
    p = Progress(3, "bar", every_s=0, terminal=True)
    for _ in range(3):
        p.update(1, loss=0.5)
    p.close()
    assert caplog.records == []
    assert "bar" in capsys.readouterr().err


def test_progress_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MMASR_PROGRESS_SECONDS", "5")
    assert progress_every_s() == 5.0
    monkeypatch.setenv("MMASR_PROGRESS_SECONDS", "soon")
    with pytest.raises(ValueError, match="MMASR_PROGRESS_SECONDS"):
        progress_every_s()
    assert format_duration(3725) == "1:02:05" and format_duration(math.nan) == "?"
