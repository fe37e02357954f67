"""Tests for onnxgrow.training: continue training a (grown) ONNX model through the torch bridge.

Training data is real text that installs with Python (stdlib sources), tokenised as bytes or by a
small BPE trained here; nothing is downloaded. Runs are tiny (batch 8, seq 32, tens of steps).
"""

from __future__ import annotations

import inspect
import io
import json
import string
import textwrap

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from rich.console import Console

from onnxgrow import api, modelio
from onnxgrow import training as train
from onnxgrow.errors import OnnxgrowError
from onnxgrow.verify import plan_inputs, run_model
from helpers import zoo_model

TEXT = "".join(inspect.getsource(m) for m in (json.decoder, json.encoder, textwrap, string))
QUIET = dict(console=Console(file=io.StringIO()))
SMALL = dict(batch=8, seq=32, lr=1e-3, log_every=5, **QUIET)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "stdlib.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def model_path(zoo, name):
    return zoo_model(zoo, name)  # a model that did not build fails, naming the build error


def ort_clm_loss(path, tokens: np.ndarray, seq: int = 32, rows: int = 8) -> float:
    """Next-token cross-entropy of a decoder run in ONNX Runtime, on fixed windows of `tokens`."""
    starts = np.linspace(0, len(tokens) - seq - 1, rows).astype(int)
    ids = np.stack([tokens[s:s + seq + 1] for s in starts])
    feeds = {"input_ids": ids[:, :-1], "attention_mask": np.ones((rows, seq), np.int64)}
    logits = run_model(path, feeds, "cpu")["logits"]
    logp = torch.log_softmax(torch.from_numpy(logits).double(), -1)
    return float(-logp.gather(-1, torch.from_numpy(ids[:, 1:])[..., None]).mean())


