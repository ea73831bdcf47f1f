"""SmolVLM / Idefics3: SigLIP tower -> pixel-shuffle connector -> Llama decoder."""
from __future__ import annotations

from edgemed.models.base import Adapter, ImageFacts, MmprojFacts
from edgemed.models.families._common import pil_resample_name, size_of


class Idefics3Adapter(Adapter):
    """SmolVLM / Idefics3: SigLIP tower -> pixel-shuffle connector -> Llama decoder.

    Images as Idefics3ImageProcessor makes them: the longer side resized to size["longest_edge"],
    then (do_image_splitting) cut into tiles of the tower's size plus the whole image resized to
    one tile, each with its own block of image tokens (edgemed.runtime.preprocess.tiles)."""

    family = "idefics3"
    model_types = ("idefics3", "smolvlm")
    # A missing single token becomes token -1 in llama-mtmd-cli and crashes decoding (REFERENCE.md).
    mmproj = MmprojFacts("idefics3", ("model.vision_model.",), write_post_ln=True,
                         single_tokens=("\n\n", "\n", "<fake_token_around_image>", "<global-img>"))
    vision_input = "tiles"

    @classmethod
    def model_class(cls):
        from transformers import Idefics3ForConditionalGeneration

        return Idefics3ForConditionalGeneration

    @classmethod
    def parent_inputs(cls, input_ids, pixel_values, image_token_id):
        kw = super().parent_inputs(input_ids, pixel_values, image_token_id)
        if pixel_values is not None:
            kw["pixel_values"] = pixel_values[None]  # [batch 1, tiles + whole images, 3, H, W]
        return kw

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
        longest = size_of(getattr(ip, "size", None), "longest_edge") if getattr(ip, "do_resize", False) else None
        tiles = ip is not None and bool(getattr(ip, "do_image_splitting", False))
        tile = size_of(getattr(ip, "max_image_size", None), "longest_edge")
        from edgemed.errors import BadInputError

        if (tiles or longest) and tile != vc.image_size:
            raise BadInputError("preprocessor_config.json max_image_size", f"is {tile}, the vision tower takes "
                                f"{vc.image_size}", "set max_image_size.longest_edge to the tower's image_size")
        if tiles and not longest:
            raise BadInputError("preprocessor_config.json do_image_splitting", "is on with do_resize off; edgemed "
                                "cuts tiles after the longest-edge resize, as SmolVLM's and Idefics3's configs do",
                                "set do_resize true with size.longest_edge, or do_image_splitting false")
        return ImageFacts(
            image_size=vc.image_size,
            patch_size=vc.patch_size,
            image_mean=list(getattr(ip, "image_mean", [0.5, 0.5, 0.5])),
            image_std=list(getattr(ip, "image_std", [0.5, 0.5, 0.5])),
            resample=pil_resample_name(getattr(ip, "resample", 1)),
            resize_mode="longest_edge" if longest else "squash",
            longest_edge=longest,
            tile_marker="<fake_token_around_image>" if tiles else None,
            rescale_factor=float(getattr(ip, "rescale_factor", 1 / 255)),
            num_image_tokens=int(n),
            image_token=token,
            image_token_id=config.image_token_id,
            prefix="<fake_token_around_image><global-img>",
            suffix="<fake_token_around_image>",
            placeholder="<image>",
        )
