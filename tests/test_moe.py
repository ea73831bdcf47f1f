"""MoE distillation (moe-distill + distill): a dense Llama becomes a Qwen2-MoE that llama.cpp runs."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgemed.errors import BadInputError

TARGET = "cpu-x86-avx2"


@pytest.fixture(scope="module")
def llama_wide(tmp_path_factory):
    """A tiny Llama whose FFN (1024 channels) splits into 8 experts of 96 + a 256-channel shared one."""
    from edgemed.models.tiny import build_tiny

    return build_tiny("llama", tmp_path_factory.mktemp("llama_moe") / "m", num_hidden_layers=4,
                      intermediate_size=1024)


@pytest.fixture(scope="module")
def moe_q8(llama_wide, tmp_path_factory):
    from edgemed.pipeline import compress

    out = tmp_path_factory.mktemp("moe") / "q8"
    compress(str(llama_wide), ["moe-8x-top2", "q8_0"], TARGET, out)
    return out


def test_balanced_kmeans_recovers_planted_coactivation_groups():
    from edgemed.transforms.moe import balanced_kmeans

    rng = np.random.default_rng(0)
    groups, per, tokens = 4, 8, 400
    owner = rng.permutation(np.repeat(np.arange(groups), per))  # channel -> planted group
    active = rng.integers(0, groups, size=tokens)  # each token fires one group
    feats = (owner[:, None] == active[None, :]).astype(float) + 0.05 * rng.random((groups * per, tokens))
    got = balanced_kmeans(feats, groups, iters=20, seed=0)
    assert np.bincount(got).tolist() == [per] * groups  # balanced
    # every planted group lands in exactly one cluster
    for g in range(groups):
        assert len(set(got[owner == g])) == 1


@pytest.mark.slow
def test_moe_q8_0_gguf_runs_in_llama_cpp_with_8_experts_2_used(moe_q8):
    import llama_cpp

    m = json.loads((moe_q8 / "manifest.json").read_text())
    assert m["status"] == "ok"
    moe = m["runtime"]["moe"]
    assert moe["num_experts"] == 8 and moe["top_k"] == 2
    # active FFN parameters per token at most half of the dense FFN's
    assert moe["active_ffn_ratio"] <= 0.5
    ffn = moe["ffn_params_per_block"]
    assert ffn["active"] <= 0.5 * ffn["dense"]
    # llama.cpp's own reading of the file
    llm = llama_cpp.Llama(str(moe_q8 / "model-q8_0.gguf"), n_ctx=256, verbose=False)
    md = llm.metadata
    assert md["general.architecture"] == "qwen2moe"
    assert md["qwen2moe.expert_count"] == "8" and md["qwen2moe.expert_used_count"] == "2"
    # the GGUF computes what the PyTorch MoE computes, at every position (prefill and KV decode)
    assert m["parity"]["transformed_parent"]["kld_mean"] < 1e-3 and np.isfinite(m["parity"]["logits_max_abs_diff"])
    # the distillation ran and is reported against the dense parent, before and after
    d = m["runtime"]["distill"]
    assert d["kld_vs_parent_after"]["kld_mean"] < d["kld_vs_parent_before"]["kld_mean"]
    assert m["model"]["component_params"]["language"] == moe["params_after"]["language"]


@pytest.mark.slow
def test_moe_gguf_expert_tensors_are_q8_0_and_router_stays_f32(moe_q8):
    import gguf

    r = gguf.GGUFReader(str(moe_q8 / "model-q8_0.gguf"))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == "Q8_0" and types["blk.0.ffn_down_exps.weight"] == "Q8_0"
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"  # llama.cpp never quantizes the router
    shape = next(t.shape for t in r.tensors if t.name == "blk.0.ffn_up_exps.weight")
    assert list(shape) == [64, 96, 8]  # ggml order: n_embd, expert width, experts


def test_moe_bad_inputs_fail_before_loading(llama_wide, tmp_path):
    from edgemed.pipeline import compress

    bad = tmp_path / "moe-64.yaml"
    bad.write_text("name: moe-64\nsteps:\n  - step: moe-distill\n    args:\n      num_experts: 64\n")
    with pytest.raises(BadInputError, match="do not divide the FFN"):
        compress(str(llama_wide), [str(bad), "q8_0"], TARGET, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    bad.write_text("name: moe-k\nsteps:\n  - step: moe-distill\n    args:\n      num_experts: 4\n      top_k: 4\n")
    with pytest.raises(BadInputError, match="top_k"):
        compress(str(llama_wide), [str(bad), "q8_0"], TARGET, tmp_path / "out")


def test_moe_refuses_an_unsupported_family(tmp_path):
    from edgemed.models.tiny import build_tiny
    from edgemed.pipeline import compress

    phi = build_tiny("phi3", tmp_path / "phi3")
    with pytest.raises(BadInputError, match="MoE distillation supports"):
        compress(str(phi), ["moe-8x-top2", "q8_0"], TARGET, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_distill_without_a_transform_is_refused(llama_wide, tmp_path):
    from edgemed.pipeline import compress

    r = tmp_path / "kd.yaml"
    r.write_text("name: kd\nsteps:\n  - step: distill\n")
    with pytest.raises(BadInputError, match="no prune or moe step before it"):
        compress(str(llama_wide), [str(r), "q8_0"], TARGET, tmp_path / "out")


def test_plan_counts_the_moe_model(llama_wide):
    from edgemed import load_recipe, load_target
    from edgemed.plan import plan
    from edgemed.recipe import compose

    dense = plan(str(llama_wide), load_recipe("q8_0"), load_target(TARGET)).to_dict()
    moe = plan(str(llama_wide), compose([load_recipe("moe-8x-top2"), load_recipe("q8_0")]),
               load_target(TARGET)).to_dict()
    assert json.dumps(moe)  # serialisable
    assert moe["components"]["language"]["params"] >= dense["components"]["language"]["params"]


@pytest.mark.slow
def test_moe_onnx_int8_matches_its_pytorch_parent(llama_wide, tmp_path):
    from edgemed.pipeline import compress

    r = compress(str(llama_wide), ["moe-8x-top2", "int8"], TARGET, tmp_path / "int8")
    assert r.status == "ok"
    assert r.manifest.parity["transformed_parent"]["kld_mean"] < 1e-3
    assert r.manifest.runtime["moe"]["num_experts"] == 8
