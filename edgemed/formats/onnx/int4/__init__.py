"""int4 algorithms for ONNX: each one module with one registered Int4Algorithm subclass, listed in
INT4_MODULES (adding one is one file and one line). They share the MatMulNBits rewrite below.

The algorithm picks each block's grid; every one writes ONNX Runtime's MatMulNBits (com.microsoft)
so the artifact runs on its fast kernels. MatMuls whose K no block divides go to ONNX Runtime's rtn
(logged, never silently).
"""
from __future__ import annotations

import logging
from typing import ClassVar

from edgemed.formats.onnx.graph import fit_block, replace_nodes
from edgemed.registry import Registry

log = logging.getLogger(__name__)

INT4_MODULES = ("edgemed.formats.onnx.int4.mse", "edgemed.formats.onnx.int4.fmin",
                "edgemed.formats.onnx.int4.gptq", "edgemed.formats.onnx.int4.ort")


class Int4Algorithm:
    """One way to choose int4 blocks for a set of MatMul nodes."""

    name: ClassVar[str]
    # Calibration statistics of the decoder's MatMul inputs (grids.ProbeStats or
    # parent_stats.ParentStats): used when given (mse weights its error by their mean squares,
    # gptq needs their Hessians and falls back to rtn without).
    calibrated: ClassVar[bool] = False
    # Stores a float per block on top of the scale (a block offset or a float zero point): the
    # planner counts its bytes.
    float_offset: ClassVar[bool] = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "name" in cls.__dict__:
            INT4_ALGORITHMS.register(cls.name)(cls)

    @classmethod
    def quantize(cls, model, nodes: list[str], block_size: int, args, stats):
        """Replace exactly `nodes` by int4 MatMulNBits; returns the model. `args` is Int4Args."""
        raise NotImplementedError  # pragma: no cover


INT4_ALGORITHMS: Registry[type[Int4Algorithm]] = Registry("int4 algorithm", plugins=INT4_MODULES)


def ort_nbits(model, nodes: list[str], bits: int, block_size: int, symmetric: bool, accuracy_level: int,
              algorithm: str):
    """Weight-only MatMulNBits on exactly `nodes` (every other MatMul is excluded)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig, HQQWeightOnlyQuantConfig, KQuantWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    include = set(nodes)
    exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in include]
    if algorithm == "hqq":
        cfg = HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits)
    elif algorithm == "k_quant":
        cfg = KQuantWeightOnlyQuantConfig()
    else:
        cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                           accuracy_level=accuracy_level, bits=bits)
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                             accuracy_level=accuracy_level, nodes_to_exclude=exclude, algo_config=cfg)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    q.process()
    return q.model.model


def asym_int4(model, nodes: list[str], block_size: int, accuracy_level: int, algorithm: str, quantize):
    """Replace each MatMul in `nodes` by an asymmetric int4 MatMulNBits whose grid comes from
    quantize(weight [K, N], input tensor name, block) -> (q, scales, zero points)."""
    from edgemed.formats.onnx.int4.grids import matmulnbits_initializers

    def rewrite(node, w, b):
        k, n = w.shape
        q, scales, zps = quantize(w, node.input[0], b)
        return asym_nbits_node(node, k, n, b, accuracy_level), matmulnbits_initializers(node.name, q, scales, zps, b)

    new_nodes, new_inits, rtn_fallback = rewrite_matmuls(model, nodes, block_size, rewrite)
    return finish_int4_rewrite(model, new_nodes, new_inits, rtn_fallback, block_size, accuracy_level, algorithm)


def rewrite_matmuls(model, nodes: list[str], block_size: int, rewrite):
    """The graph's node list with each MatMul in `nodes` replaced by rewrite(node, weight [K, N],
    block) -> (new node, its initializers); returns (nodes, initializers, the MatMuls whose K is not
    a multiple of the fitted block, left in place for rtn)."""
    from onnx import numpy_helper

    wanted = set(nodes)
    inits = {t.name: t for t in model.graph.initializer}
    new_nodes, new_inits, fallback = [], [], []
    for node in model.graph.node:
        if node.name not in wanted:
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        b = fit_block(w.shape[0], block_size)
        if w.shape[0] % b:
            fallback.append(node.name)
            new_nodes.append(node)
            continue
        node_out, node_inits = rewrite(node, w, b)
        new_nodes.append(node_out)
        new_inits += node_inits
    return new_nodes, new_inits, fallback


def asym_nbits_node(node, k: int, n: int, block: int, accuracy_level: int):
    """The MatMulNBits that replaces MatMul `node`, reading matmulnbits_initializers' tensors."""
    from onnx import helper

    name = node.name
    return helper.make_node(
        "MatMulNBits", [node.input[0], f"{name}.q4", f"{name}.scales", f"{name}.zero_points"], list(node.output),
        name=f"{name}_Q4", domain="com.microsoft", K=k, N=n, bits=4, block_size=block, accuracy_level=accuracy_level)


def finish_int4_rewrite(model, nodes, initializers, rtn_fallback: list[str], block_size: int,
                        accuracy_level: int, algorithm: str, bits: int = 4, symmetric: bool = False):
    """Install a rewritten node list (fmin, mse, gptq; int8 mse with bits=8) and send MatMuls whose
    K is not a multiple of the block to ONNX Runtime's rtn instead (logged: never silently)."""
    from onnx import helper

    replace_nodes(model, nodes, initializers)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    if rtn_fallback:
        log.warning("%s: K not a multiple of %d for %d MatMul(s); they use rtn", algorithm, block_size,
                    len(rtn_fallback))
        model = ort_nbits(model, rtn_fallback, bits, block_size, symmetric, accuracy_level, "rtn")
    return model
