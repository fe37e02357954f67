"""com.microsoft Attention: the one-node attention onnxruntime.transformers.optimizer writes for BERT, with
the Q, K and V projections inside the op (a packed [hidden, q | k | v] weight and bias, num_heads).

Only attention fusion is switched on here (the fused norms and activations are another form's tests), so
the model differs from the zoo's BERT in that one place.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxgrow
from onnxgrow.verify import validate
from helpers import assert_close_to_scale, zoo_model


@pytest.fixture(scope="module")
def fused_bert(zoo, tmp_path_factory):
    optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
    from onnxruntime.transformers.fusion_options import FusionOptions
    options = FusionOptions("bert")
    for name in ("enable_embed_layer_norm", "enable_skip_layer_norm", "enable_bias_skip_layer_norm",
                 "enable_bias_gelu", "enable_gelu", "enable_layer_norm"):
        setattr(options, name, False)
    config = zoo["bert-ts17"]["config"]
    fused = optimizer.optimize_model(str(zoo_model(zoo, "bert-ts17")), model_type="bert", opt_level=0,
                                     num_heads=config["num_heads"], hidden_size=config["hidden_size"],
                                     optimization_options=options)
    path = tmp_path_factory.mktemp("fused") / "bert-attention.onnx"
    fused.save_model_to_file(str(path))
    attentions = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Attention"]
    assert len(attentions) == config["num_layers"] and attentions[0].domain == "com.microsoft"
    return path, config


def test_inspect_gives_the_true_configuration(fused_bert):
    path, config = fused_bert
    got = onnxgrow.inspect(path)
    assert {k: got[k] for k in config if k in got} == {k: config[k] for k in config if k in got}


def test_hypercloning_x2_is_exact_and_doubles_num_heads(fused_bert, tmp_path):
    path, config = fused_bert
    out = tmp_path / "wide.onnx"
    onnx.save(onnxgrow.widen(path, 2), out)
    report = validate(path, out)
    assert report.passed, report.to_dict()
    assert_close_to_scale(report)
    assert max(o.max_abs_diff for o in report.outputs) <= 1e-4
    heads = [a.i for n in onnx.load(str(out)).graph.node if n.op_type == "Attention" for a in n.attribute
             if a.name == "num_heads"]
    assert heads == [2 * config["num_heads"]] * config["num_layers"]


@pytest.mark.parametrize("method", ["fpi", "aki", "pad"])
def test_other_widths_run(fused_bert, tmp_path, method):
    path, config = fused_bert
    out = tmp_path / "wide.onnx"
    onnx.save(onnxgrow.widen(path, 2, method=method), out)
    report = validate(path, out, tolerance=1e9)
    assert all(np.isfinite(o.max_abs_diff) for o in report.outputs)
    assert onnxgrow.inspect(out)["num_heads"] == 2 * config["num_heads"]


@pytest.mark.parametrize("method", ["stack", "interleave"])
def test_post_norm_deepens_by_copies(fused_bert, tmp_path, method):
    path, config = fused_bert
    out = tmp_path / "deep.onnx"
    onnx.save(onnxgrow.deepen(path, factor=2, method=method), out)
    report = validate(path, out, tolerance=1e9)
    assert all(np.isfinite(o.max_abs_diff) for o in report.outputs)
    assert onnxgrow.inspect(out)["num_layers"] == 2 * config["num_layers"]
