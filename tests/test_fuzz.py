"""Every command against hostile and broken inputs.

The contract (issue "Reliability and security"): a bad input gets exactly one line starting with
"error:", exit code 2, no traceback and no file written. Inputs that are broken for sure (a truncated
file, a cycle, external data outside the model's folder) must be refused, naming the problem. Inputs
whose validity is unclear (a flipped bit inside a float weight only changes a number) may be accepted:
then the command exits 0 (or 1, "not preserved", where that exists) and any model it wrote is valid.

The cases are built from the committed tiny GPT-2 and from small graphs made with onnx.helper.
`bench/fuzz.py` runs the same generator for thousands of cases.

`train` runs the model through the torch bridge instead of ONNX Runtime; it trains one step on a small
fixed byte corpus (written once per process, outside every case's folder) and, when it accepts an
input, writes OUT.onnx with OUT.ckpt and OUT.loss.png beside it.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import onnxgrow
from onnxgrow import modelio
from onnxgrow.cli import app

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "default" / "tiny-gpt2.onnx"

TRAIN_BYTES = bytes(range(256)) * 2  # every byte value; 10% (51 tokens) held out, a window needs 9
_train_data: Path | None = None


def train_data() -> str:
    """The corpus `train` reads: a file outside every case's folder, written once per process."""
    global _train_data
    if _train_data is None or not _train_data.is_file():
        folder = Path(tempfile.mkdtemp(prefix="onnxgrow-fuzz-data-"))
        atexit.register(shutil.rmtree, folder, True)
        _train_data = folder / "corpus.bin"
        _train_data.write_bytes(TRAIN_BYTES)
    return str(_train_data)


COMMANDS: dict[str, Callable[[str], list[str]]] = {
    "inspect": lambda m: ["inspect", m],
    "validate": lambda m: ["validate", m, m],
    "widen": lambda m: ["widen", m, "--factor", "2"],
    "deepen": lambda m: ["deepen", m, "--factor", "2"],
    "subclone": lambda m: ["subclone", m, "--hidden", "32", "--allow-random-calib", "--samples", "4",
                           "--seq", "16"],
    # on the CPU: on CUDA an out-of-range id would be an asynchronous device assert, not an error line
    "train": lambda m: ["train", m, "--data", train_data(), "--bytes", "--steps", "1", "--batch", "1",
                        "--seq", "8", "--device", "cpu"],
}
# commands that write a model next to their input, and the files each writes beside that OUT.onnx
WRITES = {"widen": (), "deepen": (), "subclone": (), "train": (".ckpt", ".loss.png")}
CASE_SECONDS = 60  # a case that takes longer has hung


# --- the cases ------------------------------------------------------------------------------------------
#
# A case writes its input into `folder` (and, for the external-data cases, files into the sibling
# folder `outside/`) and returns the path to hand to the commands. `must_refuse` cases are broken for
# sure (for the commands in `refused_by`, when given); `reason` is a regular expression the error line
# must match.

RUNS_ORT = frozenset({"validate", "widen", "deepen", "subclone"})  # commands that run the model in ORT
RUNS_BRIDGE = frozenset({"train"})  # commands that run the model through the torch bridge
RUNS_MODEL = RUNS_ORT | RUNS_BRIDGE


# `valid` cases are valid models by construction (a flip of a mantissa or sign bit inside a float weight, a
# value renamed everywhere it is used): refusing one, or calling it "not preserved", is our failure.

@dataclasses.dataclass
class Case:
    name: str
    make: Callable[[Path], Path]
    must_refuse: bool = False
    reason: str | None = None
    refused_by: frozenset[str] | None = None
    valid: bool = False  # valid by construction: every command must accept it (exit 0)

    def refused(self, command: str) -> bool:
        return self.must_refuse and (self.refused_by is None or command in self.refused_by)


def source_bytes() -> bytes:
    return DEFAULT_MODEL.read_bytes()


def source_model() -> onnx.ModelProto:
    return onnx.load_from_string(source_bytes())


def write(folder: Path, data: bytes, name: str = "model.onnx") -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def save(folder: Path, model: onnx.ModelProto, name: str = "model.onnx") -> Path:
    return write(folder, model.SerializeToString(), name)


def weight_spans(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges of the tiny model's large weights: a flip there only changes a number."""
    spans = []
    for t in onnx.load_from_string(data).graph.initializer:
        if len(t.raw_data) >= 1024:
            start = data.find(t.raw_data)
            spans.append((start, start + len(t.raw_data)))
    return sorted(spans)


def small_graph(nodes, inputs=("x",), outputs=("y",), initializers=(), opset=17, domains=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in outputs], list(initializers))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=opsets)


def with_external_data(folder: Path) -> tuple[onnx.ModelProto, onnx.TensorProto]:
    """The tiny GPT-2 with its weights in `folder/weights.bin`; returns (model, largest weight)."""
    model = source_model()
    onnx.save(model, folder / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=1024)
    model = onnx.load(folder / "model.onnx", load_external_data=False)
    weight = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    return model, weight


