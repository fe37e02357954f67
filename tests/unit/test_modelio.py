"""Writing models: the free-space check before anything is written (issue 18, item 3)."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from onnxgrow import modelio
from onnxgrow.errors import OnnxgrowError
from unit.toy import build


def toy_model() -> ir.Model:
    return ir.from_proto(build())


def test_a_full_filesystem_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    model = toy_model()
    weights = modelio.weight_bytes(model)
    # enough for the weights once, not for the single file assembled beside them
    monkeypatch.setattr(modelio, "free_bytes", lambda folder: weights + modelio.SPACE_MARGIN + 1)
    out = tmp_path / "m.onnx"
    with pytest.raises(OnnxgrowError, match=r"not enough space to write .*m\.onnx: it needs .*twice the weights"
                                            r".*free on its filesystem; nothing written"):
        modelio.save(model, out)
    assert list(tmp_path.iterdir()) == []


def test_external_data_needs_the_weights_once(tmp_path, monkeypatch):
    model = toy_model()
    need = modelio.weight_bytes(model) + modelio.SPACE_MARGIN
    monkeypatch.setattr(modelio, "free_bytes", lambda folder: need)
    modelio.save(model, tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx").exists() and (tmp_path / "m.onnx.data").exists()
    monkeypatch.setattr(modelio, "free_bytes", lambda folder: need - 1)
    with pytest.raises(OnnxgrowError, match="not enough space"):
        modelio.save(model, tmp_path / "n.onnx", external_data=True)
    assert not (tmp_path / "n.onnx").exists()


def test_sizes_read_as_people_write_them():
    assert [modelio.human_bytes(n) for n in (512, 2048, 5 * 2**20, 3 * 2**30, 2**41)] == \
        ["512 B", "2.0 KB", "5.0 MB", "3.0 GB", "2048.0 GB"]
