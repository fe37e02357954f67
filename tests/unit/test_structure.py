"""The matcher on toy decoders: it must find every size and role exactly as the toy was built."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxgrow.structure import load_structure, same, weight_of

from .toy import Toy, build, run, token_ids

VARIANTS = {
    "layernorm-gelu": Toy(),
    "tied": Toy(tied=True),
    "rmsnorm-relu": Toy(norm="rmsnorm", activation="relu"),
    "no-positions": Toy(max_positions=None),
    "three-layers-four-heads": Toy(layers=3, heads=4, ffn=24, vocab=30),
}


def spec_of(cfg: Toy):
    return load_structure(ir.from_proto(build(cfg)))


@pytest.mark.parametrize("name", VARIANTS)
def test_finds_the_sizes_it_was_built_with(name):
    cfg = VARIANTS[name]
    spec = spec_of(cfg)
    assert (spec.hidden.size, spec.heads.size, spec.kv_heads.size, spec.head_dim.size, spec.vocab.size) == (
        cfg.hidden, cfg.heads, cfg.heads, cfg.head_dim, cfg.vocab)
    assert spec.group is None
    assert [d.size for d in spec.ffn] == [cfg.ffn] * cfg.layers
    assert len(spec.blocks) == cfg.layers
    assert spec.norm == cfg.norm and spec.norm_position == "pre"
    assert spec.activation == cfg.activation
    assert spec.tied_embeddings is cfg.tied
    assert spec.positional == ("none" if cfg.max_positions is None else "learned")
    assert not spec.parallel_residual
    assert spec.config()["max_positions"] == cfg.max_positions
    assert spec.config()["opset"] == 17


@pytest.mark.parametrize("name", VARIANTS)
def test_finds_each_weight_in_its_role(name):
    cfg = VARIANTS[name]
    spec = spec_of(cfg)

    def weight(node):
        return weight_of(spec.flow, node)[0].name

    assert spec.token_embedding.name == "wte"
    assert (spec.position_embedding.name if spec.position_embedding else None) == (
        None if cfg.max_positions is None else "wpe")
    for i, block in enumerate(spec.blocks):
        att, ffn = block.attention, block.ffn
        assert [weight(n) for n in (att.q_proj, att.k_proj, att.v_proj, att.o_proj)] == [
            f"blocks.{i}.attn.{p}.weight" for p in "qkvo"]
        assert not att.fused_qkv
        assert (weight(ffn.up), weight(ffn.down), ffn.gate) == (
            f"blocks.{i}.up.weight", f"blocks.{i}.down.weight", None)
        assert [n.scale for n in block.norms] == [f"blocks.{i}.ln1.weight", f"blocks.{i}.ln2.weight"]
        assert [n.kind for n in block.norms] == [cfg.norm] * 2
    assert spec.final_norm.scale == "ln_f.weight"
    assert weight(spec.lm_head) == ("wte" if cfg.tied else "lm_head.weight")


@pytest.mark.parametrize("name", VARIANTS)
def test_counts_the_parameters(name):
    cfg = VARIANTS[name]
    proto = build(cfg)
    floats = sum(int(np.prod(t.dims)) for t in proto.graph.initializer
                 if t.data_type == 1 and len(t.dims) > 0)  # scalars are constants, not parameters
    assert load_structure(ir.from_proto(proto)).config()["num_parameters"] == floats


def test_each_layer_has_its_own_head_and_ffn_dims():
    """Nothing ties layer 0's sizes to layer 1's in the toy: each gets Dims of its own, all found."""
    spec = spec_of(Toy())
    b0, b1 = spec.blocks
    assert not same(b0.attention.kv_heads, b1.attention.kv_heads)
    assert not same(spec.ffn[0], spec.ffn[1])
    assert same(b0.attention.head_dim, spec.head_dim)


def test_square_model_keeps_positions_apart_from_hidden():
    """hidden == number of positions: the position table is [16, 16], yet its rows are positions."""
    cfg = Toy(hidden=16, max_positions=16)
    spec = spec_of(cfg)
    rows, cols = spec.flow.dims[spec.position_embedding]
    assert rows.size == cols.size == spec.hidden.size == 16
    assert same(cols, spec.hidden)
    assert not same(rows, spec.hidden)
    assert spec.config()["max_positions"] == 16 and spec.config()["hidden_size"] == 16


def test_toy_is_causal():
    """A sanity check of the toy itself: changing a later token leaves earlier logits alone."""
    cfg = Toy()
    proto = build(cfg)
    ids = token_ids(cfg)
    changed = ids.copy()
    changed[:, -1] = (changed[:, -1] + 1) % cfg.vocab
    a, b = run(proto, ids), run(proto, changed)
    assert np.array_equal(a[:, :-1], b[:, :-1])
    assert not np.allclose(a[:, -1], b[:, -1])
