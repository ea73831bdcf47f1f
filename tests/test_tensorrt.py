"""TensorRT target on a machine without TensorRT: Q/DQ ONNX graphs (valid, no contrib ops, close to
fp32 on ONNX Runtime CPU), build profiles in the manifest, planner refusals, and build-engine's exit
code. The engine build and the TensorRT session run only where tensorrt and a GPU are (they skip
here with the reason); bench/trt_check.py is the device-side check."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgemed.artifact import Manifest, read_manifest, verify, write_manifest
from edgemed.cli import main
from edgemed.formats.onnx.graph import COMPONENT_KEY
from edgemed.recipe import ComponentPolicy, load_recipe
from edgemed.formats.tensorrt.args import PROFILES_FILE, TrtExportArgs
from edgemed.formats.tensorrt.profiles import build_profiles, validate_profiles
from edgemed.formats.tensorrt.qdq import qdq_graph

GRAPHS = ("vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx")
CONTRIB = {"MatMulNBits", "MatMulInteger", "DynamicQuantizeLinear", "GroupQueryAttention", "QLinearMatMul"}


def _tensorrt_reason() -> str | None:
    from edgemed.formats.tensorrt.session import tensorrt_available

    return tensorrt_available()


# --- small synthetic graph: fast unit checks of the Q/DQ compiler ---------------------------------

def _tiny_graph(path, k=128, n=64, vocab=96):
    """x[1,S,k] -> MatMul W1 (language) -> + mask bias (Add) -> MatMul W2 (lm_head) -> logits."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.05, (k, n)).astype(np.float32)
    w2 = rng.normal(0, 0.05, (n, vocab)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="lang_mm"),
             helper.make_node("Add", ["h", "bias"], ["hb"], name="mask_add"),
             helper.make_node("MatMul", ["hb", "w2"], ["logits"], name="head_mm")]
    for node, comp in zip(nodes, ("language", "language", "lm_head")):
        e = node.metadata_props.add()
        e.key, e.value = COMPONENT_KEY, comp
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", k])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", vocab])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                           numpy_helper.from_array(np.zeros(n, np.float32), "bias")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    feeds = [{"x": rng.normal(0, 1, (1, s, k)).astype(np.float32)} for s in (5, 7, 9)]
    return feeds


def _run(path, x):
    import onnxruntime as ort

    from edgemed.formats.tensorrt.session import QDQ_AS_TENSORRT

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for key, value in QDQ_AS_TENSORRT.items():  # as QdqOnnxSession runs it: TensorRT's exact int8 math
        opts.add_session_config_entry(key, value)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["QDQPropagationTransformer"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("language,lm_head,dq_types,int4_algorithm", [
    ("int4", "int8", {TensorProto.INT4, TensorProto.INT8}, "awq_clip"),
    ("int4", "fp32", {TensorProto.INT4}, "rtn"),
    ("int8", "int8", {TensorProto.INT8}, "rtn"),
    ("fp8", "fp8", {TensorProto.FLOAT8E4M3FN}, "rtn"),
])
def test_qdq_compiler_follows_policy(tmp_path, language, lm_head, dq_types, int4_algorithm):
    src = tmp_path / "g.onnx"
    feeds = _tiny_graph(src)
    ref = _run(src, feeds[0]["x"])
    q = tmp_path / "q.onnx"
    shutil.copy(src, q)
    policy = ComponentPolicy(language=language, lm_head=lm_head)
    args = TrtExportArgs(int4_algorithm=int4_algorithm)
    assert qdq_graph(q, policy, args, feeds) == {"language": language, "lm_head": lm_head}
    model = onnx.load(str(q))
    ops = {n.op_type for n in model.graph.node}
    assert "DequantizeLinear" in ops and not ops & CONTRIB
    inits = {t.name: t.data_type for t in model.graph.initializer}
    weight_dq = {inits[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    assert weight_dq == dq_types
    # The mask Add stays float: nothing quantizes its inputs.
    producers = {o: n for n in model.graph.node for o in n.output}
    add = next(n for n in model.graph.node if n.op_type == "Add")
    assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in add.input)
    if language == "int4":
        dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) == TensorProto.INT4]
        assert {a.name: a.i for a in dq[0].attribute}["block_size"] == 128
        assert len(dq[0].input) == 2  # symmetric: no zero point, as TensorRT's INT4 weight-only wants
    got = _run(q, feeds[0]["x"])
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert 0 < rel < {"int8": 0.05, "int4": 0.15, "fp8": 0.15}[language]


