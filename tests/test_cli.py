"""The CLI contract of DESIGN.md: commands, exit codes, nothing half-written."""
import json
import shutil

import pytest
import yaml

from edgemed.cli import main


def test_targets_lists_the_eight(capsys):
    assert main(["targets"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.strip().splitlines()]
    assert names == sorted(["cpu-x86-avx2", "cpu-arm64", "jetson-orin-nano-8gb", "jetson-orin-nx-16gb",
                            "jetson-agx-orin-64gb", "jetson-thor", "rtx-4060-8gb", "rtx-4090-24gb"])


def test_recipes_show_prints_resolved_yaml(capsys, tmp_path):
    assert main(["recipes", "--show", "int4"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["steps"][1]["args"]["int4"]["block_size"] == 32
    assert main(["recipes"]) == 0
    assert "int8" in capsys.readouterr().out


@pytest.fixture(scope="module")
def llava7b_config(tmp_path_factory):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    d = tmp_path_factory.mktemp("llava7b")
    LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        text_config=LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=32064),
        image_token_id=32000,
    ).save_pretrained(d)
    assert [p.name for p in d.iterdir()] == ["config.json"]
    return d


def test_plan_refuses_fp16_7b_on_orin_nano(llava7b_config, capsys):
    assert main(["plan", str(llava7b_config), "--recipe", "fp16", "--target", "jetson-orin-nano-8gb"]) == 2
    err = capsys.readouterr().err
    assert "cannot run" in err and "fix" in err


def test_plan_accepts_int4_7b_where_it_fits_and_prints_components(llava7b_config, capsys):
    assert main(["plan", str(llava7b_config), "--recipe", "int4", "--target", "jetson-orin-nx-16gb",
                 "--host-memory-gb", "512"]) == 0
    out = capsys.readouterr().out
    for comp in ("vision", "projector", "embed", "language", "lm_head", "feasible"):
        assert comp in out
    assert main(["plan", str(llava7b_config), "--recipe", "int4", "--target", "jetson-orin-nx-16gb", "--json",
                 "--host-memory-gb", "512"]) == 0
    d = json.loads(capsys.readouterr().out)  # one JSON document, nothing after it
    assert d["feasible"] and d["components"]["language"]["precision"] == "int4"


def test_plan_refuses_a_host_that_cannot_compress(llava7b_config, capsys):
    assert main(["plan", str(llava7b_config), "--recipe", "int4", "--target", "jetson-orin-nx-16gb",
                 "--host-memory-gb", "8"]) == 2
    err = capsys.readouterr().err
    assert "host: compress needs about" in err and "parent (fp32) 28.3" in err and "GB of free RAM" in err


def test_plan_refuses_unknown_target(llava7b_config, capsys):
    assert main(["plan", str(llava7b_config), "--recipe", "int4", "--target", "jetson-nano-2gb"]) == 2
    assert "jetson-orin-nano-8gb" in capsys.readouterr().err


def test_compress_bad_recipe_exits_2_and_leaves_nothing(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compress", str(tiny_dir("llava-siglip")), "--recipe", "int3", "-o", str(out)]) == 2
    assert "int3" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_compress_config_only_exits_2(llava7b_config, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["compress", str(llava7b_config), "--recipe", "int4", "--target", "cpu-x86-avx2", "-o", str(out),
                 "--host-memory-gb", "512"])  # past the host check (a 7B needs more RAM than this machine has)
    assert code == 2 and "no weights" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_compress_refuses_existing_output(tiny_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert main(["compress", str(tiny_dir("llama")), "-o", str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_compress_unknown_architecture_exits_2(tmp_path, capsys):
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["compress", str(model), "-o", str(tmp_path / "out")]) == 2
    assert "bert" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_default_compress_uses_the_demo_model(edgemed_home, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["compress"]) == 0
    out = capsys.readouterr().out
    assert "parity vs PyTorch parent" in out and "before -> after" in out
    artifact = tmp_path / "edgemed-out" / "edgemed-demo-cxr-int8"
    m = json.loads((artifact / "manifest.json").read_text())
    assert m["status"] == "ok" and m["model"]["text"]["num_layers"] == 30  # SmolLM2 inside
    assert m["model"]["image"]["num_image_tokens"] == 64
    assert main(["inspect", str(artifact), "--verify"]) == 0
    shutil.copy(artifact / "tokenizer.json", artifact / "extra.json")
    assert main(["inspect", str(artifact), "--verify"]) == 2  # an unlisted file is reported
