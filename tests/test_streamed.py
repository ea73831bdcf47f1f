"""compress --low-memory: the parent's weights stay on disk (edgemed.models.streamed).

The streamed parent must compute exactly what the in-memory fp32 parent computes (logits,
generations, imatrix), and the artifact it writes must be the same bytes; recipes that need the
whole model in memory are refused with exit 2 before any work; `plan` offers --low-memory where
it makes an infeasible host feasible.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgemed.cli import main
from edgemed.errors import BadInputError


@pytest.mark.parametrize("family", ["llama", "llava-clip", "gemma3"])
def test_streamed_parent_computes_what_the_loaded_parent_does(tiny_dir, family):
    from edgemed.calibration.builtin import synthetic_test_image
    from edgemed.models import load_model
    from edgemed.reference.parent import ParentSession
    from edgemed.reference.parity import parent_logits

    src = str(tiny_dir(family))
    full, low = load_model(src), load_model(src, low_memory=True)
    assert low.streamed is not None and full.streamed is None
    # Nothing of the model is resident between forwards: every parameter is a shape-only placeholder.
    assert all(p.stride() == (0,) * p.dim() for p in low.model.parameters() if p.dim())
    assert low.component_params() == full.component_params()
    ids = full.prompt_ids("Is there a pleural effusion?", False)
    assert np.array_equal(parent_logits(full, ids, None), parent_logits(low, ids, None))
    image = synthetic_test_image() if full.multimodal else None
    a = ParentSession(full).generate(image, "Describe the image.", max_new_tokens=6)
    b = ParentSession(low).generate(image, "Describe the image.", max_new_tokens=6)
    assert a.token_ids == b.token_ids
    st = low.streamed
    assert st.resident == 0 and 0 < st.peak_resident < 4 * sum(p.numel() for p in full.model.parameters()) / 2


def _hashes(manifest) -> dict[str, str]:
    return {f.path: f.sha256 for f in manifest.files}


@pytest.mark.parametrize("family,recipe", [("llama", "q4_k_m"), ("llava-clip", "q8_0"), ("llama", "int4"),
                                           ("llava-clip", "int8-mse"), ("llama", "int4-gptq")])
def test_low_memory_artifact_is_the_same_bytes(tiny_dir, tmp_path, family, recipe, monkeypatch):
    """The files written from the streamed parent (GGUF and its imatrix; ONNX graphs from the
    builder fed tensor by tensor and quantized node by node with the parent's calibration
    statistics, GPTQ's Hessians layer by layer; the cached parent reference) equal those of the
    in-memory path byte for byte."""
    import onnx

    from edgemed.pipeline import compress

    loads = []  # (repacking, load mode) of each model llama.cpp loads
    if recipe.startswith("q"):
        lc = pytest.importorskip("llama_cpp").llama_cpp
        real_model_load = lc.llama_model_load_from_file

        def model_load(path, params):
            loads.append((params.use_extra_bufts, params.load_mode))
            return real_model_load(path, params)

        monkeypatch.setattr(lc, "llama_model_load_from_file", model_load)
    src = str(tiny_dir(family))
    full = compress(src, [recipe], "cpu-x86-avx2", tmp_path / "full").manifest
    full_loads, loads[:] = list(loads), []
    real_load, whole = onnx.load, []

    def load(f, *a, **k):  # a streamed compress reads no graph's weights whole
        if k.get("load_external_data", True):
            whole.append(str(f))
        return real_load(f, *a, **k)

    monkeypatch.setattr(onnx, "load", load)
    low = compress(src, [recipe], "cpu-x86-avx2", tmp_path / "low", low_memory=True).manifest
    hf, hl = _hashes(full), _hashes(low)
    assert set(hf) == set(hl) and any(p.endswith((".gguf", ".onnx")) for p in hf)
    assert hf == hl
    # Parity ran the ONNX decoder one layer at a time (formats/onnx/layered.py): the same numbers, answers included.
    assert low.parity == full.parity and low.gate_suite == full.gate_suite
    assert low.plan["host"]["weights"] == "on disk (--low-memory)" != full.plan["host"]["weights"]
    assert "process" in low.plan["host"]["parts_gb"] and "parent (fp32)" not in low.plan["host"]["parts_gb"]
    assert any("--low-memory" in n for n in low.notes) and not any("--low-memory" in n for n in full.notes)
    if recipe.startswith("q"):  # parity mapped the GGUF without repacking it: file-backed pages, not a copy
        assert full_loads and set(full_loads) == {(True, lc.LLAMA_LOAD_MODE_MMAP)}
        assert loads and set(loads) == {(False, lc.LLAMA_LOAD_MODE_MMAP)}
        assert lc.llama_model_default_params().use_extra_bufts  # the default is restored after each load
    # Only the small graphs (embedding table, vision tower) are quantized whole.
    assert not [f for f in whole if "decoder" in Path(f).name or Path(f).name == "model.onnx"]


@pytest.mark.parametrize("family,recipe,why", [
    ("llama", "prune-depth-25", "prune-depth"),  # dropping blocks needs the whole model's influence scores
    ("llama", "moe-8x-top2", "moe"),  # its distillation trains the whole student
    ("llama", "trt-int8", "trt-"),  # TensorRT's Q/DQ steps are not streamed
])
def test_low_memory_refuses_a_recipe_that_needs_the_whole_model(tiny_dir, tmp_path, capsys, family, recipe, why):
    out = tmp_path / "out"
    rc = main(["compress", str(tiny_dir(family)), "--recipe", recipe, "--low-memory", "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "--low-memory" in err and why in err and "recipe that streams" in err
    assert not out.exists()


def test_low_memory_onnx_needs_the_builder(tiny_dir, tmp_path, capsys):
    """Gemma 3's decoder attends bidirectionally over image tokens, which the onnxruntime-genai
    builder cannot write: a streamed ONNX export is refused (exit 2, nothing left) rather than
    traced whole by torch.onnx."""
    out = tmp_path / "out"
    rc = main(["compress", str(tiny_dir("gemma3")), "--recipe", "int4", "--low-memory", "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "builder" in err and "without --low-memory" in err
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_low_memory_names_a_tensor_the_checkpoint_lacks(tiny_dir, tmp_path):
    """A checkpoint whose tensor names are not the model's (another transformers' layout, a cut
    shard) is refused by the first missing name, not loaded half."""
    from safetensors.torch import load_file, save_file

    from edgemed.models import load_model

    src = tiny_dir("llama")
    bad = tmp_path / "renamed"
    shutil.copytree(src, bad)
    state = load_file(bad / "model.safetensors")
    state["model.layers.1.mlp.up.weight"] = state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BadInputError, match=r"model\.layers\.1\.mlp\.up_proj\.weight") as e:
        load_model(str(bad), low_memory=True)
    assert "without --low-memory" in e.value.fix


def test_plan_offers_low_memory_and_checks_the_host(tmp_path, capsys):
    """Mistral-7B (the real config) at q4_k_m on a 12 GB host: in memory it is refused with exit 2
    and --low-memory named as the fix; with --low-memory the host side fits."""
    from edgemed.pipeline import resolve
    from edgemed.plan import STREAM_PART, plan

    src = str(Path(__file__).parent / "fixtures" / "checkpoints" / "mistral-7b-instruct-v0.2")
    recipe, target = resolve(["q4_k_m"], "jetson-agx-orin-64gb")
    p = plan(src, recipe, target, host_memory_gb=12)
    assert not p.host.feasible and "parent (fp32)" in p.host.parts
    assert any(f.startswith("--low-memory") for f in p.fixes)
    low = plan(src, recipe, target, host_memory_gb=12, low_memory=True)
    assert low.host.feasible and low.host.peak_ram_bytes < 6e9
    # ONNX int4: parity holds one decoder layer (a 32nd of the 5.4 GB artifact's layers), not the artifact.
    low4 = plan(src, *resolve(["int4"], "cpu-x86-avx2"), host_memory_gb=12, low_memory=True)
    assert low4.host.feasible and low4.host.peak_ram_bytes < 3.5e9 < 5e9 < low4.artifact_bytes
    assert set(low.host.parts) == {"process", STREAM_PART, "gguf export and quantize"}
    # Parity maps the 7B's Q4_K_M (page cache, reported beside the peak) and holds its f32 KV cache (32 layers x
    # 8 KV heads x 128 x 2048 tokens), less than twice the largest tensor in fp32 (the embedding table) streamed.
    assert low.host.mapped_bytes == low.artifact_bytes > 4e9
    assert low.host.parts[STREAM_PART] == 2 * 32_000 * 4096 * 4 > 2 * 32 * 8 * 128 * 2048 * 4
    rc = main(["plan", src, "--recipe", "q4_k_m", "--target", "jetson-agx-orin-64gb", "--host-memory-gb", "12"])
    assert rc == 2 and "--low-memory" in capsys.readouterr().err
    capsys.readouterr()
    rc = main(["plan", src, "--recipe", "q4_k_m", "--target", "jetson-agx-orin-64gb", "--host-memory-gb", "12",
               "--low-memory", "--json"])
    out = capsys.readouterr().out
    assert rc == 0 and json.loads(out)["host"]["feasible"] is True
    rc = main(["plan", src, "--recipe", "prune-depth-25", "--recipe", "q8_0", "--low-memory"])
    assert rc == 2 and "cannot run with --low-memory" in capsys.readouterr().err


def test_distillation_teacher_is_read_from_disk(tiny_dir, tmp_path, monkeypatch):
    """prune + distill: the teacher is the streamed checkpoint, not a deep copy, and it computes the
    loaded model's logits (the distill step's `before` KLD is against it)."""
    import copy

    import torch

    from edgemed.pipeline import compress

    real = copy.deepcopy

    def no_copy(x, *a, **k):
        if isinstance(x, torch.nn.Module):
            raise AssertionError("the teacher was deep-copied")
        return real(x, *a, **k)

    monkeypatch.setattr(copy, "deepcopy", no_copy)
    m = compress(str(tiny_dir("llama")), ["prune-width-25", "q8_0"], "cpu-x86-avx2", tmp_path / "out").manifest
    assert any(n.startswith("distill: the teacher (the model as loaded) is read from the checkpoint") for n in m.notes)
    assert m.plan["host"]["parts_gb"].get("teacher (distill, streamed from disk)") is not None


def test_low_memory_onnx_with_external_data(tiny_dir, tmp_path, monkeypatch):
    """Past external.INLINE_LIMIT (lowered here to 0) both paths write the graph with its weights in one
    external-data file, tensor by tensor at page-aligned offsets: the same bytes, every file, and an
    artifact ONNX Runtime and the artifact checks accept."""
    import onnx

    from edgemed.formats.onnx import external
    from edgemed.formats.onnx.external import ALIGN, external_info
    from edgemed.pipeline import compress

    monkeypatch.setattr(external, "INLINE_LIMIT", 0)
    src = str(tiny_dir("llama"))
    full = compress(src, ["int4"], "cpu-x86-avx2", tmp_path / "full").manifest
    low = compress(src, ["int4"], "cpu-x86-avx2", tmp_path / "low", low_memory=True).manifest
    assert "onnx/model.onnx_data" in {f.path for f in full.files}  # the front ends' name (layout.move_graphs)
    assert _hashes(full) == _hashes(low)
    assert low.parity["kld_mean"] == full.parity["kld_mean"] < 0.05
    b = onnx.load(str(tmp_path / "low" / "onnx" / "model.onnx"), load_external_data=False)
    offsets = [int(external_info(t)["offset"]) for t in b.graph.initializer if external_info(t)]
    big = [t for t in b.graph.initializer if external.stored_bytes(t) >= external.INLINE_TENSOR]
    assert len(offsets) == len(big) > 0 and all(o % ALIGN == 0 for o in offsets)


@pytest.mark.parametrize("family,recipe", [("llama", "int4"), ("llava-clip", "int8")])
def test_layered_session_computes_what_the_whole_graph_does(tiny_dir, tmp_path, monkeypatch, family, recipe):
    """compress --low-memory's parity session runs the decoder graph one layer's run of nodes at a
    time, each its own ONNX Runtime session over the same external-data file, dropped before the
    next opens: logits at every position (prefill and the KV-cache decode path) and greedy answers
    equal the whole graph's, bit for bit."""
    import weakref

    from edgemed.artifact import read_manifest
    from edgemed.formats.onnx import external
    from edgemed.formats.onnx.layered import LayeredDecoder
    from edgemed.formats.onnx.session import OnnxSession
    from edgemed.pipeline import compress

    monkeypatch.setattr(external, "INLINE_LIMIT", 0)
    out = tmp_path / "a"
    compress(str(tiny_dir(family)), [recipe], "cpu-x86-avx2", out, low_memory=True)
    manifest = read_manifest(out)
    whole, layered = OnnxSession(out, manifest), OnnxSession(out, manifest, layered=True)
    dec = layered.decoder
    # A run per layer (the builder names its final norm as one more), and those before and after them.
    assert isinstance(dec, LayeredDecoder) and dec.layers >= manifest.model.text["num_layers"]
    alive, most = [], [0]
    real = LayeredDecoder._session

    def session(self, ri):
        sess = real(self, ri)
        alive.append(weakref.ref(sess))
        most[0] = max(most[0], sum(r() is not None for r in alive))
        return sess

    monkeypatch.setattr(LayeredDecoder, "_session", session)
    ids = whole.prompt_ids("Is there a pleural effusion?", False)
    for kw in ({}, {"decode_from": len(ids) // 2}):
        assert np.array_equal(whole.logits(ids, **kw), layered.logits(ids, **kw))
    a = whole.generate(None, "Describe the findings.", max_new_tokens=5)
    b = layered.generate(None, "Describe the findings.", max_new_tokens=5)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert most[0] == 1 and len(alive) > dec.layers  # one run's session at a time
    total = sum(e.stat().st_size for e in (out / "onnx").glob("*.onnx_data"))
    assert 0 < dec.peak_run_weights < total / 2

    # Many requests in one pass over the layers (parity's and the gate suite's): the same logits,
    # and generate()'s answers whatever the drafts (none, wrong, its own: then one pass).
    from edgemed.calibration.builtin import synthetic_test_image
    from edgemed.runtime.session import greedy_answers, logits_many

    image = synthetic_test_image() if layered.image else None
    pv = layered.pixel_values(image) if image is not None else None
    with_image = layered.prompt_ids("Describe the image.", image is not None,
                                    layered.image_grid(image) if image is not None else (0, 0))
    reqs = [(ids, None, None), (ids, None, len(ids) // 2), (with_image, pv, len(with_image) - 3), (ids[:4], None, 1)]
    passes = len(alive)
    for x, y in zip(logits_many(whole, reqs), logits_many(layered, reqs)):
        assert np.array_equal(x, y)
    assert len(alive) - passes == len(dec.runs)  # each run's session opened once for all of them
    items = [(image, "Describe the image."), (None, "Is there a pleural effusion?"), (None, "Any fracture?")]
    want = [whole.generate(im, p, max_new_tokens=6) for im, p in items]
    assert greedy_answers(whole, items, 6) == [w.text for w in want]
    assert greedy_answers(layered, items, 6) == [w.text for w in want]
    assert greedy_answers(layered, items, 6, drafts=[[5, 6, 7], None, want[2].token_ids[:2] + [9, 9]]) == \
        [w.text for w in want]
    passes = len(alive)
    assert greedy_answers(layered, items, 6, drafts=[w.token_ids for w in want]) == [w.text for w in want]
    assert len(alive) - passes == len(dec.runs)


def test_calibration_statistics_read_each_streamed_weight_once(tiny_dir, monkeypatch):
    """The mse grids' importance and GPTQ's Hessians from a streamed parent: every decoder layer
    runs on all calibration feeds in turn with its weights held, so each weight is read from the
    checkpoint once a pass, not once a feed (a 7B's full pass reads 14.5 GB)."""
    from collections import Counter

    from edgemed.calibration.feeds import decoder_feeds
    from edgemed.formats.onnx.parent_stats import ParentStats
    from edgemed.models import load_model
    from edgemed.models.streamed import CheckpointTensors

    cm = load_model(str(tiny_dir("llama")), low_memory=True)
    feeds = decoder_feeds(cm, None, 4)
    reads: Counter = Counter()
    real = CheckpointTensors.get

    def get(self, key):
        reads[key] += 1
        return real(self, key)

    monkeypatch.setattr(CheckpointTensors, "get", get)
    stats = ParentStats(cm, feeds)
    by_module = stats._collect()
    layer_keys = [k for k in reads if ".layers." in k]
    assert len(feeds) == 4 and layer_keys and max(reads[k] for k in layer_keys) == 1
    assert id(cm.adapter.lm_head(cm.model)) in by_module
    reads.clear()
    stats._head_hessian()  # runs every layer again, each read once
    assert max(reads[k] for k in reads if ".layers." in k) == 1


@pytest.mark.parametrize("family", ["llama", "llava-clip"])
def test_low_memory_width_pruning_is_the_same_bytes(tiny_dir, tmp_path, family):
    """prune-width from a streamed parent: the channel importance from the sequential layer pass and
    the kept rows and columns, written beside the checkpoint and read in place of its tensors, give
    the in-memory path's pruned model: the same GGUF bytes, the same parity and pruning record; the
    scratch tensors are not part of the artifact."""
    pytest.importorskip("llama_cpp")
    from edgemed.pipeline import compress
    from edgemed.recipe import load_recipe

    (tmp_path / "width.yaml").write_text(
        "name: prune-width-only\nsteps:\n  - step: prune-width\n    args: {fraction: 0.25, of: block_params, "
        "importance: wanda, multiple_of: 8, calibration_count: 3}\n")
    recipes = [load_recipe(str(tmp_path / "width.yaml")), "q8_0"]
    src = str(tiny_dir(family))
    full = compress(src, recipes, "cpu-x86-avx2", tmp_path / "full").manifest
    low = compress(src, recipes, "cpu-x86-avx2", tmp_path / "low", low_memory=True).manifest
    assert _hashes(full) == _hashes(low) and not any("scratch" in p for p in _hashes(low))
    assert low.parity == full.parity
    assert low.runtime["pruning"] == full.runtime["pruning"]
    rec = low.runtime["pruning"]["prune-width"]
    assert rec["intermediate_size"] < rec["intermediate_size_before"]
    assert low.model.text == full.model.text


def test_low_memory_distillation_refits_each_layer(tiny_dir, tmp_path):
    """prune-width-25 (prune + distill) with the weights on disk: the recovery is layer-local (each
    FFN's down projection refit by least squares to the teacher's FFN output), it lowers every
    layer's error and the KLD to the unpruned parent, and the artifact holds no scratch tensors."""
    pytest.importorskip("llama_cpp")
    from edgemed.pipeline import compress

    m = compress(str(tiny_dir("llama")), ["prune-width-25", "q8_0"], "cpu-x86-avx2", tmp_path / "low",
                 low_memory=True).manifest
    d = m.runtime["distill"]
    assert d["method"].startswith("layer-local least squares")
    # Ridge towards the pruned weights, its strength cross-validated: never worse held out, nor on all rows.
    assert all(f["heldout_error_after"] <= f["heldout_error_before"] for f in d["layers"])
    assert all(0 <= f["relative_error_after"] <= f["relative_error_before"] for f in d["layers"])
    assert any(f["ridge"] is not None for f in d["layers"])
    assert d["kld_vs_parent_after"]["kld_mean"] < d["kld_vs_parent_before"]["kld_mean"]
    assert len(d["layers"]) == m.model.text["num_layers"]
    assert not any(".scratch" in f.path for f in m.files) and not (tmp_path / "low" / ".scratch").exists()
    assert m.plan["host"]["weights"] == "on disk (--low-memory)"
    assert m.parity["kld_mean"] < 1.0
