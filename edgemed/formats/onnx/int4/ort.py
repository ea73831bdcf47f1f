"""ONNX Runtime's own MatMulNBitsQuantizer algorithms: rtn spans each block's min..max; hqq (float
zero points: no fast CPU kernel in ONNX Runtime 1.32, about 10x slower here); k_quant."""
from __future__ import annotations

from edgemed.formats.onnx.graph import by_fitted_block
from edgemed.formats.onnx.int4 import Int4Algorithm, ort_nbits


class _Ort(Int4Algorithm):
    @classmethod
    def quantize(cls, model, nodes, block_size, args, stats):
        for block, group in by_fitted_block(model, nodes, block_size).items():
            model = ort_nbits(model, group, 4, block, args.symmetric, args.accuracy_level, cls.name)
        return model


class Rtn(_Ort):
    name = "rtn"


class Hqq(_Ort):
    name = "hqq"
    float_offset = True


class KQuant(_Ort):
    name = "k_quant"
