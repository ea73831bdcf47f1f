"""The planner, from a config.json alone (no weights): LLaVA-1.5-7B's shape against the shipped targets."""
from __future__ import annotations

import json
import math

import pytest

from edgemed.errors import InfeasiblePlanError
from edgemed.plan import RUNTIME_OVERHEAD_FIXED_BYTES, RUNTIME_OVERHEAD_FRACTION, check_feasible, plan
from edgemed.recipe import ComponentPolicy, Recipe
from edgemed.target import load_target

# LLaVA-1.5-7B: CLIP ViT-L/14-336 (303.5M with its post-layernorm) + 2-layer MLP projector (21.0M)
# + Llama-2-7B with a 32064-token vocabulary (6,738.9M): 7,063.4M in all.
LLAVA_15_7B_PARAMS = 7.06e9


@pytest.fixture(autouse=True)
def big_host(monkeypatch):
    """These tests are about the target side; the host that compresses (its RAM and free disk, which
    other jobs on this machine change) is planned below."""
    from collections import namedtuple

    monkeypatch.setattr("edgemed.plan_host.host_memory_available", lambda: 1 << 40)
    monkeypatch.setattr("shutil.disk_usage", lambda path: namedtuple("usage", "total used free")(1 << 50, 0, 1 << 50))


@pytest.fixture(scope="module")
def llava7b(tmp_path_factory):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                              intermediate_size=4096, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       intermediate_size=11008, vocab_size=32064, max_position_embeddings=4096)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    folder = tmp_path_factory.mktemp("llava-1.5-7b-config")
    cfg.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]  # no weights anywhere
    return str(folder)


def _recipe(name: str, steps=({"step": "onnx-export"},), **policy) -> Recipe:
    return Recipe(name=name, policy=ComponentPolicy(**policy), steps=list(steps))


FP16 = dict(vision="fp16", projector="fp16", embed="fp16", language="fp16", lm_head="fp16")
INT4 = dict(vision="int8", projector="int8", language="int4", lm_head="int8")  # embed stays fp32 (ONNX Gather)
INT4_STEPS = ({"step": "onnx-export"},
              {"step": "onnx-quantize", "args": {"int4": {"algorithm": "rtn", "block_size": 32, "symmetric": False},
                                                 "int8": {"method": "dynamic"}}})


@pytest.fixture(scope="module")
def int4_recipe():
    return _recipe("int4-test", INT4_STEPS, **INT4)


