"""Med-MoE (github:jiangsongtao/Med-MoE) as published: a tiny replica in its own key layout, built from
tests/fixtures/checkpoints/med-moe-phi2/ (config.json reconstructed field by field, sources in its
README), normalised without its code and checked against a forward transcribed from its code
(moe/sharded_moe.py's gate, dispatch and combine; moe/layer.py's shared `meta_moe` expert;
moellava/model/llava_arch.py's splice), then through compress and the runtime."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoints" / "med-moe-phi2"
QUESTION = "Is there a pleural effusion?"
ONE_TURN = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def med_moe(tmp_path_factory):
    from edgemed.models.replica import build_replica

    return build_replica(FIXTURE, tmp_path_factory.mktemp("med-moe") / "med-moe-phi2", seed=0)


def _image(w=400, h=300, seed=0):
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def _variant(src: Path, out: Path, variant: str) -> Path:
    """The same replica in MoE-LLaVA's layout (LanguageBind/MoE-LLaVA-Phi2-2.7B-4e, which Med-MoE
    forks: top-2 routing, a router without bias, no shared expert), or as Med-MoE's dense stage-2
    model (llava_phi: the MLPs the experts started from, no moe)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    state = load_file(out / "model.safetensors")
    raw = json.loads((out / "config.json").read_text())
    if variant == "moe-llava top-2":
        state = {k: v for k, v in state.items() if ".meta_moe." not in k and not k.endswith("gate.wg.bias")}
        raw["moe"] = {**raw["moe"], "top_k_experts": 2}
    else:
        state = {k.replace(".mlp.meta_moe.", ".mlp."): v for k, v in state.items() if ".deepspeed_moe." not in k}
        raw.pop("moe")
        raw.update(model_type="llava_phi", architectures=["LlavaPhiForCausalLM"])
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    return out


class DeepSpeedMoE:
    """moe/layer.py MoE.forward at evaluation in one process, transcribed: TopKGate (router in fp32),
    top1gating / top2gating, the dispatch einsum "sec,sm->ecm", each expert on its own tokens, the
    combine einsum "sec,ecm->sm", plus the shared meta_moe MLP. Med-MoE builds its layers with
    eval_capacity_factor 4 and drop_tokens=False (top-1: capacity = the largest expert count).
    Random token selection only orders tokens past capacity, and none are; the top-2 Gumbel noise is
    left out (edgemed routes without it, as its module doc says)."""

    def __init__(self, state, prefix, config, k, num_experts):
        import torch
        import transformers as tf

        mlp = tf.models.phi.modeling_phi.PhiMLP
        self.k, self.E = k, num_experts
        bias = prefix + "deepspeed_moe.gate.wg.bias" in state
        self.wg = torch.nn.Linear(config.hidden_size, num_experts, bias=bias)
        self.wg.load_state_dict({n: state[prefix + "deepspeed_moe.gate.wg." + n] for n in ("weight", "bias")[:1 + bias]})
        self.experts = []
        for e in range(num_experts):
            m = mlp(config)
            m.load_state_dict({n: v for n, v in _sub(state, f"{prefix}deepspeed_moe.experts.deepspeed_experts.{e}.").items()})
            self.experts.append(m)
        meta = _sub(state, prefix + "meta_moe.")
        self.meta = None
        if meta:
            self.meta = mlp(config)
            self.meta.load_state_dict(meta)

    def gate(self, x):
        import torch
        import torch.nn.functional as F

        logits = self.wg(x.float())
        gates = F.softmax(logits, dim=1)
        S, E = gates.shape
        mask1 = F.one_hot(torch.argmax(gates, dim=1), num_classes=E)
        if self.k == 1:
            capacity = int(mask1.sum(0).max())  # drop_tokens=False
            locations1_s = torch.sum((torch.cumsum(mask1, dim=0) - 1) * mask1, dim=1)
            gates = gates * mask1.float()
            return torch.einsum("se,sc->sec", gates, F.one_hot(locations1_s, capacity).float())
        capacity = max(int(math.ceil(S / E * 4 * 2)), 0)
        mask2 = F.one_hot(torch.argmax(logits.masked_fill(mask1.bool(), float("-inf")), dim=1), num_classes=E)
        locations1 = torch.cumsum(mask1, dim=0) - 1
        locations2 = torch.cumsum(mask2, dim=0) - 1 + torch.sum(mask1, dim=0, keepdim=True)
        mask1 = mask1 * torch.lt(locations1, capacity)
        mask2 = mask2 * torch.lt(locations2, capacity)
        l1, l2 = torch.sum(locations1 * mask1, dim=1), torch.sum(locations2 * mask2, dim=1)
        g1, g2 = torch.einsum("se,se->s", gates, mask1.float()), torch.einsum("se,se->s", gates, mask2.float())
        denom = torch.clamp(g1 + g2, min=torch.finfo(g1.dtype).eps)
        g1, g2 = g1 / denom, g2 / denom
        c1 = torch.einsum("se,sc->sec", torch.einsum("s,se->se", g1, mask1.float()), F.one_hot(l1, capacity).float())
        c2 = torch.einsum("se,sc->sec", torch.einsum("s,se->se", g2, mask2.float()), F.one_hot(l2, capacity).float())
        return c1 + c2

    def __call__(self, hidden):
        import torch

        x = hidden.reshape(-1, hidden.shape[-1])
        combine = self.gate(x)
        dispatched = torch.einsum("sec,sm->ecm", combine.bool().type_as(x), x)
        expert_out = torch.stack([self.experts[e](dispatched[e]) for e in range(self.E)])
        out = torch.einsum("sec,ecm->sm", combine.type_as(x), expert_out).reshape(hidden.shape)
        return out + self.meta(hidden) if self.meta is not None else out


