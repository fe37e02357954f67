"""The resize engine on the 2-layer toy: one copy map per Dim rewrites weights, shape literals and
outputs together.

HyperCloning by hand, every hidden unit, head and FFN neuron repeated n times and the summed-over
axes divided by n, must give the source's logits; padding (new slots zero) must give the new shapes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxgrow.resize import Plan, Resizer, WeightRule
from onnxgrow.structure import distinct, load_structure

from .toy import Toy, arrays, assert_close_to_scale, build, run, token_ids


def resize(proto: onnx.ModelProto, sizes: dict[str, int], plan, rule: WeightRule) -> onnx.ModelProto:
    """sizes: new size per role ("hidden", "heads", "ffn"); plan(old, new) -> Plan."""
    spec = load_structure(ir.from_proto(proto))
    roles = {"hidden": [spec.hidden], "heads": distinct(b.attention.kv_heads for b in spec.blocks),
             "ffn": distinct(spec.ffn)}
    plans = {d: plan(d.size, sizes[role]) for role, dims in roles.items() for d in dims}
    result = ir.to_proto(Resizer(spec, plans).apply(rule))
    onnx.checker.check_model(result, full_check=True)
    return result


def tile(old: int, new: int) -> Plan:
    return Plan(np.arange(new) % old)


def pad(old: int, new: int) -> Plan:
    return Plan(np.concatenate([np.arange(old), -np.ones(new - old, dtype=np.int64)]))


def expected_shapes(cfg: Toy, hidden: int, heads: int, ffn: int) -> dict[str, tuple]:
    """Every initializer's shape in a toy resized to these sizes (head_dim and scalars stay)."""
    shapes = {"wte": (cfg.vocab, hidden), "ln_f.weight": (hidden,), "ln_f.bias": (hidden,)}
    if cfg.max_positions is not None:
        shapes["wpe"] = (cfg.max_positions, hidden)  # rows are positions, not hidden units
    if not cfg.tied:
        shapes["lm_head.weight"] = (hidden, cfg.vocab)
    inner = heads * cfg.head_dim
    for i in range(cfg.layers):
        b = f"blocks.{i}"
        for p in "qkv":
            shapes.update({f"{b}.attn.{p}.weight": (hidden, inner), f"{b}.attn.{p}.bias": (inner,)})
        shapes.update({f"{b}.attn.o.weight": (inner, hidden), f"{b}.attn.o.bias": (hidden,),
                       f"{b}.up.weight": (hidden, ffn), f"{b}.up.bias": (ffn,),
                       f"{b}.down.weight": (ffn, hidden), f"{b}.down.bias": (hidden,)})
        for n in ("ln1", "ln2"):
            shapes.update({f"{b}.{n}.weight": (hidden,), f"{b}.{n}.bias": (hidden,)})
    return shapes


def check_shapes(result: onnx.ModelProto, source: onnx.ModelProto, expected: dict[str, tuple]):
    """Every initializer is still there; the named ones have their new shapes, the rest (scalars,
    shape literals, index constants) their old ones."""
    new, old = arrays(result), arrays(source)
    assert set(new) == set(old)
    for name, array in old.items():
        assert new[name].shape == expected.get(name, array.shape), name


CASES = {"layernorm": Toy(), "tied": Toy(tied=True), "rmsnorm-relu": Toy(norm="rmsnorm", activation="relu")}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("n", [2, 3])
def test_hypercloning_plan_keeps_the_logits(name, n):
    cfg = CASES[name]
    source = build(cfg)
    wide = resize(source, dict(hidden=n * cfg.hidden, heads=n * cfg.heads, ffn=n * cfg.ffn), tile,
                  WeightRule(divide_by_copies=True, fill="zeros"))
    check_shapes(wide, source, expected_shapes(cfg, n * cfg.hidden, n * cfg.heads, n * cfg.ffn))
    ids = token_ids(cfg)
    assert_close_to_scale(run(wide, ids), run(source, ids))


def test_hypercloning_rewrites_the_head_count_in_reshapes(toy, toy_config):
    cfg = toy_config
    wide = arrays(resize(toy, dict(hidden=32, heads=4, ffn=80), tile, WeightRule()))
    for i in range(cfg.layers):
        for p in "qkv":
            assert wide[f"blocks.{i}.attn.{p}.split_heads"].tolist() == [0, 0, 4, cfg.head_dim]
        assert wide[f"blocks.{i}.attn.merge_heads"].tolist() == [0, 0, 32]


def test_hypercloning_weights_are_tiled_and_divided(toy):
    """W' = (1/n) [[W W] [W W]] where both sides grow; biases and embeddings are plain copies."""
    old = arrays(toy)
    new = arrays(resize(toy, dict(hidden=32, heads=4, ffn=80), tile, WeightRule()))
    w = old["blocks.0.up.weight"]
    assert np.array_equal(new["blocks.0.up.weight"], np.tile(w, (2, 2)) / 2)
    assert np.array_equal(new["blocks.0.up.bias"], np.tile(old["blocks.0.up.bias"], 2))
    assert np.array_equal(new["wte"], np.tile(old["wte"], (1, 2)))
    assert np.array_equal(new["lm_head.weight"], np.tile(old["lm_head.weight"], (2, 1)) / 2)
    # the heads axis is the outer factor of heads x head_dim: head h' copies head h' % heads
    assert np.array_equal(new["blocks.1.attn.q.weight"], np.tile(old["blocks.1.attn.q.weight"], (2, 2)) / 2)


def test_tied_embedding_moves_the_scale_to_the_final_norm():
    """The tied table is looked up too, so it cannot carry 1/n: the final norm's affine does."""
    cfg = Toy(tied=True)
    source = build(cfg)
    old = arrays(source)
    new = arrays(resize(source, dict(hidden=32, heads=4, ffn=80), tile, WeightRule()))
    assert np.array_equal(new["wte"], np.tile(old["wte"], (1, 2)))
    assert np.allclose(new["ln_f.weight"], np.tile(old["ln_f.weight"], 2) / 2)
    assert np.allclose(new["ln_f.bias"], np.tile(old["ln_f.bias"], 2) / 2)


def test_padding_plan_grows_shapes_with_zeros(toy, toy_config, ids):
    cfg = toy_config
    wide = resize(toy, dict(hidden=24, heads=3, ffn=50), pad, WeightRule(divide_by_copies=False, fill="zeros"))
    check_shapes(wide, toy, expected_shapes(cfg, 24, 3, 50))
    old, new = arrays(toy), arrays(wide)
    up = new["blocks.0.up.weight"]
    assert np.array_equal(up[:16, :40], old["blocks.0.up.weight"])
    assert not up[16:].any() and not up[:, 40:].any()
    assert not new["ln_f.weight"][16:].any()
    assert new["blocks.0.attn.k.split_heads"].tolist() == [0, 0, 3, cfg.head_dim]
    logits = run(wide, ids)  # ONNX Runtime accepts the new shapes
    assert logits.shape == (*ids.shape, cfg.vocab) and np.isfinite(logits).all()
