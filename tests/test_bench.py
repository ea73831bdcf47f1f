"""edgemed bench: suites in their real schemas, meters, the cached parent reference, gates in
compress, `edgemed bench` without torch, and the parent-vs-artifacts comparison script."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from no_torch import BLOCK_TORCH

REPO = Path(__file__).resolve().parents[1]

# `edgemed bench` (and bench/device_bench.py) must run where torch cannot even be imported.
_NO_TORCH = BLOCK_TORCH + """
sys.argv = sys.argv[1:]
if sys.argv[0] == 'cli':
    from edgemed.cli import main
    rc = main(sys.argv[1:])
else:
    import runpy
    sys.argv = [sys.argv[0]] + sys.argv[1:]
    try:
        runpy.run_path(sys.argv[0], run_name='__main__')
        rc = 0
    except SystemExit as e:
        rc = int(e.code or 0)
print('TORCH_LOADED', 'torch' in sys.modules or 'transformers' in sys.modules)
sys.exit(rc)
"""


def _no_torch(*args, timeout=300):
    return subprocess.run([sys.executable, "-c", _NO_TORCH, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _png(size=(40, 32), value=90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# suites, each from a tiny file in its real schema


def _write_parquet(path: Path, rows: list[dict]):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _vqa_rows():
    # flaviagiammarino/vqa-rad and path-vqa: image {bytes, path}, question, answer; no answer type.
    return [
        {"image": {"bytes": _png(), "path": "synpic1.jpg"}, "question": "is there a pneumothorax?", "answer": "no"},
        {"image": {"bytes": _png(value=30), "path": "synpic2.jpg"}, "question": "what organ is shown?",
         "answer": "lungs"},
        {"image": {"bytes": _png(value=200), "path": "synpic3.jpg"}, "question": "Is the heart enlarged?",
         "answer": "Yes"},
    ]


@pytest.mark.parametrize("suite", ["vqa-rad", "pathvqa"])
def test_parquet_vqa_suites(tmp_path, suite):
    from edgemed.bench.suites import load_suite, render_prompt_for

    _write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", _vqa_rows())
    _write_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", _vqa_rows()[:1])
    items = load_suite(suite, tmp_path)  # split test by default, the train file is ignored
    assert [it.answer_type for it in items] == ["closed", "open", "closed"]
    assert all(isinstance(it.image, Image.Image) and it.image.size == (40, 32) for it in items)
    assert len(load_suite(suite, tmp_path, split="train")) == 1
    assert len(load_suite(suite, tmp_path / "data" / "test-00000-of-00001.parquet", limit=2)) == 2
    assert render_prompt_for(suite, items[0]).startswith("is there a pneumothorax?\n")


def _slake_records():
    return [
        {"img_id": 0, "img_name": "xmlab0/source.jpg", "question": "Which organ is abnormal?", "answer": "Lung",
         "q_lang": "en", "location": "Lung", "modality": "CT", "answer_type": "OPEN", "base_type": "vqa",
         "content_type": "Abnormality", "triple": ["vhead", "_", "_"], "qid": 11},
        {"img_id": 0, "img_name": "xmlab0/source.jpg", "question": "Is this a CT?", "answer": "Yes",
         "q_lang": "en", "location": "Lung", "modality": "CT", "answer_type": "CLOSED", "base_type": "vqa",
         "content_type": "Modality", "triple": ["vhead", "_", "_"], "qid": 12},
        {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "这是什么模态?", "answer": "CT",
         "q_lang": "zh", "location": "Abdomen", "modality": "CT", "answer_type": "OPEN", "base_type": "vqa",
         "content_type": "Modality", "triple": ["vhead", "_", "_"], "qid": 13},
    ]


@pytest.mark.parametrize("zipped", [False, True])
def test_slake_suite_english_only_with_images(tmp_path, zipped):
    from edgemed.bench.suites import load_suite

    (tmp_path / "test.json").write_text(json.dumps(_slake_records(), ensure_ascii=False))
    (tmp_path / "validation.json").write_text("[]")
    if zipped:
        with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as z:
            z.writestr("imgs/xmlab0/source.jpg", _png())
    else:
        (tmp_path / "imgs" / "xmlab0").mkdir(parents=True)
        (tmp_path / "imgs" / "xmlab0" / "source.jpg").write_bytes(_png())
    items = load_suite("slake", tmp_path)
    assert [it.answer_type for it in items] == ["open", "closed"]  # the zh question is dropped
    assert items[0].modality == "CT" and items[0].subgroups["location"] == "Lung"
    from edgemed.runtime.preprocess import as_image

    assert as_image(items[0].image).size == (40, 32)


def test_medqa_suite(tmp_path):
    from edgemed.bench import scoring
    from edgemed.bench.suites import load_suite, render_prompt_for

    rec = {"question": "A 23-year-old woman has dysuria. Which drug is best?", "answer": "Nitrofurantoin",
           "options": {"A": "Ampicillin", "B": "Ceftriaxone", "C": "Doxycycline", "D": "Nitrofurantoin"},
           "meta_info": "step1", "answer_idx": "D", "metamap_phrases": ["woman", "dysuria"]}
    (tmp_path / "phrases_no_exclude_test.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "phrases_no_exclude_train.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n")
    items = load_suite("medqa", tmp_path)
    assert len(items) == 1 and items[0].answer_type == "mc" and items[0].answer_idx == "D"
    prompt = render_prompt_for("medqa", items[0])
    assert "D. Nitrofurantoin" in prompt and prompt.endswith("Answer:")
    assert scoring.summarize([items[0].score_record("The answer is D.")])["mc_acc"] == 1.0


def test_pubmedqa_suite_parquet_and_original_json(tmp_path):
    from edgemed.bench.suites import load_suite, render_prompt_for

    row = {"pubid": 21645374, "question": "Do mitochondria play a role in remodelling lace plant leaves?",
           "context": {"contexts": ["Programmed cell death (PCD) is ...", "Lace plant leaves ..."],
                       "labels": ["BACKGROUND", "RESULTS"], "meshes": ["Apoptosis"],
                       "reasoning_required_pred": ["yes"], "reasoning_free_pred": ["yes"]},
           "long_answer": "Results depicted mitochondrial dynamics ...", "final_decision": "yes"}
    _write_parquet(tmp_path / "pqa_labeled" / "train-00000-of-00001.parquet",
                   [row, {**row, "pubid": 2, "final_decision": "maybe"}])
    items = load_suite("pubmedqa", tmp_path)  # the labeled set has only a train split
    assert [it.answer for it in items] == ["yes", "maybe"] and items[0].labels == ("yes", "no", "maybe")
    assert "Programmed cell death" in render_prompt_for("pubmedqa", items[0])
    ori = {"21645374": {"QUESTION": row["question"], "CONTEXTS": row["context"]["contexts"],
                        "final_decision": "no", "LONG_ANSWER": "..."}}
    (tmp_path / "ori_pqal.json").write_text(json.dumps(ori))
    items = load_suite("pubmedqa", tmp_path / "ori_pqal.json")
    assert items[0].answer == "no" and items[0].id == "pubmedqa-21645374"


def _synthetic_cxr(root: Path) -> Path:
    """The layout the synthetic-cxr generator writes: test.jsonl + images/."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (finding, normal, sex) in enumerate([("effusion", True, "F"), ("effusion", False, "M"),
                                                 ("nodule", True, "M"), ("nodule", False, "F")]):
        (root / "images" / f"{i}.png").write_bytes(_png((48, 48), 40 + 40 * i))
        rows.append({"id": f"cxr-{i}", "image": f"images/{i}.png",
                     "question": f"Is there a {finding} on this radiograph?", "answer": "no" if normal else "yes",
                     "answer_type": "closed", "modality": "cxr", "finding": finding, "normal": normal,
                     "subgroups": {"sex": sex, "site": "A" if i < 2 else "B"}})
    (root / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_synthetic_cxr_suite(tmp_path):
    from edgemed.bench.suites import load_suite
    from edgemed.errors import BadInputError

    items = load_suite("synthetic-cxr", _synthetic_cxr(tmp_path))
    assert len(items) == 4 and items[0].normal is True and items[0].finding == "effusion"
    assert items[1].subgroups == {"sex": "M", "site": "A"} and Path(items[1].image).is_file()
    with pytest.raises(BadInputError, match="generated"):
        load_suite("synthetic-cxr")
    with pytest.raises(BadInputError, match="unknown suite"):
        load_suite("mimic")


# --------------------------------------------------------------------------------------------
# meters, roofline, report pieces


def test_latency_summary_follows_the_conventions():
    from edgemed.bench.meters import latency_summary
    from edgemed.runtime.session import GenerationResult

    runs = [GenerationResult("", [1, 2, 3, 4, 5], 20, [0.1 + d, 0.12 + d, 0.14 + d, 0.16 + d, 0.18 + d],
                             preprocess_s=0.01, vision_encode_s=0.04) for d in (0.0, 0.01, 0.02, 0.03)]
    s = latency_summary(runs)
    assert s["ttft_ms"]["p50"] == pytest.approx(115.0)  # TTFT includes preprocessing and vision
    assert s["tpot_ms"]["p50"] == pytest.approx(20.0)  # (t_last - t_first) / (N - 1)
    assert s["decode_tok_s"] == pytest.approx(50.0)
    # prefill = TTFT - preprocessing - vision: 0.05..0.08 s for 20 prompt tokens, median of the rates
    assert s["prefill_tok_s"] == pytest.approx(np.median([20 / (0.05 + d) for d in (0.0, 0.01, 0.02, 0.03)]))
    assert s["vision_encode_ms"]["p50"] == pytest.approx(40.0)
    assert set(s["ttft_ms"]) == {"p50", "p90", "p99"}


def test_roofline_from_artifact_files():
    from edgemed.bench.meters import bytes_per_token, roofline

    from edgemed.artifact import Manifest

    manifest = Manifest.model_validate({
        "format": "onnx", "target": {"memory_bandwidth_gb_s": 51.2},
        "model": {"text": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "vocab_size": 100}},
        "files": [{"path": "decoder_model_merged.onnx", "bytes": 1000, "component": "language+lm_head", "sha256": ""},
                  {"path": "decoder_model_merged.onnx.data", "bytes": 9_000, "component": "support", "sha256": ""},
                  {"path": "embed_tokens.onnx", "bytes": 10_000, "component": "embed", "sha256": ""},
                  {"path": "vision_encoder.onnx", "bytes": 50_000, "component": "vision+projector", "sha256": ""}]})
    b = bytes_per_token(Path("."), manifest, context_tokens=10)
    assert b["weight_bytes"] == 10_000 and b["embed_row_bytes"] == 100
    assert b["kv_bytes"] == 2 * 2 * 2 * 16 * 10 * 4
    r = roofline(Path("."), manifest, decode_tok_s=1000.0, context_tokens=10, bandwidth_gb_s=1.0)
    assert r["decode_ceiling_tok_s"] == pytest.approx(1e9 / b["bytes_per_token"])
    assert r["fraction"] == pytest.approx(1000.0 / r["decode_ceiling_tok_s"])
    spec = roofline(Path("."), manifest, decode_tok_s=None, context_tokens=10, on_accelerator=True)
    assert spec["bandwidth_gb_s"] == 51.2 and spec["fraction"] is None and spec["fraction_unavailable_reason"]


