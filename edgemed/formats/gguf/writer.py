"""The streaming GGUF writer the language-model and mmproj files share, and policy precision names
-> gguf-py's types.

Tensor names come from gguf-py's own map (`gguf.get_tensor_name_map`) and constants; edgemed keeps
no second name table. Tensors are streamed: every tensor's header is declared first, then each
tensor is converted and written on its own, so peak extra memory is one tensor, not the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from edgemed.errors import BadInputError
from edgemed.formats.gguf import gguf_type_name


# --- precision names -> gguf-py enums ------------------------------------------------------------
def gguf_py():
    import gguf

    return gguf


def ggml_type(precision: str):
    """The ggml tensor type a policy precision names (q4_k_m -> Q4_K, int8 -> Q8_0, fp16 -> F16)."""
    gguf = gguf_py()
    name = gguf_type_name(precision).upper()
    for suffix in ("_M", "_S", "_L"):
        if name.endswith(suffix) and "_K" in name:
            name = name[: -len(suffix)]
    try:
        return gguf.GGMLQuantizationType[name]
    except KeyError:
        raise BadInputError(f"precision '{precision}'", "is not a llama.cpp tensor type",
                            "use f32, f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, iq4_xs, ...") from None


def llama_ftype(precision: str):
    """The llama.cpp file type (quantization mixture) a policy precision names."""
    gguf = gguf_py()
    name = gguf_type_name(precision).upper()
    key = "ALL_F32" if name == "F32" else f"MOSTLY_{name}"
    try:
        return gguf.LlamaFileType[key]
    except KeyError:
        raise BadInputError(f"precision '{precision}'", "is not a llama.cpp file type",
                            "use f32, f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, iq4_xs, ...") from None


# --- streaming writer -----------------------------------------------------------------------------
@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    make: Callable[[], np.ndarray]  # float32 data, produced only when written


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    gguf = gguf_py()
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * type_size


def stream_tensors(writer, planned: list[PlannedTensor]) -> None:
    """Declare every tensor, write header/KV/tensor infos, then convert and write one at a time."""
    gguf = gguf_py()
    for t in planned:
        if t.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dt = np.float32 if t.qtype == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(t.name, t.shape, np.dtype(dt), _nbytes(t.shape, t.qtype))
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
            writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), _nbytes(t.shape, t.qtype), raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in planned:
        data = np.ascontiguousarray(t.make(), dtype=np.float32).reshape(t.shape)
        if t.qtype == gguf.GGMLQuantizationType.F16:
            data = data.astype(np.float16)
        elif t.qtype != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(data, t.qtype)
        writer.write_tensor_data(data)
        del data
    writer.close()


def float_type(precision: str, ndim: int, cols: int):
    """Tensor type the writer itself stores: 1-D tensors F32; 2-D at f16/f32, or Q8_0 where the
    policy asks for 8 bits and the rows fit Q8_0's 32-blocks (gguf-py's own Q8_0 quantizer)."""
    gguf = gguf_py()
    T = gguf.GGMLQuantizationType
    if ndim < 2:
        return T.F32
    t = ggml_type(precision)
    if t in (T.F32, T.F16):
        return t
    if t == T.BF16:
        return T.F16
    if t == T.Q8_0 and cols % 32 == 0:
        return T.Q8_0
    return T.F16
