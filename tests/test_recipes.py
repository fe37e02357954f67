"""train's recipe for grown models: chosen from onnxgrow.history, visible in the optimiser's rates,
printed by `onnxgrow train`, and turned off by --recipe none."""

from __future__ import annotations

import inspect
import json
import string
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from onnxgrow import api, metadata, modelio, recipes
from onnxgrow.cli import app
from onnxgrow.training import Trainer, lr_at

TINY = Path(__file__).resolve().parents[1] / "models" / "default" / "tiny-gpt2.onnx"
TEXT = "".join(inspect.getsource(m) for m in (json.decoder, string))


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """The tiny GPT-2 widened x2 by HyperCloning, and a text file to train it on."""
    d = tmp_path_factory.mktemp("recipe")
    path = d / "wide.onnx"
    modelio.save(api.widen_ir(modelio.load(TINY), factor=2, method="hypercloning"), path)
    (d / "data.txt").write_text(TEXT)
    return path, d / "data.txt"


def test_recipe_from_history():
    wide = "widen:hypercloning:ffn=512,hidden=128:from=ffn=256,hidden=64"
    r = recipes.from_history([wide])
    assert (r.name, r.copy_factor, r.warmup_from) == ("grown", 2, recipes.SOURCE_FINAL_RATE)
    # two copying widens multiply; a pad widen copies nothing
    assert recipes.from_history([wide, wide.replace("128", "256").replace("=64", "=128")]).copy_factor == 4
    assert recipes.from_history(["widen:pad:hidden=128:from=hidden=64"]).name == "warm"
    assert recipes.from_history(["deepen:stack:layers=4"]).name == "warm"
    assert recipes.from_history(["subclone:hidden=64,layers=1,removed=[1]"]).name == "none"
    # trained since it was grown, or never grown: the plain schedule
    assert recipes.from_history([wide, "train:clm:steps=10"]).name == "none"
    assert recipes.from_history([]).name == "none"
    # an old history without the source's width: the copy factor is unknown, so no lr/n
    assert recipes.from_history(["widen:hypercloning:hidden=128"]).copy_factor == 1
    assert recipes.choose("none", [wide]) == recipes.PLAIN


def test_widen_records_the_source_width(grown):
    entry = metadata.history(modelio.load(grown[0]))[-1]
    assert recipes.widen_copy_factor(entry) == 2


def build(path, data, recipe):
    torch.manual_seed(0)
    return Trainer.build(modelio.load(path), data, use_bytes=True, steps=100, batch=2, seq=16, lr=1e-3,
                         device=torch.device("cpu"), recipe=recipe)


def test_grown_recipe_slows_copied_matrices_and_none_is_plain(grown):
    t = build(*grown, "auto")
    assert t.recipe.name == "grown"
    t.step()
    rates = {}
    for g in t.optimizer.param_groups:
        for p in g["params"]:
            rates[id(p)] = g["lr"]
    first = lr_at(0, 100, 1e-3, recipes.SOURCE_FINAL_RATE)
    assert first == pytest.approx(1e-3 * (0.1 + 0.9 / 5))  # warmup from the source's final rate
    spec = api.structure(modelio.load(grown[0]))
    module = t.student.module
    tables = [module.parameter(v.name) for v in (spec.token_embedding, spec.position_embedding)]
    matrices = [p for p in module.parameters() if p.dim() >= 2 and not any(p is q for q in tables)]
    assert len(matrices) > 4 and all(rates[id(p)] == pytest.approx(first / 2) for p in matrices)
    assert all(rates[id(p)] == pytest.approx(first) for p in tables)
    assert all(rates[id(p)] == pytest.approx(first) for p in t.student.module.parameters() if p.dim() < 2)

    plain = build(*grown, "none")
    plain.step()
    assert plain.recipe.name == "none"
    assert all(g["lr"] == pytest.approx(lr_at(0, 100, 1e-3)) for g in plain.optimizer.param_groups)
    assert len(plain.optimizer.param_groups) == 2  # the plain layout: matrices with decay, the rest without


def test_cli_train_prints_the_recipe(grown, tmp_path):
    path, data = grown
    args = ["train", str(path), "--data", str(data), "--bytes", "--steps", "2", "--batch", "2", "--seq", "16",
            "-o", str(tmp_path / "out.onnx")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "recipe grown (grown by widen:hypercloning)" in result.output and "lr/2" in result.output
    result = CliRunner().invoke(app, args + ["--recipe", "none", "--force"])
    assert result.exit_code == 0, result.output
    assert "recipe none (asked for): the plain schedule" in result.output
    result = CliRunner().invoke(app, args + ["--recipe", "nope", "--force"])
    assert result.exit_code == 2 and "unknown recipe 'nope'" in result.output


def test_constant_schedule_and_warm_start():
    # 100 steps: a 5-step warmup, from lr/10 with the recipe, then the constant rate
    assert [lr_at(s, 100, 1.0, 0.1, "constant") for s in (0, 4, 5, 99)] == pytest.approx([0.28, 1.0, 1.0, 1.0])
    assert lr_at(99, 100, 1.0) < 0.11  # the plain cosine ends near lr/10