@pytest.mark.slow
def test_widened_model_trains_and_held_out_loss_drops(zoo, tmp_path, text_file):
    source = model_path(zoo, "gpt2-ts17")
    wide = tmp_path / "wide.onnx"
    onnx.save(api.widen(source, 2), str(wide))
    s = train.train(wide, text_file, use_bytes=True, steps=40, checkpoint_every=20, **SMALL)
    assert s["objective"] == "clm"
    assert s["val_loss_end"] < s["val_loss_start"] - 1.0, s["val_history"]
    assert s["train_loss_end"] < s["train_loss_start"]
    assert [step for step, _ in s["val_history"]] == [0, 20, 40]
    assert s["tokens_per_s"] > 0 and len(s["losses"]) == 40
    out = tmp_path / "wide.trained.onnx"
    assert s["output"] == str(out) and (tmp_path / "wide.trained.ckpt").is_file()
    assert (tmp_path / "wide.trained.loss.png").read_bytes()[:4] == b"\x89PNG"
    # the written model is the same graph with new weights, and ONNX Runtime sees the improvement
    before, after = onnx.load(str(wide)), onnx.load(str(out))
    assert [n.op_type for n in before.graph.node] == [n.op_type for n in after.graph.node]
    assert "train:clm:steps=40" in {p.key: p.value for p in after.metadata_props}["onnxgrow.history"]
    held_out = np.frombuffer(TEXT.encode(), np.uint8).astype(np.int64)[-len(TEXT) // 10:]
    assert ort_clm_loss(out, held_out) < ort_clm_loss(wide, held_out) - 1.0
    # the tied embedding and its transposed copy were trained as one weight
    inits = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    old = {t.name: numpy_helper.to_array(t) for t in before.graph.initializer}
    wte = "transformer.wte.weight"
    copies = [n for n in inits if n != wte and old[n].shape == old[wte].T.shape and np.array_equal(old[n], old[wte].T)]
    assert len(copies) == 1
    assert not np.array_equal(inits[wte], old[wte])
    np.testing.assert_array_equal(inits[copies[0]], inits[wte].T)


@pytest.mark.parametrize("name,objective", [
    ("gpt2-ts17", "clm"), ("opt-ts14", "clm"), ("llama-gqa-dynamo18", "clm"), ("neox-optimum-kv", "clm"),
    ("bert-ts17", "mlm"), ("bert-mlm-ts17", "mlm"), ("bert-dynamo18", "mlm")])
def test_objective_from_structure(zoo, name, objective):
    m = modelio.load(model_path(zoo, name))
    assert train.choose_objective(api.structure(m), m, plan_inputs(m)) == objective


def test_encoder_without_head_trains_masked_lm(zoo, tmp_path, text_file):
    # BertModel's output is last_hidden_state: the MLM logits come from a head tied to the embedding
    s = train.train(model_path(zoo, "bert-ts17"), text_file, use_bytes=True, steps=25, checkpoint_every=0,
                    output=tmp_path / "bert.onnx", **SMALL)
    assert s["objective"] == "mlm"
    assert s["val_loss_end"] < s["val_loss_start"] - 0.5


def test_kv_cache_export_trains_with_an_empty_past(zoo, tmp_path, text_file):
    s = train.train(model_path(zoo, "llama-gqa-optimum-kv"), text_file, use_bytes=True, steps=10,
                    checkpoint_every=0, output=tmp_path / "kv.onnx", **SMALL)
    assert s["val_loss_end"] < s["val_loss_start"]
    onnx.checker.check_model(str(tmp_path / "kv.onnx"))


@pytest.mark.slow
def test_distillation_from_the_source(zoo, tmp_path, text_file):
    source = model_path(zoo, "gpt2-ts17")
    wide = tmp_path / "wide.onnx"
    onnx.save(api.widen(source, 2), str(wide))
    s = train.train(wide, text_file, use_bytes=True, steps=15, distill_from=source, alpha=0.5,
                    checkpoint_every=0, **SMALL)
    # hypercloning preserves the function: at step 0, on the same validation windows, the KL term is 0
    # (alpha 1: the loss is the KL alone) and the alpha-0.5 loss is half the cross-entropy (alpha 0)
    kl, ce = (train.train(wide, text_file, use_bytes=True, steps=1, distill_from=source, alpha=alpha,
                          checkpoint_every=0, output=tmp_path / f"a{alpha}.onnx", **SMALL)["val_loss_start"]
              for alpha in (1.0, 0.0))
    assert abs(kl) <= 1e-6, kl
    assert s["val_loss_start"] == pytest.approx(0.5 * ce, abs=1e-6)
    assert ce == pytest.approx(ort_clm_loss(source, np.frombuffer(TEXT.encode(), np.uint8).astype(np.int64)),
                               rel=0.1)  # the same size as the source's loss on other windows
    assert s["val_loss_end"] < s["val_loss_start"]
    tiny = zoo["gpt2-ts17"]["file"].parents[2] / "default" / "tiny-gpt2.onnx"  # vocab 512, not 1000
    with pytest.raises(OnnxgrowError, match="vocabulary"):
        train.train(wide, text_file, use_bytes=True, steps=2, distill_from=tiny, output=tmp_path / "x.onnx", **SMALL)


def test_resume_continues_the_same_run(zoo, tmp_path, text_file, monkeypatch):
    path = model_path(zoo, "gpt2-ts14")
    straight = train.train(path, text_file, use_bytes=True, steps=8, checkpoint_every=0,
                           output=tmp_path / "straight.onnx", **SMALL)
    # a run that dies after its step-5 checkpoint, before writing its output
    save = train.save_checkpoint

    def dies_at_the_end(ckpt, state):
        if state["step"] == 8:
            raise KeyboardInterrupt
        save(ckpt, state)
    monkeypatch.setattr(train, "save_checkpoint", dies_at_the_end)
    with pytest.raises(KeyboardInterrupt):
        train.train(path, text_file, use_bytes=True, steps=8, checkpoint_every=5,
                    output=tmp_path / "resumed.onnx", **SMALL)
    monkeypatch.setattr(train, "save_checkpoint", save)
    assert not (tmp_path / "resumed.onnx").exists()
    resumed = train.train(path, text_file, use_bytes=True, steps=8, checkpoint_every=5, resume=True,
                          output=tmp_path / "resumed.onnx", **SMALL)
    assert resumed["start_step"] == 5 and len(resumed["losses"]) == 8
    # weights, optimiser moments, schedule and data order all continue: the same losses as one run
    np.testing.assert_allclose(resumed["losses"], straight["losses"], rtol=1e-5)
    (tmp_path / "resumed.onnx").unlink()
    with pytest.raises(OnnxgrowError, match="at step 8 already"):
        train.train(path, text_file, use_bytes=True, steps=8, resume=True, output=tmp_path / "resumed.onnx", **SMALL)
    with pytest.raises(OnnxgrowError, match="no checkpoint to resume from"):
        train.train(path, text_file, use_bytes=True, steps=8, resume=True, output=tmp_path / "other.onnx", **SMALL)


def test_tokenizer_json_and_npy_data(zoo, tmp_path, text_file):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]", "[MASK]"]))
    tok_path = tmp_path / "tokenizer.json"
    tok.save(str(tok_path))
    ids = train.load_tokens(text_file, tokenizer=tok_path, vocab=1000)
    assert len(ids) < len(TEXT.encode()) / 2 and ids.max() < 400  # merges happened
    assert train.mask_token(tok_path, 1000) == tok.token_to_id("[MASK]")
    s = train.train(model_path(zoo, "bert-mlm-ts17"), text_file, tokenizer=tok_path, steps=5,
                    checkpoint_every=0, output=tmp_path / "bert.onnx", **SMALL)
    assert s["objective"] == "mlm" and s["tokens_train"] + s["tokens_val"] == len(ids)
    npy = tmp_path / "ids.npy"
    np.save(npy, ids.astype(np.int32))
    np.testing.assert_array_equal(train.load_tokens(npy, vocab=1000), ids)
    with pytest.raises(OnnxgrowError, match="outside the model's vocabulary of 300"):
        train.load_tokens(npy, vocab=300)


def test_errors_are_one_line(zoo, tmp_path, text_file):
    path = model_path(zoo, "gpt2-ts17")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (dict(data_path=tmp_path / "missing.txt", use_bytes=True), "no such data file"),
        (dict(data_path=empty, use_bytes=True), "holds no tokens"),
        (dict(data_path=text_file), "give a tokenizer.json, or use bytes"),
        (dict(data_path=text_file, use_bytes=True, seq=200), "longer than the model's 128 learned positions"),
        (dict(data_path=text_file, use_bytes=True, objective="seq2seq"), "unknown objective"),
        (dict(data_path=text_file, use_bytes=True, alpha=2.0), "alpha"),
        (dict(data_path=text_file, use_bytes=True, val_fraction=0.0001), "validation split holds"),
        (dict(data_path=text_file, use_bytes=True, output=path), "overwrite the input model"),
    ]
    for kwargs, message in cases:
        kwargs = {"output": tmp_path / "out.onnx", **SMALL, **kwargs}
        with pytest.raises(OnnxgrowError, match=message) as err:
            train.train(path, steps=2, **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(OnnxgrowError, match="at least 256 ids; the model has 100"):
        train.load_tokens(text_file, use_bytes=True, vocab=100)
    (tmp_path / "exists.onnx").write_bytes(b"")
    with pytest.raises(OnnxgrowError, match="output exists"):
        train.train(path, text_file, use_bytes=True, steps=2, output=tmp_path / "exists.onnx", **SMALL)
