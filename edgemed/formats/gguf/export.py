"""CompositeModel -> llama.cpp files: one language-model GGUF and one `mmproj-*.gguf` (clip).

    model-f32.gguf     the decoder (token_embd, blk.N.*, output_norm, output), its hyperparameters,
                       tokenizer (GPT-2 byte-level BPE or SentencePiece-style) and chat template
    mmproj-f16.gguf    vision tower + projector, `general.architecture = clip`, for llama.cpp's mtmd
                       (LLaVA "mlp" with SigLIP or CLIP towers, Idefics3/SmolVLM "idefics3", Gemma 3 "gemma3")

Tensor names come from gguf-py's own map (`gguf.get_tensor_name_map`) and constants; edgemed keeps
no second name table. Tensors are streamed: every tensor's header is declared first, then each
tensor is converted and written on its own, so peak extra memory is one tensor, not the model.

Facts about what llama.cpp's loaders expect (checked against the llama.cpp vendored by
llama-cpp-python, see /work/shared/REFERENCE.md "llama.cpp multimodal"):
- Llama-family attention (llama, mistral) applies RoPE to adjacent pairs, Hugging Face to the two
  halves of each head, so q/k rows are permuted per head (`permute_qk`); Qwen2/Phi3/Gemma3 use NEOX
  RoPE in llama.cpp and need no permutation.
- Gemma 3 stores RMSNorm weights as w - 1 (llama.cpp wants w), hard-codes 5 sliding : 1 global
  layers and scales attention by 1/sqrt(head_dim): models that differ are refused, not written.
- LLaVA's "mlp" graph runs n_layer-1 vision blocks and applies `v.post_ln` if present: never write
  post_ln for LLaVA, write `clip.vision.feature_layer` whenever vision_feature_layer != -2.
- The projector stays F16 or F32 (Q8_0 on it crashed clip).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemed.formats.gguf import gguf_type_name
from edgemed.formats.gguf.language import text_arch, write_language_gguf
from edgemed.formats.gguf.mmproj import _mmproj_spec, write_mmproj_gguf

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.models import CompositeModel


# --- entry point --------------------------------------------------------------------------------------
def export_gguf(cm: "CompositeModel", out_dir: Path, precision: str = "f32", vision_precision: str = "f16",
                projector_precision: str = "f16", progress=None) -> list[dict[str, Any]]:
    """Write model-<precision>.gguf (+ mmproj-<vision precision>.gguf for a VLM) into out_dir.
    Returns one record per file: path (relative), component, precision, and writer facts."""
    say = progress or (lambda msg: None)
    text_arch(cm)  # refuse unsupported decoders before writing anything
    if cm.multimodal:
        _mmproj_spec(cm)
    out_dir.mkdir(parents=True, exist_ok=True)
    prec = gguf_type_name(precision)
    records = []
    name = f"model-{prec}.gguf"
    say(f"write {name}")
    info = write_language_gguf(cm, out_dir / name, prec)
    records.append({"path": name, "component": "embed+language+lm_head", "precision": prec, **info})
    if cm.multimodal:
        vprec = gguf_type_name(vision_precision)
        name = f"mmproj-{vprec}.gguf"
        say(f"write {name}")
        info = write_mmproj_gguf(cm, out_dir / name, vprec, projector_precision)
        records.append({"path": name, "component": "vision+projector", "precision": vprec, **info})
    return records
