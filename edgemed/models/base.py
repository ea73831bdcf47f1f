"""Composite models: a loaded VLM (or LLM) as named components plus the facts exporters need.

Family knowledge (where the vision tower lives, how image features are computed, how the
image placeholder expands in a prompt, what llama.cpp calls its projector, whether it survives
fp16) lives in one adapter per family (`edgemed/models/families/*.py`), found by the Hugging Face
`model_type`; what edgemed knows about each text decoder architecture is a DecoderFacts row that
the family bringing it registers. Nothing outside edgemed/models/ names a model_type.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from edgemed.models.families import FAMILY_MODULES
from edgemed.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

FAMILIES: Registry[type["Adapter"]] = Registry("model family", plugins=FAMILY_MODULES)
_MODEL_TYPES: dict[str, type["Adapter"]] = {}
_DECODERS: dict[str, "DecoderFacts"] = {}


def family_for(model_type: str | None) -> type["Adapter"] | None:
    """The adapter registered for a Hugging Face model_type, or None."""
    FAMILIES._load()
    return _MODEL_TYPES.get(model_type or "")


def model_types() -> list[str]:
    FAMILIES._load()
    return sorted(_MODEL_TYPES)


@dataclass(frozen=True)
class DecoderFacts:
    """What edgemed knows about one text decoder architecture (a Hugging Face model_type)."""

    gguf_arch: str | None = None  # gguf.MODEL_ARCH member name; None: no GGUF writer
    # llama.cpp's RoPE for this arch rotates adjacent pairs, Hugging Face the two halves of a head:
    # q/k rows are permuted per head when written to GGUF.
    gguf_permute_qk: bool = False
    gguf_norm_shift: float = 0.0  # Gemma stores RMSNorm weights as w - 1, llama.cpp wants w
    builder_arch: str | None = None  # the CausalLM class onnxruntime-genai's builder knows; None: unsupported
    # Model-stage transforms whose block surgery handles this decoder's layout: blocks
    # `layers[i].{self_attn, mlp.{gate,up,down}_proj}` with separate gate and up projections.
    transforms: tuple[str, ...] = ()
    qkv_bias: bool = False  # q/k/v projections carry a bias though attention_bias is not set (Qwen2)
    gguf_missing: str | None = None  # why no GGUF can hold this decoder (said when a GGUF recipe is asked for)


def register_decoder(facts: DecoderFacts, *model_types: str) -> None:
    for mt in model_types:
        _DECODERS[mt] = facts


def decoder_facts(model_type: str | None) -> DecoderFacts | None:
    FAMILIES._load()
    return _DECODERS.get(model_type or "")


def decoders_supporting(transform: str) -> list[str]:
    FAMILIES._load()
    return sorted(mt for mt, f in _DECODERS.items() if transform in f.transforms)


def decoders_with(attr: str) -> list[str]:
    """The decoder model_types for which DecoderFacts.`attr` is set (e.g. gguf_arch)."""
    FAMILIES._load()
    return sorted(mt for mt, f in _DECODERS.items() if getattr(f, attr))


@dataclass(frozen=True)
class MmprojFacts:
    """How llama.cpp's clip code (mtmd) holds this family's vision tower and projector."""

    projector_type: str  # clip.projector_type: "mlp" (LLaVA), or a gguf.VisionProjectorType value
    vision_prefixes: tuple[str, ...]  # prefixes that turn the tower's parameter names into names gguf-py maps
    write_post_ln: bool  # LLaVA's "mlp" graph applies v.post_ln if present, so it must not be written
    # Strings llama.cpp's own mtmd prompt for this projector needs as single tokens.
    single_tokens: tuple[str, ...] = ()


@dataclass
class ImageFacts:
    """Everything the torch-free runtime needs to turn an image into pixel_values and a prompt."""

    image_size: int  # square side fed to the vision encoder
    patch_size: int
    image_mean: list[float]
    image_std: list[float]
    resample: str  # PIL resample name: bicubic | bilinear
    resize_mode: str  # "squash" (resize to size x size) | "shortest_edge_center_crop" | "longest_edge" (Idefics3)
    rescale_factor: float
    num_image_tokens: int  # feature vectors per image after the projector
    image_token: str  # the placeholder token repeated num_image_tokens times
    image_token_id: int
    prefix: str = ""  # text before the repeated placeholder (e.g. <fake_token_around_image><global-img>)
    suffix: str = ""  # text after it
    placeholder: str = "<image>"  # what a user prompt writes where the image goes
    shortest_edge: int | None = None  # for shortest_edge_center_crop
    pad_to_square: bool = False  # first pad to a square with the mean colour (LLaVA's image_aspect_ratio "pad")
    longest_edge: int | None = None  # "longest_edge": first resize the longer side to this (even, aspect kept)
    # Idefics3 / SmolVLM image splitting: tiles of image_size (row by row) + the whole image, each
    # tile's block marked `tile_marker<row_R_col_C>`; None: one image
    tile_marker: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TextFacts:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    bos_token: str | None = None
    max_position_embeddings: int = 2048
    decoder_model_type: str = ""
    # What the chat template sees (tokenizer.special_tokens_map: bos_token, eos_token, ...) and
    # whether the tokenizer's own special tokens are added to the rendered text (a VLM's processor
    # does unless the text starts with BOS; a text LLM's apply_chat_template never does).
    special_tokens: dict[str, str] = field(default_factory=dict)
    add_special_tokens: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Adapter:
    """One model family. Subclasses set `family`, `model_types` and override what differs."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    multimodal: ClassVar[bool] = True

    # What llama.cpp's mtmd calls this family's vision tower and projector (None: no mmproj writer).
    mmproj: ClassVar[MmprojFacts | None] = None
    # Why this family's activations leave fp16's range (|x| <= 65504), or None where fp16 is safe.
    fp16_unsafe: ClassVar[str | None] = None
    # The vision graph's signature front ends expect: "images" (pixel_values [N, 3, H, W]) or
    # "tiles" ([batch, tiles, 3, H, W] with a pixel_attention_mask [batch, tiles, H, W], as the
    # onnx-community exports of Idefics3 / SmolVLM take them and transformers.js feeds them).
    vision_input: ClassVar[str] = "images"

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "family" in cls.__dict__:
            FAMILIES.register(cls.family)(cls)
            for mt in cls.model_types:
                _MODEL_TYPES[mt] = cls

    # --- loading -----------------------------------------------------------------
    @classmethod
    def model_class(cls):
        raise NotImplementedError

    # --- components --------------------------------------------------------------
    @classmethod
    def text_config(cls, config):
        return getattr(config, "text_config", config)

    @classmethod
    def components(cls, model: "nn.Module") -> dict[str, "nn.Module"]:
        """Named parts: vision, projector, embed, language (decoder blocks + final norm), lm_head."""
        raise NotImplementedError

    @classmethod
    def language_model(cls, model: "nn.Module") -> "nn.Module":
        """The base decoder (takes inputs_embeds, returns last_hidden_state and the cache)."""
        raise NotImplementedError

    @classmethod
    def lm_head(cls, model: "nn.Module") -> "nn.Module":
        return model.lm_head

    @classmethod
    def embed_tokens(cls, model: "nn.Module") -> "nn.Module":
        return model.get_input_embeddings()

    # Families whose decoder attends bidirectionally within an image block (Gemma 3) take a
    # `token_type_ids` input (1 = image token) in the exported decoder.
    decoder_token_type_ids: ClassVar[bool] = False

    @classmethod
    def decoder_attention_mask(cls, lm, inputs_embeds, attention_mask, position_ids, cache, token_type_ids=None):
        """What the decoder receives as attention_mask (a 2-D padding mask, or per-layer-type masks)."""
        return attention_mask

    @classmethod
    def image_features(cls, model: "nn.Module", pixel_values: "torch.Tensor") -> "torch.Tensor":
        """pixel_values [N, 3, H, W] -> projected features [N, num_image_tokens, text_hidden]."""
        raise NotImplementedError

    @classmethod
    def image_facts(cls, config, tokenizer, processor) -> ImageFacts | None:
        return None

    @classmethod
    def parent_inputs(cls, input_ids: "torch.Tensor", pixel_values: "torch.Tensor | None",
                      image_token_id: int | None) -> dict[str, Any]:
        """The keyword arguments of the parent's own forward for one prompt [1, T] (and image)."""
        kw: dict[str, Any] = {"input_ids": input_ids}
        if pixel_values is not None:
            kw["pixel_values"] = pixel_values
        return kw

    @classmethod
    def num_image_tokens(cls, config) -> int | None:
        """Feature vectors one image puts into the prompt, from the config alone (None: text-only)."""
        return None