def test_cpu_session_on_a_gpu_host_does_not_report_gpu_board_energy(tmp_path):
    from edgemed.bench.energy import NullMeter, NvmlMeter
    from edgemed.bench.runner import choose_meter

    nvml = NvmlMeter(nvml=SimpleNamespace())
    assert choose_meter(nvml, on_accelerator=True) is nvml
    chosen = choose_meter(nvml, on_accelerator=False, rapl_root=tmp_path / "no-powercap")
    assert isinstance(chosen, NullMeter) and "GPU board" in chosen.unavailable_reason()


def test_pareto_front():
    from edgemed.bench.report import pareto_front

    pts = [("fp32", 10, 0.80), ("int8", 30, 0.80), ("int4", 50, 0.70), ("bad", 20, 0.60)]
    assert sorted(pareto_front(pts)) == ["int4", "int8"]


def test_plots_skipped_with_a_reason_without_matplotlib(monkeypatch, tmp_path):
    from edgemed.bench.report import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    report = {"artifact": {"name": "a"}, "latency": {"decode_tok_s": 5.0, "ttft_ms_samples": [1.0]}}
    assert plots(report, [], tmp_path) == {}
    assert "matplotlib" in report["plots"]["plots_unavailable_reason"]


def test_flips_directions_and_hallucination_probe():
    from edgemed.reference.cache import flip_summary, hallucination_probe

    s = flip_summary([("a", "Yes.", "No, it is normal.", True), ("b", "no", "no", True),
                      ("c", "no", "normal lungs", True), ("d", "a nodule", "a mass", False)])
    assert s["answer_flip_rate"] == pytest.approx(2 / 3) and s["answer_flip_n"] == 3
    assert s["answer_flip_directions"] == {"yes->no": 1, "no->none": 1}  # "normal" is not "no"
    assert s["open_answer_changed_rate"] == 1.0 and {c["id"] for c in s["changed_items"]} == {"a", "c", "d"}
    p = hallucination_probe([{"normal": True, "finding": "nodule", "parent": "no", "artifact": "yes"},
                             {"normal": True, "finding": "nodule", "parent": "no", "artifact": "no"},
                             {"normal": False, "finding": "nodule", "parent": "yes", "artifact": "yes"}])
    assert p["n"] == 2 and p["parent_yes_rate"] == 0.0 and p["artifact_yes_rate"] == 0.5


