"""ONNX graphs whose weights are never all in memory at once (`compress --low-memory`).

A graph is read without its external data (`onnx.load(..., load_external_data=False)`); each
initializer is read from its file when a step needs it (`read_array`: np.fromfile at its offset)
and every tensor written is appended to one new external-data file as soon as it exists
(`TensorSink`), so the peak is one tensor, not the model. Written here because neither library
bounds memory this way: `onnx.save(..., save_as_external_data=True)` needs every tensor in the
ModelProto first, and onnx_ir reads external tensors through memory maps it keeps open (pages
touched through an open map stay in the process's RSS: a 7B decoder's 28 GB of fp32).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

ALIGN = 4096  # tensors start on page boundaries, as ONNX Runtime wants for mapping external data
# A graph whose weights pass this is written with them in one external-data file (save_streamed),
# by the in-memory and the --low-memory path alike (same bytes): such a graph is never serialized whole
# in memory, and ONNX Runtime maps its weights instead of parsing a copy (measured on a 956 MB int4
# TinyLlama: session 1.24 GB peak RSS against 1.77 GB for the same graph in one file).
INLINE_LIMIT = 64 << 20
# Tensors below this stay in the graph even then (onnx's convert_model_to_external_data keeps them so
# by default too): ONNX Runtime's shape inference reads a Reshape's shape, a Slice's starts, from the
# graph and refuses to load a graph whose small constants are external (a torch.onnx vision tower).
INLINE_TENSOR = 1024


def external_info(tensor) -> dict[str, str] | None:
    """location / offset / length of a TensorProto stored outside the graph (None: stored inside)."""
    from onnx import TensorProto

    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in tensor.external_data}


def read_bytes(tensor, base_dir: Path) -> bytes:
    """The tensor's raw bytes, from the graph or from its external file (read now, not mapped)."""
    from onnx import numpy_helper

    info = external_info(tensor)
    if info is None:
        return tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
    with open(Path(base_dir) / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        return f.read(int(info["length"])) if "length" in info else f.read()


def read_array(tensor, base_dir: Path) -> np.ndarray:
    from onnx import helper, numpy_helper

    if external_info(tensor) is None:
        return numpy_helper.to_array(tensor)
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return np.frombuffer(read_bytes(tensor, base_dir), dtype=dtype).reshape(tuple(tensor.dims)).copy()


def stored_bytes(tensor) -> int:
    info = external_info(tensor)
    if info is not None:
        return int(info.get("length", 0))
    return len(tensor.raw_data) + 4 * len(tensor.float_data) + 8 * len(tensor.int64_data) + 4 * len(tensor.int32_data)


class TensorSink:
    """Appends tensors to one external-data file and points their TensorProtos at it.

    `path` is where the bytes go now; `location` is the name the graph records (the file is renamed
    to it by `commit`, so a graph can be rewritten over the data file it is still being read from)."""

    def __init__(self, path: Path, location: str):
        self.path, self.location = Path(path), location
        self.file = open(self.path, "wb")
        self.offset = 0

    def write(self, data) -> tuple[int, int]:
        pad = -self.offset % ALIGN
        if pad:
            self.file.write(b"\0" * pad)
            self.offset += pad
        start = self.offset
        self.file.write(data)
        self.offset += len(data)
        return start, len(data)

    def put(self, tensor, base_dir: Path) -> None:
        """Move one TensorProto's data (held in it, or external under base_dir) into this file."""
        from onnx import TensorProto

        offset, length = self.write(read_bytes(tensor, base_dir))
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            tensor.ClearField(field)
        del tensor.external_data[:]
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def save_streamed(model, path: Path, base_dir: Path) -> None:
    """Save `model`, whose initializers may be held in it or live in external files under base_dir,
    as `path`, plus `path.data` where its weights pass INLINE_LIMIT: every initializer of INLINE_TENSOR
    bytes or more is then read and written one at a time, at page-aligned offsets. Below the limit the
    graph is one file.
    The model's initializers are left pointing at what was written."""
    import onnx

    path, base_dir = Path(path), Path(base_dir)
    data = path.with_name(path.name + ".data")
    if sum(stored_bytes(t) for t in model.graph.initializer) <= INLINE_LIMIT:
        for t in model.graph.initializer:
            if external_info(t) is not None:
                t.raw_data = read_bytes(t, base_dir)
                del t.external_data[:]
                t.ClearField("data_location")  # as onnx.load leaves a tensor it read in
        onnx.save(model, str(path))
        data.unlink(missing_ok=True)
        return
    partial = path.with_name(path.name + ".data.partial")
    sink = TensorSink(partial, data.name)
    try:
        for t in model.graph.initializer:
            if stored_bytes(t) >= INLINE_TENSOR:
                sink.put(t, base_dir)
            elif external_info(t) is not None:
                t.raw_data = read_bytes(t, base_dir)
                del t.external_data[:]
                t.ClearField("data_location")
        sink.close()
    except BaseException:
        sink.discard()
        raise
    os.replace(partial, data)
    onnx.save(model, str(path))

