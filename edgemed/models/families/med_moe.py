"""Med-MoE (github:jiangsongtao/Med-MoE) and the MoE-LLaVA code it forks: a CLIP tower, an
mlp2x_gelu projector and a Phi-2 decoder whose every other FFN is a DeepSpeed mixture of experts.

What the checkpoint computes, read from its code (moe/layer.py, moe/sharded_moe.py,
moellava/model/language_model/llava_phi_moe.py; the decoder is transformers' Phi, vendored):

    MoE layer (layers moe.moe_layers_idx):  y = sum_k g_k(x) * Expert_{e_k}(x) + Shared(x)
        router logits = wg(x) in fp32 (a Linear with a bias in Med-MoE, whose router is trained
        apart and loaded; without one in MoE-LLaVA); g = softmax(logits)
        top-1: e_1 = argmax g, weight g_{e_1} (not renormalised)
        top-2: e_1, e_2 the two largest, weights renormalised to sum 1
        Shared: Med-MoE's `meta_moe`, the layer's original dense MLP, always on (MoE-LLaVA has none)
        use_residual: DeepSpeed's residual MoE, y_moe * c_0 + MLP(x) * c_1, c = softmax(coefficient(x))

edgemed holds this in `MedMoePhiModel`, transformers' PhiModel with those layers' MLP replaced by
`MedMoeBlock`, registered with transformers' Auto classes as model_type "med_moe_phi", so the
normalised model is a LlavaForConditionalGeneration like every LLaVA (export, quantization and
parity need nothing else). Where edgemed differs from the original, on purpose:
- every expert is computed and the unchosen ones are weighted 0 (one static graph that ONNX Runtime
  runs and int8/int4 quantizes per expert), rather than dispatching tokens: same numbers, E times
  the expert FLOPs;
- DeepSpeed drops tokens past an expert's capacity; at the capacity Med-MoE sets at evaluation
  (factor 4, and drop_tokens=False for top-1) no token is dropped up to 8 experts, so edgemed
  never drops (more experts with top-2 are refused);
- Med-MoE's top-2 gate adds Gumbel noise to the logits before picking the second expert, at
  evaluation too, so its answers change from run to run; edgemed picks the second expert by its
  logit alone (the noise-free routing).
- the image placeholder: LLaVA splices at IMAGE_TOKEN_INDEX (-200); Phi-2's tokenizer has no
  spare token (its `<|endoftext|>` separates turns), so edgemed adds `<image>` to the tokenizer at
  its next id, a row that Phi-2's 51200-row embedding already has and no text reaches: the
  vocabulary of the logits stays the model's own.

No GGUF: llama.cpp has Phi-2 (PHI2, dense) and Phi-3.5-MoE (PHIMOE: SwiGLU experts, a router
without bias, no shared expert), nothing for Phi-2 blocks with routed GELU experts, a biased
router and a shared expert.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgemed.errors import BadInputError
from edgemed.models.base import DecoderFacts, register_decoder, register_own_model_type
from edgemed.models.families.llava_original import OriginalLlava

# moellava/conversation.py conv_phi (SeparatorStyle.TWO, sep " ", sep2 "<|endoftext|>") over typed
# parts: a user turn's images come first ("<image>\n" + question, as its eval scripts write it).
CONV_PHI = (
    "{%- set ns = namespace(system=\"A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.\") -%}"
    "{%- for message in messages if message['role'] == 'system' -%}{%- set ns.system = '' -%}"
    "{%- for part in message['content'] | selectattr('type', 'equalto', 'text') -%}"
    "{%- set ns.system = ns.system + part['text'] -%}{%- endfor -%}{%- endfor -%}"
    "{{- ns.system + ' ' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- 'USER: ' -}}"
    "{%- for part in message['content'] | selectattr('type', 'equalto', 'image') -%}{{- '__IMAGE__\\n' -}}{%- endfor -%}"
    "{%- for part in message['content'] | selectattr('type', 'equalto', 'text') -%}{{- part['text'] -}}{%- endfor -%}"
    "{{- ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'ASSISTANT: ' -}}"
    "{%- for part in message['content'] | selectattr('type', 'equalto', 'text') -%}"
    "{%- generation -%}{{- part['text'] + eos_token -}}{%- endgeneration -%}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)
IMAGE_TOKEN = "<image>"
MODEL_TYPE = "med_moe_phi"


def _phi():
    from transformers.models.phi import configuration_phi, modeling_phi

    return configuration_phi, modeling_phi


def _classes():
    """MedMoePhiConfig, MedMoeBlock, MedMoePhiModel (transformers is imported only when needed)."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _define()
    return _CLASSES


_CLASSES = None