def test_gate_metrics_registered_and_unmeasured_gates_fail():
    from edgemed.reference.parity import GATE_METRICS, evaluate_gates
    from edgemed.recipe import Gates

    assert set(Gates.model_fields) <= set(GATE_METRICS)  # every recipe gate can be evaluated
    ok = evaluate_gates({"max_flip_rate": 0.02, "min_closed_acc_retention": 0.98},
                        {"answer_flip_rate": 0.0, "closed_acc_retention": 0.99})
    assert ok == []
    bad = evaluate_gates({"max_flip_rate": 0.02, "min_closed_acc_retention": 0.98},
                         {"answer_flip_rate": 0.1, "closed_acc_retention": None},
                         reasons={"closed_acc_retention": "parent scores 0"})
    assert len(bad) == 2 and "answer_flip_rate = 0.1" in bad[0] and "parent scores 0" in bad[1]


# --------------------------------------------------------------------------------------------
# the cached parent reference


def test_parent_reference_cache_full_and_topk(tiny_dir, artifact, tmp_path):
    import edgemed.runtime
    from edgemed.artifact import read_manifest
    from edgemed.reference.cache import REFERENCE_FILE, cache_parent_reference, compare_with_reference
    from edgemed.models import load_model

    out = artifact("llava-siglip", "int8")
    m = read_manifest(out)
    ref = next(f for f in m.files if f.component == "reference")
    assert ref.path == REFERENCE_FILE
    with np.load(out / REFERENCE_FILE, allow_pickle=False) as z:  # no pickled objects inside
        assert "logits_f16" in z.files and z["images"].dtype == np.uint8
    assert m.gate_suite["answer_flip_rate"] is not None and m.gate_suite["positions"] > 100

    # top-k mode (what a large vocabulary gets): a lower bound on the full KLD, same top-1
    cm = load_model(str(tiny_dir("llava-siglip")))
    (tmp_path / "topk").mkdir()
    rel = cache_parent_reference(cm, tmp_path / "topk", ["Is there an effusion?", "Describe the heart."],
                                 full_logits_max_bytes=0, topk=16)
    session = edgemed.runtime.load(out)
    topk = compare_with_reference(session, tmp_path / "topk" / rel, generate=False)
    (tmp_path / "full").mkdir()
    rel = cache_parent_reference(cm, tmp_path / "full", ["Is there an effusion?", "Describe the heart."])
    full = compare_with_reference(session, tmp_path / "full" / rel, generate=False)
    assert topk["mode"] == "topk" and full["mode"] == "full" and topk["positions"] == full["positions"]
    assert 0 <= topk["kld_mean"] <= full["kld_mean"] + 1e-6
    assert topk["top1_agreement"] == pytest.approx(full["top1_agreement"])


