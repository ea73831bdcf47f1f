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
    from edgemed.reference.parity import compare_logits, parent_logits

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

