import json

import pytest
import torch

from edgemed.errors import BadInputError
from edgemed.models import component_param_counts, load_config, load_model
from edgemed.models.tiny import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_loads_with_named_components(tiny_dir, family):
    cm = load_model(str(tiny_dir(family)))
    comps = cm.components()
    assert {"embed", "language", "lm_head"} <= set(comps)
    counts = cm.component_params()
    # The planner's config-only count (meta device) is exact.
    assert component_param_counts(load_config(str(tiny_dir(family)))) == counts
    assert sum(counts.values()) == sum(p.numel() for p in cm.model.parameters()) + (
        counts["lm_head"] if cm.model.config.get_text_config().tie_word_embeddings else 0)
    if family in ("llama", "mistral", "qwen2", "phi3"):
        assert not cm.multimodal
    else:
        assert cm.multimodal and {"vision", "projector"} <= set(comps)
        pv = torch.randn(1, 3, cm.image.image_size, cm.image.image_size)
        feats = cm.image_features(pv)
        assert feats.shape == (1, cm.image.num_image_tokens, cm.text.hidden_size)
        ids = cm.tokenizer(cm.build_prompt("hi", with_image=True), add_special_tokens=False).input_ids
        assert ids.count(cm.image.image_token_id) == cm.image.num_image_tokens


def test_unknown_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(BadInputError) as e:
        load_model(str(tmp_path))
    assert "bert" in str(e.value) and "llava" in str(e.value)


def test_config_without_weights_is_refused_for_loading(tiny_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_dir("llama") / "config.json").read_text())
    with pytest.raises(BadInputError, match="no weights"):
        load_model(str(tmp_path))


def test_pickle_checkpoint_needs_opt_in(tiny_dir, tmp_path):
    src = tiny_dir("llama")
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    from safetensors.torch import load_file

    torch.save(load_file(str(src / "model.safetensors")), tmp_path / "pytorch_model.bin")
    with pytest.raises(BadInputError, match="--allow-pickle"):
        load_model(str(tmp_path))
    cm = load_model(str(tmp_path), allow_pickle=True)
    assert cm.family == "decoder"


def test_missing_folder(tmp_path):
    with pytest.raises(BadInputError, match="no such folder"):
        load_config(str(tmp_path / "nope" / "model"))
