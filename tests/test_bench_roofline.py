"""bench/bench_roofline.py's accounting: what a decode step reads, and the goal's verdict."""
from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def test_roofline_counts_the_bytes_a_decode_step_reads(monkeypatch, tmp_path):
    """bench/bench_roofline.py: every weight counts but the table a Gather reads one row of (ONNX), and
    token_embd unless it is also the output (GGUF, tied); the goal needs both the speed and the fraction."""
    import gguf
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import bench_roofline as roofline

    emb, w = np.ones((50, 8), np.float32), np.ones((8, 50), np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "ids"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["logits"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 50])],
        [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    assert roofline.onnx_bytes_per_token(tmp_path) == {"bytes_per_token": w.nbytes, "embedding_bytes": emb.nbytes,
                                                       "tied_output": None}
    for tied in (False, True):
        path = tmp_path / f"m-{tied}.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_tensor("token_embd.weight", emb)
        writer.add_tensor("blk.0.ffn_up.weight", w)
        if not tied:
            writer.add_tensor("output.weight", emb)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        got = roofline.gguf_bytes_per_token(path)
        assert got == {"bytes_per_token": w.nbytes + emb.nbytes, "embedding_bytes": emb.nbytes, "tied_output": tied}

    rows = [{"name": "llama.cpp's own Q4_K_M", "decode_tok_s": 40.0, "roofline_fraction": 0.78},
            {"name": "edgemed q4_k_m (gguf)", "decode_tok_s": 41.0, "roofline_fraction": 0.80},
            {"name": "edgemed int4-fast (onnx)", "decode_tok_s": 39.0, "roofline_fraction": 0.90},
            {"name": "edgemed broken", "error": "ValueError: x"}]
    assert roofline.goal(rows)["met_by"] == []  # faster but under 0.85; over 0.85 but slower
    rows[1]["roofline_fraction"] = 0.86
    assert roofline.goal(rows)["met_by"] == ["edgemed q4_k_m (gguf)"]
