"""Idefics3 / SmolVLM image splitting as the transformers processor does it: the longer side resized,
the image cut into tiles of the tower's size (row by row) plus the whole image, each tile's block of
image tokens behind `<fake_token_around_image><row_R_col_C>`; pixels, ids and the artifact's answers
checked against the processor and the PyTorch parent."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoints" / "smolvlm-256m-instruct"
# SmolVLM-Instruct's chat template (transformers tests/models/smolvlm/test_processing_smolvlm.py; see the
# fixture README): typed parts, `User:<image>...`.
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == "
    "'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
QUESTION = "Is there a pleural effusion?"


def _image(w, h, seed=0):
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def tiled(tiny_dir, tmp_path_factory):
    """The tiny Idefics3 model with SmolVLM's processor settings scaled to its 32-px tower: the longer
    side to 128 px (SmolVLM: 2048), tiles of 32 px (SmolVLM: 512), so up to 4 x 4 tiles + the whole image."""
    import transformers as tf

    out = tmp_path_factory.mktemp("tiled") / "idefics3-tiles"
    shutil.copytree(tiny_dir("idefics3"), out)
    real = json.loads((FIXTURE / "preprocessor_config.256m-base.json").read_text())
    scale = 32 / real["max_image_size"]["longest_edge"]
    kw = {k: v for k, v in real.items() if k not in ("image_processor_type", "processor_class")}
    kw.update(max_image_size={"longest_edge": 32}, size={"longest_edge": int(real["size"]["longest_edge"] * scale)})
    tok = tf.AutoTokenizer.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    processor = tf.Idefics3Processor(image_processor=tf.Idefics3ImageProcessor(**kw), tokenizer=tok,
                                     image_seq_len=4, chat_template=SMOLVLM_TEMPLATE)
    assert processor.image_token_id == config["image_token_id"]
    processor.save_pretrained(out)
    return out


@pytest.mark.parametrize("size", [(400, 300), (300, 800), (20, 20), (1000, 37)])
def test_real_smolvlm_settings_tile_as_the_processor_does(size):
    """SmolVLM's real preprocessor settings (512-px tiles of a 2048-px image): edgemed's facts read off
    the processor, its numpy/PIL tiles equal Idefics3ImageProcessor's to 1e-5, same grid."""
    import transformers as tf

    from edgemed.models.families.idefics3 import Idefics3Adapter
    from edgemed.runtime.preprocess import image_grid, tiles

    real = json.loads((FIXTURE / "preprocessor_config.256m-base.json").read_text())
    ip = tf.Idefics3ImageProcessor(**{k: v for k, v in real.items() if k not in ("image_processor_type", "processor_class")})
    config = tf.Idefics3Config(vision_config=tf.Idefics3VisionConfig(image_size=512, patch_size=16), scale_factor=4,
                               image_token_id=5)
    tok = type("Tok", (), {"convert_ids_to_tokens": lambda self, i: "<image>"})()
    facts = Idefics3Adapter.image_facts(config, tok, type("P", (), {"image_processor": ip})()).to_dict()
    assert facts["longest_edge"] == 2048 and facts["tile_marker"] and facts["num_image_tokens"] == 64
    img = _image(*size)
    ref = ip(img, return_tensors="np", return_row_col_info=True)
    pv, rows, cols = tiles(img, facts)
    assert (rows, cols) == (ref["rows"][0][0], ref["cols"][0][0]) == image_grid(img, facts)
    assert pv.shape == ref["pixel_values"][0].shape and np.abs(pv - ref["pixel_values"][0]).max() < 1e-5


CONVERSATIONS = {
    "one image": ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}], [(400, 300)]),
    "two images, history": ([
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A frontal chest x-ray."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}], [(300, 800), (20, 20)]),
}


@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_ids_and_pixels_equal_the_processor(tiled, conv):
    from edgemed.models import load_model
    from edgemed.runtime.preprocess import image_grid, preprocess

    cm = load_model(str(tiled))
    messages, sizes = CONVERSATIONS[conv]
    images = [_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    it = iter(images)
    msgs = [{**m, "content": [{**p, "image": next(it)} if p["type"] == "image" else p for p in m["content"]]}
            for m in messages]
    ref = cm.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="np")
    facts = cm.image.to_dict()
    ids = cm.chat.ids(cm.tokenizer, messages, grids=[image_grid(im, facts) for im in images])
    assert ids.tolist() == ref["input_ids"][0].tolist()
    assert "<row_1_col_1>" in cm.tokenizer.decode(ids)
    pv = np.concatenate([preprocess(im, facts) for im in images])
    assert pv.shape == ref["pixel_values"][0].shape and np.abs(pv - ref["pixel_values"][0]).max() < 1e-5
    with pytest.raises(ValueError, match="tiles"):  # a tiled model's prompt cannot be built without the grid
        cm.chat.ids(cm.tokenizer, messages)


@pytest.mark.slow
@pytest.mark.parametrize("recipe,target", [("int4", "cpu-x86-avx2"), ("q8_0", "cpu-x86-avx2"),
                                           ("q4_k_m", "cpu-x86-avx2"), ("trt-int8", "jetson-orin-nano-8gb")])
def test_tiled_model_compresses_to_every_format(tiled, tmp_path, recipe, target):
    """The tiled model through ONNX int4, GGUF (llama.cpp feeds its overview image: the processor check
    and parity use the tiles on the ONNX/TensorRT side only) and the TensorRT Q/DQ graph."""
    from edgemed.pipeline import compress

    res = compress(str(tiled), [recipe], target, tmp_path / "a")
    p = res.manifest.parity
    assert p["processor"]["ids_equal"] and p["kld_mean"] < 2e-2 and p["top1_agreement"] > 0.8, p


def test_artifact_answers_as_the_parent_on_tiled_images(tiled, tmp_path):
    """compress checks the processor's ids and pixels (tiles included), then parity; the ONNX session
    tiles each image itself and decodes what the parent decodes for a two-image conversation."""
    from edgemed.models import load_model
    from edgemed.pipeline import compress
    from edgemed.reference.parent import ParentSession
    from edgemed.runtime import load

    res = compress(str(tiled), ["int8"], "cpu-x86-avx2", tmp_path / "a")
    p = res.manifest.parity
    assert p["processor"]["checked"] and p["processor"]["ids_equal"] and p["processor"]["pixels_max_abs_diff"] < 1e-5, p
    assert p["top1_agreement"] > 0.9, p
    messages, sizes = CONVERSATIONS["two images, history"]
    images = [_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    ours = load(tmp_path / "a").generate(messages=messages, images=images, max_new_tokens=5, stop_at_eos=False)
    parent = ParentSession(load_model(str(tiled))).generate(messages=messages, images=images, max_new_tokens=5,
                                                          stop_at_eos=False)
    assert ours.prompt_tokens == parent.prompt_tokens
    session = load(tmp_path / "a")
    ids = session.conversation_ids(messages, grids=[session.image_grid(im) for im in images])
    # 300x800 -> 48x128 -> 4 rows x 2 columns + the whole; 20x20 -> 128x128 -> 4 x 4 + the whole; 4 tokens each
    assert [session.image_grid(im) for im in images] == [(4, 2), (4, 4)]
    assert int((ids == session.image["image_token_id"]).sum()) == (9 + 17) * 4
    assert ours.token_ids == parent.token_ids
