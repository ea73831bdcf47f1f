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
    # With the weights on disk the decoder is written by the onnxruntime-genai builder, one tensor at
    # a time (genai_decoder.builder_streams); the vision and embedding graphs load their own modules.
    streams = True

    def stream_refusal(self, target=None) -> str | None:
        if self.args.decoder == "torch":
            return "decoder: torch traces the whole decoder in memory (use decoder: auto or genai)"
        return None

    def run(self, ctx: "Context") -> None:
        from edgemed.formats.onnx.genai_decoder import builder_unsupported_reason
        from edgemed.formats.onnx.export import export_onnx

        builder = self.args.decoder
        if ctx.cm.streamed is not None:
            if reason := builder_unsupported_reason(ctx.cm):
                raise BadInputError(f"recipe {ctx.recipe.name} with --low-memory", f"the ONNX decoder is streamed "
                                    f"by onnxruntime-genai's builder, and {reason}", "compress without --low-memory")
            builder = "genai"  # no torch.onnx fallback: it would trace the whole decoder in memory
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
    streams = True  # the decoder node by node from its external data (quantize_graph_streamed)

    def host_bytes(self, shape, low_memory: bool = False) -> int:
        """GPTQ's share of compress's peak RAM (plan.host_estimate; `shape`: plan's _ModelShape): one
        decoder layer's input Hessians in float64 (parent_stats' layer-by-layer pass: q/k/v, o,
        gate/up and down read four inputs) and gptq_quantize's copy, inverse and Cholesky factor of
        the largest (a 7B's down projection: 14336^2 x 8 B = 1.6 GB each). The other algorithms hold
        one weight's temporaries, counted with the weights."""
        if self.args.int4.algorithm != "gptq":
            return 0
        h = shape.facts.hidden_size
        k = max([h, *(p // h for name, p in shape.linears.items() if name.endswith("down_proj"))])
        return 8 * (3 * h * h + k * k) + 3 * 8 * k * k

    def stream_refusal(self, target=None) -> str | None:
        if self.args.int8.method != "nbits":
            return f"int8 method {self.args.int8.method} (ONNX Runtime's quantize_dynamic) loads the whole graph"
        if onnx_activations(self.args.activations, target, None)[0] == "fp16":
            return "fp16 activations convert the whole graph in memory (use a CPU target, or activations: fp32)"
        return None

    def run(self, ctx: "Context") -> None:
        from edgemed.formats.onnx.graph import DECODER
        from edgemed.formats.onnx.quantize import quantize_graph, quantize_graph_streamed

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
        streamed = ctx.cm.streamed is not None
        if streamed and activations == "fp16":
            raise BadInputError(f"recipe {ctx.recipe.name} with --low-memory", "fp16 activations convert the whole "
                                "graph in memory", "compress without --low-memory, or with activations: fp32")
        for graph in GRAPHS:
            path = ctx.work_dir / graph
            if not path.exists():
                continue
            ctx.progress(f"quantize {graph}")
            calibration = None
            algorithm = INT4_ALGORITHMS.get(self.args.int4.algorithm)
            if graph == DECODER and (algorithm.calibrated or self.args.int8.algorithm == "mse"):
                calibration = self._calibration(ctx, path)
            if streamed and graph == DECODER:
                precisions = quantize_graph_streamed(path, policy, self.args, calibration)
            else:
                precisions = quantize_graph(path, policy, self.args, calibration, activations)
            ctx.describe(graph, component=graph_component(graph), fmt="onnx",
                         precision="+".join(sorted(set(precisions.values()))) or "fp32")

    def _calibration(self, ctx: "Context", path):
        """The calibrated quantizers' statistics, computed when first needed and recorded in the
        manifest: from the parent's Linear layers for the builder's decoder (parent_stats: mean
        squares in one pass, GPTQ's Hessians layer by layer), else from passes through the
        exported graph (grids.ProbeStats: torch.onnx decoders)."""
        import onnx

        from edgemed.calibration.feeds import decoder_feeds
        from edgemed.formats.onnx.int4.grids import ProbeStats
        from edgemed.formats.onnx.parent_stats import ParentStats, builder_graph_mapped

        parent = ctx.runtime.get("decoder_builder") == "genai" and \
            builder_graph_mapped(ctx.cm, onnx.load(str(path), load_external_data=False))
        if ctx.cm.streamed is not None and not parent:  # a probe would run the whole fp32 graph
            raise BadInputError(f"recipe {ctx.recipe.name} with --low-memory", "this decoder graph has MatMuls that "
                                "map to no Linear of the parent, so its calibration statistics need the whole graph",
                                "compress without --low-memory")

        def stats():
            rec: dict = {}
            feeds = decoder_feeds(ctx.cm, ctx.recipe.calibration, self.args.int4.calibration_samples, rec)
            how = "the parent's Linear inputs" if parent else "passes through the fp32 graph"
            ctx.calibration = ctx.calibration or {**rec, "used_by": f"onnx-quantize (int4/int8 mse and gptq grids; "
                                                                    f"statistics from {how})"}
            return ParentStats(ctx.cm, feeds) if parent else ProbeStats(feeds)

        return stats
