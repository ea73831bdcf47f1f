"""The language model as one GGUF llama.cpp loads directly: hyperparameters, tokenizer
(tokenizer.py) and every decoder tensor under gguf-py's names, streamed (writer.py).

What llama.cpp's loaders expect (checked against the llama.cpp vendored by llama-cpp-python):
- Llama-family attention (llama, mistral) applies RoPE to adjacent pairs, Hugging Face to the two
  halves of each head, so q/k rows are permuted per head (`permute_qk`); Qwen2/Phi3/Gemma3 use NEOX
  RoPE in llama.cpp and need no permutation (DecoderFacts.gguf_permute_qk, edgemed.models).
- Gemma 3 stores RMSNorm weights as w - 1 (llama.cpp wants w), hard-codes 5 sliding : 1 global
  layers and scales attention by 1/sqrt(head_dim): models that differ are refused, not written.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from edgemed.errors import BadInputError
from edgemed.formats.gguf.tokenizer import write_tokenizer
from edgemed.formats.gguf.writer import float_type, gguf_py, PlannedTensor, stream_tensors, llama_ftype

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.models import CompositeModel


# --- supported text architectures -----------------------------------------------------------------
@dataclass(frozen=True)
class TextArch:
    arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool  # llama.cpp's RoPE for this arch rotates adjacent pairs (see module doc)
    norm_shift: float = 0.0  # Gemma stores RMSNorm weights as w - 1


def text_arch(cm: "CompositeModel") -> TextArch:
    """The llama.cpp architecture of the model's text decoder, from the facts its family registers."""
    from edgemed.models import decoder_facts
    from edgemed.models.base import decoders_with

    mt = cm.adapter.text_config(cm.config).model_type
    facts = decoder_facts(mt)
    if facts is not None and facts.gguf_missing:
        raise BadInputError(f"{cm.source}: language model '{mt}'", f"cannot be written as GGUF: {facts.gguf_missing}",
                            "use an ONNX recipe (int8, int4) for this model")
    if facts is None or facts.gguf_arch is None:
        raise BadInputError(
            f"{cm.source}: language model '{mt}'",
            "has no GGUF writer in edgemed (llama.cpp support for it is not wired here)",
            f"use an ONNX recipe (int8, int4) for this model; GGUF supports decoders {', '.join(decoders_with('gguf_arch'))}",
        )
    return TextArch(facts.gguf_arch, facts.gguf_permute_qk, facts.gguf_norm_shift)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face q/k rows (per head: all first halves, then all second halves of the rotary pairs)
    -> llama.cpp's interleaved pairs. Works for weights [rows, cols] and biases [rows]."""
    rows = w.shape[0]
    head_dim = rows // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- language model ---------------------------------------------------------------------------------
def _rope(tc) -> dict[str, Any]:
    rp = dict(getattr(tc, "rope_parameters", None) or {})
    if "full_attention" in rp:  # per-layer-type parameters (Gemma 3)
        rp = dict(rp["full_attention"])
    legacy = getattr(tc, "rope_scaling", None) or {}
    if isinstance(legacy, dict):
        for k, v in legacy.items():
            rp.setdefault(k, v)
    rp.setdefault("rope_theta", getattr(tc, "rope_theta", 10000.0))
    rp.setdefault("rope_type", rp.get("type", "default"))
    return rp