class _FakeSession:
    """The session API over canned logits and answers (what a device session returns)."""

    image = None

    def __init__(self, logits, answers):
        self._logits, self._answers = logits, answers

    def image_grid(self, image):
        return 0, 0

    def prompt_ids(self, prompt, with_image, grid=(0, 0)):
        return np.asarray([1, 2, 3], np.int64)

    def logits(self, ids, pixel_values=None, decode_from=None):
        return self._logits[: len(ids)]

    def generate(self, image, prompt, max_new_tokens=8, stop_at_eos=True):
        return SimpleNamespace(text=self._answers[prompt])


def test_compare_with_reference_flips_retention_and_probe(tmp_path):
    """The device-side comparison on a hand-made reference: 4 closed items, parent right on 2."""
    from edgemed.reference.cache import REFERENCE_FILE, compare_with_reference

    rng = np.random.default_rng(0)
    parent_logits = rng.normal(size=(3, 10)).astype(np.float32)
    items, answers = [], {}
    # (id, gold, parent, artifact, normal image): the artifact says "yes" to a finding on a normal
    # image (q0: a hallucination the parent did not have) and fixes the parent's miss on q2
    spec = [("q0", "no", "no", "Yes.", True), ("q1", "no", "no", "no", True),
            ("q2", "yes", "no", "yes", False), ("q3", "yes", "yes", "yes", False)]
    for name, gold, parent, art, normal in spec:
        items.append({"id": name, "prompt": name, "question": name, "answer": gold, "answer_type": "closed",
                      "image_index": -1, "finding": "nodule", "normal": normal,
                      "subgroups": {"image_finding": "normal" if normal else "nodule"}, "parent_answer": parent})
        answers[name] = art
    meta = {"format_version": 1, "mode": "full", "topk": None, "vocab_size": 10, "positions": 12,
            "max_new_tokens": 4, "parent": {}, "items": items, "kld_note": "exact"}
    np.savez(tmp_path / REFERENCE_FILE, ids=np.tile([1, 2, 3], 4).astype(np.int64),
             offsets=np.arange(0, 13, 3, dtype=np.int64), prompt_lens=np.full(4, 3, np.int64),
             logits_f16=np.tile(parent_logits, (4, 1)).astype(np.float16), meta=np.asarray(json.dumps(meta)))
    r = compare_with_reference(_FakeSession(parent_logits, answers), tmp_path / REFERENCE_FILE)
    assert r["kld_mean"] == pytest.approx(0, abs=1e-4) and r["top1_agreement"] == 1.0 and r["positions"] == 12
    assert r["answer_flip_rate"] == 0.5 and r["answer_flip_directions"] == {"no->yes": 2}
    assert {c["id"] for c in r["changed_items"]} == {"q0", "q2"}
    assert r["parent_closed_acc"] == 0.75 and r["closed_acc"] == 0.75 and r["closed_acc_retention"] == 1.0
    probe = r["hallucination_probe"]
    assert probe["n"] == 2 and probe["parent_yes_rate"] == 0.0 and probe["artifact_yes_rate"] == 0.5
    groups = r["subgroups"]["image_finding"]
    assert groups["groups"]["normal"]["n"] == 2 and groups["worst"] == "normal" and groups["gap"] == 0.5
    assert len(groups["groups"]["normal"]["ci95"]) == 2


