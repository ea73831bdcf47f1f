"""Text-only decoder LLMs (Llama, Mistral, Qwen2, Phi-3; Qwen2-MoE as written by edgemed's MoE
distillation), and the facts edgemed knows about each decoder architecture."""
from __future__ import annotations

from edgemed.models.base import Adapter, DecoderFacts, register_decoder


class DecoderAdapter(Adapter):
    """Text-only decoder LLMs (Llama, Mistral, Qwen2, Phi3; Qwen2-MoE as written by edgemed's MoE
    distillation): no vision graph."""

    family = "decoder"
    model_types = ("llama", "mistral", "qwen2", "phi3", "qwen2_moe")
    multimodal = False

    @classmethod
    def model_class(cls):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    @classmethod
    def components(cls, model):
        return {"embed": model.model.embed_tokens, "language": model.model, "lm_head": model.lm_head}

    @classmethod
    def language_model(cls, model):
        return model.model


# Phi-3 fuses gate_up_proj, so pruning and MoE distillation refuse it rather than half-handle it.
# qwen2_moe is what edgemed's MoE distillation writes (Llama/Qwen2 attention in that layout).
register_decoder(DecoderFacts(gguf_arch="LLAMA", gguf_permute_qk=True, builder_arch="LlamaForCausalLM",
                              transforms=("prune", "moe")), "llama")
register_decoder(DecoderFacts(gguf_arch="LLAMA", gguf_permute_qk=True, builder_arch="MistralForCausalLM",
                              transforms=("prune", "moe")), "mistral")
register_decoder(DecoderFacts(gguf_arch="QWEN2", builder_arch="Qwen2ForCausalLM", transforms=("prune", "moe"),
                              qkv_bias=True), "qwen2")
register_decoder(DecoderFacts(gguf_arch="QWEN2MOE"), "qwen2_moe")
register_decoder(DecoderFacts(gguf_arch="PHI3", builder_arch="Phi3ForCausalLM"), "phi3")
