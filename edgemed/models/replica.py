"""Tiny random replicas of real checkpoints, built from their real small files.

A replica keeps every field of the real config.json except the sizes (hidden, intermediate,
layers, heads), every token id, the real chat template, tokenizer_config.json, processor and
preprocessor configs; the weights are random. The real tokenizer (tokenizer.json / .model, MBs)
is not shipped: a byte-level BPE trained on a few sentences stands in, with the real special
tokens at their real ids and the real BOS policy, so the transformers processor built from the
replica's files is the real processor class with the real settings. Tests run every family's
export, runtime and parity on these (tests/fixtures/checkpoints/NAME/README.md says where each
file came from).

Checkpoints of the original LLaVA code (model_type llava_mistral: LLaVA-Med v1.5) are written in
that code's own layout (`model.layers.N`, `model.mm_projector.{0,2}`, the CLIP tower in a folder
of its own named by mm_vision_tower), so loading them exercises edgemed's normaliser.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
VISION_SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
# Files copied as they are (the tokenizer files are written by the factory).
KEPT_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja",
              "generation_config.json", "special_tokens_map.json")
_CORPUS = [
    "Is there a pleural effusion? Yes, a small right pleural effusion is present.",
    "Describe the image. Frontal chest x-ray, no acute cardiopulmonary abnormality.",
    "What is the finding? Cardiomegaly with an enlarged cardiac silhouette.",
    "USER: ASSISTANT: User: Assistant: system user assistant model [INST] [/INST]",
]


def shrink(cfg: dict[str, Any], sizes: dict[str, int] = SIZES) -> dict[str, Any]:
    """The config with its sizes replaced and every other field kept."""
    out = dict(cfg)
    heads = cfg.get("num_attention_heads")
    out.update(sizes)
    if "num_key_value_heads" in cfg and "num_key_value_heads" not in sizes:
        out["num_key_value_heads"] = sizes["num_attention_heads"] if cfg["num_key_value_heads"] in (None, heads) else 2
    if cfg.get("head_dim"):
        out["head_dim"] = sizes["hidden_size"] // sizes["num_attention_heads"]
    if isinstance(cfg.get("layer_types"), list):
        out["layer_types"] = cfg["layer_types"][:sizes["num_hidden_layers"]]
    if "mm_hidden_size" in cfg:
        out["mm_hidden_size"] = 64
    return out


def read_fixture(folder: Path) -> dict[str, Any]:
    """The real files of one checkpoint: config, tokenizer_config, chat template."""
    def load(name):
        p = folder / name
        return json.loads(p.read_text()) if p.is_file() else None

    config = load("config.json")
    if config is None:
        raise FileNotFoundError(f"{folder}: no config.json (see its README.md)")
    tok_cfg = load("tokenizer_config.json") or {}
    template = tok_cfg.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    elif (folder / "chat_template.json").is_file():
        template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    replica = load("edgemed_replica.json") or {}  # facts of the real tokenizer.json the factory needs
    if replica.get("chat_template_file"):  # a dated template kept under its own name
        template = (folder / replica["chat_template_file"]).read_text()
    return {"config": config, "tokenizer_config": tok_cfg, "chat_template": template, "replica": replica,
            "added_tokens": load("added_tokens.json") or {}}


def replica_tokenizer(tok_cfg: dict[str, Any], added: dict[str, int], adds_bos: bool, extra: dict[str, int],
                      dense: bool = False):
    """A byte-level BPE with the real special tokens at their real ids; `dense`: every id below the
    highest one taken (by tokens no merge reaches), as a real vocabulary has them, so that a token
    added later gets the next id, as it would in the real tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials: dict[str, int] = {d["content"]: int(i) for i, d in (tok_cfg.get("added_tokens_decoder") or {}).items()}
    specials.update(added)
    specials.update(extra)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    spec = json.loads(tok.to_str())
    taken, vocab, nxt = set(specials.values()), {}, 0
    for token, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1]):
        while nxt in taken:
            nxt += 1
        vocab[token] = nxt
        nxt += 1
    vocab.update(specials)
    if dense:
        used = set(vocab.values())
        vocab.update({f"<|replica_filler_{i}|>": i for i in range(max(used)) if i not in used})
    spec["model"]["vocab"] = vocab
    spec["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for t, i in sorted(specials.items(), key=lambda x: x[1])]
    out = Tokenizer.from_str(json.dumps(spec))
    out.decoder = decoders.ByteLevel()
    bos = tok_cfg.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    if adds_bos and bos:
        out.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, specials[bos])])
    return out


