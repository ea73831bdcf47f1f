"""The shipped model families. One class per family; each overrides only what differs."""
from __future__ import annotations

from edgemed.models.base import Adapter, ImageFacts


def _pil_resample_name(value) -> str:
    # Hugging Face stores PIL resample enums as ints: 2 bilinear, 3 bicubic.
    return {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}.get(int(getattr(value, "value", value)), "bicubic")


def _size_of(d, *keys, default=None):
    if d is None:
        return default
    if isinstance(d, int):
        return d
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return default


class _TowerProjectorDecoder(Adapter):
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


class LlavaAdapter(_TowerProjectorDecoder):
    """LLaVA and LLaVA-Med: CLIP or SigLIP tower -> MLP projector -> Llama/Mistral/Qwen2 decoder."""

    family = "llava"
    model_types = ("llava",)

    @classmethod
    def model_class(cls):
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    @classmethod
    def image_features(cls, model, pixel_values):
        cfg = model.config
        layer = cfg.vision_feature_layer
        out = model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        layers = [layer] if isinstance(layer, int) else list(layer)
        hs = [out.hidden_states[i] for i in layers]
        if cfg.vision_feature_select_strategy == "default":  # drop the CLS token
            hs = [h[:, 1:] for h in hs]
        import torch

        return model.model.multi_modal_projector(torch.cat(hs, dim=-1))

    @classmethod
    def num_image_tokens(cls, config) -> int:
        vc = config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        if vc.model_type == "clip_vision_model" and config.vision_feature_select_strategy == "full":
            n += 1
        return n

    @classmethod
    def image_facts(cls, config, tokenizer, processor):
        vc = config.vision_config
        ip = processor.image_processor if processor is not None else None
        n = cls.num_image_tokens(config)
        token = tokenizer.convert_ids_to_tokens(config.image_token_id)
        if ip is not None and getattr(ip, "crop_size", None) and getattr(ip, "do_center_crop", False):
            mode, shortest = "shortest_edge_center_crop", _size_of(ip.size, "shortest_edge")
        else:
            mode, shortest = "squash", None
        return ImageFacts(
            image_size=vc.image_size,
            patch_size=vc.patch_size,
            image_mean=list(getattr(ip, "image_mean", [0.5, 0.5, 0.5])),
            image_std=list(getattr(ip, "image_std", [0.5, 0.5, 0.5])),
            resample=_pil_resample_name(getattr(ip, "resample", 3)),
            resize_mode=mode,
            shortest_edge=shortest,
            rescale_factor=float(getattr(ip, "rescale_factor", 1 / 255)),
            num_image_tokens=n,
            image_token=token,
            image_token_id=config.image_token_id,
            placeholder=token,
        )


class Idefics3Adapter(Adapter):
    """SmolVLM / Idefics3: SigLIP tower -> pixel-shuffle connector -> Llama decoder.

    edgemed feeds one global image (no tile splitting), as llama.cpp's overview image does.
    """

    family = "idefics3"
    model_types = ("idefics3", "smolvlm")

    @classmethod
    def model_class(cls):
        from transformers import Idefics3ForConditionalGeneration

        return Idefics3ForConditionalGeneration

    @classmethod
    def components(cls, model):
        m = model.model
        return {
            "vision": m.vision_model,
            "projector": m.connector,
            "embed": m.text_model.embed_tokens,
            "language": m.text_model,
            "lm_head": model.lm_head,
        }

    @classmethod
    def language_model(cls, model):
        return model.model.text_model

    @classmethod
    def image_features(cls, model, pixel_values):
        import torch

        n, _, h, w = pixel_values.shape
        p = model.config.vision_config.patch_size
        mask = torch.ones((n, h // p, w // p), dtype=torch.bool, device=pixel_values.device)
        out = model.model.vision_model(pixel_values=pixel_values, patch_attention_mask=mask, return_dict=True)
        return model.model.connector(out.last_hidden_state)

    @classmethod
    def num_image_tokens(cls, config) -> int:
        vc = config.vision_config
        return int((vc.image_size // vc.patch_size) ** 2 // (config.scale_factor**2))

    @classmethod
    def image_facts(cls, config, tokenizer, processor):
        vc = config.vision_config
        ip = processor.image_processor if processor is not None else None
        n = cls.num_image_tokens(config)
        token = tokenizer.convert_ids_to_tokens(config.image_token_id)
        return ImageFacts(
            image_size=vc.image_size,
            patch_size=vc.patch_size,
            image_mean=list(getattr(ip, "image_mean", [0.5, 0.5, 0.5])),
            image_std=list(getattr(ip, "image_std", [0.5, 0.5, 0.5])),
            resample=_pil_resample_name(getattr(ip, "resample", 1)),
            resize_mode="squash",
            rescale_factor=float(getattr(ip, "rescale_factor", 1 / 255)),
            num_image_tokens=int(n),
            image_token=token,
            image_token_id=config.image_token_id,
            prefix="<fake_token_around_image><global-img>",
            suffix="<fake_token_around_image>",
            placeholder="<image>",
        )


class Gemma3Adapter(_TowerProjectorDecoder):
    """Gemma 3 / MedGemma: SigLIP tower -> pooled projector -> Gemma3 decoder (scaled embeddings)."""

    family = "gemma3"
    model_types = ("gemma3",)

    @classmethod
    def model_class(cls):
        from transformers import Gemma3ForConditionalGeneration

        return Gemma3ForConditionalGeneration

    decoder_token_type_ids = True

    @classmethod
    def decoder_attention_mask(cls, lm, inputs_embeds, attention_mask, position_ids, cache, token_type_ids=None):
        # Image tokens attend to each other bidirectionally in Gemma 3; the masks are built with
        # transformers' own functions, as Gemma3Model.forward builds them.
        from transformers.models.gemma3.modeling_gemma3 import (
            create_masks_for_vision_model, get_block_sequence_ids_for_mask)

        blocks = get_block_sequence_ids_for_mask(token_type_ids, device=inputs_embeds.device)
        return create_masks_for_vision_model(config=lm.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                             cache=cache, position_ids=position_ids, block_sequence_ids=blocks)

    @classmethod
    def image_features(cls, model, pixel_values):
        out = model.model.vision_tower(pixel_values=pixel_values, return_dict=True)
        return model.model.multi_modal_projector(out.last_hidden_state)

    @classmethod
    def num_image_tokens(cls, config) -> int:
        return int(config.mm_tokens_per_image)

    @classmethod
    def image_facts(cls, config, tokenizer, processor):
        vc = config.vision_config
        ip = processor.image_processor if processor is not None else None
        token = tokenizer.convert_ids_to_tokens(config.image_token_id)
        boi = getattr(tokenizer, "boi_token", None) or "<start_of_image>"
        eoi = getattr(tokenizer, "eoi_token", None) or "<end_of_image>"
        return ImageFacts(
            image_size=vc.image_size,
            patch_size=vc.patch_size,
            image_mean=list(getattr(ip, "image_mean", [0.5, 0.5, 0.5])),
            image_std=list(getattr(ip, "image_std", [0.5, 0.5, 0.5])),
            resample=_pil_resample_name(getattr(ip, "resample", 2)),
            resize_mode="squash",
            rescale_factor=float(getattr(ip, "rescale_factor", 1 / 255)),
            num_image_tokens=cls.num_image_tokens(config),
            image_token=token,
            image_token_id=config.image_token_id,
            prefix=f"\n\n{boi}",
            suffix=f"{eoi}\n\n",
            placeholder=boi,
        )


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