def test_param_counts_match_llava_15_7b(llava7b, int4_recipe):
    p = plan(llava7b, int4_recipe, load_target("jetson-orin-nx-16gb"))
    assert p.family == "llava"
    assert p.total_params == pytest.approx(LLAVA_15_7B_PARAMS, rel=0.02)
    c = {k: v.params for k, v in p.components.items()}
    assert list(c) == ["vision", "projector", "embed", "language", "lm_head"]
    assert c["vision"] == pytest.approx(303.5e6, rel=0.01)
    assert c["projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert c["embed"] == c["lm_head"] == 32064 * 4096


def test_fp16_everything_does_not_fit_orin_nano(llava7b):
    p = plan(llava7b, _recipe("fp16-test", **FP16), load_target("jetson-orin-nano-8gb"))
    assert not p.feasible
    assert p.artifact_bytes == pytest.approx(2 * p.total_params, rel=1e-6)
    assert len(p.reasons) == 1 and "at run time" in p.reasons[0] and "5.2 GB" in p.reasons[0]
    with pytest.raises(InfeasiblePlanError) as e:
        check_feasible(p)
    msg = str(e.value)
    assert "jetson-orin-nano-8gb" in msg and "fix:" in msg
    assert e.value.reasons == p.reasons
    # The hint is computed: fp16 weights alone are 14 GB, so only the big targets are offered.
    assert any("jetson-agx-orin-64gb" in f for f in p.fixes)
    assert not any("jetson-orin-nx-16gb" in f for f in p.fixes)


def test_int4_language_policy_size_and_fit(llava7b, int4_recipe):
    p = plan(llava7b, int4_recipe, load_target("jetson-orin-nx-16gb"))
    assert 3.5e9 < p.artifact_bytes < 5.2e9
    assert p.feasible and p.reasons == [] and p.fixes == []
    check_feasible(p)  # no exception
    # On the Orin Nano 8GB the same artifact does not fit at 2048 tokens: 4.4 GB of weights leave
    # no room in 5.2 GB once the fp16 KV cache (1.07 GB) and the runtime are added.
    nano = plan(llava7b, int4_recipe, load_target("jetson-orin-nano-8gb"))
    assert nano.artifact_bytes == p.artifact_bytes
    assert not nano.feasible and "at run time" in nano.reasons[0]
    assert any("jetson-orin-nx-16gb" in f for f in nano.fixes)


def test_per_component_numbers_add_up(llava7b, int4_recipe):
    p = plan(llava7b, int4_recipe, load_target("cpu-x86-avx2"), context_tokens=2048)
    c = p.components
    for comp in c.values():
        assert comp.bytes == math.ceil(comp.params * comp.bits_per_weight / 8)
    # int4 MatMulNBits, block 32, asymmetric: fp32 scale + 4-bit zero point per 32 weights.
    assert c["language"].bits_per_weight == pytest.approx(4 + (32 + 4) / 32)
    # int8 per channel: fp32 scale + int8 zero point per output channel of 4096 inputs.
    assert c["lm_head"].bits_per_weight == pytest.approx(8 + 40 / 4096)
    assert c["embed"].bits_per_weight == 32
    assert p.artifact_bytes == sum(x.bytes for x in c.values())
    kv = 2 * 32 * 32 * 128 * 2048 * 4  # fp32 past_key_values in the ONNX decoder
    assert p.kv_cache_bytes == kv and p.kv_bytes_per_element == 4
    assert p.runtime_overhead_bytes == math.ceil((p.artifact_bytes + kv) * RUNTIME_OVERHEAD_FRACTION) \
        + RUNTIME_OVERHEAD_FIXED_BYTES
    assert p.runtime_memory_bytes == p.artifact_bytes + kv + p.runtime_overhead_bytes
    embed_row = math.ceil(c["embed"].bytes / 32064)
    assert p.bytes_per_token == c["language"].bytes + c["lm_head"].bytes + embed_row + kv
    assert not c["vision"].read_per_token and not c["projector"].read_per_token
    # The table: five components and a total that matches.
    rows = p.table_rows()
    assert [r[0] for r in rows] == ["vision", "projector", "embed", "language", "lm_head", "total"]
    assert all(len(r) == 4 for r in rows)
    assert float(rows[-1][3].replace(",", "")) == pytest.approx(p.artifact_bytes / 1e6, abs=0.1)


def test_decode_ceiling_is_bandwidth_over_bytes_per_token(llava7b, int4_recipe):
    for name in ("jetson-orin-nx-16gb", "rtx-4090-24gb", "cpu-x86-avx2"):
        t = load_target(name)
        p = plan(llava7b, int4_recipe, t)
        assert p.decode_ceiling_tok_s == pytest.approx(t.memory_bandwidth_gb_s * 1e9 / p.bytes_per_token)
    short = plan(llava7b, int4_recipe, load_target("cpu-x86-avx2"), context_tokens=512)
    assert short.kv_cache_bytes * 4 == p.kv_cache_bytes
    assert short.decode_ceiling_tok_s > plan(llava7b, int4_recipe, load_target("cpu-x86-avx2")).decode_ceiling_tok_s


def test_fp8_refused_on_orin_naming_fp8(llava7b):
    fp8 = _recipe("fp8-test", steps=(), vision="fp16", projector="fp16", embed="fp16", language="fp8", lm_head="fp16")
    assert fp8.format is None  # transform-only: no format check, precisions still checked
    p = plan(llava7b, fp8, load_target("jetson-orin-nano-8gb"))
    assert not p.feasible
    fp8_reasons = [r for r in p.reasons if "fp8" in r]
    assert fp8_reasons and "language" in fp8_reasons[0] and "jetson-orin-nano-8gb" in fp8_reasons[0]
    with pytest.raises(InfeasiblePlanError, match="fp8"):
        check_feasible(p)
    thor = plan(llava7b, fp8, load_target("jetson-thor"))
    assert thor.feasible, thor.reasons


def test_onnx_cannot_store_fp8_even_where_the_target_can(llava7b):
    fp8 = _recipe("fp8-onnx", vision="fp16", projector="fp16", embed="fp16", language="fp8", lm_head="fp16")
    p = plan(llava7b, fp8, load_target("jetson-thor"))
    assert not p.feasible and any("onnx format cannot store" in r and "fp8" in r for r in p.reasons)


def test_fp32_is_fine_on_a_cpu_target(llava7b):
    p = plan(llava7b, _recipe("fp32-test"), load_target("cpu-x86-avx2"))
    assert not any("does not support" in r for r in p.reasons)
    assert p.artifact_bytes == 4 * p.total_params


def test_format_the_target_does_not_run_is_refused(llava7b, int4_recipe):
    gguf_only = load_target("cpu-x86-avx2").model_copy(update={"name": "gguf-box", "formats": ["gguf"]})
    p = plan(llava7b, int4_recipe, gguf_only)
    assert not p.feasible and any("format 'onnx'" in r and "gguf-box" in r for r in p.reasons)


def test_int4_block_size_follows_the_recipe(llava7b):
    steps = ({"step": "onnx-export"},
             {"step": "onnx-quantize", "args": {"int4": {"algorithm": "rtn", "block_size": 128, "symmetric": True}}})
    p = plan(llava7b, _recipe("int4-b128", steps, **INT4), load_target("cpu-x86-avx2"))
    assert p.components["language"].bits_per_weight == pytest.approx(4 + 32 / 128)


def test_shipped_int4_and_int8_layouts(llava7b):
    """int4 (mse) keeps a 4-bit zero point beside each fp32 scale, and its attention q/k/v and MLP
    down projections at int8 on a CPU; weight-only int8 keeps one scale per block."""
    from edgemed.recipe import load_recipe

    p = plan(llava7b, load_recipe("int4"), load_target("cpu-x86-avx2"))
    # LLaVA-1.5-7B per layer: q/k/v 3 x 4096^2 and down 4096 x 11008 of 202.4M weights.
    share = (3 * 4096 * 4096 + 4096 * 11008) / (4 * 4096 * 4096 + 3 * 4096 * 11008)
    lang = p.components["language"]
    assert lang.bits_per_weight == pytest.approx(share * (8 + 32 / 32) + (1 - share) * (4 + 36 / 32), rel=1e-3)
    assert "int8" in lang.note and "down_proj" in lang.note
    assert p.components["lm_head"].bits_per_weight == pytest.approx(8 + 32 / 32)
    assert p.components["embed"].precision == "int8" and p.components["embed"].bits_per_weight == pytest.approx(9)
    fast = plan(llava7b, load_recipe("int4-fast"), load_target("cpu-x86-avx2"))
    assert fast.components["language"].bits_per_weight == pytest.approx(4 + 36 / 32)
    assert not fast.components["language"].note


def test_gpu_targets_get_the_fp16_layout(llava7b):
    """On a GPU target onnx-quantize makes activations, float weights and the KV cache fp16, with
    every language projection int4 in blocks of 128 and fp16 scales; the plan counts that artifact,
    not the CPU one, and picks the longest context that fits when 2048 tokens do not."""
    from edgemed.recipe import load_recipe

    int4 = load_recipe("int4")
    cpu = plan(llava7b, int4, load_target("cpu-x86-avx2"))
    gpu = plan(llava7b, int4, load_target("jetson-orin-nano-8gb"), context_tokens=2048)
    assert cpu.kv_bytes_per_element == 4 and gpu.kv_bytes_per_element == 2
    assert gpu.kv_cache_bytes * 2 == cpu.kv_cache_bytes
    c = gpu.components
    assert c["language"].bits_per_weight == pytest.approx(4 + (16 + 4) / 128)  # fp16 scale + 4-bit zero point
    assert not c["language"].note  # no int8 projections in the GPU layout
    assert c["lm_head"].bits_per_weight == pytest.approx(8 + 16 / 32)  # int8 nbits, fp16 scale per 32
    assert c["embed"].precision == "int8" and c["embed"].bits_per_weight == pytest.approx(8 + 16 / 32)
    assert gpu.artifact_bytes < 0.7 * cpu.artifact_bytes
    # 3.99 GB of weights + 1.07 GB of fp16 KV at 2048 tokens: more than the Nano's 5.2 GB ...
    assert not gpu.feasible
    ctx = int(next(f for f in gpu.fixes if "--context" in f).split("--context ")[1].split(";")[0])
    assert 576 + 256 <= ctx < 2048 and ctx % 64 == 0
    # ... so without --context the plan takes that context (one image and a turn still fit).
    auto = plan(llava7b, int4, load_target("jetson-orin-nano-8gb"))
    assert auto.feasible and auto.context_tokens == ctx
    assert any(f"context limited to {ctx} tokens" in n for n in auto.notes)
    assert plan(llava7b, int4, load_target("jetson-orin-nano-8gb"), context_tokens=ctx).feasible
    assert not plan(llava7b, int4, load_target("jetson-orin-nano-8gb"), context_tokens=ctx + 64).feasible
    # A target too small for one image and a turn gets no shorter context.
    tight = load_target("jetson-orin-nano-8gb").model_copy(update={"name": "nano-busy", "usable_memory_gb": 4.9})
    p = plan(llava7b, int4, tight)
    assert not p.feasible and p.context_tokens == 2048 and not any("--context" in f for f in p.fixes)
    # A recipe may keep fp32 activations on a GPU; Gemma 3 always does (its activations overflow fp16).
    steps = [s.model_dump() for s in int4.steps]
    steps[1]["args"] = {**steps[1]["args"], "activations": "fp32"}
    fp32 = plan(llava7b, int4.model_copy(update={"steps": [type(int4.steps[0])(**s) for s in steps]}),
                load_target("jetson-orin-nano-8gb"))
    assert fp32.kv_bytes_per_element == 4 and fp32.artifact_bytes == cpu.artifact_bytes


def test_a_concatenating_decoder_holds_two_kv_caches(llava7b, int4_recipe):
    """torch.onnx's decoder returns present = concat(past, new) while past is still alive; the
    builder's GroupQueryAttention (the default for Llama) updates one buffer in place."""
    cpu = load_target("jetson-agx-orin-64gb")
    fused = plan(llava7b, int4_recipe, cpu)
    steps = [{"step": "onnx-export", "args": {"decoder": "torch"}}, *[s.model_dump() for s in int4_recipe.steps[1:]]]
    concat = plan(llava7b, _recipe("int4-torch", steps, **INT4), cpu)
    assert fused.kv_copies == 1 and concat.kv_copies == 2
    assert concat.kv_cache_bytes == fused.kv_cache_bytes
    assert concat.runtime_memory_bytes - fused.runtime_memory_bytes == pytest.approx(
        fused.kv_cache_bytes * (1 + RUNTIME_OVERHEAD_FRACTION), abs=2)


def test_to_dict_is_json_in_mb(llava7b, int4_recipe):
    p = plan(llava7b, int4_recipe, load_target("jetson-orin-nano-8gb"))
    d = json.loads(json.dumps(p.to_dict()))
    assert d["model"] == llava7b and d["family"] == "llava" and d["format"] == "onnx"
    assert d["artifact_mb"] == pytest.approx(p.artifact_bytes / 1e6, abs=0.05)
    assert d["components"]["language"]["precision"] == "int4"
    for key in ("kv_cache_mb", "runtime_memory_mb", "usable_memory_mb", "bytes_per_token_mb", "decode_ceiling_tok_s"):
        assert key in d
    assert d["roofline"]["bytes_per_token"] == p.bytes_per_token
    assert d["feasible"] is False and d["reasons"] and d["fixes"]


def test_text_only_decoder(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1000).save_pretrained(tmp_path)
    p = plan(str(tmp_path), _recipe("int8-test", embed="fp32", language="int8", lm_head="int8"),
             load_target("cpu-arm64"), context_tokens=100)
    assert list(p.components) == ["embed", "language", "lm_head"] and p.feasible
    assert p.kv_cache_bytes == 2 * 2 * 2 * 64 * 100 * 4  # grouped-query attention: 2 KV heads


# --- the host that compresses ---------------------------------------------------------------

def test_host_side_parts_add_up_and_follow_the_recipe(llava7b, int4_recipe):
    from edgemed import load_recipe
    from edgemed.plan import HOST_PROCESS_BYTES

    target = load_target("jetson-orin-nx-16gb")
    p = plan(llava7b, int4_recipe, target, host_memory_gb=512)
    h = p.host
    assert p.feasible and h.feasible and h.memory_source == "--host-memory-gb" and h.memory_bytes == 512e9
    assert h.parts["process"] == HOST_PROCESS_BYTES
    assert h.parts["parent (fp32)"] == 4 * p.total_params  # compress loads the parent in fp32
    assert h.peak_ram_bytes == sum(h.parts.values()) and "onnx export and quantize" in h.parts
    assert h.disk_bytes >= p.artifact_bytes
    d = json.loads(json.dumps(p.to_dict()))["host"]
    assert d["peak_ram_gb"] == pytest.approx(h.peak_ram_bytes / 1e9, abs=0.01) and d["feasible"] is True
    # A recipe that distills reads its teacher (the unpruned parent) from the checkpoint while it
    # runs: the largest tensors, not a second fp32 copy (pipeline._teacher).
    from edgemed.pipeline import resolve
    from edgemed.plan import HOST_STREAM_FACTOR

    pruned, _ = resolve(["prune-width-25", "int8"], target)
    hp = plan(llava7b, pruned, target, host_memory_gb=512).host
    assert "teacher copy (distill)" not in hp.parts and hp.parts["parent (fp32)"] == 4 * p.total_params
    assert hp.parts["teacher (distill, streamed from disk)"] == HOST_STREAM_FACTOR * 4 * 32064 * 4096
    assert load_recipe("prune-width-25").steps[-1].step == "distill"


def test_plan_counts_the_hidden_states_distills_refit_holds(llava7b):
    """distill refit: true runs a layer pass over every sequence it fits on (the parent's answers with
    data: parent): their embeddings and hidden states, hidden wide in fp32, are in the plan."""
    from edgemed.pipeline import resolve
    from edgemed.transforms.distill import REFIT_PROMPT_TOKENS

    target = load_target("jetson-orin-nx-16gb")
    base, _ = resolve(["prune-width-25", "int8"], target)

    def held(**args):
        r = base.model_copy(deep=True)
        (d,) = [s for s in r.steps if s.step == "distill"]
        d.args.update(args)
        return plan(llava7b, r, target, host_memory_gb=512).host.parts["distill step"]

    plain = held()
    extra = held(refit=True, data="parent", parent_samples=1000, parent_tokens=128) - plain
    per_answer = held(refit=True, data="parent", parent_samples=2000, parent_tokens=128) - plain - extra
    assert per_answer == 1000 * 2 * 4 * 4096 * (128 + REFIT_PROMPT_TOKENS)  # 1000 answers more, hidden 4096
    assert extra > per_answer  # one layer's least-squares sums on top, once
    assert held(refit=False, data="parent", parent_samples=2000) == plain


def test_host_that_cannot_compress_is_refused_with_the_fix(llava7b, int4_recipe):
    target = load_target("jetson-agx-orin-64gb")
    p = plan(llava7b, int4_recipe, target, host_memory_gb=16)
    assert not p.feasible and not p.host.feasible
    (reason,) = [r for r in p.reasons if r.startswith("host: ")]
    assert "compress needs about" in reason and "--host-memory-gb is 16.0 GB" in reason
    need = math.ceil(p.host.peak_ram_bytes / 0.95 / 1e9)
    assert any(f"at least {need} GB of free RAM" in f for f in p.fixes)
    with pytest.raises(InfeasiblePlanError, match="host: compress needs"):
        check_feasible(p)
    # The same plan on a host that has the memory is feasible: the target side did fit.
    assert plan(llava7b, int4_recipe, target, host_memory_gb=p.host.peak_ram_bytes / 0.9e9).feasible


def test_host_memory_reads_the_cgroup_cap(tmp_path, monkeypatch):
    monkeypatch.undo()  # the real function, not big_host's
    from edgemed.plan import host_memory_available

    (tmp_path / "memory.max").write_text("4000000000\n")
    (tmp_path / "memory.current").write_text("1000000000\n")
    assert host_memory_available(tmp_path) == 3_000_000_000  # this machine has more than 3 GB free
    (tmp_path / "memory.max").write_text("max\n")
    import psutil

    assert abs(host_memory_available(tmp_path) - psutil.virtual_memory().available) < 0.5e9


def test_host_memory_reads_a_v1_cap_on_a_parent_cgroup(tmp_path):
    """cgroup v1 (Docker on an Ubuntu 20.04 host, a Jetson's L4T): the limit sits on the job's parent
    cgroup, /proc/self/cgroup names the memory controller's path, and the inactive page cache the
    kernel drops first does not count as used."""
    from edgemed.plan_host import cgroup_headroom

    proc = tmp_path / "self-cgroup"
    proc.write_text("12:pids:/ci/job7\n4:memory:/ci/job7\n0::/\n")
    job, ci = tmp_path / "memory/ci/job7", tmp_path / "memory/ci"
    job.mkdir(parents=True)
    for d, limit, usage, inactive in [(job, 9223372036854771712, 900_000_000, 100_000_000),
                                      (ci, 2_000_000_000, 1_500_000_000, 300_000_000)]:
        (d / "memory.limit_in_bytes").write_text(f"{limit}\n")
        (d / "memory.usage_in_bytes").write_text(f"{usage}\n")
        (d / "memory.stat").write_text(f"cache 1\ntotal_inactive_file {inactive}\nrss 2\n")
    assert cgroup_headroom(tmp_path, proc) == 800_000_000  # the parent's 2.0 GB less 1.2 GB held
    (ci / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_headroom(tmp_path, proc) is None  # no limit anywhere
    (tmp_path / "self-cgroup").write_text("0::/ci.slice/job7.scope\n")  # cgroup v2 with a unified mount
    v2 = tmp_path / "unified/ci.slice"
    (v2 / "job7.scope").mkdir(parents=True)
    (v2 / "memory.max").write_text("3000000000\n")
    (v2 / "memory.current").write_text("1000000000\n")
    (v2 / "job7.scope/memory.max").write_text("max\n")
    (v2 / "job7.scope/memory.current").write_text("1000000000\n")
    assert cgroup_headroom(tmp_path, proc) == 2_000_000_000
