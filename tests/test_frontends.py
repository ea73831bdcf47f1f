"""ONNX artifacts loaded by front ends edgemed did not write: transformers' own config and
processor loaders, and transformers.js in Node (onnxruntime-node), as a web or Electron clinic app
would load them. Everything they compute is compared with edgemed's runtime and the PyTorch parent.

The Node check needs `npm ci --prefix tests/js` (CI runs it); elsewhere it is skipped unless
EDGEMED_REQUIRE_NODE=1, which turns a missing install into a failure.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

JS = Path(__file__).parent / "js"
SIDE = 32  # the demo-tiny tower's input size: no resampling, so pixels compare exactly


@pytest.fixture(scope="module", params=["int8", "int4"])
def artifact(request, tmp_path_factory):
    from edgemed.pipeline import compress

    out = tmp_path_factory.mktemp(f"frontends-{request.param}") / f"demo-tiny-{request.param}"
    compress("edgemed-demo-tiny", request.param, "cpu-x86-avx2", out)
    return out


def _image():
    from PIL import Image

    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 256, size=(SIDE, SIDE, 3), dtype=np.uint8))


MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a pleural effusion?"}]}]


def _unexpanded_prompt(session) -> str:
    """The rendered conversation with its one image placeholder not yet expanded (what a
    processor takes)."""
    from edgemed.runtime.prompt import image_block

    text = session.chat.render(MESSAGES)
    block = image_block(session.image)
    assert text.count(block) == 1
    return text.replace(block, session.image["placeholder"])


def _as_the_template_takes(session) -> list[dict]:
    """MESSAGES as a client sends them to this template: typed parts where it reads them, else one
    string with the image placeholder where the image goes (this demo's SmolLM2 template prints
    `content` as it is)."""
    from edgemed.runtime.prompt import content_kind

    specials = tuple(sorted(session.chat.special_tokens.items()))
    if content_kind(session.chat_template, True, specials) != "string":
        return MESSAGES
    return [{"role": "user", "content": session.image["placeholder"] + "\nIs there a pleural effusion?"}]


def test_layout_files_and_the_manifest_agree(artifact):
    import edgemed.runtime
    from edgemed.artifact import read_manifest

    m = read_manifest(artifact)
    listed = {f.path for f in m.files}
    for rel in ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
                "tokenizer.json", "tokenizer_config.json", "onnx/vision_encoder.onnx", "onnx/embed_tokens.onnx",
                "onnx/decoder_model_merged.onnx"):
        assert rel in listed and (artifact / rel).is_file(), rel
    assert not list(artifact.glob("*.onnx"))  # the graphs live in onnx/ only
    graphs = {f.path: f.component for f in m.files if f.path.endswith(".onnx")}
    assert graphs["onnx/decoder_model_merged.onnx"] == "language+lm_head"
    cfg = json.loads((artifact / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["image_token_index"] == m.model.image["image_token_id"]
    assert cfg["transformers.js_config"] == {"dtype": "fp32"}
    edgemed.runtime.load(artifact)  # every check of the trust boundary passes on this layout


def test_transformers_loads_config_and_processor_from_the_artifact(artifact):
    """transformers' own loaders (a client we did not write) read the artifact's files and build the
    same input ids and pixels as edgemed's runtime."""
    from transformers import AutoConfig, AutoProcessor

    import edgemed.runtime

    session = edgemed.runtime.load(artifact)
    config = AutoConfig.from_pretrained(artifact)
    assert config.model_type == "llava" and config.text_config.num_hidden_layers == session.text["num_layers"]
    processor = AutoProcessor.from_pretrained(artifact)
    image = _image()
    got = processor(images=image, text=_unexpanded_prompt(session), return_tensors="np")
    ids = session.conversation_ids(MESSAGES)
    np.testing.assert_array_equal(got["input_ids"][0], ids)
    np.testing.assert_allclose(got["pixel_values"], session.pixel_values(image), atol=1e-6)


def _node_ready() -> bool:
    ready = shutil.which("node") is not None and (JS / "node_modules" / "@huggingface" / "transformers").is_dir()
    if not ready and os.environ.get("EDGEMED_REQUIRE_NODE") == "1":
        pytest.fail("EDGEMED_REQUIRE_NODE=1 but node or tests/js/node_modules is missing: run `npm ci --prefix tests/js`")
    return ready


