"""com.microsoft BiasAdd (x + bias + skip) in a whole model (#14).

No ONNX Runtime tool writes BiasAdd into a language model: its optimizer fuses it only in Stable Diffusion
UNets (after BiasSplitGelu), and ONNX Runtime runs it on CUDA only. So the form here is a graph edit of the
zoo's bert-ts17: every residual `Add(Add(MatMul, bias), skip)` becomes `BiasAdd(MatMul, bias, skip)`, and the
model is run with the torch bridge (whose BiasAdd is x + bias + skip, tests/unit/bridge/test_fused_ops.py)
rather than ONNX Runtime on the CPU. subclone, which runs the source in ONNX Runtime to calibrate, is not
tested here for that reason.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from rich.console import Console

import onnxgrow
from onnxgrow import bridge, modelio
from onnxgrow.verify import plan_inputs
from helpers import zoo_model

KEYS = ["hidden_size", "num_layers", "num_heads", "head_dim", "ffn_size", "vocab_size", "max_positions",
        "norm", "norm_position", "positional", "num_parameters"]


def residual_bias_add(graph: onnx.GraphProto, add: onnx.NodeProto, producers: dict, vectors: set):
    """A BiasAdd for `add` if it is Add(Add(MatMul, 1-D bias), skip) in either order, with the inner Add."""
    for j in (0, 1):
        inner = producers.get(add.input[j])
        if inner is None or inner.op_type != "Add":
            continue
        bias = [i for i in inner.input if i in vectors]
        x = [i for i in inner.input if producers.get(i) is not None and producers[i].op_type == "MatMul"]
        if bias and x:
            node = helper.make_node("BiasAdd", [x[0], bias[0], add.input[1 - j]], list(add.output),
                                    name=f"{add.name}_bias_add", domain="com.microsoft")
            return node, inner
    return None, None


def with_bias_adds(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    vectors = {i.name for i in graph.initializer if numpy_helper.to_array(i).ndim == 1}
    replaced, dropped = {}, set()
    for node in graph.node:
        if node.op_type == "Add":
            fused, inner = residual_bias_add(graph, node, producers, vectors)
            if fused is not None:
                replaced[node.name], dropped = fused, dropped | {inner.name}
    nodes = [replaced.get(n.name, n) for n in graph.node if n.name not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def bias_adds(path) -> int:
    return sum(n.op_type == "BiasAdd" for n in onnx.load(str(path)).graph.node)


def run_bridge(path, feeds) -> np.ndarray:
    with torch.no_grad():
        return next(iter(bridge.to_torch(onnx.load(str(path)))(**feeds).values())).numpy()


@pytest.fixture(scope="module")
def form(zoo, tmp_path_factory):
    config = zoo["bert-ts17"]["config"]
    path = tmp_path_factory.mktemp("bias_add") / "bert-bias-add.onnx"
    onnx.save(with_bias_adds(onnx.load(str(zoo_model(zoo, "bert-ts17")))), path)
    assert bias_adds(path) == 2 * config["num_layers"]  # the attention's and the FFN's residual
    feeds = plan_inputs(modelio.load(path)).make(2, 7)
    return path, config, feeds


def test_the_edit_keeps_the_function(zoo, form):
    path, _, feeds = form
    want = run_bridge(zoo_model(zoo, "bert-ts17"), feeds)
    assert np.abs(run_bridge(path, feeds) - want).max() <= 1e-5 * np.abs(want).max()


def test_inspect_gives_the_true_configuration(form):
    path, config, _ = form
    got = onnxgrow.inspect(path)
    assert {k: got[k] for k in KEYS} == {k: config[k] for k in KEYS}


def test_hypercloning_x2_is_exact_and_keeps_bias_add(form, tmp_path):
    path, config, feeds = form
    out = tmp_path / "wide.onnx"
    onnx.save(onnxgrow.widen(path, 2), out)
    want, got = run_bridge(path, feeds), run_bridge(out, feeds)
    hidden = config["hidden_size"]
    assert got.shape[-1] == 2 * hidden
    for copy in (got[..., :hidden], got[..., hidden:]):  # the hidden state, once in each copy
        assert np.abs(copy - want).max() <= 1e-4 * np.abs(want).max()
    assert bias_adds(out) == bias_adds(path)


@pytest.mark.parametrize("method", ["fpi", "aki", "pad"])
def test_any_size_widening_runs(form, tmp_path, method):
    path, config, feeds = form
    out = tmp_path / f"{method}.onnx"
    onnx.save(onnxgrow.widen(path, method=method, hidden=96, heads=6, ffn=240), out)
    assert np.isfinite(run_bridge(out, feeds)).all()
    assert (onnxgrow.inspect(out)["hidden_size"], bias_adds(out)) == (96, bias_adds(path))


@pytest.mark.parametrize("method", ["stack", "interleave"])
def test_deepening_by_copies_runs(form, tmp_path, method):
    path, config, feeds = form
    out = tmp_path / f"{method}.onnx"
    onnx.save(onnxgrow.deepen(path, factor=2, method=method), out)
    assert np.isfinite(run_bridge(out, feeds)).all()
    assert (onnxgrow.inspect(out)["num_layers"], bias_adds(out)) == (4, 8)


def test_train_two_steps_keeps_bias_add(form, tmp_path):
    path, config, feeds = form
    text, out = tmp_path / "text.txt", tmp_path / "trained.onnx"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    onnxgrow.train(path, text, use_bytes=True, steps=2, device="cpu", seq=16, batch=2, output=out,
                   checkpoint_every=0, console=Console(file=io.StringIO()))
    after, before = run_bridge(out, feeds), run_bridge(path, feeds)
    assert np.isfinite(after).all() and not np.allclose(after, before)
    assert bias_adds(out) == bias_adds(path)