# --------------------------------------------------------------------------------------------
# gates in compress


@pytest.mark.slow  # its own compress: 15-35 s on a shared 2-core VM
def test_unreachable_gate_makes_compress_exit_3_and_reject(tiny_dir, tmp_path):
    from edgemed.artifact import read_manifest, verify
    from edgemed.cli import main

    recipe = tmp_path / "fp32-strict.yaml"
    recipe.write_text("name: fp32-strict\nsteps:\n  - step: onnx-export\n"
                      "gates:\n  max_flip_rate: 0.5\n  min_closed_acc_retention: 1000\n")
    out = tmp_path / "rejected"
    rc = main(["compress", str(tiny_dir("llava-siglip")), "--recipe", str(recipe), "--target", "cpu-x86-avx2",
               "--output", str(out)])
    assert rc == 3
    m = read_manifest(out)  # the artifact is kept, marked rejected, and intact
    assert m.status == "rejected" and "min_closed_acc_retention" in m.status_reason
    assert "max_flip_rate" not in m.status_reason  # measured on the gate suite (fp32: no flips) and passed
    assert m.gate_suite["answer_flip_rate"] == 0.0 and m.gate_suite["answer_flip_n"] >= 4
    assert verify(out) == []


# --------------------------------------------------------------------------------------------
# edgemed bench end to end, without torch


MIN_FIELDS = {
    "latency": {"ttft_ms", "tpot_ms", "decode_tok_s", "prefill_tok_s", "vision_encode_ms"},
    "memory": {"peak_rss_mb", "peak_accel_mb", "artifact_mb"},
    "energy": {"method", "joules_per_request", "joules_per_token", "tokens_per_joule"},
    "roofline": {"bandwidth_gb_s", "bytes_per_token", "decode_ceiling_tok_s", "fraction"},
    "fidelity": {"kld_mean", "kld_p99", "top1_agreement", "answer_flip_rate"},
}


