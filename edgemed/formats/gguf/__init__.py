"""GGUF backend: one language-model `*.gguf` and one `mmproj-*.gguf`, as llama.cpp names them,
quantized by llama.cpp itself and run by llama.cpp (llama-cpp-python).

    steps.py      gguf-export, gguf-quantize
    writer.py     the streaming GGUF writer (language model); mmproj.py: the clip file;
                  tokenizer.py: vocabulary and chat template
    imatrix.py    llama.cpp's importance matrix from calibration passes through the parent
    session.py    the runtime session
"""
from __future__ import annotations

from edgemed.formats.base import FormatBackend
from edgemed.recipe import PRECISION_BITS

# Generic precision names -> the llama.cpp type that stores them.
GGUF_TYPE_FOR = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}


# What llama_model_quantize stores (llama.cpp src/llama-quant.cpp), for the plan's sizes:
# - a K-quant or IQ4_XS needs rows that are a multiple of 256; otherwise llama.cpp falls back per
#   tensor (`convert_incompatible_tensor`): Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL
#   (SmolLM2's 576-wide rows: almost every matrix);
# - the _M mixtures give attn_v and ffn_down Q6_K in the layers `use_more_bits` picks (the first and
#   last eighth and every third between: about half).
_ROW_TYPE = {"q4_k_m": "q4_k", "q5_k_m": "q5_k", "q6_k": "q6_k", "iq4_xs": "iq4_xs", "q3_k_m": "q3_k", "q2_k": "q2_k"}
_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "iq4_xs": "iq4_nl", "q3_k": "iq4_nl", "q2_k": "iq4_nl"}
_TYPE_BITS = {"q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625, "q3_k": 3.4375, "q2_k": 2.625, "iq4_xs": 4.25,
              "iq4_nl": 4.5, "q5_0": 5.5, "q5_1": 6.0, "q8_0": 8.5}
_MORE_BITS = {"q4_k_m", "q5_k_m"}


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def stored_bits(precision: str, in_features: int, more_bits: bool = False) -> float:
    """Bits per weight of one matrix whose rows hold `in_features` values, as llama.cpp stores it."""
    p = gguf_type_name(precision)
    t = _ROW_TYPE.get(p)
    if t is None:
        return PRECISION_BITS[p]
    if more_bits and p in _MORE_BITS:
        t = "q6_k"
    if in_features % 256:
        t = _FALLBACK[t]
    return _TYPE_BITS[t]


def gguf_type_name(precision: str) -> str:
    """The llama.cpp type name a policy precision means (int8 -> q8_0, fp16 -> f16, q4_k_m as is)."""
    p = precision.lower()
    return GGUF_TYPE_FOR.get(p, p)


class GgufBackend(FormatBackend):
    name = "gguf"
    # Fitted to bench_memory.py's q4_k_m runs (peak RSS 1.78 / 2.73 / 3.89 / 6.99 GB at 0.88 / 1.58 /
    # 2.46 / 4.40 GB of fp32 weights): the quantized tensors the writer holds and the imatrix pass.
    # Disk: the f32 model file gguf-quantize starts from (gguf-export's dtype) beside the artifact.
    host_transient, host_transient_fixed, host_scratch = 0.4, 100_000_000, 1.0
    precisions = frozenset(PRECISION_BITS) - {"fp8", "fp4"}

    @classmethod
    def low_memory_parity_bytes(cls, estimate, num_layers: int) -> int:
        """None of the artifact is anonymous memory: llama.cpp maps it and, not repacking, reads the
        mapped blocks (low_memory_session_kwargs); its compute buffers are in the plan's process."""
        return 0

    @classmethod
    def low_memory_parity_mapped(cls, estimate) -> int:
        return int(estimate.artifact_bytes)

    @classmethod
    def low_memory_session_kwargs(cls, context_tokens: int) -> dict:
        """The file mapped and not repacked (GgufSession's repack): the weights stay file-backed
        pages, not an anonymous copy as large as the artifact, with a KV cache the parity prompts
        and gate suite fit in rather than the default 4096 tokens (1 GB at 7B)."""
        return {"use_mmap": True, "repack": False, "n_ctx": context_tokens}

    def bits_per_weight(self, precision: str, in_features: int) -> float:
        """The llama.cpp type's own bits (block scales are inside PRECISION_BITS: q8_0 = 8.5), after
        its fallback for rows that K-quants cannot hold (embeddings, lm_head: rows of hidden_size)."""
        return stored_bits(precision, in_features)

    def language_bits(self, precision: str, shape) -> tuple[float, str] | None:
        """The language model's bits per weight matrix by matrix: the _M mixture's Q6_K layers and
        the K-quant fallbacks (ffn_down's rows are the intermediate size, the others hidden_size)."""
        import re

        p = gguf_type_name(precision)
        if p not in _ROW_TYPE or not shape.linears:
            return None
        hidden, n = shape.facts.hidden_size, shape.facts.num_layers
        total = bits = more = fallback = 0
        for name, params in shape.linears.items():
            down = "down_proj" in name
            m = re.search(r"layers\.(\d+)\.", name)
            up = bool(m) and ("v_proj" in name or down) and _use_more_bits(int(m.group(1)), n)
            k = params // hidden if down else hidden
            b = stored_bits(p, k, more_bits=up)
            total, bits = total + params, bits + b * params
            more += params if up and p in _MORE_BITS else 0
            fallback += params if k % 256 else 0
        if not total:
            return None
        notes = []
        if more:
            notes.append(f"{more / total:.0%} Q6_K (attn_v, ffn_down in llama.cpp's use_more_bits layers)")
        if fallback:
            notes.append(f"{fallback / total:.0%} in llama.cpp's fallback type (rows not a multiple of 256)")
        return bits / total, "; ".join(notes)

    def tied_lm_head_stored_once(self) -> bool:
        return True  # llama.cpp stores a tied output matrix once, as token_embd

    def kv_bytes_per_element(self) -> int:
        return 2  # llama.cpp's default cache type is f16

    def model_reasons(self) -> list[str]:
        """The text decoder needs an architecture llama.cpp has (formats/gguf/language.text_arch)."""
        from edgemed.models.base import decoder_facts, decoders_with

        mt = getattr(getattr(self.shape, "facts", None), "decoder_model_type", "") if self.shape is not None else ""
        facts = decoder_facts(mt) if mt else None
        if facts is not None and facts.gguf_missing:
            return [f"language model '{mt}' cannot be written as GGUF: {facts.gguf_missing}"]
        if mt and (facts is None or facts.gguf_arch is None):
            return [f"language model '{mt}' has no GGUF writer in edgemed (GGUF supports decoders "
                    f"{', '.join(decoders_with('gguf_arch'))})"]
        return []

    @classmethod
    def required_files(cls, manifest) -> list[str]:
        image = ["mmproj-*.gguf"] if manifest.model and manifest.model.image else []
        return ["model-*.gguf", "tokenizer.json", *image]

    @classmethod
    def cuda_unavailable_reason(cls, path, manifest) -> str | None:
        try:
            import llama_cpp
        except ImportError:
            return "llama-cpp-python is not installed (pip install 'edgemed[llamacpp]')"
        if not llama_cpp.llama_supports_gpu_offload():
            return ("this llama-cpp-python was built without a GPU backend (reinstall it with "
                    "CMAKE_ARGS=\"-DGGML_CUDA=on\" pip install --no-binary llama-cpp-python llama-cpp-python)")
        return None

    @classmethod
    def open_session(cls, path, manifest, **kwargs):
        from edgemed.formats.gguf.session import GgufSession

        return GgufSession(path, manifest, **kwargs)
