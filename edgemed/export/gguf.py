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

import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from edgemed.errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.models import CompositeModel

log = logging.getLogger(__name__)


# --- precision names -> gguf-py enums ------------------------------------------------------------
def _gguf():
    import gguf

    return gguf


def _canonical(precision: str) -> str:
    from edgemed.plan import GGUF_TYPE_FOR

    p = precision.lower()
    return GGUF_TYPE_FOR.get(p, p)


def ggml_type(precision: str):
    """The ggml tensor type a policy precision names (q4_k_m -> Q4_K, int8 -> Q8_0, fp16 -> F16)."""
    gguf = _gguf()
    name = _canonical(precision).upper()
    for suffix in ("_M", "_S", "_L"):
        if name.endswith(suffix) and "_K" in name:
            name = name[: -len(suffix)]
    try:
        return gguf.GGMLQuantizationType[name]
    except KeyError:
        raise BadInputError(f"precision '{precision}'", "is not a llama.cpp tensor type",
                            "use f32, f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, iq4_xs, ...") from None


def llama_ftype(precision: str):
    """The llama.cpp file type (quantization mixture) a policy precision names."""
    gguf = _gguf()
    name = _canonical(precision).upper()
    key = "ALL_F32" if name == "F32" else f"MOSTLY_{name}"
    try:
        return gguf.LlamaFileType[key]
    except KeyError:
        raise BadInputError(f"precision '{precision}'", "is not a llama.cpp file type",
                            "use f32, f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, iq4_xs, ...") from None


# --- supported text architectures -----------------------------------------------------------------
@dataclass(frozen=True)
class TextArch:
    arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool  # llama.cpp's RoPE for this arch rotates adjacent pairs (see module doc)
    norm_shift: float = 0.0  # Gemma stores RMSNorm weights as w - 1


TEXT_ARCHS: dict[str, TextArch] = {
    "llama": TextArch("LLAMA", True),
    "mistral": TextArch("LLAMA", True),
    "qwen2": TextArch("QWEN2", False),
    # edgemed's MoE distillation (steps/moe.py) writes Llama/Qwen2 attention into this layout
    "qwen2_moe": TextArch("QWEN2MOE", False),
    "phi3": TextArch("PHI3", False),
    "gemma3": TextArch("GEMMA3", False, norm_shift=1.0),
    "gemma3_text": TextArch("GEMMA3", False, norm_shift=1.0),
}


def text_arch(cm: "CompositeModel") -> TextArch:
    mt = cm.adapter.text_config(cm.config).model_type
    if mt not in TEXT_ARCHS:
        raise BadInputError(
            f"{cm.source}: language model '{mt}'",
            "has no GGUF writer in edgemed (llama.cpp support for it is not wired here)",
            f"use an ONNX recipe (int8, int4) for this model; GGUF supports decoders {', '.join(TEXT_ARCHS)}",
        )
    return TEXT_ARCHS[mt]


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face q/k rows (per head: all first halves, then all second halves of the rotary pairs)
    -> llama.cpp's interleaved pairs. Works for weights [rows, cols] and biases [rows]."""
    rows = w.shape[0]
    head_dim = rows // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- streaming writer -----------------------------------------------------------------------------
@dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    make: Callable[[], np.ndarray]  # float32 data, produced only when written


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    gguf = _gguf()
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * type_size


def _stream(writer, planned: list[_Planned]) -> None:
    """Declare every tensor, write header/KV/tensor infos, then convert and write one at a time."""
    gguf = _gguf()
    for t in planned:
        if t.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dt = np.float32 if t.qtype == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(t.name, t.shape, np.dtype(dt), _nbytes(t.shape, t.qtype))
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
            writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), _nbytes(t.shape, t.qtype), raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in planned:
        data = np.ascontiguousarray(t.make(), dtype=np.float32).reshape(t.shape)
        if t.qtype == gguf.GGMLQuantizationType.F16:
            data = data.astype(np.float16)
        elif t.qtype != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(data, t.qtype)
        writer.write_tensor_data(data)
        del data
    writer.close()


def _np(param) -> Callable[[], np.ndarray]:
    return lambda: param.detach().float().cpu().numpy()


def _float_type(precision: str, ndim: int, cols: int):
    """Tensor type the writer itself stores: 1-D tensors F32; 2-D at f16/f32, or Q8_0 where the
    policy asks for 8 bits and the rows fit Q8_0's 32-blocks (gguf-py's own Q8_0 quantizer)."""
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    if ndim < 2:
        return T.F32
    t = ggml_type(precision)
    if t in (T.F32, T.F16):
        return t
    if t == T.BF16:
        return T.F16
    if t == T.Q8_0 and cols % 32 == 0:
        return T.Q8_0
    return T.F16


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


