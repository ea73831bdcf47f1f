"""Checkpoints written by the original LLaVA code (github:haotian-liu/LLaVA and its forks, among
them LLaVA-Med v1.5, github:microsoft/LLaVA-Med): `model_type` "llava_mistral" or "llava_llama"
(or "llava" with `mm_vision_tower`), the decoder's keys at the top level (`model.layers.N`), the
projector as `model.mm_projector.{0,2}`, the CLIP tower named by `mm_vision_tower` and loaded from
its own folder, no image token in the vocabulary.

They are normalised into transformers' LlavaForConditionalGeneration, which computes the same
function (llava/model/llava_arch.py: hidden_states[mm_vision_select_layer], CLS dropped for
"patch", mlp2x_gelu projector, features spliced where the prompt holds the image), without running
the repository's code. What differs is spelled out where it is decided:
- the image placeholder: LLaVA splices at IMAGE_TOKEN_INDEX (-200), which no tokenizer makes, so
  edgemed marks image positions with the tokenizer's `<unk>`, a token the model never sees in
  text; the vocabulary and every logit stay the model's own (adding an `<image>` row would add a
  logit the model never had);
- the prompt: the conversation format LLaVA-Med's README and eval scripts use (`mistral_instruct`,
  llava/conversation.py: LLAMA_2 separators, empty system prompt) as a chat template, tokenized
  once as the transformers processor does (LLaVA's tokenizer_image_token tokenizes the text
  around the image separately, which can differ by a token at the seam);
- pixels: `image_aspect_ratio: pad` is LLaVA's expand2square with the mean colour, which
  LlavaImageProcessor's `do_pad` reproduces.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from edgemed.errors import BadInputError
from edgemed.models.base import Normaliser

# llava/conversation.py conv_mistral_instruct (sep_style LLAMA_2, sep "", sep2 "</s>") as a chat
# template over typed parts; the question follows its images ("<image>\n" + question, as
# llava/eval/model_vqa.py writes it). __IMAGE__ is replaced by the placeholder token.
MISTRAL_INSTRUCT = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- for part in message['content'] | selectattr('type', 'equalto', 'text') -%}"
    "{%- set ns.system = ns.system + part['text'] -%}{%- endfor -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '[INST] ' -}}"
    "{%- if ns.system -%}{{- '<<SYS>>\\n' + ns.system + '\\n<</SYS>>\\n\\n' -}}{%- set ns.system = '' -%}{%- endif -%}"
    "{%- for part in message['content'] | selectattr('type', 'equalto', 'image') -%}{{- '__IMAGE__\\n' -}}{%- endfor -%}"
    "{%- for part in message['content'] | selectattr('type', 'equalto', 'text') -%}{{- part['text'] -}}{%- endfor -%}"
    "{{- ' [/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- for part in message['content'] | selectattr('type', 'equalto', 'text') -%}"
    "{%- generation -%}{{- ' ' + part['text'] + ' ' + eos_token -}}{%- endgeneration -%}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
_DECODERS = {"llava_mistral": "mistral", "llava_llama": "llama", "llava": "llama"}


class OriginalLlava(Normaliser):
    name = "llava-original"
    family = "llava"
    what = "LLaVA / LLaVA-Med checkpoint written by the original LLaVA code"
    # What differs between the original LLaVA code and its forks (MoE-LLaVA / Med-MoE rename these).
    decoders: dict[str, str] = _DECODERS  # model_type -> the transformers decoder it holds
    tower_field = "mm_vision_tower"
    projector_field = "mm_projector_type"
    tower_prefix = "model.vision_tower.vision_tower.vision_model."  # the tower copy inside the checkpoint
    projector_prefix = "model.mm_projector."
    dropped_prefixes: tuple[str, ...] = ("model.vision_tower.",)
    conversation = MISTRAL_INSTRUCT

    @classmethod
    def matches(cls, raw: dict[str, Any]) -> bool:
        return raw.get("model_type") in cls.decoders and cls.tower_field in raw

    @classmethod
    def check(cls, raw: dict[str, Any], source: str) -> None:
        """Refuse the variants LlavaForConditionalGeneration does not compute, by the field that says so."""
        wrong = {
            cls.projector_field: (raw.get(cls.projector_field, "linear"), ("mlp2x_gelu",)),
            "mm_patch_merge_type": (raw.get("mm_patch_merge_type", "flat"), ("flat",)),
            "image_aspect_ratio": (raw.get("image_aspect_ratio", "square"), ("pad", "square", None)),
            "mm_use_im_start_end": (raw.get("mm_use_im_start_end", False), (False,)),
            "mm_vision_select_feature": (raw.get("mm_vision_select_feature", "patch"), ("patch", "cls_patch")),
        }
        for key, (value, ok) in wrong.items():
            if value not in ok:
                raise BadInputError(source, f"{key} is {value!r}; edgemed normalises LLaVA checkpoints with "
                                    f"{key} in {[v for v in ok if v is not None]} (LLaVA-1.5 / LLaVA-Med v1.5)",
                                    "use a LLaVA-1.5-style checkpoint, or a transformers (llava-hf) conversion of it")

    @classmethod
    def tower(cls, folder: Path, raw: dict[str, Any], vision_tower: str | None) -> str | None:
        """Where the CLIP tower comes from, as LLaVA's own loader takes it (builder.py loads it from
        mm_vision_tower and drops the checkpoint's copy): --vision-tower, else mm_vision_tower where
        it is a folder or in the local Hugging Face cache; None: the copy inside the checkpoint."""
        import transformers as tf

        name = vision_tower or str(raw[cls.tower_field])
        if not vision_tower and name.startswith(("./", "../")) and (folder / name).is_dir():
            name = str((folder / name).resolve())  # a path relative to the checkpoint (Med-MoE's training scripts)
        try:
            tf.CLIPVisionConfig.from_pretrained(name, local_files_only=_offline())
            return name
        except (OSError, ValueError) as e:
            openai_clip = name.startswith("openai/") or Path(name).name.startswith("clip-vit-")
            if vision_tower or not _tower_keys(folder, cls.tower_prefix) or not openai_clip:
                raise BadInputError(str(folder), f"its vision tower {name!r} is not available "
                                    f"({str(e).splitlines()[0][:160]})",
                                    "pass --vision-tower DIR (a folder holding the CLIP tower's config.json, "
                                    "preprocessor_config.json and model.safetensors)") from None
            return None

    @classmethod
    def config(cls, folder: Path, raw: dict[str, Any], vision_tower: str | None = None):
        import transformers as tf

        cls.check(raw, str(folder))
        tower = cls.tower(folder, raw, vision_tower)
        if tower is not None:
            vc = tf.CLIPVisionConfig.from_pretrained(tower, local_files_only=_offline())
        else:
            vc = _tower_config_from_shapes(folder, cls.tower_prefix)
        tc = cls.text_config(folder, raw)
        return tf.LlavaConfig(
            vision_config=vc, text_config=tc, image_token_id=cls.image_token_id(folder, raw, tc),
            vision_feature_layer=raw.get("mm_vision_select_layer", -2),
            vision_feature_select_strategy="default" if raw.get("mm_vision_select_feature", "patch") == "patch" else "full",
            projector_hidden_act="gelu", multimodal_projector_bias=True,
            image_seq_length=(vc.image_size // vc.patch_size) ** 2,
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
        )

    @classmethod
    def text_config(cls, folder: Path, raw: dict[str, Any]):
        """The transformers config of the decoder: the checkpoint's fields that the decoder's config has."""
        import transformers as tf

        text_cls = tf.AutoConfig.for_model(cls.decoders[raw["model_type"]]).__class__
        fields = set(text_cls().to_dict())
        return text_cls(**{k: v for k, v in raw.items() if k in fields and k not in ("model_type", "architectures")})

    @classmethod
    def image_token_id(cls, folder: Path, raw: dict[str, Any], tc) -> int:
        """The token that marks image positions: `<unk>`, which the model never sees in text."""
        if raw.get("unk_token_id") is None and tc.bos_token_id == 1:
            return 0  # Llama/Mistral sentencepiece vocabularies: <unk> 0, <s> 1, </s> 2
        return raw.get("unk_token_id", 0)

    @classmethod
    def rename(cls, key: str) -> str | None:
        """A checkpoint key -> LlavaForConditionalGeneration's, None for what it does not hold."""
        if key.startswith(cls.projector_prefix):
            i, rest = key[len(cls.projector_prefix):].split(".", 1)
            return f"model.multi_modal_projector.linear_{ {'0': 1, '2': 2}[i] }.{rest}"
        if key.startswith(cls.tower_prefix):
            return "model.vision_tower." + key[len(cls.tower_prefix):]
        if key.startswith(cls.dropped_prefixes):
            return None
        if key.startswith("model."):
            return "model.language_model." + key[len("model."):]
        if key.startswith("lm_head."):
            return key
        return None

    @classmethod
    def state_dict(cls, folder: Path, raw: dict[str, Any], config, vision_tower: str | None, allow_pickle: bool):
        """The LlavaForConditionalGeneration state dict from the checkpoint's safetensors (and the tower's)."""
        from safetensors import safe_open

        tower = cls.tower(folder, raw, vision_tower)
        out: dict[str, Any] = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                for key in st.keys():
                    new = cls.rename(key)
                    if new is None or (tower is not None and new.startswith("model.vision_tower.")):
                        continue
                    out[new] = st.get_tensor(key).float()
        if tower is not None:
            out.update(_tower_state(tower, config, allow_pickle, str(folder)))
        return out

    @classmethod
    def processor(cls, folder: Path, raw: dict[str, Any], config, tokenizer, vision_tower: str | None):
        import transformers as tf

        tower = cls.tower(folder, raw, vision_tower)
        size = config.vision_config.image_size
        if tower is not None:
            try:
                base = tf.CLIPImageProcessor.from_pretrained(tower, local_files_only=_offline()).to_dict()
            except (OSError, ValueError) as e:
                raise BadInputError(str(folder), f"its vision tower {tower!r} has no preprocessor_config.json ({e})",
                                    "pass --vision-tower DIR holding the CLIP tower's preprocessor_config.json") from None
        else:  # an OpenAI CLIP tower: CLIPImageProcessor's defaults are OpenAI's (mean/std, bicubic) at its size
            base = tf.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).to_dict()
        keep = ("size", "crop_size", "do_center_crop", "do_resize", "do_rescale", "do_normalize", "rescale_factor",
                "image_mean", "image_std", "resample", "do_convert_rgb")
        ip = tf.LlavaImageProcessor(**{k: base[k] for k in keep if k in base},
                                    do_pad=raw.get("image_aspect_ratio") == "pad")
        token = cls.image_token(tokenizer, config)
        template = cls.conversation.replace("__IMAGE__", token)
        tokenizer.chat_template = template
        return tf.LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
                                 vision_feature_select_strategy=config.vision_feature_select_strategy,
                                 image_token=token, num_additional_image_tokens=1, chat_template=template)

    @classmethod
    def image_token(cls, tokenizer, config) -> str:
        return tokenizer.convert_ids_to_tokens(config.image_token_id)


