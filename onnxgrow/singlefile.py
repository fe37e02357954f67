"""Write a single-file .onnx from a model saved with external data, streaming the weights.

Serialising a ModelProto holds the whole model twice in memory (the proto and its bytes) and runs
at protobuf speed. A protobuf message is a sequence of fields, and a repeated field may be written
one element at a time, so the file can be written instead as

    model fields except the graph | graph tag + length | graph fields except initializers |
    for each initializer: tag + length + (name, dims, data type) + raw_data tag + length + bytes

with the bytes copied by the kernel from the external data file. Peak memory is one tensor's header.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

GRAPH_FIELD = 7  # ModelProto.graph
INITIALIZER_FIELD = 5  # GraphProto.initializer
RAW_DATA_FIELD = 9  # TensorProto.raw_data
LENGTH_DELIMITED = 2


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def key(field: int) -> bytes:
    return varint((field << 3) | LENGTH_DELIMITED)


def external_span(tensor: onnx.TensorProto) -> tuple[str, int, int] | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in tensor.external_data}
    return info["location"], int(info.get("offset", 0)), int(info["length"])


def merge_external(staged: Path, output: Path) -> None:
    """`staged` is a model whose large initializers live in external files next to it."""
    staged = Path(staged)
    model = onnx.load(str(staged), load_external_data=False)
    tensors = list(model.graph.initializer)
    del model.graph.initializer[:]
    graph_bytes = model.graph.SerializeToString()
    model.ClearField("graph")
    head = model.SerializeToString()

    pieces = []  # (header bytes, (file, offset, length) or None) per initializer
    for t in tensors:
        span = external_span(t)
        if span is None:
            pieces.append((t.SerializeToString(), None))
            continue
        inline = onnx.TensorProto()
        inline.CopyFrom(t)
        inline.ClearField("external_data")
        inline.ClearField("data_location")
        header = inline.SerializeToString() + key(RAW_DATA_FIELD) + varint(span[2])
        pieces.append((header, span))

    def element_size(header: bytes, span) -> int:
        return len(header) + (span[2] if span else 0)

    graph_len = len(graph_bytes) + sum(
        len(key(INITIALIZER_FIELD)) + len(varint(element_size(h, s))) + element_size(h, s) for h, s in pieces)
    files: dict[str, tuple] = {}
    try:
        with open(output, "wb") as out:
            out.write(head)
            out.write(key(GRAPH_FIELD) + varint(graph_len))
            out.write(graph_bytes)
            for header, span in pieces:
                size = element_size(header, span)
                out.write(key(INITIALIZER_FIELD) + varint(size))
                out.write(header)
                if span:
                    location, offset, length = span
                    if location not in files:
                        files[location] = open(staged.parent / location, "rb")
                    out.flush()
                    copy_range(files[location], out, offset, length)
    finally:
        for f in files.values():
            f.close()


def copy_range(src, dst, offset: int, length: int, chunk: int = 64 * 2**20) -> None:
    """Copy bytes file to file; the kernel moves them (sendfile), so they never enter our memory."""
    try:
        while length > 0:
            sent = os.sendfile(dst.fileno(), src.fileno(), offset, min(length, chunk))
            if sent == 0:
                raise OSError("external data file ended early")
            offset, length = offset + sent, length - sent
    except (AttributeError, OSError) as e:
        if isinstance(e, OSError) and "ended early" in str(e):
            raise
        src.seek(offset)  # no sendfile here: fall back to bounded chunks
        while length > 0:
            block = src.read(min(length, chunk))
            if not block:
                raise OSError("external data file ended early") from None
            dst.write(block)
            length -= len(block)