def _sub(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _med_moe_forward(folder: Path, ids: np.ndarray, image_token_id: int, pv: np.ndarray) -> np.ndarray:
    """Logits as Med-MoE computes them, from its own weights (EvalMoELLaVAPhiForCausalLM: the
    vendored transformers Phi with each MoE layer's mlp a DeepSpeed MoE, lm_head without bias)."""
    import torch
    import transformers as tf
    from safetensors.torch import load_file

    raw = json.loads((folder / "config.json").read_text())
    state = load_file(folder / "model.safetensors")
    fields = set(tf.PhiConfig().to_dict())
    config = tf.PhiConfig(**{k: v for k, v in raw.items() if k in fields and k not in ("model_type", "architectures")})
    lm = tf.PhiForCausalLM(config).eval()
    moe = raw.get("moe") or {"moe_layers_idx": [], "num_experts": []}
    layers = {}
    for layer, n in zip(moe["moe_layers_idx"], moe["num_experts"]):
        layers[layer] = DeepSpeedMoE(state, f"model.layers.{layer}.mlp.", config, moe["top_k_experts"], n)
        del lm.model.layers[layer]._modules["mlp"]  # a plain callable in its place: PhiDecoderLayer only calls it
        lm.model.layers[layer].mlp = layers[layer]
    dense = {k: v for k, v in state.items() if k.startswith(("model.layers.", "model.embed_tokens.", "model.final_layernorm.",
                                                             "lm_head.")) and ".mlp.deepspeed_moe." not in k and ".mlp.meta_moe." not in k}
    missing, unexpected = lm.load_state_dict(dense, strict=False)
    assert missing == ["lm_head.bias"] and not unexpected, (missing, unexpected)
    with torch.no_grad():
        lm.lm_head.bias.zero_()
        tower = tf.CLIPVisionModel.from_pretrained((folder / raw["mm_image_tower"]).resolve()).eval()
        proj = torch.nn.Sequential(torch.nn.Linear(raw["mm_hidden_size"], raw["hidden_size"]), torch.nn.GELU(),
                                   torch.nn.Linear(raw["hidden_size"], raw["hidden_size"]))
        proj.load_state_dict(_sub(state, "model.mm_projector.image_spatial_proj."))
        hs = tower(torch.from_numpy(pv), output_hidden_states=True).hidden_states[raw["mm_vision_select_layer"]]
        feats = proj(hs[:, 1:])[0]
        pos = np.flatnonzero(ids == image_token_id)
        med_ids = np.concatenate([ids[:pos[0]], [-200], ids[pos[-1] + 1:]])  # IMAGE_TOKEN_INDEX
        cut = int(np.flatnonzero(med_ids == -200)[0])
        embed = lm.get_input_embeddings()
        embeds = torch.cat([embed(torch.from_numpy(med_ids[:cut])), feats, embed(torch.from_numpy(med_ids[cut + 1:]))])
        return lm(inputs_embeds=embeds[None]).logits[0].numpy()


@pytest.mark.parametrize("variant", ["med-moe", "moe-llava top-2", "stage-2 dense"])
def test_normalised_equals_its_own_forward(med_moe, tmp_path, variant):
    """The folder in Med-MoE's layout loads without its code; edgemed's logits equal the transcribed
    DeepSpeed forward at every position (and the routing really does pick different experts)."""
    import torch

    from edgemed.models import load_model
    from edgemed.reference.parity import parent_logits

    folder = med_moe if variant == "med-moe" else _variant(med_moe, tmp_path / "v", variant)
    cm = load_model(str(folder))
    assert cm.family == "llava" and cm.text.decoder_model_type == "med_moe_phi"
    block = cm.model.model.language_model.layers[0].mlp
    if variant == "stage-2 dense":
        assert type(block).__name__ == "PhiMLP"
    else:
        assert (block.shared is not None) == (variant == "med-moe") and block.top_k == (1 if variant == "med-moe" else 2)
    ids = cm.chat.ids(cm.tokenizer, ONE_TURN)
    pv = cm.processor.image_processor(_image(), return_tensors="np")["pixel_values"]
    ours = parent_logits(cm, ids, pv)
    ref = _med_moe_forward(folder, ids, cm.image.image_token_id, pv)
    assert ref.shape == ours.shape
    assert np.abs(ref - ours).max() < 1e-4
    if variant != "stage-2 dense":
        with torch.no_grad():  # the replica's routing is not degenerate: several experts are chosen
            x = torch.randn(64, cm.text.hidden_size)
            assert len(set(block.routing(x).argmax(-1).tolist())) > 1


def test_prompt_is_conv_phi_and_ids_equal_the_processor(med_moe):
    """Med-MoE's conversation format (moellava/conversation.py conv_phi: system, "USER: <image>\\n...",
    " ASSISTANT:", turns ended by <|endoftext|>), the image marked by an added <image> token inside the
    embedding's spare rows; ids and pixels equal the processor edgemed builds for it."""
    from edgemed.models import load_model
    from edgemed.runtime.preprocess import preprocess

    cm = load_model(str(med_moe))
    history = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
               {"role": "assistant", "content": [{"type": "text", "text": "A frontal chest x-ray."}]},
               {"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    text = cm.chat.render(history)
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions.")
    image = "<image>" * 576
    assert text == (f"{system} USER: {image}\nDescribe the image. ASSISTANT: A frontal chest x-ray.<|endoftext|>"
                    f"USER: {QUESTION} ASSISTANT:")
    assert cm.config.image_token_id < cm.config.text_config.vocab_size == 51200
    ids = cm.chat.ids(cm.tokenizer, history)
    msgs = [{**m, "content": [{**p, "image": _image()} if p["type"] == "image" else p for p in m["content"]]}
            for m in history]
    ref = cm.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="np")
    assert ids.tolist() == ref["input_ids"][0].tolist()
    assert np.abs(preprocess(_image(), cm.image.to_dict()) - ref["pixel_values"]).max() < 1e-5


SLOW = pytest.mark.slow


@pytest.mark.parametrize("recipe,max_kld", [("int8", 1e-3), pytest.param("int4", 2e-2, marks=SLOW),
                                            pytest.param("trt-int8", 1e-2, marks=SLOW)])
def test_compresses_to_onnx_with_parity(med_moe, tmp_path, recipe, max_kld):
    """ONNX: every expert is a MatMul the quantizer sees; parity at every position, prefill and decode
    (trt-int8: the TensorRT Q/DQ graph, run on ONNX Runtime where there is no TensorRT)."""
    from edgemed.pipeline import compress
    from edgemed.runtime import load

    target = "jetson-orin-nano-8gb" if recipe.startswith("trt") else "cpu-x86-avx2"
    res = compress(str(med_moe), [recipe], target, tmp_path / "a")
    p = res.manifest.parity
    assert p["top1_agreement"] > 0.9 and p["kld_mean"] < max_kld, p
    assert p["vision_cosine_min"] > 0.98 and p["processor"]["ids_equal"], p
    out = load(tmp_path / "a").generate(messages=ONE_TURN, images=[_image()], max_new_tokens=3)
    assert out.prompt_tokens > 576 and len(out.token_ids) >= 1


def test_gguf_is_refused_naming_the_missing_llama_cpp_architecture(med_moe, tmp_path, capsys):
    from edgemed.cli import main

    assert main(["compress", str(med_moe), "--recipe", "q4_k_m", "--target", "cpu-x86-avx2",
                 "-o", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "PHIMOE" in err and "shared expert" in err and "int8" in err
    assert not (tmp_path / "g").exists()
    assert main(["plan", str(med_moe), "--recipe", "q8_0"]) == 2  # plan says so before any heavy work
    assert "cannot be written as GGUF" in capsys.readouterr().err


def test_convert_loads_with_transformers_once_edgemed_registers_the_decoder(med_moe, tmp_path, transformers_logits):
    """`edgemed convert` writes LlavaForConditionalGeneration with text_config "med_moe_phi"; after
    edgemed registers that model_type, transformers' Auto classes load it and compute the same logits."""
    from edgemed.cli import main
    from edgemed.models import load_model
    from edgemed.models.families.med_moe import register
    from edgemed.reference.parity import parent_logits

    out = tmp_path / "hf"
    assert main(["convert", str(med_moe), "-o", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["text_config"]["model_type"] == "med_moe_phi"
    register()
    theirs, ids, pv = transformers_logits(out, _image(), QUESTION)
    assert np.abs(theirs - parent_logits(load_model(str(med_moe)), ids, pv)).max() < 1e-4
    again = load_model(str(out))  # and edgemed reads its own conversion back
    assert again.text.decoder_model_type == "med_moe_phi"
