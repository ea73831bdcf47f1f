"""TensorRT target: TensorRT-ready Q/DQ ONNX plus build profiles; engines are built on the device.

TensorRT engines are specific to the GPU and the TensorRT version, so the host writes everything up
to the engine (as TensorRT Edge-LLM does) and `edgemed build-engine` finishes on the device:

    vision_encoder.onnx / embed_tokens.onnx / decoder_model_merged.onnx   torch.onnx graphs (the
        genai builder's GroupQueryAttention and MatMulNBits are ONNX Runtime contrib ops that
        TensorRT's parser rejects), quantized per the component policy in explicit Q/DQ form:
          int8  QuantizeLinear/DequantizeLinear on activations and weights (quantize_static, QDQ,
                symmetric, per-channel weights, no bias quantization, MatMul/Conv/Gemm with constant
                weights only, calibrated on a small deterministic image+prompt set)
          fp8   the same with FLOAT8E4M3FN (per-tensor scales; Ada, Hopper, Thor)
          int4  weight-only DequantizeLinear blocks (INT4 initializers, block_size along K), which
                TensorRT 10 reads as INT4 weight-only (W4A16)
          fp16  ONNX Runtime's float16 converter (inputs and outputs stay fp32)
    trt_profiles.json   min/opt/max shapes per graph input, precision flags and workspace bytes
                        (also in manifest.json under runtime.trt)

Why symmetric MatMul/Conv/Gemm-only Q/DQ: TensorRT fuses Q/DQ into its int8 kernels only for
symmetric scales without zero points, and a Hugging Face decoder's attention-mask `Add` (a large
negative bias) must stay out of Q/DQ or calibration returns inf scales.
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any

from edgemed.errors import BadInputError, EdgemedError
from edgemed.formats.tensorrt import TensorrtBackend
from edgemed.formats.onnx.graph import graph_component
from edgemed.formats.tensorrt.args import PROFILES_FILE, TrtExportArgs
from edgemed.formats.tensorrt.profiles import build_profiles, validate_profiles
from edgemed.formats.tensorrt.qdq import qdq_graph, qdq_precisions
from edgemed.steps import Step

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.context import Context

log = logging.getLogger(__name__)

class TensorrtExport(Step):
    name = "tensorrt-export"
    stage = "export"
    formats = ("tensorrt",)
    summary = "Q/DQ ONNX (int8/fp8/int4 weight-only/fp16 per component) + TensorRT build profiles; engines built on the device"
    Args = TrtExportArgs

    def run(self, ctx: "Context") -> None:
        from edgemed.formats.onnx.export import export_onnx

        policy = ctx.recipe.policy
        if policy.embed not in TensorrtBackend.component_precisions["embed"]:
            raise BadInputError(f"recipe {ctx.recipe.name}: policy.embed", f"'{policy.embed}' is not supported "
                                "for the embedding table (a Gather, not a MatMul)", "use fp32 or fp16 for embed")
        ctx.runtime["decoder_builder"] = "torch"
        ctx.runtime["kv_cache"] = "concat"
        ctx.notes.append("decoder graph written by torch.onnx (dynamo): TensorRT cannot parse the genai builder's contrib ops")
        names, _, note = export_onnx(ctx.cm, ctx.work_dir, opset=self.args.opset, progress=ctx.progress,
                                     decoder_builder="torch")
        ctx.notes.append(note)
        samples = None
        calibrated = ("int8", "fp8", "int4") if self.args.int4_algorithm == "awq_clip" else ("int8", "fp8")
        if any(getattr(policy, c) in calibrated for c in ("vision", "projector", "language", "lm_head")):
            ctx.progress("calibration feeds")
            samples, ctx.calibration = calibration_feeds(ctx, self.args.calibration_samples)
        for name in names:
            ctx.progress(f"Q/DQ {name}")
            precisions = qdq_graph(ctx.work_dir / name, policy, self.args, samples.get(name) if samples else None)
            ctx.describe(name, component=graph_component(name), fmt="onnx",
                         precision="+".join(sorted(set(precisions.values()))) or "fp32")
        profiles = build_profiles(ctx.work_dir, ctx.cm.text.to_dict(), ctx.cm.image.to_dict() if ctx.cm.image else None,
                                  {n: qdq_precisions(ctx.work_dir / n, policy) for n in names}, self.args,
                                  usable_memory_gb=ctx.target.usable_memory_gb)
        if (ctx.runtime.get("sparsity") or {}).get("pattern") == "2:4":
            # 2:4 weights (prune-sparse): let TensorRT pick its sparse tensor-core kernels (Ampere+).
            for name, entry in profiles["graphs"].items():
                if name == "decoder_model_merged.onnx":
                    entry["precision_flags"] = sorted({*entry["precision_flags"], "SPARSE_WEIGHTS"})
        problems = validate_profiles(profiles, ctx.work_dir)
        if problems:
            raise EdgemedError("tensorrt-export wrote invalid build profiles: " + "; ".join(problems))
        (ctx.work_dir / PROFILES_FILE).write_text(json.dumps(profiles, indent=2))
        ctx.describe(PROFILES_FILE, component="trt-profiles", fmt="json", precision=None)
        ctx.runtime["trt"] = {"profiles_file": PROFILES_FILE, **profiles, "engines": None, "build": None}


# --- calibration ---------------------------------------------------------------------------------

def calibration_feeds(ctx: "Context", count: int, samples: list[tuple[Any, str]] | None = None,
                      source: str | None = None) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """Real inputs for each graph. `samples` is [(PIL image or None, prompt)], e.g. from a
    calibration set; by default a small deterministic set: synthetic radiographs
    (edgemed.calibration.builtin.synthetic_test_image, one seed per sample) and built-in prompts, half with the
    image. The fp32 graphs just written produce the decoder's inputs_embeds, so the decoder is
    calibrated on exactly what it will see (prefill with an empty past)."""
    import numpy as np

    from edgemed.calibration.builtin import QDQ_CALIBRATION_PROMPTS, synthetic_test_image
    from edgemed.artifact import Manifest, ModelRecord
    from edgemed.formats.onnx.session import OnnxSession

    cm = ctx.cm
    ctx.cm.tokenizer.save_pretrained(ctx.work_dir)  # the session needs tokenizer.json; compress writes it again
    manifest = Manifest(model=ModelRecord(text=cm.text.to_dict(), image=cm.image.to_dict() if cm.image else None,
                                          chat_template=cm.chat_template), runtime={"kv_cache": "concat"})
    session = OnnxSession(ctx.work_dir, manifest)
    dec_inputs = {i.name for i in session.decoder.get_inputs()}
    feeds: dict[str, list[dict]] = {"vision_encoder.onnx": [], "embed_tokens.onnx": [], "decoder_model_merged.onnx": []}
    listing = []
    if samples is None:
        samples = [(synthetic_test_image(size=max(96, cm.image.image_size), seed=i) if cm.multimodal and i % 2 == 0
                    else None, QDQ_CALIBRATION_PROMPTS[i % len(QDQ_CALIBRATION_PROMPTS)]) for i in range(count)]
        names = [f"synthetic_test_image(seed={i})" if img is not None else "text" for i, (img, _) in enumerate(samples)]
    else:
        names = [f"image[{i}]" if img is not None else "text" for i, (img, _) in enumerate(samples)]
    for i, (image, prompt) in enumerate(samples):
        with_image = cm.multimodal and image is not None
        feats = None
        if with_image:
            pv = session.pixel_values(image)
            feeds["vision_encoder.onnx"].append({"pixel_values": pv})
            feats = session.encode_image(pv)
        ids = session.prompt_ids(prompt, with_image, session.image_grid(image) if with_image else (0, 0))
        feeds["embed_tokens.onnx"].append({"input_ids": ids[None]})
        embeds = session.input_embeds(ids, feats)
        s = len(ids)
        dec = {"inputs_embeds": embeds, "attention_mask": np.ones((1, s), np.int64),
               "position_ids": np.arange(s, dtype=np.int64)[None]}
        if "token_type_ids" in dec_inputs:
            dec["token_type_ids"] = (ids == cm.image.image_token_id).astype(np.int64)[None] if cm.image else np.zeros((1, s), np.int64)
        dec.update(session.empty_past().arrays)
        feeds["decoder_model_merged.onnx"].append(dec)
        listing.append(f"{names[i] if with_image else 'text'}|{prompt}")
    del session
    record = {"source": source or "edgemed built-in: synthetic radiographs (edgemed.calibration.builtin.synthetic_test_image) + prompts",
              "count": len(samples), "modalities": ["image", "text"] if cm.multimodal else ["text"],
              "sha256": hashlib.sha256("\n".join(listing).encode()).hexdigest(), "used_by": "tensorrt-export (int8/fp8 activation scales)"}
    return feeds, record
