"""`onnxgrow train` under torchrun (issue 15): two CPU ranks over gloo train what one process trains.

Each torchrun launch starts two Python processes, so the launches are few and shared through
module-scoped fixtures: a DDP run with gradient accumulation, an FSDP run with distillation, and
single-process references made in this process. Runs are tiny: the committed-size zoo GPT-2,
3 steps of batch 8 x 16 bytes.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from helpers import zoo_model
from onnx import numpy_helper
from rich.console import Console

from onnxgrow import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# short, so that validation (at most 64 windows, at the start and the end) is a few forwards
TEXT = "".join(inspect.getsource(m) for m in (json.decoder, json.encoder, textwrap))[:4000]
RUN = dict(steps=3, batch=8, seq=16, lr=1e-3)
TIMEOUT = 180  # a hang is a failure, not a stuck test run


@pytest.fixture(scope="module")
def setup(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = root / "data.txt"
    data.write_text(TEXT, encoding="utf-8")
    return zoo_model(zoo, "gpt2-ts17"), data, root


def options(**run) -> list[str]:
    out = []
    for key, value in run.items():
        flag = "--" + key.replace("_", "-")
        out += [flag] if value is True else [flag, str(value)]
    return out


def torchrun(ranks: int, model, data, output, **run) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node RANKS -m onnxgrow train ...` (ranks 0: no torchrun)."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
                if ranks else [sys.executable])
    cmd = launcher + ["-m", "onnxgrow", "train", str(model), "--data", str(data), "--bytes",
                      "-o", str(output)] + options(**run)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", COLUMNS="200")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT)


def single(model, data, output, **run) -> dict:
    """The reference: one process, in this one."""
    return training.train(model, data, use_bytes=True, output=output, console=Console(file=io.StringIO()),
                          **{**RUN, **run})


def weights(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
            if t.data_type == onnx.TensorProto.FLOAT}


def assert_same_weights(path, reference, source):
    """Every float initializer equals the reference's within 1e-4 relative to its scale, and the run
    moved the weights much further than that (the comparison could fail)."""
    got, want, before = weights(path), weights(reference), weights(source)
    assert got.keys() == want.keys()
    moved = max(float(np.abs(want[k] - before[k]).max() / (np.abs(want[k]).max() + 1e-12)) for k in want)
    assert moved > 1e-3
    for k in want:
        scale = float(np.abs(want[k]).max()) + 1e-12
        assert float(np.abs(got[k] - want[k]).max()) <= 1e-4 * scale, k


@pytest.fixture(scope="module")
def ddp_run(setup):
    model, data, root = setup
    done = torchrun(2, model, data, root / "ddp.onnx", micro_batch=2, **RUN)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def fsdp_run(setup):
    model, data, root = setup
    done = torchrun(2, model, data, root / "fsdp.onnx", fsdp=True, distill_from=model, **RUN)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_ddp_ranks_with_accumulation_train_what_one_process_trains(setup, ddp_run):
    model, data, root = setup
    single(model, data, root / "one.onnx")
    assert ddp_run.stdout.splitlines()[0] == "ddp, 2 ranks, global batch 8 = 2 x 4 (2 micro-batches of 2)"
    assert_same_weights(root / "ddp.onnx", root / "one.onnx", model)


def test_two_fsdp_ranks_distilling_train_what_one_process_trains(setup, fsdp_run):
    model, data, root = setup
    single(model, data, root / "one-distill.onnx", distill_from=model)
    assert fsdp_run.stdout.splitlines()[0] == "fsdp, 2 ranks, global batch 8 = 2 x 4"
    assert_same_weights(root / "fsdp.onnx", root / "one-distill.onnx", model)
    # the checkpoint is sharded: one file of tensors per rank, beside the metadata
    shards = sorted(p.name for p in (root / "fsdp.ckpt").iterdir() if p.suffix == ".distcp")
    assert shards == ["__0_0.distcp", "__1_0.distcp"]


def test_only_rank_0_writes_and_reports(setup, ddp_run):
    _, _, root = setup
    files = sorted(p.name for p in root.iterdir() if p.name.startswith("ddp"))
    assert files == ["ddp.ckpt", "ddp.loss.png", "ddp.onnx"]  # no second copy, no temporary left
    assert ddp_run.stdout.count("validation loss") == 2  # the start and the end, once each
    assert ddp_run.stdout.count("wrote ") == 1


def test_a_sharded_two_rank_run_resumes_with_one_rank(setup, fsdp_run, tmp_path):
    model, data, root = setup
    # the 2-rank FSDP run stopped at step 3 of 3; continue it to step 6 in one process
    shutil.copytree(root / "fsdp.ckpt", tmp_path / "resumed.ckpt")
    done = torchrun(0, model, data, tmp_path / "resumed.onnx", resume=True, fsdp=True, distill_from=model,
                    **{**RUN, "steps": 6})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[0] == "fsdp, 1 rank, global batch 8 = 1 x 8"
    assert "step 3: validation loss" in done.stdout
    # the same run in one process all along: 3 steps, then resumed to 6
    single(model, data, tmp_path / "straight.onnx", distill_from=model)
    single(model, data, tmp_path / "straight.onnx", distill_from=model, steps=6, resume=True, force=True)
    assert_same_weights(tmp_path / "resumed.onnx", tmp_path / "straight.onnx", model)


def test_an_error_on_one_rank_ends_the_run_with_one_line(setup, tmp_path):
    model, data, _ = setup
    output = tmp_path / "exists.onnx"
    output.write_bytes(b"taken")  # only rank 0, the writer, checks the output: rank 1 goes on and waits
    done = torchrun(2, model, data, output, **RUN)  # times out (fails) if rank 1 hangs
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: output exists: {output} (use --force to replace it)"]
    assert output.read_bytes() == b"taken"


def test_accumulating_micro_batches_equals_the_whole_batch(setup, tmp_path):
    # in one process, MLM: 4 micro-batches of 2 step as one batch of 8 though their rows hold different
    # numbers of labels (each micro-batch's loss is weighted by its labels); CLM: the DDP run above
    model, data, _ = setup
    for objective in ("mlm",):
        whole = single(model, data, tmp_path / f"whole-{objective}.onnx", objective=objective)
        parts = single(model, data, tmp_path / f"parts-{objective}.onnx", objective=objective, micro_batch=2)
        assert parts["layout"] == "single, 1 rank, global batch 8 = 1 x 8 (4 micro-batches of 2)"
        assert parts["losses"] == pytest.approx(whole["losses"], rel=1e-5)
        assert_same_weights(tmp_path / f"parts-{objective}.onnx", tmp_path / f"whole-{objective}.onnx", model)


def test_a_batch_that_does_not_split_is_refused(setup, tmp_path):
    model, data, _ = setup
    with pytest.raises(training.OnnxgrowError, match="--micro-batch 3 does not divide"):
        single(model, data, tmp_path / "x.onnx", micro_batch=3)
