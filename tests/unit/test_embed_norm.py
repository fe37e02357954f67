"""The matcher on ONNX Runtime's EmbedLayerNormalization: the three lookups and the embedding norm in one
com.microsoft node (onnxruntime.transformers.optimizer's BERT). Graphs of that node alone, so each step
of the matcher is asked on its own."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxgrow.errors import UnsupportedGraph
from onnxgrow.shapeflow import analyse
from onnxgrow.structure import find_embeddings, find_norms

VOCAB, POSITIONS, TYPES, HIDDEN = 50, 16, 2, 8


def embed_graph(with_sum: bool = False, ids_from_input: bool = True) -> ir.Model:
    """input_ids -> Cast(int32) -> EmbedLayerNormalization(ids, segments, word, position, segment, gamma, beta)."""
    rng = np.random.default_rng(0)
    tables = {"word": (VOCAB, HIDDEN), "position": (POSITIONS, HIDDEN), "segment": (TYPES, HIDDEN),
              "gamma": (HIDDEN,), "beta": (HIDDEN,)}
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n) for n, s in tables.items()]
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids32"], to=TensorProto.INT32),
             helper.make_node("Cast", ["token_type_ids"], ["types32"], to=TensorProto.INT32)]
    ids = "ids32"
    if not ids_from_input:  # ids computed in the graph: not the token lookup
        nodes.append(helper.make_node("Add", ["ids32", "one"], ["shifted"]))
        inits.append(numpy_helper.from_array(np.array(1, np.int32), "one"))
        ids = "shifted"
    outputs = ["embedded", "mask_index"] + (["summed"] if with_sum else [])
    nodes.append(helper.make_node("EmbedLayerNormalization", [ids, "types32", "word", "position", "segment",
                                                              "gamma", "beta"], outputs, domain="com.microsoft"))
    ints = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
            for n in ("input_ids", "token_type_ids")]
    out = helper.make_tensor_value_info("embedded", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])
    graph = helper.make_graph(nodes, "embed", ints, [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return ir.from_proto(model)


def test_the_tables_are_the_nodes_inputs_by_position():
    model = embed_graph()
    emb = find_embeddings(model.graph, analyse(model))
    assert (emb.token.name, emb.position.name, emb.token_types.name) == ("word", "position", "segment")
    assert (emb.vocab.size, emb.hidden.size) == (VOCAB, HIDDEN)
    assert emb.ids.name == "input_ids"


@pytest.mark.parametrize("with_sum", [False, True])
def test_its_gamma_and_beta_are_a_layernorm(with_sum):
    model = embed_graph(with_sum)
    norms = find_norms(model.graph, analyse(model), find_embeddings(model.graph, analyse(model)).hidden)
    assert [(n.kind, n.scale, n.bias, n.output.name) for n in norms] == [("layernorm", "gamma", "beta", "embedded")]
    # the norm's input: the sum of the lookups where the node writes it, else the output stands for it
    assert norms[0].input.name == ("summed" if with_sum else "embedded")
    assert norms[0].node is None  # not a Skip norm: no residual Add inside


def test_ids_computed_in_the_graph_are_not_the_token_lookup():
    model = embed_graph(ids_from_input=False)
    with pytest.raises(UnsupportedGraph, match="no token embedding"):
        find_embeddings(model.graph, analyse(model))