def build_replica(fixture: str | Path, out: str | Path, seed: int = 0, sizes: dict[str, int] | None = None,
                  dtype: str = "float32") -> Path:
    """Write a random model from the real files in `fixture` to `out`; returns `out`. Tiny by
    default; `sizes` (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads and
    optionally num_key_value_heads) gives another shape, `dtype` the stored dtype (the benchmarks
    write TinyLlama-shape checkpoints in bfloat16, as real checkpoints ship). Text models only
    take `sizes`/`dtype`."""
    import torch

    from edgemed.models.base import normaliser_for

    fixture, out = Path(fixture), Path(out)
    facts = read_fixture(fixture)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    normaliser = normaliser_for(facts["config"])
    if (sizes is not None or dtype != "float32") and (normaliser is not None or "vision_config" in facts["config"]):
        raise ValueError(f"{fixture}: sizes and dtype are for text models")
    if normaliser is not None and normaliser.name == "med-moe":
        _write_med_moe(facts, fixture, out)
    elif normaliser is not None:
        _write_original_llava(facts, fixture, out)
    else:
        _write_transformers(facts, fixture, out, sizes or SIZES, getattr(torch, dtype))
    return out


def _write_tokenizer(facts: dict[str, Any], out: Path, extra: dict[str, int] | None = None, dense: bool = False) -> None:
    tok_cfg = {**facts["replica"].get("tokenizer_config", {}), **facts["tokenizer_config"]}
    adds_bos = facts["replica"].get("tokenizer_adds_bos", tok_cfg.get("add_bos_token", False))
    extra = {**facts["replica"].get("special_tokens", {}), **(extra or {})}
    tok = replica_tokenizer(tok_cfg, facts["added_tokens"], adds_bos, extra, dense)
    tok.save(str(out / "tokenizer.json"))
    # The real class (LlamaTokenizer, GemmaTokenizer, ...) would rebuild its pipeline from the real
    # vocabulary files; the replica's tokenizer.json is the whole tokenizer.
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg.pop("auto_map", None)
    if facts["chat_template"] and "chat_template" in facts["tokenizer_config"]:
        tok_cfg["chat_template"] = facts["chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))


def _write_transformers(facts: dict[str, Any], fixture: Path, out: Path, sizes: dict[str, int] = SIZES,
                        dtype: Any = None) -> None:
    import torch
    import transformers as tf

    from edgemed.models.base import family_for

    raw = dict(facts["config"])
    for key in ("text_config", "vision_config"):
        if isinstance(raw.get(key), dict):
            raw[key] = shrink(raw[key], SIZES if key == "text_config" else VISION_SIZES)
    if "text_config" not in raw:
        raw = shrink(raw, sizes)
    model_type = raw.pop("model_type")
    config = tf.AutoConfig.for_model(model_type, **{k: v for k, v in raw.items() if k != "transformers_version"})
    adapter = family_for(model_type)
    if adapter is None:
        raise ValueError(f"{fixture}: model_type {model_type!r} has no edgemed family")
    cls = adapter.model_class()
    model = (cls.from_config(config, dtype=torch.float32) if hasattr(cls, "from_config")  # the Auto classes
             else cls._from_config(config, dtype=torch.float32))
    projection = getattr(getattr(model, "model", None), "multi_modal_projector", None)
    if projection is not None and hasattr(projection, "mm_input_projection_weight"):
        with torch.no_grad():  # Gemma 3 initialises this projection to zeros: images would vanish
            projection.mm_input_projection_weight.normal_(0, 0.5)
    if dtype is not None and dtype != torch.float32:
        model = model.to(dtype)
        config.dtype = dtype
    model.eval().save_pretrained(out)
    _write_tokenizer(facts, out)
    for name in KEPT_FILES:
        if (fixture / name).is_file():
            shutil.copyfile(fixture / name, out / name)
    if facts["replica"].get("chat_template_file"):
        (out / "chat_template.jinja").write_text(facts["chat_template"])
    if facts["replica"].get("processor"):  # the real processor files were not found: its class and settings
        _write_processor(facts, out)


def _write_processor(facts: dict[str, Any], out: Path) -> None:
    import transformers as tf

    spec = facts["replica"]["processor"]
    image_processor = getattr(tf, spec["image_processor"])(**spec.get("image_processor_kwargs", {}))
    tokenizer = tf.AutoTokenizer.from_pretrained(out)
    kw = {"image_seq_length": spec["image_seq_length"]} if "image_seq_length" in spec else {}
    processor = getattr(tf, spec["class"])(image_processor=image_processor, tokenizer=tokenizer,
                                           chat_template=facts["chat_template"], **kw)
    processor.save_pretrained(out)


def _write_original_llava(facts: dict[str, Any], fixture: Path, out: Path) -> None:
    """LLaVA-Med's layout: decoder keys at the top level, model.mm_projector.{0,2}, and the CLIP
    tower (here tiny and random) in a folder of its own that mm_vision_tower names."""
    import transformers as tf
    from safetensors.torch import save_file

    raw = shrink(facts["config"])
    clip = _write_tower(facts, fixture, out / "vision_tower")
    raw["mm_vision_tower"] = str(out / "vision_tower")
    text_fields = set(tf.MistralConfig().to_dict())
    tc = tf.MistralConfig(**{k: v for k, v in raw.items() if k in text_fields and k not in ("model_type", "architectures")})
    lm = tf.MistralForCausalLM(tc).eval()
    state = {k: v.contiguous() for k, v in lm.state_dict().items()}
    state.update(_projector(raw, "model.mm_projector."))
    # The published checkpoint carries a copy of the (frozen) tower too, which LLaVA's loader drops.
    state.update({"model.vision_tower.vision_tower.vision_model." + k: v.contiguous() for k, v in clip.state_dict().items()})
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    extra = {"<unk>": 0, "<s>": 1, "</s>": 2}  # Mistral's sentencepiece specials (LLaVA-Med keeps its tokenizer)
    facts = {**facts, "tokenizer_config": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                           "add_bos_token": True, **facts["tokenizer_config"]}}
    _write_tokenizer(facts, out, extra)
    for name in ("generation_config.json", "special_tokens_map.json"):
        if (fixture / name).is_file():
            shutil.copyfile(fixture / name, out / name)


