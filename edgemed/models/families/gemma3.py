"""Gemma 3 / MedGemma: SigLIP tower -> pooled projector -> Gemma 3 decoder (scaled embeddings,
bidirectional attention over image tokens)."""
from __future__ import annotations

from edgemed.models.base import DecoderFacts, ImageFacts, MmprojFacts, register_decoder
from edgemed.models.families._common import TowerProjectorDecoder, pil_resample_name


class Gemma3Adapter(TowerProjectorDecoder):
    """Gemma 3 / MedGemma: SigLIP tower -> pooled projector -> Gemma3 decoder (scaled embeddings)."""

    family = "gemma3"
    model_types = ("gemma3",)
    mmproj = MmprojFacts("gemma3", ("vision_tower.vision_model.", "vision_tower."), write_post_ln=True)
    fp16_unsafe = "Gemma 3 was trained in bf16 and its residual stream exceeds fp16's range"

    @classmethod
    def model_class(cls):
        from transformers import Gemma3ForConditionalGeneration

        return Gemma3ForConditionalGeneration

    decoder_token_type_ids = True

    @classmethod
    def parent_inputs(cls, input_ids, pixel_values, image_token_id):
        kw = super().parent_inputs(input_ids, pixel_values, image_token_id)
        if pixel_values is not None:
            kw["token_type_ids"] = (input_ids == image_token_id).long()
        return kw

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
        if getattr(ip, "do_pan_and_scan", False):  # off in Google's processor configs; crops would need their own blocks
            from edgemed.errors import BadInputError

            raise BadInputError("preprocessor_config.json do_pan_and_scan", "is true; edgemed feeds Gemma 3 one "
                                f"{vc.image_size}-px image per image, as the processor does by default",
                                "set do_pan_and_scan to false (Gemma 3's default)")
        token = tokenizer.convert_ids_to_tokens(config.image_token_id)
        boi = getattr(tokenizer, "boi_token", None) or "<start_of_image>"
        eoi = getattr(tokenizer, "eoi_token", None) or "<end_of_image>"
        return ImageFacts(
            image_size=vc.image_size,
            patch_size=vc.patch_size,
            image_mean=list(getattr(ip, "image_mean", [0.5, 0.5, 0.5])),
            image_std=list(getattr(ip, "image_std", [0.5, 0.5, 0.5])),
            resample=pil_resample_name(getattr(ip, "resample", 2)),
            resize_mode="squash",
            rescale_factor=float(getattr(ip, "rescale_factor", 1 / 255)),
            num_image_tokens=cls.num_image_tokens(config),
            image_token=token,
            image_token_id=config.image_token_id,
            prefix=f"\n\n{boi}",
            suffix=f"{eoi}\n\n",
            placeholder=boi,
        )


# llama.cpp hard-codes Gemma 3's 5 sliding : 1 global layers and its attention scale; the GGUF
# writer refuses models that differ. No builder support: bidirectional attention over images.
register_decoder(DecoderFacts(gguf_arch="GEMMA3", gguf_norm_shift=1.0), "gemma3", "gemma3_text")