def test_awq_clip_beats_rtn_on_outlier_channels():
    """The clip search never does worse than round-to-nearest on the activation-weighted error
    it minimizes (r = 1.0 is RTN and is among the candidates), and does better with outliers."""
    from edgemed.formats.tensorrt.qdq import _awq_clip_blocks

    rng = np.random.default_rng(1)
    w = rng.standard_t(3, (256, 32)).astype(np.float32) * 0.02  # heavy tails: clipping pays
    act2 = np.ones(256)
    act2[rng.choice(256, 8, replace=False)] = 100.0  # a few outlier input channels
    q, s = _awq_clip_blocks(w, act2, 128)
    assert q.min() >= -8 and q.max() <= 7 and s.shape == (2, 32)
    deq = (q.reshape(2, 128, 32) * s[:, None]).reshape(256, 32)
    amax = np.abs(w.reshape(2, 128, 32)).max(1)
    rtn_s = amax / 7
    rtn = (np.clip(np.rint(w.reshape(2, 128, 32) / rtn_s[:, None]), -8, 7) * rtn_s[:, None]).reshape(256, 32)
    err = lambda d: float((act2[:, None] * (w - d) ** 2).sum())  # noqa: E731
    assert err(deq) < 0.95 * err(rtn)


def test_qdq_refuses_precision_without_qdq_form(tmp_path):
    from edgemed.errors import BadInputError

    src = tmp_path / "g.onnx"
    feeds = _tiny_graph(src)
    with pytest.raises(BadInputError, match="fp4"):
        qdq_graph(src, ComponentPolicy(language="fp4", allow_low_bit_vision=True), TrtExportArgs(), feeds)


def test_profiles_are_validated(tmp_path):
    src = tmp_path / "decoder_model_merged.onnx"
    _tiny_graph(src)
    good = {"graphs": {src.name: {"profiles": [{"name": "p", "shapes": {"x": {"min": [1, 1, 128], "opt": [1, 8, 128],
                                                                                   "max": [1, 64, 128]}}}]}}}
    assert validate_profiles(good, tmp_path) == []
    bad = json.loads(json.dumps(good))
    shapes = bad["graphs"][src.name]["profiles"][0]["shapes"]
    shapes["x"]["opt"] = [1, 99, 128]  # opt > max
    shapes["y"] = {"min": [1], "opt": [1], "max": [1]}  # not a graph input
    problems = validate_profiles(bad, tmp_path)
    assert any("min <= opt <= max" in p for p in problems) and any("lacks" in p for p in problems)
    bad["graphs"][src.name]["profiles"][0]["shapes"] = {"x": {"min": [1, 1, 64], "opt": [1, 1, 64], "max": [1, 1, 64]}}
    assert any("dim 2 is 128" in p for p in validate_profiles(bad, tmp_path))


# --- planner and CLI -------------------------------------------------------------------------------

@pytest.fixture()
def config_only(tiny_dir, tmp_path):
    d = tmp_path / "cfg"
    d.mkdir()
    shutil.copy(tiny_dir("llava-siglip") / "config.json", d / "config.json")
    return d


def test_plan_refuses_fp8_on_orin(config_only, capsys):
    assert main(["plan", str(config_only), "--recipe", "trt-fp8", "--target", "jetson-orin-nano-8gb"]) == 2
    err = capsys.readouterr().err
    assert "fp8" in err and "jetson-orin-nano-8gb" in err