def _write_tower(facts: dict[str, Any], fixture: Path, tower: Path):
    """A tiny random CLIP tower in a folder of its own, with the real tower's preprocessor_config.json."""
    import transformers as tf

    tower_fixture = fixture.parent / facts["replica"].get("vision_tower_fixture", "clip-vit-large-patch14-336")
    # One 64-wide head, as OpenAI CLIP's heads are (edgemed reads a tower copy's config off its shapes).
    vc = tf.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                             image_size=336, patch_size=14, projection_dim=64, hidden_act="quick_gelu")
    clip = tf.CLIPVisionModel(vc).eval()
    clip.save_pretrained(tower)
    name = "preprocessor_config.json"
    src = tower_fixture / name if (tower_fixture / name).is_file() else fixture.parent / "llava-1.5-7b-hf" / name
    shutil.copyfile(src, tower / name)
    return clip


def _projector(raw: dict[str, Any], prefix: str) -> dict[str, Any]:
    """LLaVA's mlp2x_gelu projector (nn.Sequential: Linear, GELU, Linear) under `prefix`."""
    import torch

    state, hidden = {}, raw["hidden_size"]
    for i, (a, b) in {0: (raw["mm_hidden_size"], hidden), 2: (hidden, hidden)}.items():
        layer = torch.nn.Linear(a, b)
        state[f"{prefix}{i}.weight"] = layer.weight.detach().contiguous()
        state[f"{prefix}{i}.bias"] = layer.bias.detach().contiguous()
    return state