_NORMALISERS: list[type["Normaliser"]] = []
# model_types edgemed itself defines for transformers (e.g. Med-MoE's decoder), registered with its
# Auto classes on first use, so that importing a family does not import torch.
_OWN_MODEL_TYPES: dict[str, Callable[[], None]] = {}


def register_own_model_type(model_type: str, register: Callable[[], None]) -> None:
    _OWN_MODEL_TYPES[model_type] = register


def ensure_model_types(raw: dict[str, Any] | None) -> None:
    """Register with transformers the edgemed-defined model_types a raw config.json names (its own
    or its text_config's), before transformers parses it."""
    if not raw:
        return
    FAMILIES._load()
    for cfg in (raw, raw.get("text_config") or {}):
        register = _OWN_MODEL_TYPES.get(cfg.get("model_type") if isinstance(cfg, dict) else None)
        if register is not None:
            register()


class Normaliser:
    """Builds the transformers model of an edgemed family from a checkpoint folder that a model's own
    repository code wrote (its config's model_type is not a transformers one), without running that
    code: a config, a renamed state dict, a processor. `edgemed convert` saves the result as a plain
    Hugging Face folder; `compress` and `plan` use it in memory."""

    name: ClassVar[str]
    family: ClassVar[str]
    what: ClassVar[str]

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        _NORMALISERS.append(cls)

    @classmethod
    def matches(cls, raw: dict[str, Any]) -> bool:
        raise NotImplementedError

    @classmethod
    def config(cls, folder: Path, raw: dict[str, Any], vision_tower: str | None = None):
        raise NotImplementedError

    @classmethod
    def state_dict(cls, folder: Path, raw: dict[str, Any], config, vision_tower: str | None,
                   allow_pickle: bool) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def processor(cls, folder: Path, raw: dict[str, Any], config, tokenizer, vision_tower: str | None):
        raise NotImplementedError


