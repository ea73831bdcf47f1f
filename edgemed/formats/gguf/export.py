"""CompositeModel -> llama.cpp files: one language-model GGUF and one `mmproj-*.gguf` (clip).

    model-f32.gguf     the decoder (token_embd, blk.N.*, output_norm, output), its hyperparameters,
                       tokenizer (GPT-2 byte-level BPE or SentencePiece-style) and chat template
    mmproj-f16.gguf    vision tower + projector, `general.architecture = clip`, for llama.cpp's mtmd
                       (LLaVA "mlp" with SigLIP or CLIP towers, Idefics3/SmolVLM "idefics3", Gemma 3 "gemma3")

The writers: language.py (decoder + tokenizer.py), mmproj.py (clip), over writer.py's streaming
GGUF writer (tensor names from gguf-py's own map; peak extra memory one tensor, not the model).
Facts about llama.cpp's loaders are checked against the llama.cpp vendored by llama-cpp-python
(/work/shared/REFERENCE.md "llama.cpp multimodal") and written beside the code they shape.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemed.formats.gguf import gguf_type_name
from edgemed.formats.gguf.language import text_arch, write_language_gguf
from edgemed.formats.gguf.mmproj import mmproj_spec, write_mmproj_gguf

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
        mmproj_spec(cm)
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
