"""Helpers the family adapters share (reading Hugging Face processor configs, the common layout)."""
from __future__ import annotations

from edgemed.models.base import Adapter


def pil_resample_name(value) -> str:
    # Hugging Face stores PIL resample enums as ints: 2 bilinear, 3 bicubic.
    return {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}.get(int(getattr(value, "value", value)), "bicubic")


def size_of(d, *keys, default=None):
    if d is None:
        return default
    if isinstance(d, int):
        return d
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return default


class TowerProjectorDecoder(Adapter):
    """The transformers layout model.model.{vision_tower, multi_modal_projector, language_model}
    + model.lm_head, shared by LLaVA and Gemma 3."""

    @classmethod
    def components(cls, model):
        m = model.model
        return {
            "vision": m.vision_tower,
            "projector": m.multi_modal_projector,
            "embed": m.language_model.embed_tokens,
            "language": m.language_model,
            "lm_head": model.lm_head,
        }

    @classmethod
    def language_model(cls, model):
        return model.model.language_model
