"""Properties over random small transformer configurations, built and exported in the test.

For every drawn configuration (family, hidden size, heads, kv heads, FFN, layers, tied or not):
HyperCloning and identity blocks preserve the outputs, removing the added identity blocks gives
back the source's weights and outputs, and subcloning a HyperCloned model back to the source's sizes
(un-cloning: one copy of each group, its summed-over slices times the copy count) gives back the
source's weights and outputs.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import onnxgrow
from onnxgrow import modelio
from onnxgrow.api import deepen
from onnxgrow.structure import parameter_names
from onnxgrow.subcloning import subclone_ir
from conftest import load_builder
from helpers import assert_close_to_scale, save_and_validate, worst

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # each test exports and checks 8 drawn models


@st.composite
def configs(draw):
    head_dim = draw(st.sampled_from([8, 16]))
    kv = draw(st.integers(1, 2))
    group = draw(st.integers(1, 3))
    family = draw(st.sampled_from(["gpt2", "llama"]))
    heads = kv * group if family == "llama" else draw(st.integers(2, 4))
    if heads == 1:  # one head: its axis has size 1 and cannot be copied (refused, see test_widen)
        group, heads = 2, 2 * kv
    return dict(family=family, heads=heads, kv=kv if family == "llama" else heads, head_dim=head_dim,
                hidden=heads * head_dim, ffn=draw(st.sampled_from([24, 40, 64])),
                layers=draw(st.integers(1, 3)), tied=draw(st.booleans()), seed=draw(st.integers(0, 99)))


def export(c: dict, path) -> None:
    torch.manual_seed(c["seed"])
    T = transformers
    if c["family"] == "gpt2":
        config = T.GPT2Config(n_embd=c["hidden"], n_head=c["heads"], n_layer=c["layers"], n_inner=c["ffn"],
                              vocab_size=97, n_positions=32, attn_implementation="eager")
        model = T.GPT2LMHeadModel(config)
    else:
        config = T.LlamaConfig(hidden_size=c["hidden"], num_attention_heads=c["heads"],
                               num_key_value_heads=c["kv"], intermediate_size=c["ffn"],
                               num_hidden_layers=c["layers"], vocab_size=97, max_position_embeddings=32,
                               tie_word_embeddings=c["tied"], attn_implementation="eager")
        model = T.LlamaForCausalLM(config)
    with torch.no_grad():  # norms that are not all ones, so a wrong norm rewrite shows
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, mask):
            return self.m(input_ids=ids, attention_mask=mask, use_cache=False, return_dict=False)[0]

    ids = torch.randint(0, 97, (2, 5))
    with warnings.catch_warnings(), load_builder().traceable_masks():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits(model), (ids, torch.ones_like(ids)), str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}})


def parameters(path) -> list[bytes]:
    """The model's parameters (as the structure sees them), as sorted raw bytes."""
    spec = onnxgrow.structure(path)
    init = spec.model.graph.initializers
    return sorted(init[name].const_value.numpy().tobytes() for name in parameter_names(spec))


PROPERTY = settings(max_examples=8, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@PROPERTY
@given(c=configs(), factor=st.sampled_from([2, 3]))
def test_hypercloning_preserves_outputs(c, factor):
    tmp_path = Path(tempfile.mkdtemp())  # one folder per example (pytest's tmp_path is per test)
    src = tmp_path / "src.onnx"
    export(c, src)
    report = save_and_validate(onnxgrow.widen(src, factor, noise=0.01), src, tmp_path / "wide.onnx")
    assert report.passed, (c, report.to_dict())
    assert_close_to_scale(report)
    got = onnxgrow.inspect(tmp_path / "wide.onnx")
    kv = c["kv"] if c["kv"] == 1 else factor * c["kv"]  # multi-query attention stays multi-query
    assert (got["hidden_size"], got["num_heads"], got["num_kv_heads"]) == (
        factor * c["hidden"], factor * c["heads"], kv)


@PROPERTY
@given(c=configs(), extra=st.lists(st.integers(0, 2), min_size=1, max_size=3))
def test_identity_blocks_then_removing_them_gives_back_the_source(c, extra):
    tmp_path = Path(tempfile.mkdtemp())
    src = tmp_path / "src.onnx"
    export(c, src)
    at = [min(p, c["layers"] - 1) for p in extra]
    deep_path = tmp_path / "deep.onnx"
    report = save_and_validate(deepen(src, at=at), src, deep_path, tolerance=1e-5)
    assert report.passed and worst(report) == 0.0, (c, at, report.to_dict())  # identity blocks: bit-exact
    # the original blocks sit at these positions once the copies are in
    originals, position = [], 0
    for block in range(c["layers"]):
        originals.append(position)
        position += 1 + at.count(block)
    back = subclone_ir(modelio.load(deep_path), np.zeros((1, 4), np.int64), keep_layers=originals, rescale="none")
    back_path = modelio.save(back.model, tmp_path / "back.onnx")
    assert parameters(src) == parameters(back_path)
    assert save_and_validate(onnx.load(back_path), src, tmp_path / "back2.onnx", tolerance=1e-6).passed


def named_parameters(path) -> dict[str, np.ndarray]:
    """The model's parameters (as the structure sees them) by initializer name."""
    spec = onnxgrow.structure(path)
    init = spec.model.graph.initializers
    return {name: init[name].const_value.numpy() for name in parameter_names(spec)}


@PROPERTY
@given(c=configs(), factor=st.sampled_from([2, 3]), rescale=st.sampled_from(["norm", "sqrt", "none"]))
def test_widen_then_subclone_back_gives_back_the_source(c, factor, rescale):
    tmp_path = Path(tempfile.mkdtemp())
    src = tmp_path / "src.onnx"
    export(c, src)
    wide_path = tmp_path / "wide.onnx"
    onnx.save(onnxgrow.widen(src, factor), wide_path)
    ids = np.random.default_rng(c["seed"]).integers(0, 97, (4, 8))
    back = subclone_ir(modelio.load(wide_path), ids, hidden=c["hidden"], heads=c["heads"], kv_heads=c["kv"],
                       ffn=c["ffn"], rescale=rescale)
    back_path = modelio.save(back.model, tmp_path / "back.onnx")
    source, got = named_parameters(src), named_parameters(back_path)
    assert source.keys() == got.keys()  # every matrix, bias, norm and embedding, by name
    for name, x in source.items():
        # x2 is bit for bit (W/2*2); x3 rounds W/3*3 once: within an ulp or two of fp32
        np.testing.assert_allclose(got[name], x, rtol=1e-6, atol=0, err_msg=f"{name} {c} x{factor} {rescale}")
    report = save_and_validate(onnx.load(back_path), src, tmp_path / "back2.onnx", tolerance=1e-5)
    assert report.passed, (c, factor, rescale, report.to_dict())