def test_transformersjs_generates_what_edgemed_generates(artifact, tmp_path):
    """transformers.js (3.8.1, onnxruntime-node) loads the artifact as LlavaForConditionalGeneration
    from its files alone: the same prompt ids and pixels, logits at every prompt position equal to
    edgemed's session (same graphs) and close to the PyTorch parent, the same greedy tokens, and
    the chat template rendered by transformers.js's own Jinja equal to edgemed's."""
    if not _node_ready():
        pytest.skip("node and tests/js/node_modules (npm ci --prefix tests/js) are needed")
    import edgemed.runtime
    from edgemed.models import load_model
    from edgemed.reference.metrics import compare_logits
    from edgemed.reference.parity import parent_logits

    session = edgemed.runtime.load(artifact)
    image = _image()
    (tmp_path / "image.rgb").write_bytes(np.asarray(image).tobytes())
    n_new = 8
    request = {"prompt": _unexpanded_prompt(session), "messages": _as_the_template_takes(session), "rgb": "image.rgb",
               "width": SIDE, "height": SIDE, "max_new_tokens": n_new}
    (tmp_path / "request.json").write_text(json.dumps(request))
    run = subprocess.run(["node", str(JS / "transformersjs_check.mjs"), str(artifact), str(tmp_path / "request.json"),
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads((tmp_path / "out" / "result.json").read_text())

    ids = session.conversation_ids(MESSAGES)
    assert got["input_ids"] == ids.tolist()
    pixels = session.pixel_values(image)
    js_pixels = np.fromfile(tmp_path / "out" / "pixel_values.f32", np.float32).reshape(got["pixel_values_dims"])
    np.testing.assert_allclose(js_pixels, pixels, atol=1e-6)
    # The chat template through transformers.js's Jinja (@huggingface/jinja) renders what edgemed's does.
    assert got["templated"] == request["prompt"]

    js_logits = np.fromfile(tmp_path / "out" / "logits.f32", np.float32).reshape(got["logits_dims"])[0]
    ours = session.logits(ids, pixels)
    assert js_logits.shape == ours.shape == (len(ids), session.text["vocab_size"])
    np.testing.assert_allclose(js_logits, ours, atol=1e-4, rtol=1e-4)
    cm = load_model(str(session.manifest.source.revision_or_path))
    parent = parent_logits(cm, ids, pixels)
    stats, edgemed_stats = compare_logits(parent, js_logits), compare_logits(parent, ours)
    # A random tiny model's logits are nearly flat, so top-1 flips on near-ties at int4: the bar is
    # that transformers.js loses nothing against the parent beyond what edgemed's own session does.
    assert stats["kld_mean"] < 0.05 and abs(stats["kld_mean"] - edgemed_stats["kld_mean"]) < 1e-4, stats
    assert stats["top1_agreement"] >= edgemed_stats["top1_agreement"] - 1.5 / len(ids), (stats, edgemed_stats)

    ours_gen = session.generate(messages=MESSAGES, images=[image], max_new_tokens=n_new).token_ids
    eos = set(session.text["eos_token_ids"])
    js_gen = got["generated_ids"][len(ids):]
    js_gen = js_gen[:next((i for i, t in enumerate(js_gen) if t in eos), len(js_gen))]
    assert js_gen == [t for t in ours_gen if t not in eos]



TEXT_FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"


@pytest.fixture(scope="module", params=["qwen2.5-7b-instruct", "mistral-7b-instruct-v0.2"])
def text_artifact(request, tmp_path_factory):
    """A replica of a real text LLM checkpoint (its config, template and special tokens; tiny random
    weights, see edgemed.models.replica) compressed to int8: one graph, onnx/model.onnx. Mistral's
    is written as a real 7B's is, its weights in onnx/model.onnx_data (external.INLINE_LIMIT lowered)."""
    from edgemed.formats.onnx import external
    from edgemed.models.replica import build_replica
    from edgemed.pipeline import compress

    root = tmp_path_factory.mktemp(f"text-{request.param}")
    model = build_replica(TEXT_FIXTURES / request.param, root / "model", seed=0)
    out = root / f"{request.param}-int8"
    with pytest.MonkeyPatch.context() as mp:
        if request.param.startswith("mistral"):
            mp.setattr(external, "INLINE_LIMIT", 0)
        compress(str(model), "int8", "cpu-x86-avx2", out)
    return out, model


def test_a_text_llm_is_one_graph_that_takes_input_ids(text_artifact):
    import onnx

    import edgemed.runtime
    from edgemed.artifact import read_manifest

    out, _ = text_artifact
    m = read_manifest(out)
    graphs = {f.path: f.component for f in m.files if f.path.endswith(".onnx")}
    assert graphs == {"onnx/model.onnx": "embed+language+lm_head"}
    assert ("onnx/model.onnx_data" in {f.path for f in m.files}) == ("mistral" in out.name)
    g = onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False).graph
    assert [i.name for i in g.input][:2] == ["input_ids", "attention_mask"] and g.output[0].name == "logits"
    assert m.parity["kld_mean"] < 1e-3  # parity went through this one graph
    assert edgemed.runtime.load(out).generate(prompt="hello", max_new_tokens=3, stop_at_eos=False).token_ids


TEXT_MESSAGES = [{"role": "user", "content": "Is there a pleural effusion?"}]


def test_transformersjs_runs_a_text_llm_as_edgemed_does(text_artifact, tmp_path):
    """transformers.js's AutoTokenizer + AutoModelForCausalLM on the artifact: its own chat template
    rendering and ids equal edgemed's, logits at every position equal edgemed's session (1e-4) and
    close to the parent's, and the same greedy tokens."""
    if not _node_ready():
        pytest.skip("node and tests/js/node_modules (npm ci --prefix tests/js) are needed")
    import edgemed.runtime
    from edgemed.models import load_model
    from edgemed.reference.metrics import compare_logits
    from edgemed.reference.parity import parent_logits

    out, model = text_artifact
    session = edgemed.runtime.load(out)
    n_new = 8
    (tmp_path / "request.json").write_text(json.dumps({"kind": "text", "messages": TEXT_MESSAGES,
                                                       "max_new_tokens": n_new}))
    run = subprocess.run(["node", str(JS / "transformersjs_check.mjs"), str(out), str(tmp_path / "request.json"),
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads((tmp_path / "out" / "result.json").read_text())
    assert got["templated"] == session.chat.render(TEXT_MESSAGES)
    ids = session.conversation_ids(TEXT_MESSAGES)
    assert got["input_ids"] == ids.tolist()
    js_logits = np.fromfile(tmp_path / "out" / "logits.f32", np.float32).reshape(got["logits_dims"])[0]
    ours = session.logits(ids)
    np.testing.assert_allclose(js_logits, ours, atol=1e-4, rtol=1e-4)
    parent = parent_logits(load_model(str(model)), ids, None)
    assert abs(compare_logits(parent, js_logits)["kld_mean"] - compare_logits(parent, ours)["kld_mean"]) < 1e-4
    eos = set(session.text["eos_token_ids"])
    js_gen = got["generated_ids"][len(ids):]
    js_gen = js_gen[:next((i for i, t in enumerate(js_gen) if t in eos), len(js_gen))]
    ours_gen = session.generate(messages=TEXT_MESSAGES, max_new_tokens=n_new).token_ids
    assert js_gen == [t for t in ours_gen if t not in eos]


@pytest.fixture(scope="module", params=["whole", "tiles"])
def idefics3_artifact(request, tiny_dir, tmp_path_factory):
    """The tiny Idefics3 model with SmolVLM's real processor settings scaled to its 32-px tower,
    with image splitting ("tiles": a 128 x 96 image, 4 x 3 tiles + the whole image) or without
    ("whole": a 32 x 32 image, the tower's size: no resampling anywhere), compressed to int8."""
    import transformers as tf

    from edgemed.pipeline import compress

    src = tmp_path_factory.mktemp(f"idefics3-{request.param}") / "model"
    shutil.copytree(tiny_dir("idefics3"), src)
    real = json.loads((TEXT_FIXTURES / "smolvlm-256m-instruct" / "preprocessor_config.256m-base.json").read_text())
    kw = {k: v for k, v in real.items() if k not in ("image_processor_type", "processor_class")}
    split = request.param == "tiles"
    kw.update(max_image_size={"longest_edge": 32}, size={"longest_edge": 128 if split else 32}, do_image_splitting=split)
    from test_idefics3_tiles import SMOLVLM_TEMPLATE

    processor = tf.Idefics3Processor(image_processor=tf.Idefics3ImageProcessor(**kw),
                                     tokenizer=tf.AutoTokenizer.from_pretrained(src), image_seq_len=4,
                                     chat_template=SMOLVLM_TEMPLATE)
    processor.save_pretrained(src)
    out = src.parent / "idefics3-int8"
    compress(str(src), "int8", "cpu-x86-avx2", out)
    return out, src, (128, 96) if split else (32, 32)


def test_transformersjs_runs_idefics3_with_its_tiles(idefics3_artifact, tmp_path):
    """transformers.js's Idefics3Processor and Idefics3ForConditionalGeneration on the artifact (its
    vision graph takes the tiled signature, layout.tile_vision_input): the same prompt ids (image
    blocks and `<row_R_col_C>` markers included), the tiles' pixels equal edgemed's, and logits at every
    position equal edgemed's session fed the same pixels. transformers.js resizes with its own
    interpolation, not PIL's Lanczos, so the one resampled tile (the whole image shrunk to 32 px)
    differs a little; where nothing is resampled the greedy tokens are compared too."""
    if not _node_ready():
        pytest.skip("node and tests/js/node_modules (npm ci --prefix tests/js) are needed")
    from PIL import Image

    import edgemed.runtime

    out, _, (w, h) = idefics3_artifact
    session = edgemed.runtime.load(out)
    # A smooth image (noise upsampled 8x): resampling filters agree on it where they would not on
    # pixel noise, so the resampled whole image can be compared meaningfully.
    small = Image.fromarray(np.random.default_rng(11).integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8))
    image = small.resize((w, h), Image.Resampling.BICUBIC)
    (tmp_path / "image.rgb").write_bytes(np.asarray(image).tobytes())
    grid = session.image_grid(image)
    text = session.chat.render(MESSAGES, grids=[grid])
    from edgemed.runtime.prompt import image_block

    prompt = text.replace(image_block(session.image, grid), session.image["placeholder"])
    request = {"prompt": prompt, "messages": MESSAGES, "rgb": "image.rgb", "width": w, "height": h,
               "max_new_tokens": 8}
    (tmp_path / "request.json").write_text(json.dumps(request))
    run = subprocess.run(["node", str(JS / "transformersjs_check.mjs"), str(out), str(tmp_path / "request.json"),
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads((tmp_path / "out" / "result.json").read_text())
    assert got["templated"] == prompt
    ids = session.conversation_ids(MESSAGES, grids=[grid])
    assert got["input_ids"] == ids.tolist()
    ours_px = session.pixel_values(image)
    js_px = np.fromfile(tmp_path / "out" / "pixel_values.f32", np.float32).reshape(got["pixel_values_dims"])[0]
    assert js_px.shape == ours_px.shape
    tiles = grid[0] * grid[1]  # the tiles come first, cut from the resized image; the whole image is last
    np.testing.assert_allclose(js_px[:tiles], ours_px[:tiles], atol=1e-5)
    js_logits = np.fromfile(tmp_path / "out" / "logits.f32", np.float32).reshape(got["logits_dims"])[0]
    np.testing.assert_allclose(js_logits, session.logits(ids, js_px), atol=1e-4, rtol=1e-4)
    if tiles == 0:  # nothing resampled: the same pixels, so the same answer
        np.testing.assert_allclose(js_px, ours_px, atol=1e-5)
        eos = set(session.text["eos_token_ids"])
        js_gen = got["generated_ids"][len(ids):]
        js_gen = js_gen[:next((i for i, t in enumerate(js_gen) if t in eos), len(js_gen))]
        ours_gen = session.generate(messages=MESSAGES, images=[image], max_new_tokens=8).token_ids
        assert js_gen == [t for t in ours_gen if t not in eos]
    else:
        diff = np.abs(js_px[tiles:] - ours_px[tiles:])
        assert diff.mean() < 0.05, diff.mean()  # the resampled whole image: close, not equal (pixels in [-1, 1])