@pytest.mark.parametrize("recipe,target", [("trt-fp8", "jetson-thor"), ("trt-fp8", "rtx-4090-24gb"),
                                           ("trt-int8", "jetson-orin-nano-8gb"), ("trt-int4-awq", "jetson-orin-nano-8gb"),
                                           ("trt-fp16", "jetson-orin-nano-8gb")])
def test_plan_accepts_trt_recipes_where_they_run(config_only, recipe, target):
    assert main(["plan", str(config_only), "--recipe", recipe, "--target", target]) == 0


def test_plan_refuses_tensorrt_on_a_cpu_target(config_only, capsys):
    assert main(["plan", str(config_only), "--recipe", "trt-int8", "--target", "cpu-x86-avx2"]) == 2
    assert "tensorrt" in capsys.readouterr().err


def test_plan_refuses_an_engine_build_that_would_not_fit(tmp_path, capsys):
    """A 7B LLaVA at trt-int8 runs in an Orin NX's 16 GB, but building its decoder engine holds the
    parsed weights and the engine in the same shared memory, plus the builder workspace."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       intermediate_size=11008, vocab_size=32064)
    LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000).save_pretrained(tmp_path)
    assert main(["plan", str(tmp_path), "--recipe", "trt-int8", "--target", "jetson-orin-nx-16gb"]) == 2
    err = capsys.readouterr().err
    assert "building the decoder engine needs about" in err and "needs about 9" not in err
    assert main(["plan", str(tmp_path), "--recipe", "trt-int4-awq", "--target", "jetson-orin-nx-16gb",
                 "--host-memory-gb", "512"]) == 0


def test_trt_recipes_ship_and_say_what_int4_is():
    for name in ("trt-fp16", "trt-int8", "trt-int4-awq", "trt-fp8"):
        r = load_recipe(name)
        assert r.format == "tensorrt" and r.gates.active()
    assert "awq_clip" in load_recipe("trt-int4-awq").description  # honest: no AWQ pre-scaling


@pytest.mark.skipif(_tensorrt_reason() is None, reason="tensorrt is installed here: test_engine_build_and_parity covers it")
def test_build_engine_without_tensorrt_exits_2(tmp_path, capsys):
    write_manifest(tmp_path, Manifest(format="tensorrt", runtime={"trt": {"graphs": {}}}))
    assert main(["build-engine", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and "pip install" in err


def test_runtime_import_stays_torch_free():
    import subprocess
    import sys

    code = ("import sys, edgemed.runtime, edgemed.formats.tensorrt.session, edgemed.formats.tensorrt.engine; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- end to end on the tiny LLaVA ------------------------------------------------------------------

@pytest.fixture(scope="session")
def trt_artifact(tiny_dir, tmp_path_factory):
    from edgemed.pipeline import compress

    root = tmp_path_factory.mktemp("trt")
    cache = {}

    def get(recipe: str, target: str = "jetson-orin-nano-8gb"):
        if recipe not in cache:
            out = root / recipe
            compress(str(tiny_dir("llava-siglip")), [recipe], target, out)
            cache[recipe] = out
        return cache[recipe]

    return get


def _logits(session, with_image=True):
    from edgemed.calibration.builtin import synthetic_test_image

    pv = session.pixel_values(synthetic_test_image(seed=3)) if with_image else None
    ids = session.prompt_ids("Is the heart enlarged on this radiograph?", with_image)
    return session.logits(ids, pv), session.logits(ids, pv, decode_from=len(ids) // 2)


@pytest.mark.slow  # two compresses (about 25 s each here) and the fp32 reference
@pytest.mark.parametrize("recipe,max_kld,max_rel", [("trt-int8", 1e-3, 0.05), ("trt-int4-awq", 1e-2, 0.2)])
def test_qdq_artifact_runs_on_ort_close_to_fp32(trt_artifact, artifact, recipe, max_kld, max_rel):
    from edgemed.reference.metrics import compare_logits
    from edgemed.runtime import load
    from edgemed.formats.onnx.session import OnnxSession

    out = trt_artifact(recipe)
    m = read_manifest(out)
    assert m.format == "tensorrt" and m.status == "ok"
    for g in GRAPHS:
        model = onnx.load(str(out / g), load_external_data=False)
        ops = {n.op_type for n in model.graph.node}
        assert not ops & CONTRIB, f"{g}: contrib ops {ops & CONTRIB}"
        assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    dec = onnx.load(str(out / "decoder_model_merged.onnx"))
    inits = {t.name: t.data_type for t in dec.graph.initializer}
    dq_types = {inits[n.input[0]] for n in dec.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    if recipe == "trt-int8":
        assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in dec.graph.node}
        assert dq_types == {TensorProto.INT8}
        vis = {n.op_type for n in onnx.load(str(out / "vision_encoder.onnx")).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= vis
    else:
        assert dq_types == {TensorProto.INT4, TensorProto.INT8}  # language int4 weight-only, lm_head int8
    # Q/DQ feeds only the quantized ops (dedicated pairs): residual Adds and the mask Add read floats.
    for g in GRAPHS:
        model = onnx.load(str(out / g))
        dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        assert {n.op_type for n in model.graph.node if set(n.input) & dq_out} <= {"MatMul", "Conv", "Gemm"}, g
    # Every Q/DQ node carries its component, like every other node.
    assert all(any(p.key == COMPONENT_KEY for p in n.metadata_props)
               for n in dec.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))

    session = load(out)
    assert session.parity_record()["runtime_backend"].startswith("onnxruntime")
    assert session.device.device == "cpu" and "no NVIDIA GPU" in session.device.reason  # a GPU target, no GPU here
    ids = session.prompt_ids("Is the heart enlarged?", False)
    _, past = session.forward(session.input_embeds(ids, None), session.empty_past(len(ids)), ids)
    assert type(past).__name__ == "ConcatKV" and past.length == len(ids)  # torch.onnx's concat layout:
    assert all(v.device_name().lower() == "cpu" for v in past.values.values())  # present bound as the next past
    ref_dir = artifact("llava-siglip", "fp32")
    ref = OnnxSession(ref_dir, read_manifest(ref_dir))
    for got, want in zip(_logits(session), _logits(ref)):
        c = compare_logits(want, got)
        rel = c["logits_max_abs_diff"] / np.abs(want).max()
        assert c["kld_mean"] < max_kld and 0 < rel < max_rel, c
    assert m.parity["kld_mean"] < max_kld


@pytest.mark.slow
def test_manifest_holds_build_profiles(trt_artifact):
    out = trt_artifact("trt-int8")
    m = read_manifest(out)
    trt = m.runtime["trt"]
    assert json.loads((out / PROFILES_FILE).read_text())["graphs"] == trt["graphs"]
    assert validate_profiles(trt, out) == []
    assert set(trt["graphs"]) == set(GRAPHS) and trt["engines"] is None
    dec = trt["graphs"]["decoder_model_merged.onnx"]
    assert [p["name"] for p in dec["profiles"]] == ["prefill", "decode"]
    assert dec["precision_flags"] == ["FP16", "INT8"]
    assert dec["profiles"][0]["shapes"]["past_key_values.0.key"]["min"][2] == 0  # prefill: empty past
    assert dec["profiles"][1]["shapes"]["inputs_embeds"]["max"][1] == 1  # decode: one token
    # Workspace from the target's memory: 25% of Orin Nano's 5.2 GB usable, capped at 4 GB.
    assert dec["workspace_bytes"] == 1_300_000_000
    assert m.runtime["decoder_builder"] == "torch"
    assert m.calibration["count"] == 8 and len(m.calibration["sha256"]) == 64
    assert main(["inspect", str(out), "--verify"]) == 0


@pytest.mark.slow
def test_engine_records_are_hashed_and_verified(trt_artifact, tmp_path):
    """What build-engine writes into the manifest (without building: fake engine bytes) keeps
    `inspect --verify` passing, and a session falls back to the Q/DQ ONNX where tensorrt is absent."""
    from edgemed.formats.tensorrt.engine import _record_engine_files
    from edgemed.runtime import load

    out = tmp_path / "a"
    shutil.copytree(trt_artifact("trt-int8"), out)
    m = read_manifest(out)
    graphs = m.runtime["trt"]["graphs"]
    built = {g: e["engine"] for g, e in graphs.items()}
    for rel in built.values():
        (out / rel).parent.mkdir(exist_ok=True)
        (out / rel).write_bytes(b"not a real engine")
    _record_engine_files(out, m, built, graphs)
    m.runtime["trt"]["engines"] = built
    write_manifest(out, m)
    assert verify(out) == []
    rec = read_manifest(out).file("engines/decoder_model_merged.engine")
    assert rec.format == "tensorrt-engine" and rec.component == "language+lm_head" and rec.precision == "int8"
    if _tensorrt_reason() is not None:
        assert "not importable" in load(out).parity_record()["runtime_backend"]


@pytest.mark.slow
@pytest.mark.skipif(_tensorrt_reason() is not None, reason=f"needs TensorRT and a GPU: {_tensorrt_reason()}")
def test_engine_build_and_parity(trt_artifact, tmp_path):
    from edgemed.formats.tensorrt.engine import build_engines
    from edgemed.reference.metrics import compare_logits
    from edgemed.formats.tensorrt.session import open_tensorrt

    out = tmp_path / "a"
    shutil.copytree(trt_artifact("trt-fp16"), out)
    build_engines(out)
    assert verify(out) == []
    m = read_manifest(out)
    trt_s = open_tensorrt(out, m, backend="tensorrt")
    ort_s = open_tensorrt(out, m, backend="onnxruntime")
    for got, want in zip(_logits(trt_s), _logits(ort_s)):
        assert compare_logits(want, got)["kld_mean"] < 1e-3


def test_build_profiles_cover_every_input(tmp_path):
    """build_profiles on a decoder-shaped graph (inputs named as the exporter names them)."""
    kv, hd, d, layers = 2, 8, 16, 2
    names = ["inputs_embeds", "attention_mask", "position_ids"] + [f"past_key_values.{i}.{t}" for i in range(layers)
                                                                   for t in ("key", "value")]
    shapes = {"inputs_embeds": [1, "s", d], "attention_mask": [1, "t"], "position_ids": [1, "s"]}
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT if n != "attention_mask" and "position" not in n
                                         else TensorProto.INT64, shapes.get(n, [1, kv, "p", hd])) for n in names]
    g = helper.make_graph([helper.make_node("Identity", ["inputs_embeds"], ["logits"])], "d", ins,
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", d])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), str(tmp_path / "decoder_model_merged.onnx"))
    text = {"num_kv_heads": kv, "head_dim": hd, "hidden_size": d}
    prof = build_profiles(tmp_path, text, None, {"decoder_model_merged.onnx": {"language": "int4", "lm_head": "fp16"}},
                          TrtExportArgs(max_context=256), usable_memory_gb=120)
    assert validate_profiles(prof, tmp_path) == []
    entry = prof["graphs"]["decoder_model_merged.onnx"]
    assert entry["precision_flags"] == ["FP16", "INT4"]
    assert entry["workspace_bytes"] == 4_000_000_000  # capped
    assert entry["profiles"][0]["shapes"]["attention_mask"]["max"] == [1, 256]


# --- the TensorRT glue against a stand-in: tensorrt and cuda-python faked over ONNX Runtime --------

def _fake_tensorrt():
    """A stand-in for the slice of the TensorRT 10 Python API edgemed uses. Its 'engine' is the
    ONNX graph run by ONNX Runtime, and 'device memory' is host memory, so every call edgemed
    makes (build flags, profiles, tensor addresses, copies, profile switches) is exercised and the
    results must equal the Q/DQ ONNX session's exactly. It proves the glue, not TensorRT itself."""
    import ctypes
    import types

    import onnxruntime as ort

    from edgemed.formats.tensorrt.session import QDQ_AS_TENSORRT

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.0.0-fake"
    log = {"flags": [], "profiles": [], "switches": [], "workspace": [], "runs": [], "copies": []}
    trt.fake_log = log

    class Logger:
        WARNING = 2

        def __init__(self, *a):
            pass

    class TensorIOMode:
        INPUT, OUTPUT = "input", "output"

    class MemoryPoolType:
        WORKSPACE = "workspace"

    class BuilderFlag:  # no INT4 member: edgemed must skip it (Q/DQ types decide)
        FP16, INT8, FP8, BF16 = "FP16", "INT8", "FP8", "BF16"

    class NetworkDefinitionCreationFlag:
        pass

    class Network:
        path = None

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            self.network.path = path
            return True

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), name
            self.shapes[name] = (lo, opt, hi)

    class Config:
        def __init__(self):
            self.flags, self.profiles = [], []

        def set_memory_pool_limit(self, pool, n):
            log["workspace"].append(n)

        def set_flag(self, f):
            self.flags.append(f)

        def add_optimization_profile(self, p):
            self.profiles.append(p)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            log["flags"].append(sorted(config.flags))
            log["profiles"].append(len(config.profiles))
            return json.dumps({"onnx": network.path, "profiles": len(config.profiles)}).encode()

    dtypes = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(float16)": np.float16}

    class Engine:
        def __init__(self, blob):
            spec = json.loads(blob)
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            for key, value in QDQ_AS_TENSORRT.items():  # the engine's exact int8 math, as the CPU session does
                opts.add_session_config_entry(key, value)
            self.sess = ort.InferenceSession(spec["onnx"], opts, disabled_optimizers=["QDQPropagationTransformer"])
            self.num_optimization_profiles = spec["profiles"]
            self.ins = {i.name: np.dtype(dtypes[i.type]) for i in self.sess.get_inputs()}
            self.outs = {o.name: np.dtype(dtypes[o.type]) for o in self.sess.get_outputs()}
            self.names = list(self.ins) + list(self.outs)
            self.num_io_tensors = len(self.names)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name in self.ins else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return self.ins.get(name, self.outs.get(name))

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addr, self.result = engine, {}, {}, None

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            self.result = None

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr

        def set_optimization_profile_async(self, idx, stream):
            assert 0 <= idx < self.engine.num_optimization_profiles
            log["switches"].append(idx)

        def _run(self):
            if self.result is None:
                feeds = {}
                for name, dt in self.engine.ins.items():
                    shape = self.shapes[name]
                    n = int(np.prod(shape)) * dt.itemsize
                    raw = ctypes.string_at(self.addr[name], n) if n else b""
                    feeds[name] = np.frombuffer(raw, dt).reshape(shape).copy()
                self.result = dict(zip(self.engine.outs, self.engine.sess.run(None, feeds)))
            return self.result

        def get_tensor_shape(self, name):
            return self._run()[name].shape

        def execute_async_v3(self, stream):
            log["runs"].append(len(self.engine.outs))
            for name, arr in self._run().items():
                arr = np.ascontiguousarray(arr)
                ctypes.memmove(self.addr[name], arr.ctypes.data, arr.nbytes)
            self.result = None
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            return Engine(blob)

    for k, v in dict(Logger=Logger, TensorIOMode=TensorIOMode, MemoryPoolType=MemoryPoolType, BuilderFlag=BuilderFlag,
                     NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag, Builder=Builder, OnnxParser=Parser,
                     Runtime=Runtime, nptype=lambda dt: dt).items():
        setattr(trt, k, v)

    class Cudart:
        class cudaMemcpyKind:
            cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

        def __init__(self):
            self.live = {}

        def cudaMalloc(self, n):
            buf = ctypes.create_string_buffer(n)
            self.live[ctypes.addressof(buf)] = buf
            return 0, ctypes.addressof(buf)

        def cudaFree(self, ptr):
            self.live.pop(ptr, None)
            return (0,)

        def cudaMemcpyAsync(self, dst, src, n, kind, stream):
            log["copies"].append(kind)
            ctypes.memmove(dst, src, n)
            return (0,)

        def cudaStreamCreate(self):
            return 0, 0

        def cudaStreamSynchronize(self, s):
            return (0,)

        def cudaRuntimeGetVersion(self):
            return 0, 12060

        def cudaDriverGetVersion(self):
            return 0, 12080

        def cudaGetDeviceProperties(self, i):
            return 0, types.SimpleNamespace(name=b"Fake Orin", major=8, minor=7)

    return trt, Cudart()