def _check_nulls_have_reasons(block: dict, name: str):
    for k, v in block.items():
        if v is None and not k.endswith("_reason"):
            reasons = [r for r in block if r.endswith("unavailable_reason") and block[r]]
            assert reasons, f"{name}.{k} is null without a *_unavailable_reason"


def test_edgemed_bench_cli_without_torch(artifact, tmp_path):
    art = artifact("llava-siglip", "int8")
    suites = ["--suite", f"synthetic-cxr={_synthetic_cxr(tmp_path / 'cxr')}"]
    try:
        import pyarrow  # noqa: F401,PLC0415  (the bench extra; without it the parquet suite is left out)

        assert pyarrow

        _write_parquet(tmp_path / "vqa-rad" / "data" / "test-00000-of-00001.parquet", _vqa_rows())
        suites += ["--suite", f"vqa-rad={tmp_path / 'vqa-rad'}"]
    except ImportError:
        pass
    out = tmp_path / "bench" / "report.json"
    res = _no_torch("cli", "bench", art, *suites, "--output", out, "--runs", "4", "--max-new-tokens", "8")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "TORCH_LOADED False" in res.stdout

    r = json.loads(out.read_text())
    for key in ("artifact", "target", "host", "latency", "memory", "energy", "roofline", "fidelity", "accuracy"):
        assert key in r
    assert {"cpu", "cores", "accelerator", "os"} <= set(r["host"])
    for block, fields in MIN_FIELDS.items():
        assert fields <= set(r[block]), (block, fields - set(r[block]))
        _check_nulls_have_reasons(r[block], block)
    lat = r["latency"]
    assert {"p50", "p90", "p99"} <= set(lat["ttft_ms"]) and {"p50", "p90"} <= set(lat["tpot_ms"])
    assert lat["ttft_ms"]["p50"] > 0 and lat["decode_tok_s"] > 0 and lat["vision_encode_ms"]["p50"] > 0
    assert len(lat["ttft_ms_samples"]) == 4
    # no energy counter on these VMs: null plus the reason, never an estimate
    assert r["energy"]["joules_per_token"] is None and r["energy"]["energy_unavailable_reason"]
    assert 0 < r["roofline"]["fraction"] <= 1.2
    assert r["memory"]["peak_rss_mb"] > 0 and 0 < r["memory"]["artifact_mb"] < 10
    assert r["memory"]["peak_accel_mb"] is None and r["memory"]["peak_accel_mb_unavailable_reason"]
    assert r["fidelity"]["kld_mean"] is not None and 0 <= r["fidelity"]["top1_agreement"] <= 1
    acc = r["accuracy"]
    assert set(acc) == {"synthetic-cxr", "edgemed-gate"} | ({"vqa-rad"} if len(suites) > 2 else set())
    for name, block in acc.items():
        assert block["n"] > 0 and "closed_acc" in block and "open_recall" in block
        lo, hi = block["ci95"]
        assert 0 <= lo <= hi <= 1, name
    if "vqa-rad" in acc:
        assert acc["vqa-rad"]["n_by_metric"]["closed_acc"] == 2 and acc["vqa-rad"]["ci95_by_metric"]["open_recall"]
    assert acc["synthetic-cxr"]["hallucination_probe"]["n"] == 2
    assert "closed_acc_llava_med_compat" in acc["synthetic-cxr"]  # strict and compatible side by side
    md = (out.parent / "report.md").read_text()
    assert "## Latency" in md and "## Energy" in md and "not measured" in md
    for png in ("pareto.png", "ttft.png"):
        assert (out.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r["plots"]["pareto_front"] == [art.name]


def test_bench_without_reference_reports_why_and_bad_suite_exits_2(artifact, tmp_path):
    import shutil

    from edgemed.artifact import read_manifest, write_manifest
    from edgemed.bench import run_bench
    from edgemed.cli import main

    old = tmp_path / "old"  # an artifact from before the parent reference existed
    shutil.copytree(artifact("llava-siglip", "int8"), old)
    (old / "parent_reference.npz").unlink()
    m = read_manifest(old)
    m.files = [f for f in m.files if f.component != "reference"]
    write_manifest(old, m)
    r = run_bench(old, runs=2, warmup=0, max_new_tokens=3, plots=False, record_in_manifest=False)
    assert r["fidelity"]["kld_mean"] is None and "re-run compress" in r["fidelity"]["fidelity_unavailable_reason"]
    assert main(["bench", str(old), "--suite", "mimic-cxr", "--output", str(tmp_path / "r.json")]) == 2


def test_device_bench_script_without_torch(artifact, tmp_path):
    art = artifact("llava-siglip", "int8")
    res = _no_torch(REPO / "bench" / "device_bench.py", art, "--out", tmp_path / "dev", "--runs", "3",
                    "--max-new-tokens", "4")
    assert res.returncode == 0, res.stderr
    assert "TORCH_LOADED False" in res.stdout
    summary = json.loads((tmp_path / "dev" / "summary.json").read_text())
    assert summary["decode_tok_s"] > 0 and summary["energy_unavailable_reason"]
    assert (tmp_path / "dev" / "report.json").is_file()


def test_bench_modules_import_without_torch():
    code = ("import edgemed.bench, edgemed.bench.runner, edgemed.bench.suites, edgemed.reference.cache, "
            "edgemed.bench.meters, edgemed.bench.report, edgemed.reference.parent, edgemed.cli")
    res = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    imported = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "transformers" not in imported and "matplotlib" not in imported


# --------------------------------------------------------------------------------------------
# the parent and the artifacts side by side


def test_compare_script_parent_and_artifacts_in_one_run(tiny_dir, artifact, tmp_path):
    art = artifact("llava-siglip", "int8")
    out = tmp_path / "cmp"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "compare.py"), str(tiny_dir("llava-siglip")), str(art),
                          "--out", str(out), "--runs", "3", "--max-new-tokens", "4"],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    table = json.loads((out / "comparison.json").read_text())
    rows = {r["name"]: r for r in table["rows"]}
    assert list(rows) == ["parent", art.name]
    assert rows["parent"]["format"] == "pytorch" and rows["parent"]["decode_speedup_vs_parent"] == 1.0
    for r in rows.values():
        assert r["decode_tok_s"] > 0 and r["ttft_ms_p50"] > 0
    a = rows[art.name]
    assert a["decode_speedup_vs_parent"] == pytest.approx(a["decode_tok_s"] / rows["parent"]["decode_tok_s"])
    assert a["kld_mean"] is not None
    # printed: one Markdown table with every model's decode tok/s and its ratio to the parent
    assert "decode tok/s" in res.stdout and "x parent" in res.stdout
    for name in rows:
        line = next(ln for ln in res.stdout.splitlines() if ln.startswith(f"| {name} |"))
        assert f"{rows[name]['decode_speedup_vs_parent']:.3g}" in line
    assert (out / "comparison.md").is_file() and (out / "pareto.png").is_file()
    assert (out / "parent" / "report.json").is_file()