def normaliser_for(raw: dict[str, Any] | None) -> type[Normaliser] | None:
    """The normaliser for a checkpoint's raw config.json, or None."""
    if not raw:
        return None
    FAMILIES._load()
    return next((n for n in _NORMALISERS if n.matches(raw)), None)


def text_facts(adapter: type[Adapter], config, tokenizer=None) -> TextFacts:
    tc = adapter.text_config(config)
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    eos = getattr(tc, "eos_token_id", None)
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    gen_eos = []
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        gen_eos.append(tokenizer.eos_token_id)
    eos_list = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []), *gen_eos})
    return TextFacts(
        num_layers=tc.num_hidden_layers,
        num_kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        hidden_size=tc.hidden_size,
        vocab_size=tc.vocab_size,
        eos_token_ids=eos_list,
        pad_token_id=getattr(tc, "pad_token_id", None),
        bos_token=getattr(tokenizer, "bos_token", None) if tokenizer is not None else None,
        max_position_embeddings=getattr(tc, "max_position_embeddings", 2048),
        decoder_model_type=tc.model_type,
        special_tokens=special_tokens_of(tokenizer),
        add_special_tokens=adapter.multimodal,
    )


def special_tokens_of(tokenizer) -> dict[str, str]:
    """The template variables transformers passes from a tokenizer (its special_tokens_map)."""
    if tokenizer is None:
        return {}
    return {k: str(v) for k, v in getattr(tokenizer, "special_tokens_map", {}).items() if isinstance(v, str)}


def count_params(module: "nn.Module | None") -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters())


def _first_dir(path: Path) -> Path:
    return path if path.is_dir() else path.parent
