"""gptq: edgemed's GPTQ on the asymmetric MatMulNBits grid (grids.gptq_quantize), from calibration
passes through the decoder graph (ONNX Runtime's GPTQ ignores nodes_to_exclude). Decoder graph
only: other graphs, which get no calibration feeds, use ONNX Runtime's asymmetric rtn."""
from __future__ import annotations

from edgemed.formats.onnx.graph import by_fitted_block, inputs_of
from edgemed.formats.onnx.int4 import Int4Algorithm, asym_int4, ort_nbits


class Gptq(Int4Algorithm):
    name = "gptq"
    calibrated = True

    @classmethod
    def quantize(cls, model, nodes, block_size, args, stats):
        if stats is None:
            for block, group in by_fitted_block(model, nodes, block_size).items():
                model = ort_nbits(model, group, 4, block, False, args.accuracy_level, "rtn")
            return model
        from edgemed.formats.onnx.int4.grids import gptq_quantize

        h = stats.hessians(model, inputs_of(model, nodes))
        return asym_int4(model, nodes, block_size, args.accuracy_level, "gptq",
                         lambda w, x, b: gptq_quantize(w, h[x], b))