def set_entry(tensor: onnx.TensorProto, key: str, value: str) -> None:
    """Set one of an external tensor's `location`, `offset`, `length` entries."""
    for entry in tensor.external_data:
        if entry.key == key:
            entry.value = value
            return
    tensor.external_data.add(key=key, value=value)


def set_location(tensor: onnx.TensorProto, location: str) -> None:
    set_entry(tensor, "location", location)


def outside_copy(folder: Path) -> Path:
    """A valid copy of the weights outside the model's folder: a tool that follows a reference out of
    the folder would succeed with it, so only a refusal passes the test."""
    outside = folder.parent / "outside"
    outside.mkdir(exist_ok=True)
    shutil.copy(folder / "weights.bin", outside / "weights.bin")
    return outside / "weights.bin"


def external_case(name: str, edit: Callable[[Path, onnx.ModelProto, onnx.TensorProto], None], reason: str) -> Case:
    def make(folder: Path) -> Path:
        model, weight = with_external_data(folder)
        edit(folder, model, weight)
        return save(folder, model)
    return Case(name, make, True, reason)


def fixed_cases() -> list[Case]:
    """Broken inputs, one per kind of breakage."""
    data = source_bytes()
    model = source_model()
    cases = [
        Case("missing", lambda f: f / "model.onnx", True, "no such file"),
        Case("empty", lambda f: write(f, b""), True, "empty|not .*ONNX model"),
        Case("directory", lambda f: (f / "model.onnx").mkdir() or f / "model.onnx", True, "not a file"),
        Case("text", lambda f: write(f, b"this is not a model\n" * 40), True, "not .*ONNX model|empty"),
        Case("truncated-head", lambda f: write(f, data[:100]), True, "not .*ONNX model|truncated"),
        Case("truncated-mid", lambda f: write(f, data[:len(data) // 2]), True, "not .*ONNX model|truncated"),
        Case("truncated-last-byte", lambda f: write(f, data[:-1]), True, "not .*ONNX model|truncated"),
        Case("tensor-proto", lambda f: write(f, model.graph.initializer[0].SerializeToString()), True,
             "not .*ONNX model|no graph|empty graph"),
        Case("graph-proto", lambda f: write(f, model.graph.SerializeToString()), True,
             "not .*ONNX model|no graph|empty graph"),
        Case("node-proto", lambda f: write(f, model.graph.node[10].SerializeToString()), True,
             "not .*ONNX model|no graph|empty graph"),
        Case("model-without-graph", lambda f: save(f, onnx.ModelProto(ir_version=8)), True,
             "no graph|empty graph"),
    ]

    # small graphs with one defect each
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    node = helper.make_node

    def graph(*nodes, **kw):
        return lambda f: save(f, small_graph(list(nodes), **kw))

    def matmul_w(w):
        return graph(node("MatMul", ["x", "w"], ["y"]), initializers=[w])

    cases += [
        Case("cycle", graph(node("Add", ["x", "b"], ["a"]), node("Relu", ["a"], ["b"]), node("Relu", ["b"], ["y"])),
             True, "cycle"),
        Case("self-loop", graph(node("Add", ["x", "y"], ["y"])), True, "cycle"),
        Case("dangling-input", graph(node("Add", ["x", "ghost"], ["y"])), True, "ghost"),
        Case("dangling-output", graph(node("Relu", ["x"], ["a"])), True, "'y'"),
        Case("duplicate-output", graph(node("Relu", ["x"], ["y"]), node("Neg", ["x"], ["y"])), True,
             "'y'.*(two|twice|more than once)"),
        Case("output-shadows-input", graph(node("Relu", ["x"], ["x"]), node("Relu", ["x"], ["y"])), True,
             "'x'.*(two|twice|more than once|graph input)"),
        Case("short-raw-data", matmul_w(short_raw(w)), True, "'w'.*(bytes|dims)"),
        Case("short-float-data", matmul_w(TensorProto(name="w", data_type=1, dims=[4, 4], float_data=[1.0] * 5)),
             True, "'w'.*(values|dims)"),
        Case("negative-dim", matmul_w(helper.make_tensor("w", 1, [-4, -4], [1.0] * 16)), True, "'w'.*dim"),
        Case("unknown-op", graph(node("Frobnicate", ["x"], ["y"])), True, "Frobnicate"),
        # a custom domain is valid ONNX (inspect may describe the model) that ONNX Runtime cannot run;
        # the other commands (train too, before the torch bridge sees it) refuse this graph before they
        # run it: it is no transformer
        Case("unknown-domain", graph(node("Relu", ["x"], ["y"], domain="com.example"), domains=["com.example"]),
             True, "com.example", frozenset({"validate"})),
        Case("opset-99", graph(node("Relu", ["x"], ["y"]), opset=99), True, "opset 99"),
    ]

    # the tiny GPT-2 with one defect each: the commands get far enough to matter only if loading misses it
    cases += [
        Case("gpt2-" + name, (lambda edit: lambda f: save(f, edited(edit)))(edit), True, reason,
             RUNS_MODEL if name == "unknown-domain" else None)
        for name, edit, reason in [
            ("dangling", lambda m: m.graph.node[100].input.__setitem__(0, "ghost"), "ghost"),
            ("cycle", gpt2_cycle, "cycle"),
            ("duplicate-output", lambda m: m.graph.node[200].output.__setitem__(0, m.graph.node[150].output[0]),
             "(two|twice|more than once)"),
            ("short-weight", lambda m: truncate_weight(m, 4), "(bytes|dims)"),
            ("weight-dims", lambda m: m.graph.initializer[4].dims.__setitem__(0, 65), "(bytes|dims)"),
            # neither ONNX Runtime nor the torch bridge runs a com.example op
            ("unknown-domain", gpt2_unknown_domain, "com.example|Tanh"),
            ("opset-99", lambda m: m.opset_import[0].__setattr__("version", 99), "opset 99"),
            ("ir-version-99", lambda m: m.__setattr__("ir_version", 99), "IR version 99"),
        ]
    ]

    # external data that leaves the folder, is missing or is too short
    def escape(location):
        def edit(folder, model, weight):
            outside_copy(folder)
            set_location(weight, location(folder))
        return edit

    def symlink(folder, model, weight):
        (folder / "link.bin").symlink_to(outside_copy(folder))
        set_location(weight, "link.bin")

    def symlinked_dir(folder, model, weight):
        outside_copy(folder)
        (folder / "sub").symlink_to(folder.parent / "outside", target_is_directory=True)
        set_location(weight, "sub/weights.bin")

    def short_file(folder, model, weight):
        path = folder / "weights.bin"
        path.write_bytes(path.read_bytes()[:-100])

    def beyond_end(folder, model, weight):
        set_entry(weight, "offset", str((folder / "weights.bin").stat().st_size - 64))

    def length_mismatch(folder, model, weight):
        set_entry(weight, "length", str(4 * int(np.prod(weight.dims)) - 4))

    def missing(folder, model, weight):
        set_location(weight, "nowhere.bin")

    cases += [
        external_case("ext-parent", escape(lambda f: "../outside/weights.bin"), "outside the model's folder"),
        external_case("ext-etc-passwd", escape(lambda f: "../../../../../../../../etc/passwd"),
                      "outside the model's folder"),
        external_case("ext-absolute", escape(lambda f: str(f.parent / "outside" / "weights.bin")),
                      "outside the model's folder"),
        external_case("ext-symlink", symlink, "symlink to a file outside the model's folder"),
        external_case("ext-symlinked-dir", symlinked_dir, "outside the model's folder|symlink"),
        external_case("ext-missing", missing, "missing"),
        external_case("ext-short-file", short_file, "too short"),
        external_case("ext-offset-beyond-end", beyond_end, "too short"),
        external_case("ext-length-mismatch", length_mismatch, "(bytes|length)"),
    ]
    return cases


def short_raw(t: onnx.TensorProto) -> onnx.TensorProto:
    t = onnx.TensorProto.FromString(t.SerializeToString())
    t.raw_data = t.raw_data[:-8]
    return t


def edited(edit) -> onnx.ModelProto:
    model = source_model()
    edit(model)
    return model


def truncate_weight(model: onnx.ModelProto, i: int) -> None:
    t = model.graph.initializer[i]
    t.raw_data = t.raw_data[: len(t.raw_data) // 2]


def gpt2_cycle(model: onnx.ModelProto) -> None:
    """Feed a late node's output back into an early node."""
    nodes = model.graph.node
    early = next(n for n in nodes if n.op_type == "LayerNormalization")
    late = [n for n in nodes if n.op_type == "MatMul"][-1]
    early.input[0] = late.output[0]


def gpt2_unknown_domain(model: onnx.ModelProto) -> None:
    next(n for n in model.graph.node if n.op_type == "Tanh").domain = "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))


# --- random mutations -------------------------------------------------------------------------------------


def random_case(rng: random.Random, data: bytes, spans: list[tuple[int, int]]) -> Case:
    """One seeded mutation of the tiny GPT-2 (bytes or protobuf fields)."""
    kind = rng.choice(MUTATIONS)
    return kind(rng, data, spans)


def outside_spans(rng: random.Random, data: bytes, spans) -> int:
    """A random byte position, half the time outside the large weights (where the structure is)."""
    while True:
        pos = rng.randrange(len(data))
        if rng.random() < 0.5 or not any(a <= pos < b for a, b in spans):
            return pos


def m_truncate(rng, data, spans) -> Case:
    cut = rng.randrange(len(data))
    return Case(f"truncate@{cut}", lambda f: write(f, data[:cut]), True)


def float_spans(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges of the large float32 weights (raw data, little-endian)."""
    spans = []
    for t in onnx.load_from_string(data).graph.initializer:
        if len(t.raw_data) >= 1024 and t.data_type == TensorProto.FLOAT:
            start = data.find(t.raw_data)
            spans.append((start, start + len(t.raw_data)))
    return sorted(spans)


def keeps_a_finite_weight(pos: int, bit: int, spans: list[tuple[int, int]]) -> bool:
    """Flipping `bit` of byte `pos` changes only the mantissa or the sign of one float32 weight: the model
    stays valid and its numbers stay finite and of the same size. (Exponent bits are left out: a flip
    there can make a weight 2^128 times larger, and the outputs inf.)"""
    for a, b in spans:
        if a <= pos < b:
            byte = (pos - a) % 4  # little-endian: bytes 0-1 mantissa, byte 2 mantissa + exponent's low bit
            return byte < 2 or (byte == 2 and bit < 7) or (byte == 3 and bit == 7)
    return False


_float_spans: list[tuple[int, int]] | None = None


def source_float_spans() -> list[tuple[int, int]]:
    global _float_spans
    if _float_spans is None:
        _float_spans = float_spans(source_bytes())
    return _float_spans


def bitflip_case(data: bytes, flips: list[tuple[int, int]]) -> Case:
    def make(f):
        b = bytearray(data)
        for pos, bit in flips:
            b[pos] ^= 1 << bit
        return write(f, bytes(b))
    floats = source_float_spans() if data == source_bytes() else float_spans(data)
    valid = all(keeps_a_finite_weight(pos, bit, floats) for pos, bit in flips)
    return Case("bitflip@" + ",".join(f"{p}.{b}" for p, b in flips), make, valid=valid)


def m_bitflip(rng, data, spans) -> Case:
    flips = [(outside_spans(rng, data, spans), rng.randrange(8)) for _ in range(rng.choice([1, 1, 2, 8]))]
    return bitflip_case(data, flips)


def rename_case(data: bytes, seed: int) -> Case:
    """One value (a node's output or a weight) renamed everywhere it is named: the same model."""
    def make(f):
        r = random.Random(seed)
        model = onnx.load_from_string(data)
        graph = model.graph
        outer = {v.name for v in [*graph.input, *graph.output]}
        names = sorted(({o for n in graph.node for o in n.output if o} | {t.name for t in graph.initializer}) - outer)
        old = r.choice(names)
        taken = names + sorted(outer)
        new = r.choice(["renamed", "a/b.c:0", "onnx::Renamed_1", "x" * 200]) + f"_{seed}"
        assert new not in taken
        for n in graph.node:
            n.input[:] = [new if x == old else x for x in n.input]
            n.output[:] = [new if x == old else x for x in n.output]
        for t in [*graph.initializer, *graph.value_info]:
            if t.name == old:
                t.name = new
        return save(f, model)
    return Case(f"rename#{seed}", make, valid=True)


def valid_cases(n: int, seed: int) -> list[Case]:
    """Mutations that keep a valid model by construction: float mantissa or sign flips, and renames."""
    rng = random.Random(seed)
    data = source_bytes()
    spans = source_float_spans()
    cases = []
    while len(cases) < n:
        if rng.random() < 0.5:
            cases.append(rename_case(data, rng.randrange(2**32)))
            continue
        flips = []
        for _ in range(rng.choice([1, 2, 8])):
            a, b = rng.choice(spans)
            pos = rng.randrange(a, b)
            byte = (pos - a) % 4
            bit = 7 if byte == 3 else rng.randrange(7 if byte == 2 else 8)
            flips.append((pos, bit))
        cases.append(bitflip_case(data, flips))
    return cases


def m_bytes(rng, data, spans) -> Case:
    pos, n = outside_spans(rng, data, spans), rng.choice([1, 4, 16])
    junk = bytes(rng.randrange(256) for _ in range(n))
    op = rng.choice(["overwrite", "insert", "delete"])

    def make(f):
        if op == "overwrite":
            return write(f, data[:pos] + junk + data[pos + n:])
        if op == "insert":
            return write(f, data[:pos] + junk + data[pos:])
        return write(f, data[:pos] + data[pos + n:])
    return Case(f"{op}{n}@{pos}", make)


def m_random_bytes(rng, data, spans) -> Case:
    n = rng.choice([1, 7, 100, 5000])
    seed = rng.randrange(2**32)
    junk = random.Random(seed).randbytes(n)
    # random bytes are almost never a model; a lucky parse has no graph
    return Case(f"random{n}#{seed}", lambda f: write(f, junk), True, "not .*ONNX model|empty|no graph")


PROTO_EDITS = ["rename-input", "rename-output", "dims", "dtype", "attribute", "opset", "op-type", "drop-node",
               "swap-nodes", "drop-output"]


def m_proto(rng, data, spans) -> Case:
    """A valid protobuf with one field changed: a rename, a dim, an attribute, an opset, a node order."""
    seed = rng.randrange(2**32)
    return proto_case(data, rng.choice(PROTO_EDITS), seed)


def proto_case(data: bytes, what: str, seed: int) -> Case:
    def make(f):
        r = random.Random(seed)
        model = onnx.load_from_string(data)
        nodes = model.graph.node
        node = nodes[r.randrange(len(nodes))]
        names = [o for n in nodes for o in n.output] + [t.name for t in model.graph.initializer]
        if what == "rename-input" and node.input:
            node.input[r.randrange(len(node.input))] = r.choice(names + ["ghost"])
        elif what == "rename-output":
            node.output[0] = r.choice(names + ["fresh"])
        elif what == "dims":
            t = r.choice(model.graph.initializer)
            if t.dims:
                t.dims[r.randrange(len(t.dims))] = r.choice([0, 1, 2, -1, 63, 2**31, 2**62])
        elif what == "dtype":
            r.choice(model.graph.initializer).data_type = r.randrange(0, 30)
        elif what == "attribute" and node.attribute:
            a = r.choice(node.attribute)
            if a.type == onnx.AttributeProto.INT:
                a.i = r.choice([0, 1, -1, 2**31, -(2**62)])
            elif a.type == onnx.AttributeProto.INTS and a.ints:
                a.ints[r.randrange(len(a.ints))] = r.choice([0, 1, -1, 2**31])
            elif a.type == onnx.AttributeProto.TENSOR:
                a.t.dims.append(3)
        elif what == "opset":
            model.opset_import[0].version = r.choice([1, 7, 13, 16, 18, 28, 29, 1000, -1])
        elif what == "op-type":
            node.op_type = r.choice(["Relu", "Identity", "MatMul", "Softmax", "Nope"])
        elif what == "drop-node":
            nodes.remove(node)
        elif what == "swap-nodes":
            i, j = r.randrange(len(nodes)), r.randrange(len(nodes))
            a, b = onnx.NodeProto(), onnx.NodeProto()
            a.CopyFrom(nodes[i]), b.CopyFrom(nodes[j])
            nodes[i].CopyFrom(b), nodes[j].CopyFrom(a)
        elif what == "drop-output":
            del model.graph.output[:]
        return save(f, model)
    return Case(f"proto-{what}#{seed}", make)


def m_external(rng, data, spans) -> Case:
    """The tiny GPT-2 with its weights in a file next to it; one reference, or the file, changed."""
    seed = rng.randrange(2**32)
    what = rng.choice(["location", "offset", "length", "cut-file", "grow-file"])

    def make(f):
        r = random.Random(seed)
        model, _ = with_external_data(f)
        tensor = r.choice([t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL])
        weights = f / "weights.bin"
        size = weights.stat().st_size
        if what == "location":
            outside_copy(f)
            set_location(tensor, r.choice([
                "../outside/weights.bin", str(f.parent / "outside" / "weights.bin"), "/etc/passwd",
                "../../../../../../etc/passwd", "", ".", "..", "nowhere.bin", "weights.bin/..",
                "./weights.bin", "sub/../weights.bin", "../model/weights.bin"]))  # the last three are fine
        elif what == "offset":
            set_entry(tensor, "offset", str(r.choice([0, r.randrange(size), size, size + 1, 2**63, -1])))
        elif what == "length":
            set_entry(tensor, "length", str(r.choice([0, 1, r.randrange(size), size, 2**40, -5])))
        elif what == "cut-file":
            weights.write_bytes(weights.read_bytes()[:r.randrange(size)])
        else:  # bytes after the last tensor are harmless
            with open(weights, "ab") as out:
                out.write(r.randbytes(r.randrange(1, 5000)))
        return save(f, model)
    return Case(f"external-{what}#{seed}", make)


MUTATIONS = [m_truncate, m_bitflip, m_bitflip, m_bytes, m_random_bytes, m_proto, m_proto, m_proto,
             m_external]


def random_cases(n: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    data = source_bytes()
    spans = weight_spans(data)
    return [random_case(rng, data, spans) for _ in range(n)]


# --- the contract -----------------------------------------------------------------------------------------


# What a case came to. A failure is ours: "internal error" (exit 3, or an error line that says so),
# "timeout" (the case ran past its limit, whatever the tool did about it), or "failure" (any other
# broken promise). "not preserved" is exit 1 of a command that checks its output: allowed only for
# inputs of unclear validity, and every one is listed by bench/fuzz.py.
FAILURES = frozenset({"internal error", "timeout", "failure"})


@dataclasses.dataclass
class Outcome:
    status: str  # "accepted", "not preserved", "rejected", or one of FAILURES
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status in FAILURES


def listing(root: Path) -> dict[str, int]:
    """Every path under `root` with its size (a symlink counts as itself, not what it points at)."""
    return {str(p.relative_to(root)): (p.lstat().st_size if not p.is_dir() or p.is_symlink() else -1)
            for p in sorted(root.rglob("*"))}


# Which files a command opens (through Python): none may lie outside the model's folder.

_opened: list[str] | None = None  # set while run_case runs a command


def _audit(event: str, args) -> None:
    if _opened is not None and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


class Timeout(BaseException):
    """Raised by the case's alarm. A BaseException, so the tool's `except Exception` handlers cannot turn a
    hang into an ordinary error line; and the alarm also sets a flag, so a handler that catches even
    this is still found out."""


_alarm_fired = False


def _alarm(signum, frame):
    global _alarm_fired
    _alarm_fired = True
    raise Timeout()


runner = CliRunner()


@contextlib.contextmanager
def torch_threads(command: str):
    """train on 8 tokens, one intra-op thread: more threads only wait on each other (on a 2-core machine
    with one core busy a case took 1.2 s with torch's 2 threads, 0.2 s with one)."""
    if command not in RUNS_BRIDGE:
        yield
        return
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_case(case: Case, command: str, root: Path, limit: int | None = None) -> Outcome:
    """Build `case` in a fresh folder under `root`, run `command` on it, check the contract. A case that
    runs past `limit` seconds (default CASE_SECONDS) is a "timeout", whatever the command answered."""
    limit = limit or CASE_SECONDS
    if root.exists():
        shutil.rmtree(root)
    folder = root / "model"
    folder.mkdir(parents=True)
    path = case.make(folder)
    before = listing(root)
    use_alarm = hasattr(signal, "SIGALRM") and os.name == "posix"
    global _opened, _alarm_fired
    _alarm_fired = False
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(limit)
    _opened = opened = []  # every file the command opens (through Python)
    try:
        with torch_threads(command):
            result = runner.invoke(app, COMMANDS[command](str(path)))
    except Timeout:
        return Outcome("timeout", f"hung for more than {limit} s")
    finally:
        _opened = None
        if use_alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    if _alarm_fired:  # the alarm's exception was caught inside the tool: still a hang
        return Outcome("timeout", f"hung for more than {limit} s (and the tool caught the alarm: "
                                  f"{result.output.strip().splitlines()[-1:]})")
    outside = os.path.realpath(root / "outside")
    read_outside = [p for p in opened if p.startswith(outside + os.sep) or p == "/etc/passwd"]
    if read_outside:
        return Outcome("failure", f"opened a file outside the model's folder: {read_outside[0]}")
    return judge(case, command, result, before, listing(root), root)


def judge(case: Case, command: str, result, before: dict, after: dict, root: Path) -> Outcome:
    output = result.output
    code = result.exit_code
    exc = result.exception
    if exc is not None and not isinstance(exc, SystemExit):
        return Outcome("failure", f"uncaught {type(exc).__name__}: {str(exc)[:200]}")
    if "Traceback" in output:
        return Outcome("failure", "traceback in the output")
    if code == 3 or "internal error" in output:  # exit 3 is onnxgrow's own failure, never the input's
        return Outcome("internal error", f"exit {code}: {output.strip().splitlines()[-1:]}")
    if code not in (0, 1, 2):
        return Outcome("failure", f"exit code {code}: {output.strip().splitlines()[-1:]}")
    new = sorted(set(after) - set(before))
    changed = sorted(p for p in before if p in after and before[p] != after[p]) + sorted(set(before) - set(after))
    if changed:
        return Outcome("failure", f"changed or removed {changed}")
    if code == 2:
        lines = output.strip().splitlines()
        if len(lines) != 1 or not lines[0].startswith("error:"):
            return Outcome("failure", f"not one error line: {output[-300:]!r}")
        if new:
            return Outcome("failure", f"refused but wrote {new}")
        if case.valid:
            return Outcome("failure", f"refused an input that is valid by construction: {lines[0]}")
        if case.refused(command) and case.reason and not re.search(case.reason, lines[0]):
            return Outcome("failure", f"error does not name the problem /{case.reason}/: {lines[0]}")
        return Outcome("rejected", lines[0])
    if case.refused(command):
        return Outcome("failure", f"accepted a broken input (exit {code}): {output.strip().splitlines()[-1:]}")
    if code == 1 and command in ("inspect", "subclone", "train"):
        return Outcome("failure", f"exit 1 from {command}")
    if code == 1 and case.valid:
        return Outcome("failure", f"not preserved on an input that is valid by construction: "
                                  f"{output.strip().splitlines()[-1:]}")
    if command in WRITES and code == 0:
        models = [p for p in new if p.endswith(".onnx")]
        if len(models) != 1 or new != sorted(models + [models[0][:-5] + side for side in WRITES[command]]):
            return Outcome("failure", f"wrote {new}")
        empty = [p for p in new if after[p] <= 0]
        if empty:
            return Outcome("failure", f"wrote empty files {empty}")
        try:
            onnx.checker.check_model(str(root / models[0]))
        except Exception as e:
            return Outcome("failure", f"wrote an invalid model: {str(e).splitlines()[0][:200]}")
    elif new:
        return Outcome("failure", f"exit {code} and wrote {new}")
    if code == 1:
        return Outcome("not preserved", output.strip().splitlines()[-1] if output.strip() else "exit 1")
    return Outcome("accepted", f"exit {code}")


# --- tests -------------------------------------------------------------------------------------------------

FIXED = fixed_cases()


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", FIXED, ids=[c.name for c in FIXED])
def test_broken_input_is_refused_in_one_line(tmp_path, case, command):
    outcome = run_case(case, command, tmp_path / "case")
    expected = {"rejected"} if case.refused(command) else {"rejected", "accepted", "not preserved"}
    assert outcome.status in expected, f"{case.name} / {command}: {outcome.detail}"


RANDOM = random_cases(300, seed=1234)
ROTATION = [c for c in COMMANDS if c not in RUNS_BRIDGE]  # the commands that take turns on the cases


@pytest.mark.parametrize("i", range(len(RANDOM)), ids=[c.name for c in RANDOM])
def test_random_mutation_keeps_the_contract(tmp_path, i):
    case = RANDOM[i]
    command = ROTATION[i % len(ROTATION)]
    outcome = run_case(case, command, tmp_path / "case")
    assert not outcome.failed, f"{case.name} / {command}: {outcome.status}: {outcome.detail}"


# train runs every random case rather than taking a turn: it is the one command that runs the model
# through the torch bridge (its own interpreter of every op), so the ONNX Runtime commands' turns say
# nothing about it; and one step on 8 tokens is cheap (about 0.1 s a case here, most refused at loading)
@pytest.mark.parametrize("i", range(len(RANDOM)), ids=[c.name for c in RANDOM])
def test_random_mutation_keeps_the_contract_in_train(tmp_path, i):
    case = RANDOM[i]
    outcome = run_case(case, "train", tmp_path / "case")
    assert not outcome.failed, f"{case.name} / train: {outcome.status}: {outcome.detail}"


VALID = valid_cases(12, seed=77)


def test_valid_by_construction_mutations_are_all_accepted(tmp_path):
    """Float mantissa or sign flips and renamed values leave a valid model: every command must accept
    every one (exit 0). A judge that took refusals of these as "clean" would pass a tool that refuses
    everything."""
    commands = list(COMMANDS)
    outcomes = [(c.name, cmd, run_case(c, cmd, tmp_path / "case"))
                for i, c in enumerate(VALID) for cmd in [commands[i % len(commands)]]]
    assert all(c.valid for c in VALID)
    assert {c.name.split("#")[0].split("@")[0] for c in VALID} == {"bitflip", "rename"}
    refused = [(n, cmd, o.status, o.detail) for n, cmd, o in outcomes if o.status != "accepted"]
    assert not refused, f"{len(outcomes) - len(refused)}/{len(outcomes)} accepted: {refused}"


def test_random_stream_marks_only_mantissa_and_sign_flips_valid():
    data, spans = source_bytes(), source_float_spans()
    a, _ = spans[0]
    assert bitflip_case(data, [(a, 0), (a + 3, 7)]).valid  # mantissa, sign
    assert not bitflip_case(data, [(a + 3, 6)]).valid  # exponent
    assert not bitflip_case(data, [(a, 0), (0, 1)]).valid  # one flip in the structure
    assert any(c.valid for c in RANDOM) and not any(c.valid for c in RANDOM if not c.name.startswith("bitflip"))


# --- the judge itself, against injected defects -------------------------------------------------------------


def hang_in_load(monkeypatch, catch):
    """Make loading sleep past the case's limit inside a handler like the library's own."""
    import time
    real = modelio.load

    def slow_load(*args, **kwargs):
        try:
            time.sleep(5)
        except catch as e:  # what a catch-all in the library would do with the alarm
            raise onnxgrow.OnnxgrowError("not a readable ONNX model") from e
        return real(*args, **kwargs)
    monkeypatch.setattr(modelio, "load", slow_load)


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="the case's alarm needs SIGALRM")
@pytest.mark.parametrize("catch", [Exception, BaseException], ids=["except-Exception", "except-BaseException"])
def test_judge_fails_a_hang_in_load(tmp_path, monkeypatch, catch):
    """Injected defect: a load that hangs. `except Exception` cannot catch the alarm (a BaseException);
    a handler that catches even that still leaves the alarm's flag set. Either way: a timeout, never a
    clean rejection."""
    hang_in_load(monkeypatch, catch)
    case = Case("valid", lambda f: write(f, source_bytes()))
    outcome = run_case(case, "widen", tmp_path / "case", limit=1)
    assert outcome.status == "timeout" and outcome.failed, outcome


@pytest.mark.parametrize("code, output, status", [
    (3, "error: internal error (KeyError): 'x'; please report it\n", "internal error"),
    (2, "error: internal error (KeyError): 'x'\n", "internal error"),
    (1, "outputs are not preserved\n", "failure"),  # on a valid input
    (2, "error: not a readable ONNX model\n", "failure"),  # a valid input refused
    (0, "", "accepted"),
])
def test_judge_on_a_valid_input(tmp_path, code, output, status):
    result = dataclasses.make_dataclass("Result", ["output", "exit_code", "exception"])(output, code, None)
    case = Case("valid", lambda f: write(f, source_bytes()), valid=True)
    assert judge(case, "inspect" if code == 0 else "widen", result, {}, {}, tmp_path).status == status


def test_judge_lists_not_preserved_apart_from_accepted(tmp_path):
    result = dataclasses.make_dataclass("Result", ["output", "exit_code", "exception"])(
        "outputs are not preserved; nothing written\n", 1, None)
    outcome = judge(Case("unclear", lambda f: f), "widen", result, {}, {}, tmp_path)
    assert outcome.status == "not preserved" and not outcome.failed


def test_subclone_of_a_model_with_external_data(tmp_path):
    """Found by fuzzing: subclone's copy of the model looked for the weights in the working folder."""
    folder = tmp_path / "model"
    folder.mkdir()
    with_external_data(folder)
    result = runner.invoke(app, COMMANDS["subclone"](str(folder / "model.onnx")))
    assert result.exit_code == 0, result.output


# Found by bench/fuzz.py: train answered these with "internal error (TypeError|ValueError)" from deep in
# the bridge or the loss; the edit feeds an op an input of the wrong rank or leaves the output misshapen
TRAIN_FINDINGS = [
    ("rename-input", 149962363, "torch bridge could not run node"),  # Range(limit=[n]): a TypeError
    ("rename-input", 490443124, "Slice starts must be a 1-D tensor of integers"),
    ("rename-input", 3400542540, "Unsqueeze axes must be a 1-D tensor of integers"),
    ("rename-input", 3851715552, "first output has shape .* not one row per token"),
]


@pytest.mark.parametrize("what, seed, reason", TRAIN_FINDINGS, ids=[f"{w}#{s}" for w, s, _ in TRAIN_FINDINGS])
def test_train_refuses_what_it_once_crashed_on(tmp_path, what, seed, reason):
    outcome = run_case(proto_case(source_bytes(), what, seed), "train", tmp_path / "case")
    assert outcome.status == "rejected" and re.search(reason, outcome.detail), outcome.detail


def test_train_names_the_node_the_bridge_could_not_run(tmp_path):
    """Found by fuzzing (proto-rename-input#1123671281): a model that loads but cannot run - a Gather in
    the shape arithmetic picks another index, so a Gemm meets a [1, 512] input - gave train an
    "internal error (RuntimeError)". Like ONNX Runtime's refusal in validate, it now names the node."""
    def edit(model):
        gather = next(n for n in model.graph.node if n.name == "/transformer/h.1/attn/Gather_6")
        gather.input[1] = "/transformer/Constant_9_output_0"
    outcome = run_case(Case("gemm-mismatch", lambda f: save(f, edited(edit))), "train", tmp_path / "case")
    assert outcome.status == "rejected", outcome.detail
    assert re.search(r"torch bridge could not run node '/transformer/h.1/attn/c_proj/Gemm' \(Gemm\): "
                     r"mat1 and mat2 shapes", outcome.detail), outcome.detail


# --- end to end: the real process, its real stderr --------------------------------------------------------


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxgrow.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "ONNXGROW_DEBUG"})


E2E = {c.name: c for c in FIXED}


@pytest.mark.parametrize("name, command", [("truncated-mid", "inspect"), ("ext-parent", "widen"),
                                            ("ext-symlink", "validate"), ("gpt2-cycle", "deepen"),
                                            ("tensor-proto", "subclone"),
                                            ("gpt2-unknown-domain", "train")])
def test_end_to_end_one_line_on_stderr(tmp_path, name, command):
    case = E2E[name]
    folder = tmp_path / "model"
    folder.mkdir()
    path = case.make(folder)
    before = listing(tmp_path)
    done = run_cli(COMMANDS[command](str(path)), tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and re.search(case.reason, lines[0]), done.stderr
    assert listing(tmp_path) == before


def test_end_to_end_run_failure_is_one_line(tmp_path):
    """A model that loads but fails when run (a Reshape to an impossible shape)."""
    shape = numpy_helper.from_array(np.array([3, 3], np.int64), "shape")
    save(tmp_path, small_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], initializers=[shape]))
    done = run_cli(["validate", "model.onnx", "model.onnx"], tmp_path)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: onnxruntime could not run"), done.stderr


# --- what loading accepts, and what it costs ----------------------------------------------------------------


def test_unsorted_nodes_are_sorted_not_refused(tmp_path):
    """ONNX wants nodes in topological order, ONNX Runtime does not insist; the loader sorts them."""
    model = source_model()
    nodes = list(model.graph.node)
    random.Random(0).shuffle(nodes)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    path = save(tmp_path, model)
    assert onnxgrow.inspect(path) == onnxgrow.inspect(DEFAULT_MODEL)


def test_subgraph_reads_from_the_enclosing_graph(tmp_path):
    """An If branch may read the outer graph's values: not a dangling input."""
    branch = lambda op: helper.make_graph([helper.make_node(op, ["x"], ["z"])], op,  # noqa: E731
                                          [], [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4])])
    cond = numpy_helper.from_array(np.array(True), "cond")
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch("Relu"), else_branch=branch("Neg"))
    path = save(tmp_path, small_graph([node], initializers=[cond]))
    model = modelio.load(path)
    assert [n.op_type for n in model.graph] == ["If"]


def test_outputs_without_a_shape_are_fine(tmp_path):
    """The checker insists on shapes of graph outputs; ONNX Runtime does not, nor does the loader."""
    model = source_model()
    model.graph.output[0].type.tensor_type.ClearField("shape")
    assert onnxgrow.inspect(save(tmp_path, model)) == onnxgrow.inspect(DEFAULT_MODEL)


def test_loading_reads_no_external_data(tmp_path):
    with_external_data(tmp_path)
    global _opened
    _opened = opened = []
    try:
        model = modelio.load(tmp_path / "model.onnx")
    finally:
        _opened = None
    assert str(tmp_path / "weights.bin") not in opened
    assert modelio.weight_bytes(model) == sum(len(t.raw_data) for t in source_model().graph.initializer)


def test_external_data_through_a_symlink_inside_the_folder_is_fine(tmp_path):
    with_external_data(tmp_path)
    (tmp_path / "data").mkdir()
    os.replace(tmp_path / "weights.bin", tmp_path / "data" / "weights.bin")
    (tmp_path / "weights.bin").symlink_to(tmp_path / "data" / "weights.bin")
    assert onnxgrow.inspect(tmp_path / "model.onnx") == onnxgrow.inspect(DEFAULT_MODEL)
