"""Tests for onnxgrow.bridge (ONNX graph -> torch module -> ONNX) and onnxgrow.weights.

The reference is always ONNX Runtime on the same graph: zoo exports for the ops exporters use,
one-node graphs for the op semantics the zoo does not reach (negative steps, batch_dims, ...).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from conftest import ZOO_NAMES
from onnx import TensorProto, helper, numpy_helper

from onnxgrow import api, bridge, weights
from onnxgrow.errors import OnnxgrowError
from onnxgrow.verify import make_inputs, run_model
from helpers import zoo_model

TOLERANCE = 1e-5  # float32, max abs difference to ONNX Runtime
SHAPES = ((2, 5), (3, 9))  # two calls on one module: shape computations must follow the inputs


def model_path(zoo, name):
    return zoo_model(zoo, name)  # a model that did not build fails, naming the build error


def run_bridge(module, feeds) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = module(**feeds) if isinstance(feeds, dict) else module(*feeds)
    return {k: v.numpy() for k, v in out.items()}


def max_diff(a: dict, b: dict) -> float:
    assert list(a) == list(b)
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) if a[k].size else 0.0 for k in a)


# --- outputs equal ONNX Runtime's -------------------------------------------------------------------


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_matches_onnxruntime(zoo, name):
    path = model_path(zoo, name)
    module = bridge.to_torch(path)
    assert module.output_names == [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]
    for batch, seq in SHAPES:
        feeds = make_inputs(path, batch, seq, past_length=3)  # KV-cache models get a 3-token past
        ref = run_model(path, feeds, "cpu")
        out = run_bridge(module, feeds)
        assert list(out) == list(ref)
        assert max_diff(out, ref) < TOLERANCE, f"{name} at batch {batch}, seq {seq}"


def test_inputs_by_position_numpy_and_errors(zoo):
    path = model_path(zoo, "gpt2-ts17")
    module = bridge.to_torch(path)
    feeds = make_inputs(path, 2, 4)
    named = run_bridge(module, feeds)
    positional = run_bridge(module, list(feeds.values()))  # numpy arrays, graph-input order
    assert max_diff(named, positional) == 0.0
    with pytest.raises(OnnxgrowError, match="missing graph inputs: attention_mask"):
        module(input_ids=torch.from_numpy(feeds["input_ids"]))
    with pytest.raises(OnnxgrowError, match="no input 'ids'"):
        module(ids=torch.from_numpy(feeds["input_ids"]))


# --- weights: trainable, frozen, tied ------------------------------------------------------------------


def test_trainable_weights_and_frozen_constants(zoo):
    path = model_path(zoo, "llama-gqa-dynamo18")
    module = bridge.to_torch(path)
    assert sum(p.numel() for p in module.parameters()) == api.inspect(path)["num_parameters"]
    # the rotary inverse frequencies are a graph constant, not a weight
    assert module.parameter("expand_2") is None
    assert isinstance(module.initializer("expand_2"), torch.Tensor)
    feeds = {k: torch.from_numpy(v) for k, v in make_inputs(path, 2, 6).items()}
    module(**feeds)["logits"].square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_tied_copy_is_one_parameter(zoo):
    path = model_path(zoo, "gpt2-ts17")  # TorchScript stores wte [V, H] and an anonymous [H, V] copy
    module = bridge.to_torch(path)
    (copy, (base, transposed)), = module.tied.items()
    assert base == "transformer.wte.weight" and transposed
    assert module.parameter(copy) is module.parameter(base)
    assert len({id(p) for p in module.parameters()}) == len(list(module.parameters()))
    assert "onnx::MatMul" not in " ".join(module.state_dict())  # the copy is not a second weight


def test_tied_weights_stay_tied_through_training(zoo, tmp_path):
    path = model_path(zoo, "gpt2-ts17")
    module = bridge.to_torch(path)
    (copy, (base, _)), = module.tied.items()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    feeds = {k: torch.from_numpy(v) for k, v in make_inputs(path, 2, 8).items()}
    for _ in range(3):
        logits = module(**feeds)["logits"]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 feeds["input_ids"][:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    proto = bridge.write_back(module, path)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    assert not np.array_equal(inits[base], before[base])  # it trained ...
    np.testing.assert_array_equal(inits[copy], inits[base].T)  # ... and both copies hold the one weight
    # the written model computes in ONNX Runtime what the trained module computes
    out_path = tmp_path / "trained.onnx"
    onnx.save(proto, str(out_path))
    eval_feeds = make_inputs(path, 2, 7)
    assert max_diff(run_bridge(module, eval_feeds), run_model(out_path, eval_feeds, "cpu")) < TOLERANCE


# --- write_back -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2-ts17", "gpt2-dynamo18", "opt-ts14", "bert-mlm-ts17", "llama-gqa-optimum-kv"])
def test_write_back_round_trip_is_bit_identical(zoo, name):
    path = model_path(zoo, name)
    original = onnx.load(str(path)).SerializeToString()
    assert bridge.write_back(bridge.to_torch(path)).SerializeToString() == original
    proto = onnx.load(str(path))
    assert bridge.write_back(bridge.to_torch(proto), proto).SerializeToString() == original
    assert proto.SerializeToString() == original  # the caller's proto is not modified


def test_write_back_refuses_another_model(zoo):
    module = bridge.to_torch(model_path(zoo, "gpt2-ts17"))
    with pytest.raises(OnnxgrowError, match="built from another model"):
        bridge.write_back(module, model_path(zoo, "llama-gqa-ts17"))


# --- autocast and torch.compile --------------------------------------------------------------------------


def test_bf16_autocast_runs_close_to_float32(zoo):
    path = model_path(zoo, "llama-gqa-ts17")
    module = bridge.to_torch(path)
    feeds = {k: torch.from_numpy(v) for k, v in make_inputs(path, 2, 6).items()}
    ref = module(**feeds)["logits"].detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = module(**feeds)["logits"]
    assert low.dtype == torch.bfloat16  # the matmuls ran in bf16 ...
    low.float().sum().backward()
    cos = torch.nn.functional.cosine_similarity(low.detach().float().flatten(), ref.flatten(), dim=0)
    assert cos > 0.999 and (low.float() - ref).abs().max() < 0.05 * ref.abs().max()  # ... and stayed close


def test_module_cast_to_bf16_keeps_graph_constants(zoo):
    # BERT's mask bias is (1 - mask) * -3.4e38: in bf16 that constant is -inf, and 0 * -inf is NaN
    path = model_path(zoo, "bert-ts14")
    feeds = make_inputs(path, 2, 6)
    ref = run_model(path, feeds, "cpu")["last_hidden_state"]
    module = bridge.to_torch(path).bfloat16()
    assert all(p.dtype == torch.bfloat16 for p in module.parameters())
    out = run_bridge(module, feeds)["last_hidden_state"]
    assert np.isfinite(out).all() and np.abs(out - ref).max() < 0.02 * np.abs(ref).max()


@pytest.mark.slow
def test_torch_compile_single_graph_and_matches(zoo):
    dynamo = pytest.importorskip("torch._dynamo")
    if not dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this Python")
    path = model_path(zoo, "gpt2-dynamo18")
    module = bridge.to_torch(path)
    feeds = {k: torch.from_numpy(v) for k, v in make_inputs(path, 2, 6).items()}
    dynamo.reset()
    # shapes are host values, so dynamo sees the whole graph at once: no graph breaks
    assert dynamo.explain(module)(**feeds).graph_break_count == 0
    dynamo.reset()
    compiled = torch.compile(module, backend="aot_eager")  # no C++ toolchain needed, still AOTAutograd
    out = compiled(**feeds)["logits"]
    ref = module(**feeds)["logits"]
    assert (out - ref).abs().max().item() < TOLERANCE
    out.sum().backward()
    assert all(p.grad is not None for p in module.parameters())


# --- single ops against ONNX Runtime ---------------------------------------------------------------------

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 3, 4)).astype(np.float32)
ONNX_TYPE = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64,
             np.dtype(np.bool_): TensorProto.BOOL}


def ints(*values):
    return np.array(values, dtype=np.int64)


# (id, node, inputs (runtime inputs, then constants as initializers: names with a leading "c"), opset)
OP_CASES = [
    ("slice-negative-step", helper.make_node("Slice", ["x", "cs", "ce", "ca", "cst"], ["y"]),
     {"x": X, "cs": ints(-1), "ce": ints(-10**10), "ca": ints(2), "cst": ints(-2)}, 18),
    ("slice-clamped", helper.make_node("Slice", ["x", "cs", "ce", "ca"], ["y"]),
     {"x": X, "cs": ints(1, -100), "ce": ints(2**62, 2), "ca": ints(1, -1)}, 18),
    ("reshape-zero-and-minus-one", helper.make_node("Reshape", ["x", "cshape"], ["y"]),
     {"x": X, "cshape": ints(0, -1)}, 18),
    ("split-uneven", helper.make_node("Split", ["x"], ["y", "z"], axis=2, num_outputs=2),
     {"x": RNG.standard_normal((2, 5)).astype(np.float32).reshape(1, 2, 5)}, 18),
    ("expand-bidirectional", helper.make_node("Expand", ["x", "cshape"], ["y"]),
     {"x": RNG.standard_normal((3, 1)).astype(np.float32), "cshape": ints(2, 1, 4)}, 18),
    ("softmax-opset11-flattens", helper.make_node("Softmax", ["x"], ["y"], axis=1), {"x": X}, 11),
    ("trilu-lower", helper.make_node("Trilu", ["x", "ck"], ["y"], upper=0), {"x": X, "ck": ints(-1)}, 18),
    ("cumsum-exclusive-reverse", helper.make_node("CumSum", ["x", "cax"], ["y"], exclusive=1, reverse=1),
     {"x": X, "cax": ints(1)}, 18),
    ("gathernd-batch-dims", helper.make_node("GatherND", ["x", "cidx"], ["y"], batch_dims=1),
     {"x": X, "cidx": np.array([[[2, 1]], [[0, -1]]], dtype=np.int64)}, 18),
    ("scatternd-add", helper.make_node("ScatterND", ["x", "cidx", "u"], ["y"], reduction="add"),
     {"x": X, "u": np.ones((2, 4), np.float32), "cidx": np.array([[0, 1], [0, 1]], dtype=np.int64)}, 18),
    ("gather-axis1-negative", helper.make_node("Gather", ["x", "cidx"], ["y"], axis=1),
     {"x": X, "cidx": np.array([[-1, 0]], dtype=np.int64)}, 18),
    ("gemm-transposed-scaled",
     helper.make_node("Gemm", ["a", "b", "c"], ["y"], transA=1, transB=1, alpha=0.5, beta=2.0),
     {"a": RNG.standard_normal((4, 3)).astype(np.float32), "b": RNG.standard_normal((5, 4)).astype(np.float32),
      "c": RNG.standard_normal((5,)).astype(np.float32)}, 18),
    ("reducesum-axes-input", helper.make_node("ReduceSum", ["x", "cax"], ["y"], keepdims=0),
     {"x": X, "cax": ints(0, -1)}, 18),
    ("reducemean-all", helper.make_node("ReduceMean", ["x"], ["y"]), {"x": X}, 18),
    ("unsqueeze-negative-axes", helper.make_node("Unsqueeze", ["x", "cax"], ["y"]), {"x": X, "cax": ints(-1, 0)}, 18),
    ("squeeze-all", helper.make_node("Squeeze", ["x"], ["y"]), {"x": X.reshape(2, 1, 12, 1)}, 18),
    ("where-broadcast", helper.make_node("Where", ["m", "x", "cy"], ["y"]),
     {"m": RNG.random((3, 4)) > 0.5, "x": X, "cy": np.array(-1.0, np.float32)}, 18),
    ("range-float", helper.make_node("Range", ["cs", "cl", "cd"], ["y"]),
     {"cs": np.array(0.5, np.float32), "cl": np.array(3.0, np.float32), "cd": np.array(0.75, np.float32)}, 18),
    ("layernorm-axis1", helper.make_node("LayerNormalization", ["x", "cw", "cb"], ["y"], axis=1, epsilon=1e-3),
     {"x": X, "cw": RNG.standard_normal((3, 4)).astype(np.float32),
      "cb": RNG.standard_normal((3, 4)).astype(np.float32)}, 18),
    ("flatten", helper.make_node("Flatten", ["x"], ["y"], axis=2), {"x": X}, 18),
    ("pow-int-exponent", helper.make_node("Pow", ["x", "ce"], ["y"]), {"x": X, "ce": ints(3)}, 18),
    ("int-div-truncates", helper.make_node("Div", ["a", "cb"], ["y"]), {"a": ints(-7, 7, -8), "cb": ints(2)}, 18),
    # shape arithmetic runs on the host (Python ints): the same semantics on that path
    ("host-shape-arithmetic", [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Slice", ["s", "cend", "cbig", "czero", "cneg"], ["rev"]),  # [4, 3, 2]
        helper.make_node("Sub", ["czero", "rev"], ["minus"]),  # [-4, -3, -2]
        helper.make_node("Div", ["minus", "cthree"], ["q"]),  # truncates: [-1, -1, 0]
        helper.make_node("Equal", ["q", "czero"], ["e"]),
        helper.make_node("Where", ["e", "rev", "q"], ["w"]),  # [-1, -1, 2]
        helper.make_node("Concat", ["w", "cthree"], ["y"], axis=0)],
     {"x": X, "cend": ints(-1), "cbig": ints(-2**62), "czero": ints(0), "cneg": ints(-1), "cthree": ints(3)}, 18),
]


@pytest.mark.parametrize("node,values,opset", [c[1:] for c in OP_CASES], ids=[c[0] for c in OP_CASES])
def test_single_op_matches_onnxruntime(tmp_path, node, values, opset):
    feeds = {k: v for k, v in values.items() if not k.startswith("c")}
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in values.items() if k.startswith("c")]
    inputs = [helper.make_tensor_value_info(k, ONNX_TYPE[v.dtype], v.shape) for k, v in feeds.items()]
    nodes = node if isinstance(node, list) else [node]
    out_type = TensorProto.INT64 if len(nodes) > 1 else ONNX_TYPE[values.get("x", next(iter(values.values()))).dtype]
    outputs = [helper.make_tensor_value_info(o, out_type, None) for o in nodes[-1].output]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    path = tmp_path / "op.onnx"
    onnx.save(model, str(path))
    ref = run_model(path, feeds, "cpu")
    out = run_bridge(bridge.to_torch(model), feeds)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in ref.items()}
    assert max_diff(out, ref) < TOLERANCE


def test_unsupported_op_is_refused():
    node = helper.make_node("Resize", ["x", "", "cscales"], ["y"])
    model = helper.make_model(helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones(4, np.float32), "cscales")]), opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(OnnxgrowError, match="does not implement these ops: Resize"):
        bridge.to_torch(model)


# --- weights by role ---------------------------------------------------------------------------------------


def read_safetensors(path):
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()[weights.ROLES_KEY])


def test_export_weights_names_roles(zoo, tmp_path):
    path = model_path(zoo, "gpt2-ts17")
    out = weights.export_weights(path, tmp_path / "w.safetensors")
    tensors, roles = read_safetensors(out)
    for role in ("embed.tokens", "embed.positions", "layers.0.attn.qkv", "layers.0.attn.qkv.bias", "layers.1.attn.o",
                 "layers.1.ffn.up", "layers.1.ffn.down.bias", "layers.0.norm0.weight", "layers.0.norm1.bias",
                 "final_norm.weight", "lm_head"):
        assert role in tensors, role
    assert not any(k.startswith("other.") for k in tensors)  # every GPT-2 weight has a role
    assert roles["layers.0.attn.qkv"] == {"initializer": "transformer.h.0.attn.c_attn.weight", "transposed": True}
    assert tuple(tensors["layers.0.attn.qkv"].shape) == (192, 64)  # [out, in] whatever the export stored
    assert torch.equal(tensors["lm_head"], tensors["embed.tokens"])  # the tied head, as [vocab, hidden]
    # nothing is lost: every float initializer is under some name
    floats = {t.name for t in onnx.load(str(path)).graph.initializer if t.data_type == TensorProto.FLOAT}
    assert {r["initializer"] for r in roles.values()} == floats


def test_weights_round_trip(zoo, tmp_path):
    path = model_path(zoo, "bert-dynamo18")  # has other.* entries (scalars, token types)
    out = weights.export_weights(path, tmp_path / "w.safetensors")
    tensors, _ = read_safetensors(out)
    assert any(k.startswith("other.") for k in tensors)
    assert weights.load_weights(path, out).SerializeToString() == onnx.load(str(path)).SerializeToString()
    with pytest.raises(OnnxgrowError, match="output exists"):
        weights.export_weights(path, out)


def test_load_into_module_restores_outputs(zoo, tmp_path):
    path = model_path(zoo, "gpt2-ts17")
    out = weights.export_weights(path, tmp_path / "w.safetensors")
    module = bridge.to_torch(path)
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    feeds = make_inputs(path, 2, 5)
    ref = run_model(path, feeds, "cpu")
    assert max_diff(run_bridge(module, feeds), ref) > 0.1
    weights.load_into_module(module, out)
    assert max_diff(run_bridge(module, feeds), ref) < TOLERANCE


def test_weights_move_between_exporters(zoo, tmp_path):
    # TorchScript Llama stores projections [in, out] for MatMul; dynamo the same weights behind other
    # names. Every export of a zoo family holds the same weights, so a right mapping reproduces the
    # dynamo model byte for byte (a transposed square projection would not).
    out = weights.export_weights(model_path(zoo, "llama-gqa-ts14"), tmp_path / "w.safetensors")
    target = model_path(zoo, "llama-gqa-dynamo18")
    tensors, _ = read_safetensors(out)
    assert tuple(tensors["layers.0.attn.k"].shape) == (32, 64)  # 2 kv heads x 16, in [out, in]
    with pytest.raises(OnnxgrowError, match="weights do not fit"):
        weights.load_weights(target, out)  # strict: the exports' other.* constants differ
    proto = weights.load_weights(target, out, strict=False)
    assert proto.SerializeToString() == onnx.load(str(target)).SerializeToString()


def test_load_weights_checks_shapes(zoo, tmp_path):
    path = model_path(zoo, "gpt2-ts17")
    out = weights.export_weights(path, tmp_path / "w.safetensors")
    wide = ir.from_proto(api.widen(path, 2))
    with pytest.raises(OnnxgrowError, match=r"the file holds \[\d+(, \d+)*\], the model \[\d+(, \d+)*\]"):
        weights.load_weights(wide, out, strict=False)  # strict: the widened graph has lifted constants too


def test_weights_of_a_model_with_deduplicated_parameters(zoo, tmp_path):
    # the TorchScript exporter stores equal parameters once and feeds the copies through Identity
    # nodes named after the parameter (as in a fresh GPT-2's zero biases)
    model = onnx.load(str(model_path(zoo, "gpt2-ts17")))
    inits = {t.name: t for t in model.graph.initializer}
    kept, twin = "transformer.h.0.attn.c_proj.bias", "transformer.h.1.attn.c_proj.bias"
    model.graph.initializer.remove(inits[twin])
    model.graph.node.insert(0, onnx.helper.make_node("Identity", [kept], [twin]))
    path = tmp_path / "dedup.onnx"
    onnx.save(model, str(path))
    out = weights.export_weights(path, tmp_path / "w.safetensors")
    tensors, roles = read_safetensors(out)
    assert roles["layers.1.attn.o.bias"]["initializer"] == kept  # the twin's role reads the shared weight
    assert torch.equal(tensors["layers.0.attn.o.bias"], tensors["layers.1.attn.o.bias"])
    restored = weights.load_weights(path, out)
    assert restored.SerializeToString() == onnx.load(str(path)).SerializeToString()


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_every_zoo_model_runs_on_the_meta_device(zoo, name):
    """Shapes only, no data: what a CUDA run would compute, checked without a GPU (every op's
    implementation must work on a device other than the CPU, and host values must stay on the host)."""
    import torch
    path = zoo_model(zoo, name)
    feeds = {k: torch.from_numpy(v).to("meta") for k, v in make_inputs(path, 2, 5).items()}
    module = bridge.to_torch(path).to("meta")
    with torch.no_grad():
        outputs = module(**feeds)
    reference = run_model(path, make_inputs(path, 2, 5), "cpu")
    assert {n: tuple(t.shape) for n, t in outputs.items()} == {n: a.shape for n, a in reference.items()}
    assert all(t.device.type == "meta" for t in outputs.values())
