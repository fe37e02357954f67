"""Unit tests for onnxgrow.train.Trainer and the schedule, on the committed tiny GPT-2 (no zoo).

The data is a short repeating pattern, which a few optimiser steps already learn; runs are a few
steps of batch 2 x 8 tokens on the CPU.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from onnxgrow import api, metadata, modelio
from onnxgrow.errors import OnnxgrowError
from onnxgrow.training import LanguageModel, Trainer, lr_at, train

TINY = Path(__file__).resolve().parents[1] / "models" / "default" / "tiny-gpt2.onnx"
PATTERN = np.tile(np.arange(24, dtype=np.int64), 20)  # 480 tokens, period 24


def make_trainer(objective="clm", steps=10, lr=3e-3, val=True, seed=0) -> Trainer:
    torch.manual_seed(seed)
    m = modelio.load(TINY)
    student = LanguageModel.build(m, api.structure(m), torch.device("cpu"))
    train_tokens, val_tokens = (PATTERN[:400], PATTERN[400:]) if val else (PATTERN, PATTERN[:0])
    return Trainer(student, train_tokens, val_tokens, objective=objective, steps=steps, batch=2, seq=8,
                   lr=lr, mask_id=student.vocab - 1, seed=seed, model_path=TINY)


def test_lr_at_warms_up_then_decays_to_a_tenth():
    # 100 steps: warmup is 5% of them, linear from lr/5; then a cosine from lr down to lr/10
    assert [lr_at(s, 100, 1.0) for s in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    decay = [lr_at(s, 100, 1.0) for s in range(5, 101)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert lr_at(100, 100, 1.0) == pytest.approx(0.1)
    assert lr_at(500, 100, 1.0) == pytest.approx(0.1)  # past the end it stays at the floor
    assert lr_at(5 + 95 // 2, 100, 2.0) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 47 / 95))))
    # warmup is at most 100 steps and at least 1
    assert lr_at(49, 10_000, 1.0) == pytest.approx(0.5) and lr_at(99, 10_000, 1.0) == pytest.approx(1.0)
    assert lr_at(0, 10, 1.0) == pytest.approx(1.0)


def test_steps_lower_the_loss_on_repeated_data():
    trainer = make_trainer(steps=8)
    before = trainer.evaluate()
    losses = [trainer.step() for _ in range(8)]
    assert trainer.steps_done == 8 and trainer.losses == losses
    assert np.mean(losses[-3:]) < losses[0] - 0.5, losses
    assert trainer.evaluate() < before - 0.5
    assert trainer.tokens_seen == 8 * 2 * 8


def test_evaluate_is_repeatable_and_leaves_the_data_order_alone():
    a, b = make_trainer(), make_trainer()
    assert a.evaluate() == a.evaluate()
    assert a.step() == b.step()  # a evaluated twice, b never: the same batch and the same loss
    assert a.validate() == a.val_history[-1][1] and a.val_history[-1][0] == 1
    a.validate()
    assert len(a.val_history) == 1  # once per step
    assert make_trainer(val=False).evaluate() is None


def test_mlm_steps_train_on_masked_positions():
    trainer = make_trainer(objective="mlm", steps=4)
    assert trainer.window == 8  # no extra token for the shifted labels
    losses = [trainer.step() for _ in range(4)]
    assert all(np.isfinite(losses)) and trainer.evaluate() is not None


def test_checkpoint_then_load_takes_the_same_next_step(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    first = make_trainer(steps=6)
    for _ in range(3):
        first.step()
    first.validate()
    first.save_checkpoint(ckpt)
    ahead = [first.step(), first.step()]

    resumed = make_trainer(steps=6, seed=1)  # the seed is overridden by the checkpoint's RNG state
    resumed.load_checkpoint(ckpt)
    assert resumed.steps_done == 3 and resumed.losses == first.losses[:3]
    assert resumed.val_history == first.val_history
    assert [resumed.step(), resumed.step()] == pytest.approx(ahead, rel=1e-6)


def test_checkpoint_refusals_are_one_line(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(OnnxgrowError, match="no checkpoint to resume from"):
        make_trainer().load_checkpoint(ckpt)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(OnnxgrowError, match="not a readable checkpoint") as err:
        make_trainer().load_checkpoint(ckpt)
    assert err.value.__cause__ is not None
    done = make_trainer(steps=1)
    done.step()
    done.save_checkpoint(ckpt)
    with pytest.raises(OnnxgrowError, match="at step 1 already"):
        make_trainer(steps=1).load_checkpoint(ckpt)
    with pytest.raises(OnnxgrowError, match="objective clm, not mlm"):
        make_trainer(objective="mlm").load_checkpoint(ckpt)


def test_train_appends_its_history_entry(tmp_path):
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(PATTERN.astype(np.uint8)))
    model = tmp_path / "tiny.onnx"
    m = modelio.load(TINY)
    metadata.append_history(m, "widen:hypercloning:hidden=64")
    modelio.save(m, model)
    s = train(model, data, use_bytes=True, steps=2, batch=2, seq=8, checkpoint_every=0,
              output=tmp_path / "out.onnx", console=Console(file=io.StringIO()))
    assert s["steps"] == 2 and s["start_step"] == 0 and len(s["losses"]) == 2 and s["seq"] == 8
    assert Path(s["checkpoint"]).is_file() and Path(s["plot"]).is_file()
    out = modelio.load(tmp_path / "out.onnx")
    assert out.metadata_props[metadata.HISTORY_KEY] == "widen:hypercloning:hidden=64;train:clm:steps=2;"
