"""Format backends: each artifact format (ONNX, GGUF, TensorRT) is one package under
edgemed/formats/ that owns its export and quantization steps, its capabilities as data, the
planner's size and memory estimate for its layout, and its runtime session.

Nothing outside edgemed/formats/ branches on a format's name: the planner asks the backend the
recipe exports to (`FORMATS.get(name)`), `edgemed.runtime.load` opens the backend's session.
Importing a backend package is cheap and torch-free (the runtime imports it on a device).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from edgemed.recipe import PRECISION_BITS
from edgemed.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

FORMAT_MODULES = ("edgemed.formats.onnx", "edgemed.formats.gguf", "edgemed.formats.tensorrt")

# The fixed part of a process's memory at run time: the runtime library (ONNX Runtime or llama.cpp,
# and the CUDA/TensorRT context on a GPU), tokenizer, Python and the image pipeline, ~300 MB in RSS.
RUNTIME_OVERHEAD_FIXED_BYTES = 300_000_000
GB = 1e9


class FormatBackend:
    """One artifact format. The base class is the layout of a recipe with no export step (plain
    widths, ONNX Runtime's default int4 blocks); each backend overrides what its files store.

    An instance is bound to one recipe x target x model shape (plan._ModelShape: parameter counts,
    and the facts a layout depends on, e.g. `fp16_unsafe` and `builder_decoder`) and answers the
    planner's questions."""

    name: ClassVar[str | None] = None
    # Precisions the format can store, and per component where that differs.
    precisions: ClassVar[frozenset[str]] = frozenset(PRECISION_BITS)
    component_precisions: ClassVar[dict[str, frozenset[str]]] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.__dict__.get("name"):
            FORMATS.register(cls.name)(cls)

    def __init__(self, recipe, target, shape: Any = None):  # a Recipe and a Target (edgemed.recipe, edgemed.target)
        self.recipe, self.target, self.shape = recipe, target, shape

    # --- what the artifact stores -------------------------------------------------------------
    @property
    def activations(self) -> str:
        """The graph's float type at run time: fp32 | fp16."""
        return "fp32"

    def storable(self, component: str) -> frozenset[str]:
        return self.component_precisions.get(component, self.precisions)

    def int4_layout(self) -> tuple[int, int, int]:
        """(block size, scale bytes, zero-point bits) per int4 block: ONNX Runtime's MatMulNBits
        defaults (block 32, fp32 scale, 4-bit zero point)."""
        return 32, 4, 4

    def int8_per_channel_bytes(self) -> int:
        """Per output channel: an fp32 scale and an int8 zero point (quantize_dynamic per_channel)."""
        return 5

    def bits_per_weight(self, precision: str, in_features: int) -> float:
        """Effective bits per weight, scales and zero points included.

        - int4: 4 + (scale bytes x 8 + zero-point bits) / block size (see int4_layout).
        - int8 per output channel: 8 + int8_per_channel_bytes x 8 / in_features (the number of
          output channels is taken as params / in_features, exact for embeddings and lm_head and
          within a fraction of a percent elsewhere).
        - fp4 (NVFP4): one fp8 scale per 16 weights: 4.5.
        - fp32 / fp16 / bf16 / fp8: the plain width (fp8's per-tensor scale is negligible).
        Norm weights and biases stay in float in every format; they are < 0.2% of a component
        and are counted at the component's precision."""
        if precision == "int4":
            block, scale_bytes, zp_bits = self.int4_layout()
            return 4 + (scale_bytes * 8 + zp_bits) / block
        if precision == "int8":
            return 8 + self.int8_per_channel_bytes() * 8 / max(in_features, 1)
        if precision == "fp4":
            return 4.5
        return PRECISION_BITS[precision]

    def language_bits(self, precision: str, shape) -> tuple[float, str] | None:
        """The language model's bits per weight where the backend stores its matrices in a mixture
        (bits, note), or None: every matrix at `bits_per_weight`."""
        return None

    def int8_projections(self) -> list[str]:
        """Language projections kept at int8 in an int4 model (name substrings); none by default."""
        return []

    def tied_lm_head_stored_once(self) -> bool:
        """Whether a tied lm_head is stored once, as the embedding table, and read per token."""
        return False

    # --- run-time memory ------------------------------------------------------------------------
    def kv_bytes_per_element(self) -> int:
        return 2 if self.activations == "fp16" else 4

    def kv_copies(self) -> int:
        """KV caches alive at once during a decode step (2 where past and present are concatenated)."""
        return 1

    def build_reasons(self, components: dict, usable_bytes: int) -> list[str]:
        """Why building the artifact on the target would not fit (an engine build), if anything."""
        return []

    def model_reasons(self) -> list[str]:
        """Why this format cannot hold the model at all (`self.shape`), if anything: said by plan
        before compress would find it out."""
        return []

    # --- the host that compresses -------------------------------------------------------------------
    # `edgemed compress` holds the parent in fp32 throughout; on top of it the export and quantize
    # steps hold graphs, sessions and calibration tensors: about host_transient x the parent's fp32
    # bytes plus host_transient_fixed bytes, fitted by bench/bench_memory.py (see plan.host_estimate).
    host_transient: ClassVar[float] = 0.0
    host_transient_fixed: ClassVar[int] = 0
    # Scratch on disk beside the artifact while compress runs, in multiples of the fp32 bytes (an
    # fp32 graph before quantization, a probe's external data).
    host_scratch: ClassVar[float] = 0.0
    # compress --low-memory: what its streamed phases hold, in multiples of the largest tensor in fp32
    # (None: plan_host.HOST_STREAM_FACTOR, the GGUF writer's).
    low_memory_stream_factor: ClassVar[float | None] = None

    # --- writing ------------------------------------------------------------------------------------
    # Whether the artifact is built for one target only (TensorRT's build profiles) rather than for
    # every target that gets the same layout (edgemed.sweep shares those).
    target_specific: ClassVar[bool] = False

    def finish(self, ctx) -> None:
        """Last touches to the artifact folder after every step ran and before parity opens it
        (e.g. the front-end layout of ONNX artifacts); ctx is edgemed.context.Context."""

    # --- run time ---------------------------------------------------------------------------------
    @classmethod
    def required_files(cls, manifest) -> list[str]:
        """Files (glob patterns) a session of this format cannot run without."""
        return []

    @classmethod
    def check_files(cls, root: "Path", manifest) -> None:
        """Format-specific containment checks before the runtime library sees a file (raise
        BadInputError); the generic ones (paths, symlinks, sizes, hashes) are edgemed.artifact.verify."""

    @classmethod
    def cuda_unavailable_reason(cls, path: "Path", manifest) -> str | None:
        """Why this format's runtime cannot run the artifact on an NVIDIA GPU here (None: it can);
        checked before a session opens with device "cuda" (see edgemed.runtime.device)."""
        return f"edgemed has no GPU runtime for {cls.name} artifacts"

    @classmethod
    def low_memory_parity_bytes(cls, estimate, num_layers: int) -> int:
        """What compress --low-memory's parity session holds of the artifact (plan.host_estimate;
        `estimate`: the plan's components and artifact_bytes): the whole artifact, where the writer
        streams every tensor and the runtime loads it whole."""
        return int(estimate.artifact_bytes)

    @classmethod
    def low_memory_parity_mapped(cls, estimate) -> int:
        """What that session maps of the artifact's files without holding it (page cache the kernel
        takes back under pressure: in RSS while read, not a need; plan.HostEstimate.mapped_bytes)."""
        return 0

    @classmethod
    def low_memory_session_kwargs(cls, context_tokens: int) -> dict:
        """open_session arguments for compress --low-memory's parity session (a KV cache of
        `context_tokens`, no second resident copy of the weights), where the format has them."""
        return {}

    @classmethod
    def open_session(cls, path: "Path", manifest, **kwargs):
        """A runtime session for an artifact of this format (see edgemed.runtime.session); kwargs
        include device (an edgemed.runtime.device.DeviceChoice) when edgemed.runtime chose one."""
        raise NotImplementedError


FORMATS: Registry[type[FormatBackend]] = Registry("artifact format", plugins=FORMAT_MODULES)


def backend_for(recipe, target, shape: Any = None) -> FormatBackend:
    """The backend the recipe exports to (the base layout when it has no export step)."""
    fmt = recipe.format
    return (FORMATS.get(fmt) if fmt else FormatBackend)(recipe, target, shape)
