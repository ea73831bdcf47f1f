"""LLaVA and LLaVA-Med: CLIP or SigLIP tower -> MLP projector -> Llama/Mistral/Qwen2 decoder."""
from __future__ import annotations

from edgemed.models.base import ImageFacts, MmprojFacts
from edgemed.models.families import llava_original, med_moe  # noqa: F401  (checkpoints of LLaVA's own code, its forks)
from edgemed.models.families._common import TowerProjectorDecoder, pil_resample_name, size_of


class LlavaAdapter(TowerProjectorDecoder):
    """LLaVA and LLaVA-Med: CLIP or SigLIP tower -> MLP projector -> Llama/Mistral/Qwen2 decoder."""

    family = "llava"
    model_types = ("llava",)
    # llama.cpp's "mlp" graph runs n_layer-1 vision blocks and applies v.post_ln if present: never
    # write post_ln for LLaVA (REFERENCE.md, llama.cpp multimodal facts).
    mmproj = MmprojFacts("mlp", ("vision_tower.vision_model.", "vision_tower."), write_post_ln=False)

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
            mode, shortest = "shortest_edge_center_crop", size_of(ip.size, "shortest_edge")
        else:
            mode, shortest = "squash", None
        return ImageFacts(
            image_size=vc.image_size,
            patch_size=vc.patch_size,
            image_mean=list(getattr(ip, "image_mean", [0.5, 0.5, 0.5])),
            image_std=list(getattr(ip, "image_std", [0.5, 0.5, 0.5])),
            resample=pil_resample_name(getattr(ip, "resample", 3)),
            resize_mode=mode,
            shortest_edge=shortest,
            pad_to_square=bool(getattr(ip, "do_pad", False)),
            rescale_factor=float(getattr(ip, "rescale_factor", 1 / 255)),
            num_image_tokens=n,
            image_token=token,
            image_token_id=config.image_token_id,
            placeholder=token,
        )
