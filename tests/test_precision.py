"""Mixed-precision training (onnxgrow/precision.py): float16 and bfloat16 models train with float32
master weights and finite results, a diverged run writes nothing, and the CUDA choices are right
(with the GPU mocked: no test here needs one)."""

from __future__ import annotations

import inspect
import io
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from rich.console import Console
from typer.testing import CliRunner

from models.variants import variant
from onnxgrow import precision
from onnxgrow import training as train
from onnxgrow.cli import app
from onnxgrow.errors import NOT_PRESERVED, OnnxgrowError

TEXT = "".join(inspect.getsource(m) for m in (json.decoder, json.encoder))
SMALL = dict(batch=4, seq=32, lr=1e-3, log_every=1, checkpoint_every=0, device="cpu",
             console=Console(file=io.StringIO()))
HALF = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def half_models(zoo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("half")
    paths = {}
    for name in ("gpt2-dynamo18", "gpt2-ts17", "gpt2-optimum-kv"):
        for kind in HALF:
            paths[name, kind] = folder / f"{name}.{kind}.onnx"
            onnx.save(variant(onnx.load(zoo[name]["file"]), kind), str(paths[name, kind]))
    return paths


def float_weights(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).astype(np.float32) for t in onnx.load(str(path)).graph.initializer
            if t.data_type in (TensorProto.FLOAT, *HALF.values()) and len(t.dims) >= 2}


@pytest.mark.parametrize("name, kind, steps", [("gpt2-dynamo18", "float16", 3), ("gpt2-ts17", "bfloat16", 2),
                                               ("gpt2-optimum-kv", "bfloat16", 2),
                                               ("gpt2-optimum-kv", "float16", 2)])
def test_half_models_train_to_finite_weights_in_their_dtype(half_models, tmp_path, text_file, name, kind, steps):
    source = half_models[name, kind]
    out = tmp_path / "trained.onnx"
    s = train.train(source, text_file, use_bytes=True, steps=steps, output=out, **SMALL)
    assert "float32 master weights" in s["precision"] and kind in s["precision"]
    assert all(np.isfinite(s["losses"])) and np.isfinite(s["val_loss_end"])
    before, after = float_weights(source), float_weights(out)
    assert all(np.isfinite(w).all() for w in after.values())
    assert any(not np.array_equal(before[n], after[n]) for n in before)  # the updates were not all lost
    kept = {t.name: t.data_type for t in onnx.load(str(out)).graph.initializer}
    assert all(kept[t.name] == t.data_type for t in onnx.load(str(source)).graph.initializer)


@pytest.mark.slow
def test_half_model_resumes_from_its_master_weights(half_models, tmp_path, text_file, monkeypatch):
    """The master weights are part of the checkpoint: float16 weights alone would lose the updates
    smaller than their last place, and a resumed run would drift from a straight one."""
    source = half_models["gpt2-dynamo18", "float16"]
    options = dict(SMALL, checkpoint_every=2)
    straight = train.train(source, text_file, use_bytes=True, steps=4, output=tmp_path / "a.onnx", **options)
    save = train.save_checkpoint

    def dies_at_the_end(path, state):
        assert state["master"] and all(m.dtype == torch.float32 for m in state["master"])
        if state["step"] == 4:
            raise KeyboardInterrupt
        save(path, state)
    monkeypatch.setattr(train, "save_checkpoint", dies_at_the_end)
    with pytest.raises(KeyboardInterrupt):
        train.train(source, text_file, use_bytes=True, steps=4, output=tmp_path / "b.onnx", **options)
    monkeypatch.setattr(train, "save_checkpoint", save)
    resumed = train.train(source, text_file, use_bytes=True, steps=4, resume=True, output=tmp_path / "b.onnx",
                          **options)
    assert resumed["start_step"] == 2
    np.testing.assert_allclose(resumed["losses"], straight["losses"], rtol=1e-6)


