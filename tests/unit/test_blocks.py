"""Blocks as subgraphs of the residual stream: found, copied and removed on the toy."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxgrow.blocks import block_graphs, insert_after, remove_blocks
from onnxgrow.resize import set_tensor
from onnxgrow.structure import load_structure

from .toy import Toy, block_arrays, block_initializers, build, private_copy, run, structure


def grown(proto: onnx.ModelProto, plan: dict[int, list[tuple[int, bool]]]):
    """The toy with blocks copied by `plan` (zeroed copies get zero output projections), as a
    checked proto, plus the in-memory model it came from."""
    # a copy: ir.to_proto renames the tensors the cloned initializers share with the source's
    model = ir.from_proto(private_copy(proto))
    spec = load_structure(model)
    zeroed = insert_after(model.graph, block_graphs(spec), plan)
    for name in zeroed:
        v = model.graph.initializers[name]
        set_tensor(v, np.zeros_like(v.const_value.numpy()))
    result = ir.to_proto(model)
    onnx.checker.check_model(result, full_check=True)
    return result, model, zeroed


def test_finds_each_block_with_its_own_weights(toy, toy_config):
    spec = load_structure(ir.from_proto(toy))
    blocks = block_graphs(spec)
    assert [b.index for b in blocks] == list(range(toy_config.layers))
    for i, values in enumerate(block_initializers(spec)):
        floats = {v.name for v in values
                  if v.const_value.dtype == ir.DataType.FLOAT and v.const_value.shape.rank()}
        assert floats == {t.name for t in toy.graph.initializer if t.name.startswith(f"blocks.{i}.")
                          and t.data_type == onnx.TensorProto.FLOAT and len(t.dims) > 0}
    assert blocks[0].r_out is blocks[1].r_in
    assert sorted(blocks[1].zero_outputs) == sorted(
        f"blocks.1.{p}" for p in ("attn.o.weight", "attn.o.bias", "down.weight", "down.bias"))


def test_zeroed_copy_of_block_1_keeps_the_logits_bit_for_bit(toy, ids, toy_logits):
    deep, _, zeroed = grown(toy, {1: [(1, True)]})
    assert len(structure(deep).blocks) == 3
    assert len(zeroed) == 4
    assert np.array_equal(run(deep, ids), toy_logits)


@pytest.mark.parametrize("after", [0, 1])
def test_copied_block_has_the_source_weights(toy, after):
    deep, _, _ = grown(toy, {after: [(1, False)]})
    source, new = block_arrays(toy), block_arrays(deep)
    order = [0, 1, 1]  # a copy of block 1, after block 0 or after block 1: the same weights either way
    assert len(new) == 3
    for k, j in enumerate(order):
        assert len(new[k]) == len(source[j])
        for a, b in zip(new[k], source[j]):
            assert a.dtype == b.dtype and np.array_equal(a, b)


def test_copy_changes_the_function(toy, ids, toy_logits):
    deep, _, _ = grown(toy, {1: [(1, False)]})
    assert not np.allclose(run(deep, ids), toy_logits)


def test_copied_initializers_are_their_own(toy):
    """The copy gets new initializer values and names: zeroing its output projection leaves the
    source block's alone."""
    _, model, zeroed = grown(toy, {1: [(1, True)]})
    spec = load_structure(model)
    source, copy = block_initializers(spec)[1:]
    assert all(a is not b for a in copy for b in source)
    shared_by_name = {v.name for v in copy} & {v.name for v in source}
    assert not shared_by_name
    assert set(zeroed) <= {v.name for v in copy}
    original = model.graph.initializers["blocks.1.attn.o.weight"].const_value.numpy()
    assert np.array_equal(original, onnx.numpy_helper.to_array(
        next(t for t in toy.graph.initializer if t.name == "blocks.1.attn.o.weight")))
    assert all(not model.graph.initializers[n].const_value.numpy().any() for n in zeroed)


def test_removing_the_middle_block_keeps_the_others():
    source = build(Toy(layers=3))
    model = ir.from_proto(source)
    spec = load_structure(model)
    remove_blocks(spec, block_graphs(spec), [1])
    result = ir.to_proto(model)
    onnx.checker.check_model(result, full_check=True)
    before, after = block_arrays(source), block_arrays(result)
    assert len(after) == 2
    for k, j in enumerate([0, 2]):
        assert all(np.array_equal(a, b) for a, b in zip(after[k], before[j]))
    assert not any(t.name.startswith("blocks.1.") for t in result.graph.initializer)


def test_serializing_a_grown_model_leaves_the_source_proto_alone(toy):
    proto = private_copy(toy)
    model = ir.from_proto(proto)
    insert_after(model.graph, block_graphs(load_structure(model)), {1: [(1, False)]})
    ir.to_proto(model)
    assert [t.name for t in proto.graph.initializer] == [t.name for t in toy.graph.initializer]