def _tower_keys(folder: Path, prefix: str) -> dict[str, tuple[int, ...]]:
    """The CLIP tower tensors a LLaVA checkpoint carries (names after the prefix -> shapes), from
    the safetensors headers alone."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                if key.startswith(prefix):
                    shapes[key[len(prefix):]] = tuple(st.get_slice(key).get_shape())
    return shapes


def _tower_config_from_shapes(folder: Path, prefix: str):
    """The CLIPVisionConfig of the tower copy inside a checkpoint, read off its tensor shapes; the
    head count follows OpenAI CLIP's 64-wide heads (ViT-B 768/12, ViT-L 1024/16)."""
    import transformers as tf

    shapes = _tower_keys(folder, prefix)
    hidden = shapes["embeddings.class_embedding"][0]
    patch = shapes["embeddings.patch_embedding.weight"][-1]
    positions = shapes["embeddings.position_embedding.weight"][0]
    layers = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.layers."))
    return tf.CLIPVisionConfig(hidden_size=hidden, intermediate_size=shapes["encoder.layers.0.mlp.fc1.weight"][0],
                               num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), patch_size=patch,
                               image_size=round((positions - 1) ** 0.5) * patch)


def _tower_state(tower: str, config, allow_pickle: bool, source: str) -> dict[str, Any]:
    import torch
    import transformers as tf

    try:
        model = tf.CLIPVisionModel.from_pretrained(tower, config=config.vision_config, dtype=torch.float32,
                                                   use_safetensors=None if allow_pickle else True,
                                                   local_files_only=_offline())
    except (OSError, ValueError) as e:
        raise BadInputError(source, f"could not load its vision tower {tower!r} ({str(e).splitlines()[0][:200]})",
                            "pass --vision-tower DIR holding the CLIP tower's safetensors weights") from None
    return {"model.vision_tower." + k: v for k, v in model.state_dict().items()}


def _offline() -> bool:
    from edgemed._resources import online

    return not online()

