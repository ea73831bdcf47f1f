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

    def bits_per_weight(self, precision: str, in_features: int) -> float:
        """The llama.cpp type's own bits (block scales are inside PRECISION_BITS: q8_0 = 8.5)."""
        return PRECISION_BITS[gguf_type_name(precision)]

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