def _write_text_hparams(w, cm: "CompositeModel", arch: TextArch, tc) -> list[_Planned]:
    gguf = _gguf()
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
    extra: list[_Planned] = []
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
        extra.append(_Planned(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.shape,
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
    gguf = _gguf()
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
    gguf = _gguf()
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
        make = _np(p)
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
        planned.append(_Planned(new, shape, _float_type(precision, len(shape), shape[-1]), make))
    _stream(w, planned)
    return {"tensors": len(planned), **vocab_info}


# --- tokenizer ----------------------------------------------------------------------------------------
def _pre_tokenizer_name(tok_json: dict[str, Any]) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, read from tokenizer.json's structure
    (llama.cpp's converter hashes a probe string instead; this recognises the common shapes and
    refuses the rest, rather than guessing)."""
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex", "")
        if "\\p{N}{1,3}" in regex:
            return "llama-bpe"
        if "\\p{N}|" in regex or regex.endswith("\\p{N}"):
            return "qwen2"
    raise BadInputError("tokenizer.json pre_tokenizer", f"unrecognised byte-level BPE pre-tokenizer {kinds}",
                        "llama.cpp would tokenize this model differently from transformers; use an ONNX recipe")


def write_tokenizer(w, cm: "CompositeModel", tc) -> dict[str, Any]:
    """Vocabulary, merges or scores, special tokens and the chat template."""
    gguf = _gguf()
    tok = cm.tokenizer
    with tempfile.TemporaryDirectory() as td:
        tok.save_pretrained(td)
        tj_path = Path(td) / "tokenizer.json"
        if not tj_path.exists():
            raise BadInputError(f"{cm.source}: tokenizer", "has no tokenizer.json (a fast tokenizer)",
                                "save the model with a fast tokenizer (tokenizer.json)")
        tj = json.loads(tj_path.read_text(encoding="utf-8"))
        model = tj["model"]
        n_vocab = int(tc.vocab_size)
        if model.get("type") == "BPE" and model.get("byte_fallback"):
            # SentencePiece-style BPE (Llama 2, Mistral, Gemma): llama.cpp's "llama" tokenizer.
            vocab = gguf.LlamaHfVocab(Path(td))
            tokens, scores, types = [], [], []
            for text, score, ttype in vocab.all_tokens():
                tokens.append(text)
                scores.append(score)
                types.append(ttype)
            # gguf-py marks only bos/eos/unk as control; every special added token (e.g. <|im_start|>)
            # must be CONTROL or llama.cpp will not parse it out of a prompt.
            for a in tj.get("added_tokens", []):
                if a["id"] < len(types) and types[a["id"]] != gguf.TokenType.BYTE:
                    types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
            kind, pre = "llama", "default"
        elif model.get("type") == "BPE":
            pre = _pre_tokenizer_name(tj)
            kind = "gpt2"
            by_id = {i: t for t, i in model["vocab"].items()}
            special = {}
            for a in tj.get("added_tokens", []):
                by_id[a["id"]] = a["content"]
                special[a["id"]] = a.get("special", False)
            tokens, types, scores = [], [], None
            for i in range(max(n_vocab, max(by_id) + 1)):
                if i not in by_id:
                    tokens.append(f"[PAD{i}]")
                    types.append(gguf.TokenType.UNUSED)
                    continue
                tokens.append(by_id[i])
                if i in special:
                    types.append(gguf.TokenType.CONTROL if special[i] else gguf.TokenType.USER_DEFINED)
                else:
                    types.append(gguf.TokenType.NORMAL)
        else:
            raise BadInputError(f"{cm.source}: tokenizer", f"model type '{model.get('type')}' has no GGUF mapping",
                                "GGUF supports BPE (byte-level or SentencePiece-style) tokenizers")
        if len(tokens) > n_vocab:
            raise BadInputError(f"{cm.source}: tokenizer", f"has {len(tokens)} tokens but the model {n_vocab} rows",
                                "the tokenizer does not belong to this model")
        while len(tokens) < n_vocab:
            tokens.append(f"[PAD{len(tokens)}]")
            types.append(gguf.TokenType.UNUSED)
            if scores is not None:
                scores.append(-1000.0)
        w.add_tokenizer_model(kind)
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        if scores is not None:
            w.add_token_scores(scores)
        sv = gguf.SpecialVocab(td, load_merges=kind == "gpt2", n_vocab=n_vocab)
    # Ids straight from the loaded tokenizer (the folder's config.json may be a VLM's, with nested ids).
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "unk": tok.unk_token_id, "pad": tok.pad_token_id}
    sv.special_token_ids = {k: int(v) for k, v in ids.items() if v is not None}
    probe = tok("a").input_ids
    sv.add_special_token = {"bos": bool(tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id]),
                            "eos": bool(tok.eos_token_id is not None and probe[-1:] == [tok.eos_token_id])}
    sv.chat_template = None
    sv.add_to_gguf(w, quiet=True)
    if cm.chat_template:
        w.add_chat_template(cm.chat_template)
    # Every end-of-generation id the parent stops on (e.g. <|im_end|> besides <|endoftext|>).
    eos = [i for i in cm.text.eos_token_ids if i != tok.eos_token_id]
    if eos:
        w.add_eot_token_id(int(eos[0]))
    return {"tokenizer_model": kind, "tokenizer_pre": pre, "vocab": len(tokens)}


# clip.cpp reads this key (clip-impl.h KEY_FEATURE_LAYERS); gguf-py 0.19 has no constant for it.
CLIP_FEATURE_LAYER = "clip.vision.feature_layer"


# --- mmproj -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MmprojSpec:
    projector_type: str  # clip.projector_type value (gguf.VisionProjectorType holds all but LLaVA's "mlp")
    vision_prefixes: tuple[str, ...]  # prefixes that turn the vision component's parameter names into names gguf-py maps
    write_post_ln: bool


def _mmproj_spec(cm: "CompositeModel") -> MmprojSpec:
    if cm.family == "llava":
        return MmprojSpec("mlp", ("vision_tower.vision_model.", "vision_tower."), write_post_ln=False)
    if cm.family == "idefics3":
        return MmprojSpec(_gguf().VisionProjectorType.IDEFICS3, ("model.vision_model.",), write_post_ln=True)
    if cm.family == "gemma3":
        return MmprojSpec(_gguf().VisionProjectorType.GEMMA3, ("vision_tower.vision_model.", "vision_tower."),
                          write_post_ln=True)
    raise BadInputError(f"{cm.source}: family '{cm.family}'", "has no mmproj writer in edgemed yet",
                        "use an ONNX recipe for this model (GGUF mmproj: llava, idefics3, gemma3)")


def has_cls_token(cm: "CompositeModel") -> bool:
    """CLIP towers prepend a class token; llama.cpp's clip code mis-orders it (ggml-org/llama.cpp#25814)."""
    vision = cm.components().get("vision")
    return vision is not None and any("class_embedding" in n for n, _ in vision.named_parameters())


def write_mmproj_gguf(cm: "CompositeModel", path: Path, vision_precision: str = "f16",
                      projector_precision: str = "f16") -> dict[str, Any]:
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    if cm.image is None:
        raise BadInputError(cm.source, "is text-only", "mmproj is written only for vision-language models")
    spec = _mmproj_spec(cm)
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
    planned: list[_Planned] = []
    proj_prec = "f32" if _canonical(projector_precision) == "f32" else "f16"
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
            qt = T.F32 if _canonical(vision_precision) == "f32" else T.F16
        elif "position_embd" in new or "class_embd" in new:
            qt = T.F32
        else:
            qt = _float_type(vision_precision, len(shape), shape[-1])
        planned.append(_Planned(new, shape, qt, _np(p)))
    for hf_name, p in comps["projector"].named_parameters():
        new = _projector_name(gguf, names, spec, hf_name)
        shape = tuple(p.shape)
        make = _np(p)
        if spec.projector_type == gguf.VisionProjectorType.GEMMA3 and "soft_emb_norm" in new:
            make = (lambda f: (lambda: f() + 1.0))(make)  # Gemma RMSNorm stores w - 1
        planned.append(_Planned(new, shape, _float_type(proj_prec, len(shape), shape[-1]), make))
    _stream(w, planned)
    return {"tensors": len(planned), "projector_type": spec.projector_type, "cls_token": has_cls_token(cm)}


def _projector_name(gguf, names, spec: MmprojSpec, hf_name: str) -> str:
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
    prec = _canonical(precision)
    records = []
    name = f"model-{prec}.gguf"
    say(f"write {name}")
    info = write_language_gguf(cm, out_dir / name, prec)
    records.append({"path": name, "component": "embed+language+lm_head", "precision": prec, **info})
    if cm.multimodal:
        vprec = _canonical(vision_precision)
        name = f"mmproj-{vprec}.gguf"
        say(f"write {name}")
        info = write_mmproj_gguf(cm, out_dir / name, vprec, projector_precision)
        records.append({"path": name, "component": "vision+projector", "precision": vprec, **info})
    return records
