import pytest
import yaml

from edgemed._resources import shipped_names
from edgemed.errors import BadInputError
from edgemed.recipe import ComponentPolicy, Recipe, compose, load_recipe


@pytest.mark.parametrize("name", shipped_names("recipes"))
def test_shipped_recipes_round_trip(name, tmp_path):
    r = load_recipe(name)
    # The resolved recipe (every default filled) reproduces itself from its own YAML.
    path = tmp_path / "r.yaml"
    path.write_text(r.to_yaml())
    again = load_recipe(path)
    assert again.model_dump() == r.model_dump()
    assert r.format in ("onnx", "gguf", "tensorrt", None)


def test_expected_recipes_ship():
    assert {"fp16", "int8", "int4"} <= set(shipped_names("recipes"))


def test_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "steps": [{"step": "onnx-export"}], "polcy": {}}))
    with pytest.raises(BadInputError) as e:
        load_recipe(path)
    assert "polcy" in str(e.value) and str(path) in str(e.value)


def test_unknown_step_arg_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "steps": [{"step": "onnx-quantize", "args": {"int4": {"blok_size": 32}}}]}))
    with pytest.raises(BadInputError, match="blok_size"):
        load_recipe(path)


def test_unknown_step_lists_registered(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "steps": [{"step": "onnx-quantise"}]}))
    with pytest.raises(BadInputError, match="onnx-quantize"):
        load_recipe(path)


def test_unknown_recipe_name_lists_shipped():
    with pytest.raises(BadInputError, match="int8"):
        load_recipe("int3")


def test_vision_stays_8bit_unless_allowed():
    with pytest.raises(ValueError, match="allow_low_bit_vision"):
        ComponentPolicy(vision="int4")
    assert ComponentPolicy(vision="int4", allow_low_bit_vision=True).vision == "int4"


def test_bad_block_size(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "steps": [{"step": "onnx-quantize", "args": {"int4": {"block_size": 48}}}]}))
    with pytest.raises(BadInputError, match="block_size"):
        load_recipe(path)


def test_compose_overrides_policy_and_gates_in_order():
    a = Recipe(name="a", policy=ComponentPolicy(lm_head="int8"), steps=[{"step": "onnx-export"}],
               gates={"max_kld_mean": 0.5})
    b = Recipe(name="b", policy=ComponentPolicy(language="int4"), steps=[{"step": "onnx-quantize"}],
               gates={"max_kld_mean": 0.1})
    c = compose([a, b])
    assert c.name == "a+b"
    assert [s.step for s in c.steps] == ["onnx-export", "onnx-quantize"]
    assert c.policy.lm_head == "int8" and c.policy.language == "int4"
    assert c.gates.max_kld_mean == 0.1


def test_compose_keeps_one_export_and_moves_it_after_model_steps():
    a = Recipe(name="a", steps=[{"step": "onnx-export"}, {"step": "onnx-quantize"}])
    c = compose([a, a])
    assert [s.step for s in c.steps] == ["onnx-export", "onnx-quantize", "onnx-quantize"]
    assert c.format == "onnx"


def test_compress_api_takes_recipe_objects_names_and_defaults():
    from pathlib import Path

    from edgemed.pipeline import DEFAULT_RECIPE, default_output, resolve

    recipe, target = resolve(None, None)  # what `edgemed compress` with no --recipe/--target runs
    assert recipe.name == DEFAULT_RECIPE and target.name
    composed, _ = resolve([load_recipe("prune-width-25"), "q8_0"], target)
    assert composed.name == "prune-width-25+q8_0" and composed.format == "gguf"
    own = load_recipe("int4").model_copy(update={"name": "my-int4"})
    assert resolve(own, "cpu-x86-avx2")[0] is own
    assert default_output(None, recipe) == Path("edgemed-out") / "edgemed-demo-cxr-int8"