def test_cpu_frontier_goals_are_checked_from_the_rows(monkeypatch):
    """bench/bench_cpu_frontier.py's verdict: an edgemed row meets a goal only at >= the llama.cpp
    row's speed and <= the KLD it is held to."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import bench_cpu_frontier as frontier

    rows = [{"name": "llama.cpp's own Q4_0", "decode_tok_s": 100.0, "kld_mean": 0.27},
            {"name": "llama.cpp's own Q4_K_M", "decode_tok_s": 70.0, "kld_mean": 0.06},
            {"name": "llama.cpp's own Q8_0", "decode_tok_s": 80.0, "kld_mean": 0.0036},
            {"name": "edgemed int4 (onnx)", "decode_tok_s": 110.0, "kld_mean": 0.05},
            {"name": "edgemed int4-fast (onnx)", "decode_tok_s": 130.0, "kld_mean": 0.12},
            {"name": "edgemed int8 (onnx)", "decode_tok_s": 120.0, "kld_mean": 0.0061},
            {"name": "edgemed int8-mse (onnx)", "decode_tok_s": 79.0, "kld_mean": 0.0034},
            {"name": "edgemed broken", "error": "ValueError: x"}]
    g = frontier.goals(rows)
    assert g["4bit"]["met_by"] == ["edgemed int4 (onnx)", "edgemed int8 (onnx)"]
    assert g["8bit"]["met_by"] == []  # int8-mse is below Q8_0's speed here
    rows[6]["decode_tok_s"] = 81.0
    assert frontier.goals(rows)["8bit"]["met_by"] == ["edgemed int8-mse (onnx)"]
