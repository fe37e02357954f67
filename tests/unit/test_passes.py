"""The growth passes through the public API (onnxgrow.api) on toy decoders: each one's equation,
checked on the weights it writes, and the function-preserving ones checked on the logits."""

from __future__ import annotations

import numpy as np
import pytest

from onnxgrow.api import deepen, inspect, widen

from .toy import Toy, arrays, assert_close_to_scale, block_arrays, build, copy_map, private_copy, run, token_ids

EXACT_WIDEN = {
    "layernorm-gelu": Toy(),
    "tied": Toy(tied=True),
    "rmsnorm-relu": Toy(norm="rmsnorm", activation="relu"),
    "no-positions": Toy(max_positions=None),
    "square": Toy(hidden=16, max_positions=16),
}


@pytest.mark.parametrize("name", EXACT_WIDEN)
def test_hypercloning_doubles_every_width_and_keeps_the_logits(name):
    cfg = EXACT_WIDEN[name]
    source = build(cfg)
    wide = widen(source, factor=2)
    config = inspect(wide)
    assert (config["hidden_size"], config["num_heads"], config["head_dim"], config["ffn_size"]) == (
        2 * cfg.hidden, 2 * cfg.heads, cfg.head_dim, 2 * cfg.ffn)
    assert (config["vocab_size"], config["num_layers"], config["max_positions"]) == (
        cfg.vocab, cfg.layers, cfg.max_positions)
    ids = token_ids(cfg)
    assert_close_to_scale(run(wide, ids), run(source, ids))


def test_square_model_widens_hidden_but_not_positions():
    source = build(Toy(hidden=16, max_positions=16))
    assert arrays(widen(source, factor=2))["wpe"].shape == (16, 32)


def test_widen_leaves_the_callers_proto_alone(toy):
    before = toy.SerializeToString()
    widen(toy, factor=2)
    assert toy.SerializeToString() == before


@pytest.fixture(scope="module")
def maps(toy):
    """The copy maps FPI drew (hidden, and each block's FFN), read back from the weights it wrote:
    embedding columns and FFN biases are plain copies, and every source value is distinct."""
    old, fpi = arrays(toy), arrays(widen(toy, hidden=24, method="fpi"))
    g = {"hidden": copy_map(fpi["wte"], old["wte"], axis=1)}
    for i in range(2):
        g[f"ffn{i}"] = copy_map(fpi[f"blocks.{i}.up.bias"], old[f"blocks.{i}.up.bias"], axis=0)
    assert all((m >= 0).all() for m in g.values())
    return g, old, fpi


def test_fpi_copies_and_divides(maps, toy_config):
    """U[i, j] = W[g(i), g(j)] / |{i': g(i') = g(i)}| (the input side divides by its copy count);
    the first `old` units are the source's, in order."""
    g, old, fpi = maps
    gh = g["hidden"]
    assert len(gh) == 24 and np.array_equal(gh[:16], np.arange(16))
    assert len(g["ffn0"]) == 60 and np.array_equal(g["ffn0"][:toy_config.ffn], np.arange(toy_config.ffn))
    counts = np.bincount(gh)[gh][:, None]
    expected = old["blocks.0.up.weight"][gh][:, g["ffn0"]] / counts
    np.testing.assert_allclose(fpi["blocks.0.up.weight"], expected, rtol=1e-6)


def test_aki_takes_new_neurons_from_the_next_layer(toy, maps, toy_config):
    """AKI: U^l[:, j] = W^l[:, g(j)] for the source's neurons, W^{l+1}[:, g(j)] for new ones (both
    divided over copied inputs as in FPI); the top layer keeps FPI."""
    g, old, fpi = maps
    aki = arrays(widen(toy, hidden=24, method="aki"))
    gh, f = g["hidden"], toy_config.ffn
    counts = np.bincount(gh)[gh][:, None]
    up0 = aki["blocks.0.up.weight"]
    np.testing.assert_allclose(up0[:, :f], old["blocks.0.up.weight"][gh] / counts, rtol=1e-6)
    np.testing.assert_allclose(up0[:, f:], old["blocks.1.up.weight"][gh][:, g["ffn1"][f:]] / counts, rtol=1e-6)
    assert np.array_equal(aki["blocks.1.up.weight"], fpi["blocks.1.up.weight"])


def test_pad_puts_the_source_in_the_corner(toy, toy_config):
    padded = widen(toy, hidden=24, method="pad")
    old, pad = arrays(toy), arrays(padded)
    f = toy_config.ffn
    up = pad["blocks.0.up.weight"]
    assert up.shape == (24, 60)
    assert np.array_equal(up[:16, :f], old["blocks.0.up.weight"])
    assert not up[16:].any() and not up[:, f:].any()
    assert np.array_equal(pad["wte"][:, :16], old["wte"]) and not pad["wte"][:, 16:].any()
    assert inspect(padded)["num_heads"] == 3


def test_identity_deepen_is_bit_exact(toy, ids, toy_logits):
    deep = deepen(private_copy(toy), factor=2, method="identity")
    assert inspect(deep)["num_layers"] == 4
    assert np.array_equal(run(deep, ids), toy_logits)


@pytest.mark.parametrize("method, order", [("stack", [0, 1, 0, 1]), ("interleave", [0, 0, 1, 1])])
def test_copying_deepen_places_the_blocks_in_order(toy, method, order):
    deep = deepen(private_copy(toy), factor=2, method=method)
    source, new = block_arrays(toy), block_arrays(deep)
    assert len(new) == len(order)
    for k, j in enumerate(order):
        assert len(new[k]) == len(source[j])
        assert all(np.array_equal(a, b) for a, b in zip(new[k], source[j])), (k, j)


def test_deepen_leaves_the_callers_proto_alone(toy):
    proto = private_copy(toy)
    deepen(proto, factor=2, method="stack")
    assert [t.name for t in proto.graph.initializer] == [t.name for t in toy.graph.initializer]