def _define():
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModel

    configuration_phi, modeling_phi = _phi()

    class MedMoePhiConfig(configuration_phi.PhiConfig):
        """Phi-2 with DeepSpeed MoE layers as Med-MoE / MoE-LLaVA write them."""

        model_type = MODEL_TYPE

        def __init__(self, moe_layers=(), num_experts=4, top_k=1, router_bias=True, shared_expert=True,
                     use_residual=False, **kw):
            self.moe_layers = list(moe_layers)
            self.num_experts = int(num_experts)
            self.top_k = int(top_k)
            self.router_bias = bool(router_bias)
            self.shared_expert = bool(shared_expert)
            self.use_residual = bool(use_residual)
            super().__init__(**kw)

    class MedMoeBlock(nn.Module):
        """Router + experts (+ the shared expert, + DeepSpeed's residual mix); see the module doc."""

        def __init__(self, config):
            super().__init__()
            self.top_k, self.num_experts = config.top_k, config.num_experts
            self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=config.router_bias)
            self.experts = nn.ModuleList(modeling_phi.PhiMLP(config) for _ in range(config.num_experts))
            self.shared = modeling_phi.PhiMLP(config) if config.shared_expert else None
            if config.use_residual:
                self.residual = modeling_phi.PhiMLP(config)
                self.coefficient = nn.Linear(config.hidden_size, 2)

        def routing(self, x):
            """[..., E] combine weights: the chosen experts' gate values, 0 elsewhere."""
            logits = self.gate(x.float())  # TopKGate computes the router in fp32
            gates = torch.softmax(logits, dim=-1)
            first = torch.argmax(gates, dim=-1, keepdim=True)
            mask1 = torch.zeros_like(gates).scatter(-1, first, 1.0)
            if self.top_k == 1:
                return gates * mask1
            second = torch.argmax(logits.masked_fill(mask1.bool(), float("-inf")), dim=-1, keepdim=True)
            mask2 = torch.zeros_like(gates).scatter(-1, second, 1.0)
            g1, g2 = (gates * mask1).sum(-1, keepdim=True), (gates * mask2).sum(-1, keepdim=True)
            denom = torch.clamp(g1 + g2, min=torch.finfo(gates.dtype).eps)
            return (g1 / denom) * mask1 + (g2 / denom) * mask2

        def forward(self, x):
            weights = self.routing(x).to(x.dtype)
            out = weights[..., 0:1] * self.experts[0](x)
            for e in range(1, self.num_experts):
                out = out + weights[..., e:e + 1] * self.experts[e](x)
            if hasattr(self, "coefficient"):
                coef = torch.softmax(self.coefficient(x), dim=-1)
                out = out * coef[..., 0:1] + self.residual(x) * coef[..., 1:]
            if self.shared is not None:
                out = out + self.shared(x)
            return out

    class MedMoePhiModel(modeling_phi.PhiModel):
        config_class = MedMoePhiConfig

        def __init__(self, config):
            super().__init__(config)
            for i in config.moe_layers:
                self.layers[i].mlp = MedMoeBlock(config)
            self.post_init()

    AutoConfig.register(MODEL_TYPE, MedMoePhiConfig, exist_ok=True)
    AutoModel.register(MedMoePhiConfig, MedMoePhiModel, exist_ok=True)
    return MedMoePhiConfig, MedMoeBlock, MedMoePhiModel


def register() -> None:
    """Make model_type "med_moe_phi" known to transformers' Auto classes (a converted Med-MoE folder
    then loads with LlavaForConditionalGeneration after `import edgemed.models`)."""
    _classes()


