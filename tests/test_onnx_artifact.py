"""End to end: tiny models -> compress -> ONNX artifacts -> runtime, parity, verify."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgemed.artifact import read_manifest, verify
from no_torch import BLOCK_TORCH

LAYOUT = {"onnx/vision_encoder.onnx", "onnx/embed_tokens.onnx", "onnx/decoder_model_merged.onnx", "tokenizer.json",
          "manifest.json", "config.json", "generation_config.json"}


def _ops(path):
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_fp32_export_matches_parent(artifact):
    m = read_manifest(artifact("llava-siglip", "fp32"))
    p = m.parity
    assert p["prefill"]["positions"] > 50
    assert p["logits_max_abs_diff"] < 1e-4
    assert p["decode"]["logits_max_abs_diff"] < 1e-4
    assert p["vision_cosine_min"] > 0.99999
    assert p["top1_agreement"] == 1.0


@pytest.mark.parametrize("recipe", ["int8", "int8-mse", "int4", "int4-fast", "int4-gptq"])
def test_quantized_artifact_layout_and_manifest(artifact, recipe):
    out = artifact("llava-siglip", recipe)
    assert LAYOUT <= {p.relative_to(out).as_posix() for p in out.rglob("*")}
    m = read_manifest(out)
    written = json.loads((out / "manifest.json").read_text())
    for key in ("schema_version", "created_utc", "edgemed_version", "source", "recipe", "target", "calibration",
                "tools", "files", "results", "status"):
        assert key in written
    assert m.status == "ok"
    assert m.recipe["steps"][1]["args"]["int4"]["block_size"] == 32  # resolved defaults
    assert all(len(f.sha256) == 64 for f in m.files)
    assert {f.path for f in m.files} >= {"onnx/decoder_model_merged.onnx", "onnx/vision_encoder.onnx"}
    dec = onnx.load(str(out / "onnx" / "decoder_model_merged.onnx"), load_external_data=False)
    ins = [i.name for i in dec.graph.input]
    assert {"inputs_embeds", "attention_mask", "past_key_values.1.value"} <= set(ins)
    assert "present.1.value" in [o.name for o in dec.graph.output]
    language = {"int8": {8}, "int8-mse": {8}, "int4": {4, 8}}.get(recipe, {4})
    assert _bits_by_component(out / "onnx" / "decoder_model_merged.onnx") == {"language": language, "lm_head": {8}}
    if recipe == "int4":  # attention q/k/v and MLP down at int8 on a CPU target, the rest int4
        for n in dec.graph.node:
            if n.op_type == "MatMulNBits" and "language" in str(n.metadata_props):
                bits = next(a.i for a in n.attribute if a.name == "bits")
                assert (bits == 8) == any(p in n.name for p in ("q_proj", "k_proj", "v_proj", "down_proj")), n.name
        assert "GatherBlockQuantized" in _ops(out / "onnx" / "embed_tokens.onnx")  # int8 embedding table
    if recipe == "int8-mse":  # edgemed's own int8 blocks: symmetric (no zero points), block 32
        nbits = [n for n in dec.graph.node if n.op_type == "MatMulNBits"]
        assert nbits and all(len(n.input) == 3 and n.name.endswith("_Q8") for n in nbits)
        assert {next(a.i for a in n.attribute if a.name == "block_size") for n in nbits} == {32}
        assert m.recipe["steps"][1]["args"]["int8"]["algorithm"] == "mse"
    if recipe != "int8":  # calibrated grids (mse, gptq): the set they used is in the manifest
        assert m.calibration["count"] > 0 and m.calibration["used_by"].startswith("onnx-quantize")
    # The vision tower and projector stay >= 8 bit in every shipped recipe.
    assert _bits_by_component(out / "onnx" / "vision_encoder.onnx") == {"vision": {8}, "projector": {8}}
    assert m.parity["kld_mean"] < 0.05


def _bits_by_component(path):
    """{component: {bits of its MatMulNBits nodes}} from the tags every node carries."""
    out = {}
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        if n.op_type == "MatMulNBits":
            comp = next(p.value for p in n.metadata_props if p.key == "edgemed.component")
            out.setdefault(comp, set()).add(next(a.i for a in n.attribute if a.name == "bits"))
    return out


def test_int8_logits_close_to_transformers_independently(tiny_dir, artifact):
    """Not edgemed's parity numbers: the HF processor and model vs raw onnxruntime sessions."""
    import onnxruntime as ort
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    src, out = tiny_dir("llava-siglip"), artifact("llava-siglip", "int8")
    proc = AutoProcessor.from_pretrained(src)
    model = LlavaForConditionalGeneration.from_pretrained(src).eval()
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 48, 3), dtype=np.uint8))
    enc = proc(text="<image>\nIs there a nodule in the right lung?", images=img, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits[0].numpy()
    ids = enc["input_ids"].numpy()
    so = lambda f: ort.InferenceSession(str(out / "onnx" / f), providers=["CPUExecutionProvider"])  # noqa: E731
    feats = so("vision_encoder.onnx").run(None, {"pixel_values": enc["pixel_values"].numpy()})[0]
    emb = so("embed_tokens.onnx").run(None, {"input_ids": ids})[0]
    mask = ids[0] == model.config.image_token_id
    emb[0, mask] = feats.reshape(-1, feats.shape[-1])
    dec = so("decoder_model_merged.onnx")
    tc = model.config.text_config
    feeds = {"inputs_embeds": emb, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
    for i in range(tc.num_hidden_layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((1, tc.num_key_value_heads, 0, tc.head_dim), np.float32)
    names = {i.name for i in dec.get_inputs()}  # position_ids only where the graph needs it
    got = dec.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0][0]
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 0.05
    lp = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    lq = got - np.log(np.exp(got).sum(-1, keepdims=True))
    assert (np.exp(lp) * (lp - lq)).sum(-1).mean() < 1e-3


_NO_TORCH = BLOCK_TORCH + """
import json, numpy as np, edgemed.runtime
s = edgemed.runtime.load(sys.argv[1])
img = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)
r = s.generate(image=img, prompt='Is there an effusion?', max_new_tokens=5, stop_at_eos=False)
print(json.dumps({'n': len(r.token_ids), 'ttft': r.ttft_ms, 'torch': 'torch' in sys.modules}))
"""


@pytest.mark.parametrize("recipe", ["int8", "int4"])
def test_runtime_runs_where_torch_cannot_be_imported(artifact, recipe):
    out = artifact("llava-siglip", recipe)
    res = subprocess.run([sys.executable, "-c", _NO_TORCH, str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["n"] == 5 and got["ttft"] > 0 and not got["torch"]


def test_runtime_import_is_torch_free():
    res = subprocess.run([sys.executable, "-X", "importtime", "-c", "import edgemed.runtime, edgemed.formats.onnx.session"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    imported = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "transformers" not in imported


def test_generate_is_greedy_and_matches_parity_tokens(artifact):
    import edgemed.runtime

    s = edgemed.runtime.load(artifact("llava-siglip", "int8"))
    a = s.generate(prompt="Describe the heart.", max_new_tokens=6, stop_at_eos=False)
    b = s.generate(prompt="Describe the heart.", max_new_tokens=6, stop_at_eos=False)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 6
    # The KV-cache loop must agree with teacher-forced logits over the generated sequence.
    ids = np.concatenate([s.prompt_ids("Describe the heart.", False), np.asarray(a.token_ids[:-1])])
    full = s.logits(ids)
    n = len(ids) - len(a.token_ids) + 1
    assert list(full[n - 1:].argmax(-1)) == a.token_ids


def test_verify_accepts_then_rejects_a_flipped_byte(artifact, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(artifact("llava-siglip", "int4"), out)
    assert verify(out) == []
    f = out / "onnx" / "decoder_model_merged.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    problems = verify(out)
    assert len(problems) == 1 and "decoder_model_merged.onnx" in problems[0]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava-clip", "idefics3", "gemma3", "llama", "mistral", "qwen2", "phi3"])
def test_every_family_exports_at_parity(artifact, family):
    out = artifact(family, "fp32")
    p = read_manifest(out).parity
    assert p["logits_max_abs_diff"] < 1e-4, p
    if family in ("llava-clip", "idefics3", "gemma3"):
        assert p["vision_cosine_min"] > 0.99999
        assert (out / "onnx" / "vision_encoder.onnx").exists()
    else:
        assert not (out / "onnx" / "vision_encoder.onnx").exists()
    if family == "gemma3":  # bidirectional image attention needs the token types
        dec = onnx.load(str(out / "onnx" / "decoder_model_merged.onnx"), load_external_data=False)
        assert "token_type_ids" in [i.name for i in dec.graph.input]


@pytest.mark.slow
def test_fp16_recipe(artifact):
    out = artifact("llava-siglip", "fp16")
    m = read_manifest(out)
    assert m.parity["kld_mean"] < 0.01
    dec = onnx.load(str(out / "onnx" / "decoder_model_merged.onnx"), load_external_data=False)
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in dec.graph.initializer)


def test_gpu_target_gets_an_fp16_graph_at_parity(tiny_dir, tmp_path):
    """On a GPU target `int4` writes fp16 activations, KV cache and float weights (scales and fmin
    offsets too), int4 in blocks of up to 128; the CPU runtime still runs it at parity."""
    from edgemed.pipeline import compress
    from edgemed.runtime import load

    out = tmp_path / "gpu"
    compress(str(tiny_dir("llava-siglip")), ["int4"], "jetson-orin-nano-8gb", out)
    m = read_manifest(out)
    assert m.runtime["activations"] == "fp16" and any("fp16 on jetson-orin-nano-8gb" in n for n in m.notes)
    dec = onnx.load(str(out / "onnx" / "decoder_model_merged.onnx"), load_external_data=False)
    f16 = onnx.TensorProto.FLOAT16
    types = {v.name: v.type.tensor_type.elem_type for v in list(dec.graph.input) + list(dec.graph.output)}
    assert types["inputs_embeds"] == types["past_key_values.0.key"] == types["present.0.value"] == f16
    assert types["logits"] == f16
    assert not any(t.data_type == onnx.TensorProto.FLOAT for t in dec.graph.initializer)
    blocks = {next(a.i for a in n.attribute if a.name == "block_size")
              for n in dec.graph.node if n.op_type == "MatMulNBits"}
    hidden = m.model.text["hidden_size"]
    assert blocks and max(blocks) == min(128, hidden)  # fit_block: the largest power of two <= 128 dividing K
    assert _bits_by_component(out / "onnx" / "decoder_model_merged.onnx") == {"language": {4}, "lm_head": {8}}
    # The vision and embedding graphs keep fp32 inputs and outputs around an fp16 body.
    vis = onnx.load(str(out / "onnx" / "vision_encoder.onnx"), load_external_data=False)
    assert vis.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == f16 for t in vis.graph.initializer)
    assert m.parity["kld_mean"] < 0.01  # (a random tiny model has near ties: top-1 is no measure here)
    s = load(out)
    assert s._kv_dtype == np.float16
    assert len(s.generate(None, "hello", max_new_tokens=4, stop_at_eos=False).token_ids) == 4


def test_activations_follow_the_target_and_family():
    from edgemed.formats.onnx.args import onnx_activations
    from edgemed.models import FAMILIES
    from edgemed.target import load_target

    llava, gemma3 = FAMILIES.get("llava").fp16_unsafe, FAMILIES.get("gemma3").fp16_unsafe
    nano, cpu = load_target("jetson-orin-nano-8gb"), load_target("cpu-x86-avx2")
    assert onnx_activations("auto", nano, llava)[0] == "fp16"
    assert onnx_activations("auto", cpu, llava) == ("fp32", None)
    act, why = onnx_activations("auto", nano, gemma3)
    assert act == "fp32" and "fp16" in why  # Gemma 3's activations leave fp16's range
    assert onnx_activations("fp32", nano, llava) == ("fp32", None)


def test_shared_kv_cache_decodes_through_its_kept_binding_and_growth(artifact):
    """The builder's decoder updates one KV buffer per layer in place; the runtime keeps one binding
    across steps and rebinds when the buffers grow (past 256 tokens here). Token-by-token decoding
    through both must give the logits of one prefill over the same tokens."""
    import edgemed.runtime

    s = edgemed.runtime.load(artifact("llava-siglip", "fp32"))
    assert s._shared_kv
    ids = np.resize(s.prompt_ids("Is there a pleural effusion on the left?", False), 300)
    full = s.logits(ids)
    embeds = s.input_embeds(ids, None)
    out, past = s.forward(embeds[:, :8], s.empty_past(8), ids[:8])
    assert past.capacity == 256
    rows = [out]
    for t in range(8, len(ids)):
        step, past = s.forward(embeds[:, t:t + 1], past, ids[t:t + 1])
        rows.append(step)
    assert past.capacity == 512
    np.testing.assert_allclose(np.concatenate(rows), full, atol=1e-4)


def test_graphs_carry_no_path_of_the_machine_that_exported_them(artifact):
    """torch.onnx's per-node stack traces hold the exporting machine's absolute paths; an artifact a
    clinic deploys carries none (and stays byte-identical across checkouts of the same edgemed)."""
    import edgemed

    here = str(Path(edgemed.__file__).resolve().parent.parent)
    out = artifact("llava-siglip", "int8")
    for graph in ("vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx"):
        m = onnx.load(str(out / "onnx" / graph), load_external_data=False)
        values = [p.value for n in m.graph.node for p in n.metadata_props]
        assert values and not any(here in v for v in values), graph
