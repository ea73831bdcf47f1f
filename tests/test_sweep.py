"""`edgemed sweep` on the tiny demo: 3 recipes x 2 targets with one pair refused by the plan, one
artifact shared by both targets, one forced failure, the choice per target, and the resume on a
rerun; on a local Ray instance and on the process-pool fallback."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgemed.cli import main
from edgemed.errors import BadInputError

BROKEN = """name: q4_k_m-broken
description: q4_k_m whose calibration folder is not there (the forced failure)
policy: {vision: fp16, projector: fp16, embed: q4_k_m, language: q4_k_m, lm_head: q6_k}
calibration: /nonexistent/calibration-set
steps:
  - step: gguf-export
  - step: gguf-quantize
    args: {imatrix: multimodal}
"""


@pytest.fixture
def grid(tmp_path):
    """int8 (ONNX), q8_0 (GGUF) and a broken GGUF recipe x this CPU and a box that runs only GGUF."""
    import yaml

    from edgemed.target import load_target

    broken = tmp_path / "q4_k_m-broken.yaml"
    broken.write_text(BROKEN)
    box = load_target("cpu-x86-avx2").model_dump(mode="json")
    box.update(name="gguf-only-box", formats=["gguf"])
    box_file = tmp_path / "gguf-only-box.yaml"
    box_file.write_text(yaml.safe_dump(box))
    return ["int8", "q8_0", str(broken)], ["cpu-x86-avx2", str(box_file)]


def _check(summary: dict, out: Path) -> None:
    rows = {(Path(r["recipe"]).stem if r["recipe"].endswith(".yaml") else r["recipe"], r["target"]): r
            for r in summary["rows"]}
    assert len(rows) == 6
    refused = rows[("int8", "gguf-only-box")]
    assert refused["status"] == "refused" and "format 'onnx' does not run on gguf-only-box" in refused["reasons"][0]
    ok = rows[("int8", "cpu-x86-avx2")]
    assert ok["status"] == "ok" and ok["size_mb"] > 0 and ok["kld_mean"] < 1e-3 and ok["host_decode_tok_s"] > 0
    assert ok["accuracy"]["suite"] == "edgemed-gate" and len(ok["accuracy"]["ci95"]) == 2
    assert ok["predicted_decode_tok_s"] > 0 and ok["gate"]["status"] == "ok"
    # GGUF files are the same for every target: one artifact, both rows point at it.
    a, b = rows[("q8_0", "cpu-x86-avx2")], rows[("q8_0", "gguf-only-box")]
    assert a["artifact"] == b["artifact"] and a["shared_with"] == ["gguf-only-box"] and b["status"] == "ok"
    assert a["predicted_decode_tok_s"] > 0 and b["predicted_decode_tok_s"] > 0  # each target's own plan
    for target in ("cpu-x86-avx2", "gguf-only-box"):
        failed = rows[("q4_k_m-broken", target)]
        assert failed["status"] == "failed" and "/nonexistent/calibration-set" in failed["error"]
    smallest = min((r for r in summary["rows"] if r["target"] == "cpu-x86-avx2" and r["status"] == "ok"),
                   key=lambda r: r["size_mb"])
    assert summary["choice"]["cpu-x86-avx2"]["recipe"] == smallest["recipe"]
    assert summary["choice"]["gguf-only-box"]["recipe"] == "q8_0"
    on_disk = json.loads((out / "sweep.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(summary["rows"], default=str))
    md = (out / "sweep.md").read_text()
    assert "| int8 | gguf-only-box | refused |" in md and "smallest artifact that passes every gate" in md
    assert (out / "sweep-cpu-x86-avx2.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["process", "ray"])
def test_sweep_plans_shares_fails_chooses_and_resumes(grid, tmp_path, engine):
    if engine == "ray":
        pytest.importorskip("ray")
    from edgemed.sweep import sweep

    recipes, targets = grid
    out = tmp_path / "sweep"
    events = []
    summary = sweep("edgemed-demo-tiny", recipes, targets, out, jobs=2, engine=engine, runs=2, max_new_tokens=4,
                    progress=lambda kind, payload: events.append((kind, payload.get("key"))))
    assert summary["engine"] == engine
    _check(summary, out)
    assert sum(k == "start" for k, _ in events) == 3  # int8 (cpu), q8_0 (shared), the broken one
    first = {r["artifact"]: r for r in summary["rows"] if r["status"] == "ok"}
    assert all(r["compressed_now"] and r["benched_now"] for r in first.values())

    again = sweep("edgemed-demo-tiny", recipes, targets, out, jobs=2, engine=engine, runs=2, max_new_tokens=4)
    _check(again, out)
    for r in again["rows"]:
        if r["status"] == "ok":
            assert not r["compressed_now"] and not r["benched_now"]  # verified artifact + report: skipped


def test_sweep_cli_refuses_bad_input_before_any_work(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sweep", "edgemed-demo-tiny", "-r", "int3", "-t", "cpu-x86-avx2", "-o", str(out)]) == 2
    assert "int3" in capsys.readouterr().err
    assert main(["sweep", "edgemed-demo-tiny", "-r", "int8", "-t", "cpu-x86-avx2", "-o", str(out),
                 "--engine", "dask"]) == 2
    assert main(["sweep", "edgemed-demo-tiny", "-r", "int8", "-t", "cpu-x86-avx2", "-o", str(out),
                 "--suite", "no-such-suite"]) == 2
    assert not (out / "artifacts").exists()
    from edgemed.sweep import sweep

    with pytest.raises(BadInputError, match="--jobs"):
        sweep("edgemed-demo-tiny", ["int8"], ["cpu-x86-avx2"], out, jobs=0)


def test_pairs_with_one_layout_share_an_artifact_and_tensorrt_builds_per_target():
    from edgemed.demo import resolve_model
    from edgemed.sweep import plan_pairs

    model = resolve_model("edgemed-demo-tiny")
    rows = plan_pairs(model, ["int8", "q4_k_m", "trt-int8"], ["cpu-x86-avx2", "jetson-orin-nano-8gb", "rtx-4060-8gb"])
    art = {(r["recipe"], r["target"]): r["artifact"] for r in rows}
    # ONNX: the fp32 CPU layout apart, the fp16 GPU layout shared by the two GPUs
    assert art[("int8", "jetson-orin-nano-8gb")] == art[("int8", "rtx-4060-8gb")] != art[("int8", "cpu-x86-avx2")]
    assert len({art[("q4_k_m", t)] for t in ("cpu-x86-avx2", "jetson-orin-nano-8gb", "rtx-4060-8gb")}) == 1
    assert art[("trt-int8", "cpu-x86-avx2")] is None  # refused: no TensorRT on a CPU target
    assert art[("trt-int8", "jetson-orin-nano-8gb")] != art[("trt-int8", "rtx-4060-8gb")]