def test_a_diverged_run_exits_non_zero_and_writes_nothing(half_models, tmp_path, text_file):
    out = tmp_path / "nan.onnx"
    result = CliRunner().invoke(app, ["train", str(half_models["gpt2-dynamo18", "float16"]), "--data", str(text_file),
                                      "--bytes", "--steps", "3", "--batch", "4", "--seq", "32", "--lr", "1e6",
                                      "--device", "cpu", "-o", str(out)])
    assert result.exit_code == NOT_PRESERVED, result.output
    assert "training diverged" in result.output and "nothing written" in result.output
    assert list(tmp_path.iterdir()) == []  # no model, checkpoint or loss curve


def test_out_of_vocabulary_ids_are_refused_before_the_device(zoo, text_file):
    trainer = train.Trainer.build(train.modelio.load(zoo["gpt2-ts17"]["file"]), text_file, use_bytes=True,
                                  steps=2, batch=2, seq=8, lr=1e-3, device=torch.device("cpu"))
    trainer.train_tokens = np.full_like(trainer.train_tokens, trainer.student.vocab + 3)
    with pytest.raises(OnnxgrowError, match="outside the model's vocabulary of 1000"):
        trainer.step()


def parameter(dtype) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(2, 2, dtype=dtype))


@pytest.mark.parametrize("capability, autocast, scaled", [((7, 5), torch.float16, True),
                                                          ((8, 0), torch.bfloat16, False),
                                                          ((9, 0), torch.bfloat16, False)])
def test_cuda_autocast_follows_the_compute_capability(monkeypatch, capability, autocast, scaled):
    """bf16 autocast only where the GPU has it natively: torch.cuda.is_bf16_supported() also says yes
    on a T4 or V100 (emulation); the device asked for is the one checked."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: asked.append(i) or capability)
    chosen = precision.choose([parameter(torch.float32)], torch.device("cuda", 1))
    assert (chosen.autocast, chosen.loss_scaling, asked) == (autocast, scaled, [1])
    assert not chosen.master_weights


def test_precision_on_the_cpu_and_for_half_weights():
    assert precision.choose([parameter(torch.float32)], torch.device("cpu")).describe() == "float32"
    half = precision.choose([parameter(torch.float32), parameter(torch.float16)], torch.device("cpu"))
    assert half.master_weights and half.loss_scaling and half.autocast is None
    bf16 = precision.choose([parameter(torch.bfloat16)], torch.device("cpu"))
    assert bf16.master_weights and not bf16.loss_scaling


def test_loss_scale_halves_on_overflow_and_grows_after_clean_steps():
    scale = precision.LossScale(True, init=8.0, growth_interval=3)
    scale.update(overflow=True)
    assert scale.value == 4.0
    for _ in range(3):
        scale.update(overflow=False)
    assert scale.value == 8.0
    off = precision.LossScale(False)
    off.update(overflow=True)
    assert off.value == 1.0


def test_master_weights_keep_updates_smaller_than_a_float16_step():
    """1e-4 added to 1.0 vanishes in float16 (its step there is 9.8e-4) but adds up in the master."""
    p = parameter(torch.float16)
    with torch.no_grad():
        p.fill_(1.0)
    master = precision.MasterWeights([p])
    for _ in range(20):
        with torch.no_grad():
            master.params()[0].add_(1e-4)
        master.copy_back()
    assert float(master.params()[0][0, 0].detach()) == pytest.approx(1.002, abs=1e-6)
    value = float(p.detach()[0, 0])
    assert value == pytest.approx(1.002, abs=1e-3) and value > 1.0


def test_a_model_broken_before_training_is_bad_input(zoo, tmp_path, text_file):
    """A loss that is not finite before any update is the input's fault (exit 2), not a divergence."""
    model = onnx.load(zoo["gpt2-ts17"]["file"])
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    array = numpy_helper.to_array(weight).copy()
    array.flat[0] = np.inf
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    source = tmp_path / "broken.onnx"
    onnx.save(model, str(source))
    result = CliRunner().invoke(app, ["train", str(source), "--data", str(text_file), "--bytes", "--steps", "2",
                                      "--batch", "2", "--seq", "16", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "not finite before training" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.onnx"]