@pytest.mark.slow
@pytest.mark.skipif(_tensorrt_reason() is None, reason="real tensorrt here: test_engine_build_and_parity covers it")
def test_build_engine_and_trt_session_glue_with_a_stand_in(trt_artifact, tmp_path, monkeypatch, capsys):
    import sys

    import edgemed.formats.tensorrt.session as ts
    from edgemed.runtime import load

    out = tmp_path / "a"
    shutil.copytree(trt_artifact("trt-int8"), out)  # before the stand-in: compress loads transformers
    trt, cudart = _fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(ts, "load_cudart", lambda: cudart)
    assert main(["build-engine", str(out)]) == 0
    assert main(["build-engine", str(out)]) == 2 and "--force" in capsys.readouterr().err
    assert verify(out) == []
    m = read_manifest(out)
    rec = m.runtime["trt"]
    assert set(rec["engines"]) == set(GRAPHS) and all((out / p).is_file() for p in rec["engines"].values())
    b = rec["build"]
    assert (b["tensorrt"], b["cuda_runtime"], b["gpu"], b["compute_capability"]) == ("10.0.0-fake", "12.6", "Fake Orin", "sm_87")
    assert m.tools["tensorrt"] == "10.0.0-fake"
    assert ["FP16", "INT8"] in trt.fake_log["flags"] and 2 in trt.fake_log["profiles"]
    assert set(trt.fake_log["workspace"]) == {1_300_000_000}

    import edgemed.runtime.device as dev

    assert isinstance(load(out), ts.QdqOnnxSession)  # a GPU target, but no GPU here: the Q/DQ ONNX on the CPU
    monkeypatch.setattr(dev, "gpu_absent_reason", lambda: None)  # the stand-in's GPU
    trt_s, ort_s = load(out), ts.open_tensorrt(out, m, backend="onnxruntime")
    assert isinstance(trt_s, ts.TrtSession) and trt_s.parity_record()["runtime_backend"] == "tensorrt engines"
    assert trt_s.device.device == "cuda" and isinstance(load(out, device="cpu"), ts.QdqOnnxSession)
    for got, want in zip(_logits(trt_s), _logits(ort_s)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert 1 in trt.fake_log["switches"]  # the decode profile was selected for one-token steps
    from edgemed.calibration.builtin import synthetic_test_image

    log = trt.fake_log
    log["runs"].clear(), log["copies"].clear()
    a = trt_s.generate(synthetic_test_image(), "Any effusion?", max_new_tokens=6, stop_at_eos=False)
    b_ = ort_s.generate(synthetic_test_image(), "Any effusion?", max_new_tokens=6, stop_at_eos=False)
    assert a.token_ids == b_.token_ids and len(a.token_ids) == 6
    # The KV cache stays on the device: each engine run copies one tensor down (logits, embeddings,
    # image features), although the decoder has 1 + 2 x layers outputs.
    d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
    assert max(log["runs"]) > 1 and log["copies"].count(d2h) == len(log["runs"])
    trt_s.close()


def test_a_quantizer_that_ignores_the_policy_is_caught(tmp_path, monkeypatch):
    import edgemed.formats.tensorrt.qdq as ts
    from edgemed.errors import EdgemedError

    src = tmp_path / "g.onnx"
    feeds = _tiny_graph(src)
    monkeypatch.setattr(ts, "_int4_qdq", lambda model, nodes, block: model)  # silently does nothing
    with pytest.raises(EdgemedError, match="lang_mm .*wanted int4, got float"):
        qdq_graph(src, ComponentPolicy(language="int4"), TrtExportArgs(int4_algorithm="rtn"), feeds)
