"""The streamed single-file writer produces the same model as onnx's own serialization."""

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from onnxgrow import modelio
from onnxgrow.singlefile import merge_external
from conftest import DEFAULT_MODEL


def test_merged_file_equals_the_source(tmp_path):
    ir.save(ir.load(DEFAULT_MODEL), tmp_path / "staged.onnx", external_data="staged.onnx.data")
    merge_external(tmp_path / "staged.onnx", tmp_path / "merged.onnx")
    merged, source = onnx.load(tmp_path / "merged.onnx"), onnx.load(DEFAULT_MODEL)
    onnx.checker.check_model(merged, full_check=True)
    weights = {t.name: numpy_helper.to_array(t) for t in merged.graph.initializer}
    expected = {t.name: numpy_helper.to_array(t) for t in source.graph.initializer}
    assert weights.keys() == expected.keys()
    assert all(np.array_equal(weights[k], expected[k]) for k in expected)
    assert [n.op_type for n in merged.graph.node] == [n.op_type for n in source.graph.node]


def test_save_is_single_file_below_2gb_and_external_on_request(tmp_path):
    model = modelio.load(DEFAULT_MODEL)
    single = modelio.save(model, tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx.data").exists() and onnx.load(single).graph.initializer
    external = modelio.save(modelio.load(DEFAULT_MODEL), tmp_path / "b.onnx", external_data=True)
    assert (tmp_path / "b.onnx.data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx", "b.onnx.data"]  # no leftovers
    onnx.checker.check_model(str(external))
