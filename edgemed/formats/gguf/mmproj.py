"""The vision tower and projector as llama.cpp's `mmproj-*.gguf` (general.architecture = clip),
laid out as the family's MmprojFacts say (edgemed.models: LLaVA "mlp" with SigLIP or CLIP towers,
Idefics3/SmolVLM "idefics3", Gemma 3 "gemma3").

- LLaVA's "mlp" graph runs n_layer-1 vision blocks and applies `v.post_ln` if present: never write
  post_ln for LLaVA, write `clip.vision.feature_layer` whenever vision_feature_layer != -2.
- The projector stays F16 or F32 (Q8_0 on it crashed clip).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemed.errors import BadInputError
from edgemed.formats.gguf import gguf_type_name
from edgemed.formats.gguf.writer import float_type, gguf_py, PlannedTensor, stream_tensors, llama_ftype

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.models import CompositeModel

# clip.cpp reads this key (clip-impl.h KEY_FEATURE_LAYERS); gguf-py 0.19 has no constant for it.
CLIP_FEATURE_LAYER = "clip.vision.feature_layer"


# --- mmproj -------------------------------------------------------------------------------------------
def mmproj_spec(cm: "CompositeModel"):
    """The family's MmprojFacts (edgemed.models.base): how llama.cpp's clip code holds its tower."""
    if cm.adapter.mmproj is None:
        from edgemed.models import FAMILIES

        with_mmproj = [name for name, a in FAMILIES.items() if a.mmproj is not None]
        raise BadInputError(f"{cm.source}: family '{cm.family}'", "has no mmproj writer in edgemed yet",
                            f"use an ONNX recipe for this model (GGUF mmproj: {', '.join(with_mmproj)})")
    return cm.adapter.mmproj


def has_cls_token(cm: "CompositeModel") -> bool:
    """CLIP towers prepend a class token; llama.cpp's clip code mis-orders it (ggml-org/llama.cpp#25814)."""
    vision = cm.components().get("vision")
    return vision is not None and any("class_embedding" in n for n, _ in vision.named_parameters())


