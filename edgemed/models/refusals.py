"""Models edgemed knows and does not load, with the exact reason (read from each model's own code)
and what would help. Matched on the raw config.json (model_type, architectures), before
transformers is asked to parse a model_type it does not know."""
from __future__ import annotations

from typing import Any

# (predicate on the raw config, reason, fix)
KNOWN: list[tuple[Any, str, str]] = [
    # CheXagent-2's model_type is not known here (its config was not found): its class name decides, first.
    (lambda raw: "CheXagentForCausalLM" in raw.get("architectures", []),
     "CheXagent-2-3b runs only as remote code pinned to transformers 4.40.0 (trust_remote_code) and takes images as "
     "file paths spelled out inside input_ids, which its model opens itself; its projector (fixed sin-cos position "
     "embedding, Linear-GELU-Linear, LayerNorm, a bias-free matrix) and its 1024-token span between <|img|> and "
     "<|/img|> have no transformers class, so edgemed cannot load it without running that code",
     "edgemed does not run a model repository's code by default; a normaliser into the LLaVA family (SigLIP "
     "last layer, its own projector type) is the way to support it"),
    (lambda raw: raw.get("model_type") == "chexagent" or "CheXagentForConditionalGeneration" in raw.get("architectures", []),
     "CheXagent-8b is a BLIP-2 / InstructBLIP-style model: a 12-layer Q-Former whose 128 query tokens cross-attend "
     "to an EVA-ViT's features, prepended to the prompt (no image placeholder); edgemed's families splice projected "
     "vision features at placeholder tokens (LLaVA, Idefics3, Gemma 3) and have no Q-Former (github:Stanford-AIMI/"
     "CheXagent deprecates this model for CheXagent-2-3b)",
     "use a LLaVA-style medical VLM (LLaVA-Med v1.5, MedGemma); a Q-Former family for edgemed is not written yet"),
    (lambda raw: raw.get("model_type") in ("moe_llava_stablelm", "moe_llava_qwen", "moe_llava_qwen1_5", "moe_llava_llama",
                                           "moe_llava_mistral", "moe_llava_minicpm", "llava_stablelm", "llava_qwen",
                                           "llava_qwen1_5", "llava_minicpm"),
     "this is a MoE-LLaVA / Med-MoE checkpoint on a decoder other than Phi-2 (github:jiangsongtao/Med-MoE vendors "
     "StableLM-epoch, Qwen and MiniCPM with remote-code layouts); edgemed normalises the Phi-2 ones (moe_llava_phi, "
     "llava_phi) only",
     "use Med-MoE's Phi-2 checkpoint, or ask for a normaliser for this decoder"),
]


def known_refusal(raw: dict[str, Any]) -> tuple[str, str] | None:
    for matches, reason, fix in KNOWN:
        if matches(raw):
            return reason, fix
    return None