def _write_med_moe(facts: dict[str, Any], fixture: Path, out: Path) -> None:
    """Med-MoE's layout (moellava/model/language_model/llava_phi_moe.py, moe/layer.py): Phi-2 keys at
    the top level; in each MoE layer `mlp.deepspeed_moe.gate.wg` (a router with a bias),
    `mlp.deepspeed_moe.experts.deepspeed_experts.K` and the shared `mlp.meta_moe` (the dense MLP it
    started from); `model.mm_projector.image_spatial_proj.{0,2}`; lm_head without bias; a copy of
    the CLIP tower under model.image_tower.image_tower, and the tower in its own folder that
    mm_image_tower names."""
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    raw = shrink(facts["config"])
    moe = dict(raw.get("moe") or {})
    if moe.get("moe_layers_idx"):
        idx = [i for i in moe["moe_layers_idx"] if i < raw["num_hidden_layers"]]
        experts = moe.get("num_experts", 4)
        experts = experts if isinstance(experts, list) else [experts] * len(moe["moe_layers_idx"])
        moe.update(moe_layers_idx=idx, num_experts=experts[:len(idx)])
        raw["moe"] = moe
    # Med-MoE's scripts name the tower by a relative path ("./clip-vit-large-patch14-336"): kept, with the
    # tower written there.
    tower = str(raw.get("mm_image_tower") or "")
    if tower.startswith("./"):
        clip = _write_tower(facts, fixture, out / tower)
    else:
        clip = _write_tower(facts, fixture, out / "image_tower")
        raw["mm_image_tower"] = str(out / "image_tower")
    fields = set(tf.PhiConfig().to_dict())
    tc = tf.PhiConfig(**{k: v for k, v in raw.items() if k in fields and k not in ("model_type", "architectures")})
    lm = tf.PhiForCausalLM(tc).eval()
    state = {k: v.contiguous() for k, v in lm.state_dict().items() if k != "lm_head.bias"}
    for layer, n in zip(moe.get("moe_layers_idx", []), moe.get("num_experts", [])):
        dense = f"model.layers.{layer}.mlp."
        for k in [k for k in state if k.startswith(dense)]:  # the dense MLP becomes the shared expert
            state[dense + "meta_moe." + k[len(dense):]] = state.pop(k)
        router = torch.nn.Linear(tc.hidden_size, n)
        torch.nn.init.normal_(router.weight, std=2.0 / tc.hidden_size**0.5)  # decisive, varied routing
        state[dense + "deepspeed_moe.gate.wg.weight"] = router.weight.detach().contiguous()
        state[dense + "deepspeed_moe.gate.wg.bias"] = router.bias.detach().contiguous()
        for e in range(n):
            expert = tf.models.phi.modeling_phi.PhiMLP(tc)
            for k, v in expert.state_dict().items():
                state[f"{dense}deepspeed_moe.experts.deepspeed_experts.{e}.{k}"] = v.detach().contiguous()
    state.update(_projector(raw, "model.mm_projector.image_spatial_proj."))
    state.update({"model.image_tower.image_tower.vision_model." + k: v.contiguous() for k, v in clip.state_dict().items()})
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    eot = "<|endoftext|>"  # Phi-2's (CodeGen's) one special token: BOS, EOS and UNK, never added
    facts = {**facts, "tokenizer_config": {"bos_token": eot, "eos_token": eot, "unk_token": eot,
                                           "add_bos_token": False, **facts["tokenizer_config"]}}
    _write_tokenizer(facts, out, {eot: 50256}, dense=True)  # Phi-2's vocab.json: ids 0..50256, no gap
    for name in ("generation_config.json", "special_tokens_map.json"):
        if (fixture / name).is_file():
            shutil.copyfile(fixture / name, out / name)