def _llama3_rope_factors(rp: dict[str, Any], head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's rope scaling, as llama.cpp's `rope_freqs` tensor holds them."""
    base = rp["rope_theta"]
    factor = rp.get("factor", 8.0)
    lo, hi = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old_ctx = rp.get("original_max_position_embeddings", 8192)
    inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    out = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / hi, 1.0, out)
    out = np.where(wavelen > old_ctx / lo, factor, out)
    return out.astype(np.float32)


def _write_text_hparams(w, cm: "CompositeModel", arch: TextArch, tc) -> list[PlannedTensor]:
    gguf = gguf_py()
    heads = tc.num_attention_heads
    kv_heads = getattr(tc, "num_key_value_heads", None) or heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    w.add_context_length(int(tc.max_position_embeddings))
    w.add_embedding_length(int(tc.hidden_size))
    w.add_feed_forward_length(int(tc.intermediate_size))
    w.add_block_count(int(tc.num_hidden_layers))
    w.add_head_count(int(heads))
    w.add_head_count_kv(int(kv_heads))
    w.add_layer_norm_rms_eps(float(getattr(tc, "rms_norm_eps", 1e-6)))
    w.add_vocab_size(int(tc.vocab_size))
    w.add_rope_dimension_count(int(head_dim * getattr(tc, "partial_rotary_factor", 1.0)))
    if head_dim != tc.hidden_size // heads or arch.arch == "GEMMA3":
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
    if arch.arch == "GEMMA3":
        _gemma3_hparams(w, cm, tc, head_dim)
    rp = _rope(tc)
    w.add_rope_freq_base(float(rp["rope_theta"]))
    extra: list[PlannedTensor] = []
    rtype = (rp.get("rope_type") or "default").lower()
    if rtype == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rp["factor"]))
    elif rtype == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rp["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rp["original_max_position_embeddings"]))
    elif rtype == "llama3":
        factors = _llama3_rope_factors(rp, head_dim)
        extra.append(PlannedTensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.shape,
                              gguf.GGMLQuantizationType.F32, lambda: factors))
    elif rtype != "default":
        raise BadInputError(f"{cm.source}: rope_type '{rtype}'", "has no GGUF mapping in edgemed",
                            "use an ONNX recipe for this model, or a model with default/linear/yarn/llama3 RoPE")
    if arch.arch == "QWEN2MOE":
        w.add_expert_count(int(tc.num_experts))
        w.add_expert_used_count(int(tc.num_experts_per_tok))
        w.add_expert_feed_forward_length(int(tc.moe_intermediate_size))
        w.add_expert_shared_feed_forward_length(int(tc.shared_expert_intermediate_size))
        if tc.norm_topk_prob:  # llama.cpp's qwen2moe graph never renormalises the top-k weights
            raise BadInputError(f"{cm.source}: norm_topk_prob", "llama.cpp's qwen2moe graph does not renormalise",
                                "use an ONNX recipe for this model")
    if arch.arch == "PHI3":
        w.add_rope_scaling_orig_ctx_len(int(getattr(tc, "original_max_position_embeddings", None)
                                            or tc.max_position_embeddings))
        if getattr(tc, "sliding_window", None):
            w.add_sliding_window(int(tc.sliding_window))
    return extra


def _gemma3_hparams(w, cm: "CompositeModel", tc, head_dim: int) -> None:
    # llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 62-layer 27B) and
    # ignores query_pre_attn_scalar; a model that sets it otherwise would be silently wrong.
    qpas = getattr(tc, "query_pre_attn_scalar", head_dim)
    expected = tc.hidden_size // tc.num_attention_heads if tc.num_hidden_layers == 62 else head_dim
    if qpas != expected:
        raise BadInputError(f"{cm.source}: query_pre_attn_scalar {qpas}",
                            f"llama.cpp's gemma3 graph scales attention by 1/sqrt({expected})",
                            "use an ONNX recipe for this model")
    if getattr(tc, "attn_logit_softcapping", None):
        raise BadInputError(f"{cm.source}: attn_logit_softcapping", "llama.cpp's gemma3 graph has none",
                            "use an ONNX recipe for this model")
    if getattr(tc, "final_logit_softcapping", None):
        w.add_final_logit_softcapping(float(tc.final_logit_softcapping))
    rp = getattr(tc, "rope_parameters", None) or {}
    types = list(getattr(tc, "layer_types", None) or [])
    if tc.sliding_window and "sliding_attention" in types:
        # llama.cpp's gemma3 hard-codes 5 sliding layers then 1 global; refuse another layout.
        if types != ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(len(types))]:
            raise BadInputError(f"{cm.source}: layer_types", "not Gemma 3's 5 local : 1 global pattern",
                                "use an ONNX recipe for this model")
        w.add_sliding_window(int(tc.sliding_window))
        if "sliding_attention" in rp:
            w.add_rope_freq_base_swa(float(rp["sliding_attention"]["rope_theta"]))


def language_tensors(cm: "CompositeModel") -> Iterator[tuple[str, str, Any]]:
    """(hf_name, gguf_name, parameter) for every language-model tensor, in file order."""
    gguf = gguf_py()
    arch = text_arch(cm)
    tc = cm.adapter.text_config(cm.config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.arch], tc.num_hidden_layers)
    lm = cm.adapter.language_model(cm.model)
    head = cm.adapter.lm_head(cm.model)
    embed = cm.adapter.embed_tokens(cm.model)
    for hf_name, p in lm.named_parameters():
        if hf_name.endswith("mlp.experts.gate_up_proj"):  # fused [E, 2r, H]: llama.cpp keeps gate and up apart
            stem = "model." + hf_name[: -len("gate_up_proj")]
            half = p.shape[1] // 2
            yield hf_name + "[gate]", names.get_name(stem + "gate_proj.weight", try_suffixes=(".weight",)), p[:, :half]
            yield hf_name + "[up]", names.get_name(stem + "up_proj.weight", try_suffixes=(".weight",)), p[:, half:]
            continue
        # The decoder's own parameter names, or the checkpoint's (model.*) where gguf-py knows only those.
        # A bare nn.Parameter (fused experts' down_proj) is named like a Linear's weight.
        query = hf_name if hf_name.endswith((".weight", ".bias")) else hf_name + ".weight"
        new = (names.get_name(query, try_suffixes=(".weight", ".bias"))
               or names.get_name("model." + query, try_suffixes=(".weight", ".bias")))
        if new is None:
            raise BadInputError(f"{cm.source}: tensor {hf_name}", "has no llama.cpp name for this architecture",
                                "this checkpoint has layers llama.cpp's graph does not know; use an ONNX recipe")
        yield hf_name, new, p
    tied = head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr()
    if not tied or arch.arch == "QWEN2MOE":  # llama.cpp's qwen2moe loader requires output.weight
        yield "lm_head.weight", names.get_name("lm_head.weight", try_suffixes=(".weight",)), head.weight


def _model_name(cm: "CompositeModel") -> str:
    name = Path(cm.source).name or cm.source
    # llama.cpp sets token attributes by general.name: a name containing "phi3"/"phi-3" makes it look
    # up "</s>", "<unk>", "<s>" and "<|endoftext|>" and abort when one is missing (llama-vocab.cpp).
    vocab = cm.tokenizer.get_vocab()
    if not all(t in vocab for t in ("</s>", "<unk>", "<s>", "<|endoftext|>")):
        import re

        name = re.sub(r"phi-?3", "phi_3", name, flags=re.IGNORECASE)
    return name


def write_language_gguf(cm: "CompositeModel", path: Path, precision: str = "f32") -> dict[str, Any]:
    """The decoder, hyperparameters and tokenizer as one GGUF llama.cpp loads directly."""
    gguf = gguf_py()
    arch = text_arch(cm)
    tc = cm.adapter.text_config(cm.config)
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.arch]])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(_model_name(cm))
    ftype = llama_ftype(precision)
    w.add_file_type(int(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    planned = _write_text_hparams(w, cm, arch, tc)
    vocab_info = write_tokenizer(w, cm, tc)
    heads = tc.num_attention_heads
    kv_heads = getattr(tc, "num_key_value_heads", None) or heads
    for hf_name, new, p in language_tensors(cm):
        make = cm.weight_reader(p)
        if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            make = (lambda f: (lambda: permute_qk(f(), heads)))(make)
        elif arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            make = (lambda f: (lambda: permute_qk(f(), kv_heads)))(make)
        if arch.norm_shift and new.endswith("norm.weight"):
            make = (lambda f: (lambda: f() + arch.norm_shift))(make)
        shape = tuple(p.shape)
        if new.endswith("ffn_gate_inp_shexp.weight"):  # Linear(H, 1): llama.cpp wants a vector {n_embd}
            shape = shape[1:]
            make = (lambda f: (lambda: f().reshape(-1)))(make)
        planned.append(PlannedTensor(new, shape, float_type(precision, len(shape), shape[-1]), make))
    stream_tensors(w, planned)
    return {"tensors": len(planned), **vocab_info}
