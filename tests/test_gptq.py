"""edgemed's GPTQ: packing that ONNX Runtime's MatMulNBits reads, and less output error than rtn."""
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from edgemed.formats.onnx.int4.grids import gptq_quantize, matmulnbits_initializers


def _rtn(w, block):
    k, n = w.shape
    q, s, z = np.zeros((k, n), np.uint8), np.zeros((k // block, n)), np.zeros((k // block, n))
    for b in range(k // block):
        blk = w[b * block:(b + 1) * block]
        d = (blk.max(0) - blk.min(0)) / 15
        s[b], z[b] = d, np.clip(np.rint(-blk.min(0) / d), 0, 15)
        q[b * block:(b + 1) * block] = np.clip(np.rint(blk / d) + z[b], 0, 15)
    return q, s, z


def _dequant(q, s, z, block):
    return (q - np.repeat(z, block, 0)) * np.repeat(s, block, 0)


def _calibration(k, n_tok=512, seed=0):
    rng = np.random.default_rng(seed)
    # Correlated inputs with a few outlier channels, as LLM activations have.
    x = rng.normal(size=(n_tok, k)) @ rng.normal(size=(k, k)) / np.sqrt(k)
    x[:, :3] *= 8
    return x


def test_matmulnbits_reads_the_packing():
    k, n, block = 96, 40, 32
    rng = np.random.default_rng(1)
    w = rng.normal(size=(k, n))
    x = _calibration(k, 16)
    q, s, z = gptq_quantize(w, x.T @ x, block)
    inits = matmulnbits_initializers("w", q, s, z, block)
    node = helper.make_node("MatMulNBits", ["x", "w.q4", "w.scales", "w.zero_points"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=block, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.astype(np.float32)})[0]
    np.testing.assert_allclose(y, x @ _dequant(q, s, z, block), rtol=1e-3, atol=1e-3)


def test_gptq_beats_round_to_nearest_on_the_layer_output():
    k, n, block = 128, 64, 32
    w = np.random.default_rng(2).normal(size=(k, n)) * 0.05
    x = _calibration(k)
    q, s, z = gptq_quantize(w, x.T @ x, block)
    err_gptq = np.linalg.norm(x @ w - x @ _dequant(q, s, z, block))
    err_rtn = np.linalg.norm(x @ w - x @ _dequant(*_rtn(w, block), block))
    assert q.max() <= 15 and err_gptq < 0.8 * err_rtn


def test_mse_grid_has_less_weight_error_than_round_to_nearest():
    """mse_quantize keeps rtn's grid among its candidates and refits the scale by least squares, so no
    block can get worse than rtn; on heavy-tailed weights it is better overall."""
    from edgemed.formats.onnx.int4.grids import mse_quantize

    k, n, block = 128, 200, 32
    w = np.random.default_rng(4).standard_t(df=4, size=(k, n)) * 0.02
    q, s, z = mse_quantize(w, block, chunk=64)  # several column chunks
    assert q.dtype == np.uint8 and q.max() <= 15 and z.min() >= 0 and z.max() <= 15 and (s > 0).all()
    per_block = lambda d: ((d - w) ** 2).reshape(k // block, block, n).sum(1)  # noqa: E731
    mse_err, rtn_err = per_block(_dequant(q, s, z, block)), per_block(_dequant(*_rtn(w, block), block))
    assert (mse_err <= rtn_err * (1 + 1e-6) + 1e-12).all()
    assert mse_err.sum() < 0.95 * rtn_err.sum()
    # Importance moves the error off the channels that matter.
    imp = np.ones(k)
    imp[:8] = 100.0
    qi, si, zi = mse_quantize(w, block, importance=imp)
    err_on = lambda d: ((d - w)[:8] ** 2).sum()  # noqa: E731
    assert err_on(_dequant(qi, si, zi, block)) < err_on(_dequant(q, s, z, block))


def _two_matmuls(k=64, n=32, seed=3):
    rng = np.random.default_rng(seed)
    w1 = helper.make_tensor("w1", TensorProto.FLOAT, [k, k], rng.normal(size=(k, k)).astype(np.float32).tobytes(), raw=True)
    w2 = helper.make_tensor("w2", TensorProto.FLOAT, [k, n], rng.normal(size=(k, n)).astype(np.float32).tobytes(), raw=True)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="m1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="m2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], initializer=[w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_probe_past_protobufs_limit_goes_through_external_data_and_leaves_the_model(tmp_path):
    """The >2 GB probe crash: ByteSize() raises past 2 GB, so the size is counted from the tensors and
    a big graph is handed to ONNX Runtime as a file with external data, without a copy of the
    weights and without emptying the caller's tensors (here forced with a 0-byte limit)."""
    from edgemed.formats.onnx.graph import session_source, tensor_bytes

    model = _two_matmuls()
    before = model.SerializeToString()
    assert tensor_bytes(model) == 4 * (64 * 64 + 64 * 32)
    x = np.random.default_rng(4).normal(size=(5, 64)).astype(np.float32)
    source = session_source(model, tmp_path, limit=0)
    assert isinstance(source, str) and (tmp_path / "probe.onnx.data").stat().st_size == tensor_bytes(model)
    assert (tmp_path / "probe.onnx").stat().st_size < 1000  # the graph alone
    y_file = ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    y_bytes = ort.InferenceSession(session_source(model, tmp_path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    np.testing.assert_array_equal(y_file, y_bytes)
    assert model.SerializeToString() == before


def test_calibration_inputs_probe_hidden_tensors_and_restore_the_outputs():
    from edgemed.formats.onnx.int4.grids import calibration_inputs

    model = _two_matmuls()
    before = model.SerializeToString()
    x = np.random.default_rng(5).normal(size=(5, 64)).astype(np.float32)
    (got,) = list(calibration_inputs(model, ["r", "x"], [{"x": x}]))
    w1 = np.frombuffer(model.graph.initializer[0].raw_data, np.float32).reshape(64, 64)
    np.testing.assert_allclose(got["r"], np.maximum(x @ w1, 0), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got["x"], x.astype(np.float64))
    assert model.SerializeToString() == before


def test_mse_grids_on_threads_are_the_bytes_of_one_loop(monkeypatch):
    """The column ranges run on a thread per core (grids._over_columns): the same bytes as one loop
    over 1024-column chunks, for a width that splits unevenly, with and without importance."""
    from edgemed.formats.onnx.int4 import grids

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((64, 1500)) * 0.02).astype(np.float32)
    w[:32, 7] = 0.0
    imp = rng.random(64).astype(np.float32)
    monkeypatch.setattr(grids.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    threaded = [grids.mse_quantize(w, 32, imp), grids.mse_quantize(w, 32), grids.mse_quantize_int8(w, 32, imp)]

    def one_loop(one, n, chunk):
        for c0 in range(0, n, chunk):
            one(c0, min(n, c0 + chunk))

    monkeypatch.setattr(grids, "_over_columns", one_loop)
    looped = [grids.mse_quantize(w, 32, imp), grids.mse_quantize(w, 32), grids.mse_quantize_int8(w, 32, imp)]
    for a, b in zip(threaded, looped):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_gptq_lazy_batches_are_the_row_by_row_algorithm(monkeypatch):
    """gptq_quantize's lazy batch updates push the same errors as the row-by-row GPTQ it replaced
    (bench/bench_grids.py's baseline), in another summation order: the same codes and zero points and
    scales equal to rounding, for batches that split K unevenly and with dead input channels."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_grids import plain_gptq_quantize

    rng = np.random.default_rng(11)
    for k, n, lazy in [(224, 40, 128), (256, 24, 64), (96, 16, 32)]:
        w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
        x = rng.standard_normal((3 * k, k))
        x[:, 1:] += 0.5 * x[:, :-1]
        x[:, 5] = 0.0  # a dead channel: H's diagonal is 0 there
        h = x.T @ x
        q, s, z = gptq_quantize(w, h, 32, lazy=lazy)
        q0, s0, z0 = plain_gptq_quantize(w, h, 32)
        assert np.array_equal(q, q0) and np.array_equal(z, z0), (k, lazy)
        np.testing.assert_allclose(s, s0, rtol=1e-9)


def test_mse_search_scores_distinct_candidates_to_the_plain_searchs_bytes(monkeypatch):
    """grids.mse_quantize scores a block again only where a shifted zero point is new at that scale:
    the same bytes as the plain search that scores all 41 x 7 candidates (bench/bench_grids.py's
    baseline), on blocks that tie (all zero, constant), clip (one huge weight), are tiny, or have zero
    importance, for blocks of 16 to 128 and a width that splits into uneven column ranges."""
    from edgemed.formats.onnx.int4 import grids

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_grids import plain_mse_quantize

    rng = np.random.default_rng(5)
    for k, n, block in [(64, 48, 32), (256, 37, 16), (512, 70, 64), (256, 20, 128)]:
        w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
        w[:block, 0] = 0.0
        w[block:2 * block, 1] = 0.5
        w[:, 2] *= 1e-8
        w[::7, 3] = 3.0
        imp = rng.random(k).astype(np.float32)
        imp[:4] = 0.0
        for importance in (None, imp):
            ours = grids.mse_quantize(w, block, importance, chunk=17)
            plain = plain_mse_quantize(w, block, importance, chunk=17)
            assert all(np.array_equal(a, b) for a, b in zip(ours, plain)), (k, n, block, importance is None)


def test_int8_mse_grid_beats_absmax_and_round_trips():
    """mse_quantize_int8: codes + 128 in uint8 with one scale per block; its squared error (weighted
    by the importance it was given) is no worse than absmax/127 rounding, block by block."""
    from edgemed.formats.onnx.int4.grids import mse_quantize_int8

    rng = np.random.default_rng(0)
    w = rng.standard_t(4, (256, 48)).astype(np.float32)
    imp = rng.uniform(0.1, 10, 256).astype(np.float32)
    q, s = mse_quantize_int8(w, 32, imp)
    assert q.dtype == np.uint8 and q.shape == w.shape and s.shape == (8, 48)
    deq = ((q.astype(np.float32) - 128).reshape(8, 32, 48) * s[:, None, :]).reshape(256, 48)
    b = w.reshape(8, 32, 48)
    sr = np.abs(b).max(1) / 127
    rtn = (np.clip(np.rint(b / sr[:, None]), -127, 127) * sr[:, None]).reshape(256, 48)
    err = lambda x: (imp[:, None] * (x - w) ** 2).reshape(8, 32, 48).sum(1)  # noqa: E731
    assert (err(deq) <= err(rtn) * (1 + 1e-5)).all() and err(deq).sum() < 0.97 * err(rtn).sum()


def test_parent_statistics_are_the_graph_probe_statistics(tiny_dir, tmp_path):
    """The mse grids' importance (each MatMul input channel's mean square) and GPTQ's Hessians taken
    from the parent's Linear layers equal what a probe of the builder's fp32 graph measures, for
    every projection the builder writes (fused qkv and gate/up included) and the lm_head: the name
    mapping and the layer-by-layer pass are right."""
    import onnx
    import pytest

    pytest.importorskip("onnxruntime_genai")
    from edgemed.calibration.feeds import decoder_feeds
    from edgemed.formats.onnx.genai_decoder import export_decoder_genai
    from edgemed.formats.onnx.graph import DECODER, inputs_of
    from edgemed.formats.onnx.int4.grids import ProbeStats
    from edgemed.formats.onnx.parent_stats import ParentStats, builder_graph_mapped
    from edgemed.models import load_model

    cm = load_model(str(tiny_dir("llama")))
    export_decoder_genai(cm, tmp_path)
    model = onnx.load(str(tmp_path / DECODER))
    assert builder_graph_mapped(cm, model)
    matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1]
    assert any("qkv_proj" in n for n in matmuls) and "/lm_head/MatMul" in matmuls
    feeds = decoder_feeds(cm, None, 4)
    names = inputs_of(model, matmuls)
    parent, probe = ParentStats(cm, feeds).mean_squares(model, names), ProbeStats(feeds).mean_squares(model, names)
    assert set(parent) == set(probe) == set(names)
    for name in names:
        np.testing.assert_allclose(parent[name], probe[name], rtol=2e-4, err_msg=name)
    # GPTQ's Hessians, from the parent one decoder layer at a time (asked in graph order, then an
    # earlier layer again, which starts the pass over), are the probe's X^T X too.
    parent, probe = ParentStats(cm, feeds).hessians(model, names), ProbeStats(feeds).hessians(model, names)
    assert set(parent) == set(probe) == set(names)
    order = list(dict.fromkeys(n.input[0] for n in model.graph.node if n.name in set(matmuls)))
    assert len(order) > 4 and order[-1] != order[0]
    for name in order + order[:2]:
        np.testing.assert_allclose(parent[name], probe[name], rtol=2e-4, atol=2e-5 * np.abs(probe[name]).max(),
                                   err_msg=name)