def write_mmproj_gguf(cm: "CompositeModel", path: Path, vision_precision: str = "f16",
                      projector_precision: str = "f16") -> dict[str, Any]:
    gguf = gguf_py()
    T = gguf.GGMLQuantizationType
    if cm.image is None:
        raise BadInputError(cm.source, "is text-only", "mmproj is written only for vision-language models")
    spec = mmproj_spec(cm)
    cfg, vc = cm.config, cm.config.vision_config
    tc = cm.adapter.text_config(cfg)
    w = gguf.GGUFWriter(path, "clip")
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(f"mmproj {Path(cm.source).name or cm.source}")
    w.add_file_type(int(llama_ftype(vision_precision)))
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(spec.projector_type)
    w.add_vision_projection_dim(int(tc.hidden_size))
    w.add_vision_image_size(int(vc.image_size))
    w.add_vision_patch_size(int(vc.patch_size))
    w.add_vision_embedding_length(int(vc.hidden_size))
    w.add_vision_feed_forward_length(int(vc.intermediate_size))
    w.add_vision_block_count(int(vc.num_hidden_layers))
    w.add_vision_head_count(int(vc.num_attention_heads))
    w.add_vision_attention_layernorm_eps(float(getattr(vc, "layer_norm_eps", 1e-6)))
    w.add_vision_image_mean([float(x) for x in cm.image.image_mean])
    w.add_vision_image_std([float(x) for x in cm.image.image_std])
    act = getattr(vc, "hidden_act", "gelu")
    # clip.cpp: use_gelu -> tanh GELU, use_silu -> SiLU, neither -> quick GELU (CLIP's quick_gelu).
    if act.startswith("gelu"):
        w.add_vision_use_gelu(True)
    elif act == "silu":
        w.add_vision_use_silu(True)
    elif act != "quick_gelu":
        raise BadInputError(f"{cm.source}: vision hidden_act '{act}'", "clip.cpp has no such activation",
                            "use an ONNX recipe for this model")
    if spec.projector_type == "mlp":
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int):
            raise BadInputError(f"{cm.source}: vision_feature_layer {layer}", "several feature layers are not supported",
                                "use an ONNX recipe for this model")
        if layer != -2:
            # clip.cpp counts hidden states from 0 (= the embeddings) and wants non-negative indices.
            w.add_array(CLIP_FEATURE_LAYER, [layer if layer >= 0 else vc.num_hidden_layers + 1 + layer])
    elif spec.projector_type == gguf.VisionProjectorType.IDEFICS3:
        w.add_vision_projector_scale_factor(int(cfg.scale_factor))
        w.add_vision_preproc_image_size(int(vc.image_size))
    elif spec.projector_type == gguf.VisionProjectorType.GEMMA3:
        # The pooling factor from patches per side to image tokens per side (clip.cpp assumes 4).
        factor = (vc.image_size // vc.patch_size) // int(round(math.sqrt(cfg.mm_tokens_per_image)))
        if factor != 4:
            w.add_vision_projector_scale_factor(int(factor))

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, vc.num_hidden_layers)
    comps = cm.components()
    planned: list[PlannedTensor] = []
    proj_prec = "f32" if gguf_type_name(projector_precision) == "f32" else "f16"
    for hf_name, p in comps["vision"].named_parameters():
        if hf_name.startswith("head.") or ".head." in hf_name:
            continue  # SigLIP's pooling head: unused by LLaVA, Idefics3 and Gemma 3
        full = spec.vision_prefixes[0] + hf_name
        new = None
        for prefix in spec.vision_prefixes:
            new = names.get_name(prefix + hf_name, try_suffixes=(".weight", ".bias"))
            if new is not None:
                break
        if new is None:
            raise BadInputError(f"{cm.source}: vision tensor {full}", "has no clip.cpp name",
                                "use an ONNX recipe for this model")
        if new.startswith(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_POST_NORM]) and not spec.write_post_ln:
            continue
        shape = tuple(p.shape)
        if len(shape) < 2:
            qt = T.F32
        elif "patch_embd" in new:
            qt = T.F32 if gguf_type_name(vision_precision) == "f32" else T.F16
        elif "position_embd" in new or "class_embd" in new:
            qt = T.F32
        else:
            qt = float_type(vision_precision, len(shape), shape[-1])
        planned.append(PlannedTensor(new, shape, qt, cm.weight_reader(p)))
    for hf_name, p in comps["projector"].named_parameters():
        new = _projector_name(gguf, names, spec, hf_name)
        shape = tuple(p.shape)
        make = cm.weight_reader(p)
        if spec.projector_type == gguf.VisionProjectorType.GEMMA3 and "soft_emb_norm" in new:
            make = (lambda f: (lambda: f() + 1.0))(make)  # Gemma RMSNorm stores w - 1
        planned.append(PlannedTensor(new, shape, float_type(proj_prec, len(shape), shape[-1]), make))
    stream_tensors(w, planned)
    return {"tensors": len(planned), "projector_type": spec.projector_type, "cls_token": has_cls_token(cm)}


def _projector_name(gguf, names, spec, hf_name: str) -> str:
    if spec.projector_type == "mlp":
        # LLaVA's two linears are clip.cpp's mm.0 and mm.2 (the GELU sits at index 1).
        idx = {"linear_1": 0, "linear_2": 2}[hf_name.split(".")[0]]
        base = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ].format(bid=idx)
        return f"{base}.{hf_name.rsplit('.', 1)[1]}"
    if spec.projector_type == gguf.VisionProjectorType.GEMMA3:
        # Gemma 3 keeps its projection as a bare parameter (mm_input_projection_weight).
        hf_name = hf_name.replace("_weight", ".weight")
        new = names.get_name("multi_modal_projector." + hf_name, try_suffixes=(".weight", ".bias"))
    else:
        new = names.get_name("model.connector." + hf_name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise BadInputError(f"projector tensor {hf_name}", "has no clip.cpp name", "use an ONNX recipe for this model")
    return new
