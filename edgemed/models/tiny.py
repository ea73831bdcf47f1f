"""Tiny random models of every supported family, built offline and deterministically.

Tests use them, and until the trained demo model ships `edgemed compress` with no MODEL
compresses the tiny LLaVA-SigLIP built here. They are real architectures (the same transformers
classes as LLaVA-Med, SmolVLM and MedGemma) with random weights, so every exporter, quantizer
and runtime path runs in seconds.
"""
from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<fake_token_around_image>", "<global-img>",
    "<start_of_image>", "<end_of_image>", "<image_soft_token>", "<end_of_utterance>",
]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "Is there a nodule in the left upper lobe? No, the lungs are clear.",
    "Is there a pleural effusion? Yes, a small right pleural effusion is present.",
    "What is the finding? Cardiomegaly with an enlarged cardiac silhouette.",
    "Is this a normal chest radiograph? Yes, no acute cardiopulmonary abnormality.",
    "Where is the pneumothorax? Left apical pneumothorax without mediastinal shift.",
    "Describe the image. Frontal chest x-ray, ribs, heart shadow, diaphragm, costophrenic angles.",
    "Which organ is abnormal? The heart. How large is the opacity? About two centimeters.",
]
FAMILIES = ("llava-siglip", "llava-clip", "idefics3", "gemma3", "llama", "mistral", "qwen2", "phi3")


def build_tokenizer(vocab_size: int = 400):
    """A byte-level BPE trained on a fixed corpus: deterministic, covers any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, extra_special_tokens={"image_token": "<image>"},
    )
    fast.chat_template = CHATML
    return fast


def _text_config(kind: str, vocab: int, **kw):
    import transformers as tf

    common = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=False,
                  bos_token_id=0, eos_token_id=2, pad_token_id=0)
    common.update(kw)
    cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config, "phi3": tf.Phi3Config}[kind]
    if kind == "mistral":
        common.setdefault("sliding_window", None)
    if kind == "phi3":
        common.update(pad_token_id=0)
    return cls(**common)


def build_tiny(family: str, out_dir: str | Path, seed: int = 0, **text_kw) -> Path:
    """Write a tiny random model of `family` (one of FAMILIES) with its tokenizer to out_dir."""
    import torch
    import transformers as tf

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family}; use one of {FAMILIES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    vocab = len(tok)
    image_id = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    processor = None
    if family in ("llava-siglip", "llava-clip"):
        if family == "llava-siglip":
            vc = tf.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                       image_size=32, patch_size=8)
            ip = tf.SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
            strategy, extra = "full", 0
        else:
            vc = tf.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                     image_size=32, patch_size=8, projection_dim=64)
            ip = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
            strategy, extra = "default", 1
        cfg = tf.LlavaConfig(vision_config=vc, text_config=_text_config("llama", vocab, **text_kw),
                             image_token_id=image_id, vision_feature_layer=-2,
                             vision_feature_select_strategy=strategy, projector_hidden_act="gelu")
        model = tf.LlavaForConditionalGeneration(cfg)
        processor = tf.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8,
                                      vision_feature_select_strategy=strategy, image_token="<image>",
                                      num_additional_image_tokens=extra, chat_template=CHATML)
    elif family == "idefics3":
        vc = tf.Idefics3VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, image_size=32, patch_size=8)
        cfg = tf.Idefics3Config(vision_config=vc, text_config=_text_config("llama", vocab, **text_kw),
                                image_token_id=image_id, scale_factor=2)
        model = tf.Idefics3ForConditionalGeneration(cfg)
    elif family == "gemma3":
        vc = tf.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   image_size=32, patch_size=8)
        tc = tf.Gemma3TextConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, vocab_size=vocab, max_position_embeddings=512,
                                 sliding_window=512, bos_token_id=0, eos_token_id=2, pad_token_id=0, **text_kw)
        cfg = tf.Gemma3Config(text_config=tc, vision_config=vc, mm_tokens_per_image=4, image_token_id=image_id,
                              boi_token_id=tok.convert_tokens_to_ids("<start_of_image>"),
                              eoi_token_id=tok.convert_tokens_to_ids("<end_of_image>"))
        model = tf.Gemma3ForConditionalGeneration(cfg)
        with torch.no_grad():  # transformers initialises this projection to zeros: images would vanish
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.5)
    else:
        model = tf.AutoModelForCausalLM.from_config(_text_config(family, vocab, **text_kw))
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    if processor is not None:
        processor.save_pretrained(out)
    return out
