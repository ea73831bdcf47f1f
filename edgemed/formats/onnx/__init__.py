"""ONNX backend: three graphs (vision encoder + projector, token embeddings, KV-cache decoder) in the
onnx-community layout, quantized with ONNX Runtime's operators, run by ONNX Runtime.

    steps.py          onnx-export, onnx-quantize (and their typed args)
    export.py         torch.onnx export of the three graphs; genai_decoder.py: the builder's decoder
    quantize.py       the component policy compiled to per-node quantizers
    int4/             int4 algorithms, one registered module each (mse, fmin, gptq, ORT's own)
    graph.py          graph rewrites the quantizers share
    session.py        the runtime session
"""
from __future__ import annotations

from edgemed.formats.base import FormatBackend


class OnnxBackend(FormatBackend):
    name = "onnx"
    # Fitted to bench_memory.py's int4 runs (peak RSS 4.35 / 8.27 GB at 0.88 / 1.58 GB of fp32
    # weights): the source copy the genai builder reads, the fp32 graph, the calibration probe's
    # session and the quantized graph, which the allocator does not all hand back between steps.
    host_transient, host_transient_fixed, host_scratch = 3.7, 0, 1.0
    precisions = frozenset({"fp32", "fp16", "int8", "int4"})
    # compress --low-memory: its streamed phases (torch.onnx tracing the embedding table, the parent's
    # calibration forward, the lm_head's quantization) hold about 3.5 x the largest fp32 tensor.
    # Parity runs the decoder one layer at a time (formats/onnx/layered.py): past
    # external.INLINE_LIMIT it holds the largest run's weights, mapped and MatMulNBits' prepacked copy
    # (1.1 x), beside a VLM's vision tower and embedding table, whole; a graph below the limit is one
    # protobuf, written whole and parsed again (5 x the artifact). Fitted to bench_memory.py's int4
    # --low-memory rows (TinyLlama shape, largest tensor 0.26 GB: 11 layers 1.80 GB peak RSS,
    # 556 MB artifact; 22 layers 1.94 GB, 956 MB, when parity held the whole artifact; 1.75 / 1.78 GB
    # a layer at a time; Mistral-7B: 2.76 GB through the streamed phases, plan 2.74).
    low_memory_stream_factor = 3.5
    LOW_MEMORY_INLINE_FACTOR, LOW_MEMORY_EXTERNAL_FACTOR = 5.0, 1.1

    @classmethod
    def low_memory_parity_bytes(cls, estimate, num_layers: int) -> int:
        from edgemed.formats.onnx.external import INLINE_LIMIT

        if estimate.artifact_bytes <= INLINE_LIMIT:
            return int(cls.LOW_MEMORY_INLINE_FACTOR * estimate.artifact_bytes)
        size = {k: c.bytes for k, c in estimate.components.items()}
        separate = "vision" in size  # a VLM's embedding table is a graph of its own, held whole
        whole = size.get("vision", 0) + size.get("projector", 0) + (size.get("embed", 0) if separate else 0)
        run = max(size.get("language", 0) / max(1, num_layers), size.get("lm_head", 0),
                  0 if separate else size.get("embed", 0))
        return int(cls.LOW_MEMORY_EXTERNAL_FACTOR * (whole + run))

    @classmethod
    def low_memory_session_kwargs(cls, context_tokens: int) -> dict:
        """The decoder one layer at a time (formats/onnx/layered.py): the same logits, one layer's
        weights resident."""
        return {"layered": True}

    # onnx-quantize keeps the embedding table (a Gather, not a MatMul) float or int8 (GatherBlockQuantized).
    component_precisions = {"embed": frozenset({"fp32", "fp16", "int8"})}

    def _quantize_args(self):
        return self.recipe.step_args("onnx-quantize")

    @property
    def activations(self) -> str:
        """What onnx-quantize will make the graph's float type (see steps.onnx_activations)."""
        from edgemed.formats.onnx.args import onnx_activations

        unsafe = getattr(self.shape, "fp16_unsafe", None)
        return onnx_activations(self._quantize_args().activations, self.target, unsafe)[0]

    def int4_layout(self) -> tuple[int, int, int]:
        """MatMulNBits: one scale per block of `block_size` weights along K, in the graph's float
        type (fp32 on a CPU, fp16 on a GPU, where blocks are `fp16_block_size`), plus a 4-bit zero
        point packed two per uint8 when asymmetric (measured with onnxruntime 1.32: block 32
        asymmetric fp32 = 5.125 bits/weight, symmetric = 5.0). Algorithms that store a float per
        block on top of the scale (fmin's block offset, HQQ's float zero point) count it: 6.0 at
        block 32 in fp32, 4.25 at block 128 in fp16."""
        from edgemed.formats.onnx.int4 import INT4_ALGORITHMS

        int4 = self._quantize_args().int4
        fp16 = self.activations == "fp16"
        block = int4.fp16_block_size if fp16 else int4.block_size
        float_bytes = 2 if fp16 else 4
        if INT4_ALGORITHMS.get(int4.algorithm).float_offset:
            return block, float_bytes, float_bytes * 8
        return block, float_bytes, 0 if int4.symmetric else 4

    def bits_per_weight(self, precision: str, in_features: int) -> float:
        """int4 blocks are fitted to K as the quantizer fits them (fit_block); int8 is weight-only
        MatMulNBits by default: 8 + 32 / block (an fp32 scale per block; fp16 where activations
        are fp16: 8 + 16 / block), or per channel with quantize_dynamic (`int8.method: dynamic`)."""
        from edgemed.formats.onnx.graph import fit_block

        if precision == "int4" and in_features > 0:
            block, scale_bytes, zp_bits = self.int4_layout()
            return 4 + (scale_bytes * 8 + zp_bits) / fit_block(in_features, block)
        int8 = self._quantize_args().int8
        if precision == "int8" and int8.method == "nbits":
            return 8 + (16 if self.activations == "fp16" else 32) / int8.block_size
        return super().bits_per_weight(precision, in_features)

    def int8_projections(self) -> list[str]:
        """The CPU layout keeps these language projections at int8 in an int4 model."""
        if self.activations != "fp32":
            return []
        return list(self._quantize_args().int4.int8_projections)

    def kv_copies(self) -> int:
        """A torch.onnx decoder takes past_key_values and returns present = concat(past, new): both
        are in memory while it runs. The builder's GroupQueryAttention updates one cache in place."""
        decoder = self.recipe.step_args("onnx-export").decoder
        return 1 if getattr(self.shape, "builder_decoder", False) and decoder != "torch" else 2

    @classmethod
    def required_files(cls, manifest) -> list[str]:
        """The graphs in onnx/ (layout.py) or, as artifacts written before that layout and the
        TensorRT format keep them, in the folder itself."""
        if any(f.path.rsplit("/", 1)[-1] == "model.onnx" for f in manifest.files):
            return ["*model.onnx", "tokenizer.json"]  # a text LLM's one graph (layout.merge_text_model)
        image = ["vision_encoder.onnx"] if manifest.model and manifest.model.image else []
        graphs = ["decoder_model_merged.onnx", "embed_tokens.onnx", *image]
        return [f"*{name}" for name in graphs] + ["tokenizer.json"]

    def finish(self, ctx) -> None:
        """The graphs into onnx/ and the config files beside them, so that front ends we did not
        write (transformers.js) load the artifact too (layout.py)."""
        from edgemed.formats.onnx.layout import (merge_text_model, move_graphs, tile_vision_input,
                                                  write_front_end_files)

        if ctx.cm.image is None:
            merge_text_model(ctx)
        elif ctx.cm.adapter.vision_input == "tiles":
            tile_vision_input(ctx)
        write_front_end_files(ctx, move_graphs(ctx))

    @classmethod
    def check_files(cls, root, manifest) -> None:
        """Every external-data location an ONNX graph names stays inside the artifact and is a listed
        file: checked here, before ONNX Runtime opens the graph (it would read what a tampered graph
        points at, or fail with its own error)."""
        from edgemed.formats.onnx.graph import check_external_data

        for f in manifest.files:
            if f.path.endswith(".onnx"):
                check_external_data(root, f.path, {g.path for g in manifest.files})

    @classmethod
    def cuda_unavailable_reason(cls, path, manifest) -> str | None:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (pip install onnxruntime-gpu "
                    "in place of onnxruntime; on a Jetson, the JetPack wheel)")
        return None

    @classmethod
    def open_session(cls, path, manifest, **kwargs):
        from edgemed.formats.onnx.session import OnnxSession

        return OnnxSession(path, manifest, **kwargs)
