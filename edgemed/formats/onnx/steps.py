"""ONNX export and quantization steps (onnx-export, onnx-quantize); their typed arguments are in args.py.

The quantizers themselves are in edgemed.formats.onnx.quantize and edgemed.formats.onnx.int4.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from edgemed.errors import BadInputError
from edgemed.formats.onnx import OnnxBackend
from edgemed.formats.onnx.args import OnnxExportArgs, OnnxQuantizeArgs, onnx_activations
from edgemed.formats.onnx.graph import GRAPHS, graph_component
from edgemed.formats.onnx.int4 import INT4_ALGORITHMS
from edgemed.steps import Step

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.context import Context


class OnnxExport(Step):
    name = "onnx-export"
    stage = "export"
    formats = ("onnx",)
    summary = "vision encoder + projector, token embeddings and a KV-cache decoder as three ONNX graphs"
    Args = OnnxExportArgs

    def run(self, ctx: "Context") -> None:
        from edgemed.formats.onnx.genai_decoder import builder_unsupported_reason
        from edgemed.formats.onnx.export import export_onnx

        builder = self.args.decoder
        if builder != "torch":
            reason = builder_unsupported_reason(ctx.cm)
            if reason is not None and builder == "genai":
                raise BadInputError(f"recipe {ctx.recipe.name}: onnx-export decoder=genai", reason,
                                    "use decoder: auto or torch")
            if reason is not None:
                ctx.notes.append(f"decoder exported with torch.onnx: {reason}")
                builder = "torch"
        names, used, decoder_note = export_onnx(ctx.cm, ctx.work_dir, opset=self.args.opset,
                                                progress=ctx.progress, decoder_builder=builder)
        ctx.notes.append(decoder_note)
        ctx.runtime["decoder_builder"] = used
        # The builder's GroupQueryAttention reads past and writes present in one shared buffer.
        ctx.runtime["kv_cache"] = "shared_buffer" if used == "genai" else "concat"
        for name in names:
            ctx.describe(name, component=graph_component(name), fmt="onnx", precision="fp32")


class OnnxQuantize(Step):
    name = "onnx-quantize"
    stage = "artifact"
    formats = ("onnx",)
    summary = "ONNX Runtime quantizers per the component policy (int8 dynamic, int4 MatMulNBits, fp16)"
    Args = OnnxQuantizeArgs

    def run(self, ctx: "Context") -> None:
        from edgemed.formats.onnx.quantize import quantize_graph

        policy = ctx.recipe.policy
        embed = OnnxBackend.component_precisions["embed"]
        if policy.embed not in embed:
            raise BadInputError(f"recipe {ctx.recipe.name}: policy.embed", f"'{policy.embed}' is not supported for ONNX",
                                f"use {', '.join(sorted(embed))} for embed")
        activations, why = onnx_activations(self.args.activations, ctx.target, ctx.cm.adapter.fp16_unsafe)
        ctx.runtime["activations"] = activations
        if activations == "fp16":
            why = (why or "activations, float weights and the KV cache are fp16 (the recipe says so)") + \
                f"; int4 in blocks of up to {self.args.int4.fp16_block_size} with fp16 scales"
        if why:
            ctx.notes.append(why)
        if activations == "fp32" and self.args.int4.int8_projections and "int4" in policy.model_dump().values():
            ctx.notes.append("int4 language model with its " + ", ".join(self.args.int4.int8_projections)
                             + " projections (where present) at int8")
        for graph in GRAPHS:
            path = ctx.work_dir / graph
            if not path.exists():
                continue
            ctx.progress(f"quantize {graph}")
            feeds = None
            calibrated = INT4_ALGORITHMS.get(self.args.int4.algorithm).calibrated or self.args.int8.algorithm == "mse"
            if graph == "decoder_model_merged.onnx" and calibrated:
                from edgemed.calibration.feeds import decoder_feeds

                def decoder_calibration():  # the calibrated quantizers' passes, recorded in the manifest
                    rec: dict = {}
                    out = decoder_feeds(ctx.cm, ctx.recipe.calibration, self.args.int4.calibration_samples, rec)
                    ctx.calibration = ctx.calibration or {**rec, "used_by": "onnx-quantize (int4/int8 mse and gptq grids)"}
                    return out

                feeds = decoder_calibration
            precisions = quantize_graph(path, policy, self.args, feeds, activations)
            ctx.describe(graph, component=graph_component(graph), fmt="onnx",
                         precision="+".join(sorted(set(precisions.values()))) or "fp32")