class MedMoe(OriginalLlava):
    """Med-MoE / MoE-LLaVA on Phi-2 (`moe_llava_phi`; its dense stage-2 model `llava_phi`)."""

    name = "med-moe"
    what = "Med-MoE / MoE-LLaVA (Phi-2) checkpoint"
    decoders = {"moe_llava_phi": MODEL_TYPE, "llava_phi": MODEL_TYPE}
    tower_field = "mm_image_tower"
    projector_field = "image_projector_type"
    tower_prefix = "model.image_tower.image_tower.vision_model."
    projector_prefix = "model.mm_projector.image_spatial_proj."
    dropped_prefixes = ("model.image_tower.", "model.video_tower.", "model.mm_projector.")
    conversation = CONV_PHI

    @classmethod
    def check(cls, raw: dict[str, Any], source: str) -> None:
        super().check(raw, source)
        if raw.get("mm_video_tower"):
            raise BadInputError(source, f"has a video tower ({raw['mm_video_tower']!r}); edgemed's LLaVA family "
                                "takes images only", "use an image-only Med-MoE / MoE-LLaVA checkpoint")
        moe = _moe(raw)
        if moe is None:
            return
        if int(moe.get("top_k_experts", 1)) not in (1, 2):
            raise BadInputError(source, f"moe.top_k_experts is {moe.get('top_k_experts')!r}; DeepSpeed MoE (and "
                                "edgemed) route to 1 or 2 experts", "use a top-1 or top-2 checkpoint")
        experts = set(_experts(moe, source))
        if len(experts) != 1:
            raise BadInputError(source, f"moe.num_experts differs between layers ({sorted(experts)})",
                                "edgemed holds the same number of experts in every MoE layer")
        if int(moe.get("top_k_experts", 1)) == 2 and experts.pop() > 8:
            raise BadInputError(source, "top-2 routing over more than 8 experts: Med-MoE's gate drops tokens past "
                                "an expert's capacity there, which edgemed does not reproduce",
                                "use a checkpoint with at most 8 experts per layer")

    @classmethod
    def text_config(cls, folder: Path, raw: dict[str, Any]):
        configuration_phi, _ = _phi()
        config_cls = _classes()[0]
        fields = set(configuration_phi.PhiConfig().to_dict())
        kw = {k: v for k, v in raw.items() if k in fields and k not in ("model_type", "architectures")}
        if kw.get("rope_scaling") is None:  # transformers 5 reads RoPE from rope_theta; a null rope_scaling only warns
            kw.pop("rope_scaling", None)
        moe = _moe(raw)
        if moe is None:  # the dense stage-2 model (llava_phi)
            return config_cls(**kw)
        keys = _weight_keys(folder)
        return config_cls(
            moe_layers=moe["moe_layers_idx"], num_experts=_experts(moe, str(folder))[0],
            top_k=int(moe.get("top_k_experts", 1)), use_residual=bool(moe.get("use_residual", False)),
            # Med-MoE's router has a bias and its layers keep the dense MLP as a shared expert; the
            # MoE-LLaVA checkpoints it forks have neither. The weights decide (a config alone: Med-MoE).
            router_bias=not keys or any(k.endswith("deepspeed_moe.gate.wg.bias") for k in keys),
            shared_expert=not keys or any(".mlp.meta_moe." in k for k in keys), **kw)

    @classmethod
    def image_token_id(cls, folder: Path, raw: dict[str, Any], tc) -> int:
        """The id `<image>` has, or gets when edgemed adds it: the tokenizer's next id (a config alone:
        the last embedding row)."""
        ids = _tokenizer_ids(folder)
        if not ids:
            return int(tc.vocab_size) - 1
        new = ids.get(IMAGE_TOKEN, max(ids.values()) + 1)
        if new >= tc.vocab_size:
            raise BadInputError(str(folder), f"its tokenizer has no room for an image token (next id {new}, "
                                f"{tc.vocab_size} embedding rows)", "use a checkpoint whose embedding has spare rows")
        return new

    @classmethod
    def image_token(cls, tokenizer, config) -> str:
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        got = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:  # the artifact's tokenizer.json, read back, must give the same id
            from tokenizers import Tokenizer

            reread = Tokenizer.from_str(backend.to_str()).token_to_id(IMAGE_TOKEN)
            got = got if reread == got else reread
        if got != config.image_token_id:
            raise BadInputError(str(getattr(tokenizer, "name_or_path", "tokenizer")),
                                f"added {IMAGE_TOKEN} at id {got}, expected {config.image_token_id}",
                                "check that tokenizer.json and the checkpoint belong together")
        return IMAGE_TOKEN

    @classmethod
    def rename(cls, key: str) -> str | None:
        parts = key.split(".")
        if len(parts) > 5 and parts[:2] == ["model", "layers"] and parts[3] == "mlp":
            head, rest = ".".join(parts[:4]), ".".join(parts[4:])
            for old, new in (("deepspeed_moe.gate.wg.", "gate."), ("deepspeed_moe.experts.deepspeed_experts.", "experts."),
                             ("meta_moe.", "shared."), ("mlp.", "residual."), ("coefficient.", "coefficient.")):
                if rest.startswith(old):
                    return f"model.language_model.{head[len('model.'):]}.{new}{rest[len(old):]}"
        return super().rename(key)


def _moe(raw: dict[str, Any]) -> dict[str, Any] | None:
    moe = raw.get("moe")
    return moe if isinstance(moe, dict) and moe.get("moe_enable", True) and moe.get("moe_layers_idx") else None


def _experts(moe: dict[str, Any], source: str) -> list[int]:
    n = moe.get("num_experts", 4)
    n = n if isinstance(n, list) else [n] * len(moe["moe_layers_idx"])
    if len(n) != len(moe["moe_layers_idx"]):
        raise BadInputError(source, "moe.num_experts and moe.moe_layers_idx have different lengths",
                            "check the checkpoint's config.json")
    return [int(x) for x in n]


def _weight_keys(folder: Path) -> list[str]:
    """Tensor names from the safetensors headers alone."""
    from safetensors import safe_open

    keys: list[str] = []
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            keys += list(st.keys())
    return keys


def _tokenizer_ids(folder: Path) -> dict[str, int]:
    """token -> id of tokenizer.json's vocabulary and added tokens (empty without the file)."""
    p = Path(folder) / "tokenizer.json"
    if not p.is_file():
        return {}
    spec = json.loads(p.read_text())
    ids = dict(spec.get("model", {}).get("vocab") or {})
    ids.update({t["content"]: int(t["id"]) for t in spec.get("added_tokens") or []})
    return ids


register_decoder(DecoderFacts(gguf_missing="llama.cpp has Phi-2 (PHI2, dense) and Phi-3.5-MoE (PHIMOE: SwiGLU "
                                           "experts, a router without bias, no shared expert), no architecture for "
                                           "Phi-2 blocks with routed GELU experts, a biased router and a shared expert"),
                 MODEL_TYPE)
register_own_model_type(MODEL_TYPE, register)
