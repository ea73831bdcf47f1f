#!/usr/bin/env python3
"""Decode speed against the memory roofline at the TinyLlama-1.1B shape (issue #19, item 3).

    python bench/bench_roofline.py [--out bench/results/roofline] [--rounds 5] [--new-tokens 64]
        [--recipes int4 int4-fast q4_k_m q4_0] [--llama-types Q4_0 Q4_K_M] [--skip genai]

At batch 1 a decoder reads every weight once per token, so on a CPU whose cores can consume data
faster than memory delivers it, decode speed is bounded by read bandwidth / bytes per token (the
roofline). The script:

  - writes a random-weight checkpoint of TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32/4
    heads, intermediate 5632, vocab 32,000, untied output; bf16; Mistral/Llama tensors; a tokenizer
    replica of Mistral-7B-Instruct-v0.2's from tests/fixtures: its special tokens, chat template and
    vocabulary size, a small BPE), as bench_memory.py does;
  - measures the machine's read bandwidth with --threads threads the way STREAM does: each thread
    sums its half of a 2 GB buffer (far larger than every cache; numpy releases the GIL in the
    reduction), best of 7 (and 1 thread, for reference);
  - makes every contender from that checkpoint: edgemed recipes (--recipes; a shipped name or a
    YAML file; `q4_0` is written here: q4_k_m's imatrix and Q6_K output, Q4_0 everywhere else, a
    type llama.cpp repacks for its SIMD kernels), llama.cpp's OWN pipeline (its converter from the
    llama-cpp-python sdist, run in place, then llama_model_quantize, see bench_cpu_frontier.py) and
    onnxruntime-genai's builder int4;
  - counts each artifact's bytes read per token from its own tensors: every GGUF tensor / ONNX
    initializer except the embedding table, of which a token reads one row (a table that is also
    the output projection is counted); the KV cache (a few MB at this context) is left out;
  - times decode at batch 1 (--new-tokens greedy tokens after the chat prompt, --threads threads),
    one run per contender per round in a rotating order, --rounds rounds after a warm-up, median.

Reported per contender: decode tok/s, MB per token, achieved GB/s (= tok/s x bytes per token) and
its fraction of the measured bandwidth, with the issue's goal checked: an edgemed 4-bit artifact
decoding faster than llama.cpp's own Q4_K_M and at >= 0.85 of the roofline. Random weights make
greedy text meaningless but not the speed: every token reads the same bytes. Writes results.json
and results.md (with the command) to --out.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cpu_frontier as frontier  # noqa: E402  (contenders, llama.cpp's own pipeline, host facts)
import bench_memory  # noqa: E402  (the TinyLlama-shape checkpoint)
import bench_smollm2 as base  # noqa: E402  (the prompt)

GOAL_FRACTION = 0.85


def read_bandwidth(threads: int, gb: float = 2.0, repeats: int = 7) -> float:
    """GB/s of `threads` threads each summing its share of a buffer much larger than the caches (best of repeats)."""
    buf = np.ones(int(gb * 1e9) // 8, dtype=np.float64)  # written once, so every page is resident
    parts = np.array_split(buf, threads)
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=np.add.reduce, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, buf.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def gguf_bytes_per_token(path: Path) -> dict:
    """Bytes of every tensor a decode step reads: all but token_embd (unless it is also the output)."""
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    tied = "output.weight" not in tensors
    read = sum(n for name, n in tensors.items() if name != "token_embd.weight" or tied)
    return {"bytes_per_token": read, "embedding_bytes": tensors.get("token_embd.weight", 0), "tied_output": tied}


def onnx_bytes_per_token(folder: Path) -> dict:
    """Bytes of every initializer of the folder's ONNX graphs but a table only Gather ops read (the embedding)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    read = gathered = 0
    for path in sorted(folder.rglob("*.onnx")):
        graph = onnx.load(str(path), load_external_data=False).graph
        users: dict[str, set[str]] = {}
        for node in graph.node:
            for i, name in enumerate(node.input):
                users.setdefault(name, set()).add(node.op_type if i == 0 else f"{node.op_type}:{i}")
        for init in graph.initializer:
            size = int(np.prod(init.dims, dtype=np.int64)) * np.dtype(tensor_dtype_to_np_dtype(init.data_type)).itemsize
            if users.get(init.name) and users[init.name] <= {"Gather", "GatherBlockQuantized",
                                                              "GatherBlockQuantized:1", "GatherBlockQuantized:2"}:
                gathered += size  # the embedding table and its scales: one row per token
            else:
                read += size
    return {"bytes_per_token": read, "embedding_bytes": gathered, "tied_output": None}


def bytes_per_token(c) -> dict:
    if isinstance(c, frontier.LlamaCppFile):
        return gguf_bytes_per_token(c.path)
    if isinstance(c, frontier.GenaiBuilder):
        return onnx_bytes_per_token(c.folder)
    if c.format == "gguf":
        return gguf_bytes_per_token(next(c.folder.glob("model-*.gguf")))
    return onnx_bytes_per_token(c.folder)


class Edgemed(frontier.Edgemed):
    def __init__(self, parent: Path, work: Path, recipe: str, new_tokens: int):
        super().__init__(parent, work, recipe, new_tokens)
        label = Path(recipe).stem if recipe.endswith((".yaml", ".yml")) else recipe
        self.folder = work / f"edgemed-{label}"
        if self.exact is not self.timed:
            del self.exact  # the F32-KV session parity uses; timing needs only the default one


class LlamaCppFile(frontier.LlamaCppFile):
    """A GGUF file through llama-cpp-python, for timing only (F16 KV cache, llama.cpp's default)."""

    def __init__(self, path: Path, label: str, prompt_ids: list[int], new_tokens: int, threads: int):
        import llama_cpp

        self.lc, self.path, self.prompt_ids, self.new_tokens = llama_cpp, path, prompt_ids, new_tokens
        self.timed = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=threads, verbose=False)
        self.name, self.mb = label, path.stat().st_size / 1e6


class GenaiBuilder(frontier.GenaiBuilder):
    def __init__(self, parent: Path, work: Path, precision: str, new_tokens: int):
        super().__init__(parent, work, precision, new_tokens)
        self.folder = work / f"genai-{precision}"


def converter_input(parent: Path, work: Path) -> Path:
    """The checkpoint as llama.cpp's converter reads a Llama: config + weights + a sentencepiece tokenizer.model.

    The random checkpoint's tokenizer.json is edgemed's replica (a small byte-level BPE) whose
    pre-tokenizer the converter does not know, and the real Mistral tokenizer.model is not in the
    fixtures; so a sentencepiece BPE model (byte fallback) is trained here on this repository's
    Python sources, and the converter pads it to the config's 32,000 rows as it does for any
    smaller vocabulary. Only the token strings differ from the edgemed artifacts' tokenizer: the
    prompt's token ids, the weights and so every byte read per token are the same.
    """
    import sentencepiece as spm

    out = work / "hf-llama-converter"
    if (out / "tokenizer.model").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in parent.iterdir():
        if f.name.endswith((".safetensors", ".safetensors.index.json")) or f.name in ("config.json",
                                                                                      "generation_config.json"):
            (out / f.name).unlink(missing_ok=True)
            (out / f.name).symlink_to(f.resolve())
    text = out / "corpus.txt"
    repo = Path(__file__).resolve().parents[1]
    text.write_text("\n".join(p.read_text() for p in sorted((repo / "edgemed").rglob("*.py"))))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(out / "tokenizer"), model_type="bpe",
                                   vocab_size=8000, hard_vocab_limit=False, byte_fallback=True,
                                   minloglevel=2)
    (out / "tokenizer.vocab").unlink()
    text.unlink()
    return out


def extra_recipes(work: Path) -> dict[str, Path]:
    """q4_0: the shipped q4_k_m with every Q4_K/Q6_K language and embedding tensor at Q4_0 instead (the
    imatrix and the Q6_K output kept): fewer bytes per token than Q4_K_M, and a type llama.cpp repacks."""
    import yaml

    from edgemed.recipe import load_recipe

    r = load_recipe("q4_k_m").model_dump(mode="json", exclude_defaults=True)
    r["name"] = "q4_0"
    r["description"] = "llama.cpp Q4_0 with the medical multimodal imatrix, Q6_K lm_head (bench_roofline.py)"
    r["policy"].update(embed="q4_0", language="q4_0")
    path = work / "q4_0.yaml"
    path.write_text(yaml.safe_dump(r))
    return {"q4_0": path}


def goal(rows: list[dict]) -> dict:
    by = {r["name"]: r for r in rows if "decode_tok_s" in r}
    q4km = by.get("llama.cpp's own Q4_K_M")
    mine = [r for r in by.values() if r["name"].startswith("edgemed")]
    hits = [r["name"] for r in mine if q4km and r["decode_tok_s"] > q4km["decode_tok_s"]
            and r["roofline_fraction"] >= GOAL_FRACTION]
    return {"goal": f"an edgemed 4-bit artifact decoding faster than llama.cpp's own Q4_K_M and at >= "
                    f"{GOAL_FRACTION} of the measured read bandwidth", "met_by": hits,
            "q4_k_m_tok_s": q4km["decode_tok_s"] if q4km else None}


def markdown(rows: list[dict]) -> str:
    lines = ["| contender | decode tok/s (median) | MB read per token | GB/s achieved | of roofline | "
             "roofline tok/s | artifact MB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error'][:90]} | | | | | |")
            continue
        lines.append(f"| {r['name']} | {r['decode_tok_s']:.1f} | {r['bytes_per_token'] / 1e6:.0f} | "
                     f"{r['achieved_gb_s']:.1f} | {r['roofline_fraction']:.2f} | {r['roofline_tok_s']:.1f} | "
                     f"{r['mb']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/roofline"))
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("EDGEMED_HOME", Path.home() / ".cache/edgemed"))
                    / "bench-roofline")
    ap.add_argument("--layers", type=int, default=22, help="TinyLlama has 22")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipes", nargs="*", default=["int4", "int4-fast", "q4_k_m", "q4_0"],
                    help="shipped names, YAML files, or q4_0 (written by this script)")
    ap.add_argument("--llama-types", nargs="*", default=["Q4_0", "Q4_K_M"])
    ap.add_argument("--skip", nargs="*", default=[], help="contenders to skip: llama genai")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    t_start = time.time()

    shape = f"tinyllama-{args.layers}"
    work = args.work / shape  # the checkpoint and every artifact made from it
    parent = bench_memory.build_checkpoint(shape, work / "hf")
    print(f"checkpoint: {parent}", flush=True)
    bandwidth = {"threads": args.threads, "gb_s": read_bandwidth(args.threads), "gb_s_1_thread": read_bandwidth(1),
                 "method": "numpy add.reduce of a 2 GB float64 buffer split over the threads, best of 7"}
    print(f"read bandwidth: {bandwidth['gb_s']:.1f} GB/s ({args.threads} threads), "
          f"{bandwidth['gb_s_1_thread']:.1f} GB/s (1)", flush=True)

    contenders, errors = [], []
    add = frontier.contender_adder(contenders, errors)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(parent)
    text = tok.apply_chat_template([{"role": "user", "content": base.PROMPT}], tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(text, add_special_tokens=False).input_ids
    extra = extra_recipes(args.work)
    for r in (str(extra.get(r, r)) for r in args.recipes):
        add(f"edgemed {r}", lambda r=r: Edgemed(parent, work, r, args.new_tokens))
        label = Path(r).stem if r.endswith((".yaml", ".yml")) else r
        mine = contenders[-1] if contenders and contenders[-1].name.startswith(f"edgemed {label} (") else None
        if mine is not None and mine.format == "gguf":  # the same file through the loop llama.cpp's rows use
            add(f"edgemed {r} file", lambda mine=mine: LlamaCppFile(
                next(mine.folder.glob("model-*.gguf")), f"{mine.name} file, llama-cpp-python loop", prompt_ids,
                args.new_tokens, args.threads))
    if "llama" not in args.skip:
        try:
            sdist = frontier.llama_cpp_sdist(args.work)  # one download for every shape
            if not (work / sdist.parents[1].name).exists():
                (work / sdist.parents[1].name).symlink_to(sdist.parents[1])
            files = frontier.llama_cpp_own(converter_input(parent, work), work, args.llama_types)
        except Exception as e:
            files = {}
            errors.append({"name": "llama.cpp's own pipeline", "error": f"{type(e).__name__}: {str(e)[:300]}"})
        (work / "llama-own-F32.gguf").unlink(missing_ok=True)  # 4.4 GB, only the quantizer's input
        for t, path in files.items():
            add(f"llama.cpp's own {t}", lambda t=t, path=path: LlamaCppFile(
                path, f"llama.cpp's own {t}", prompt_ids, args.new_tokens, args.threads))
    if "genai" not in args.skip and importlib.util.find_spec("onnxruntime_genai"):
        add("onnxruntime-genai builder int4", lambda: GenaiBuilder(parent, work, "int4", args.new_tokens))

    rates = frontier.interleaved_rates(contenders, args.rounds, args.new_tokens)

    rows = []
    for c in contenders:
        tok_s = statistics.median(rates[c.name])
        b = bytes_per_token(c)
        achieved = tok_s * b["bytes_per_token"] / 1e9
        row = {"name": c.name, "decode_tok_s": tok_s, "rounds": rates[c.name], "mb": c.mb, **b,
               "achieved_gb_s": achieved, "roofline_fraction": achieved / bandwidth["gb_s"],
               "roofline_tok_s": bandwidth["gb_s"] * 1e9 / b["bytes_per_token"]}
        if isinstance(c, Edgemed):
            row.update(status=c.status, format=c.format)
        rows.append(row)
    rows += errors
    command = "python bench/bench_roofline.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    result = {"command": command.strip(), "model": f"random TinyLlama-1.1B shape, {args.layers} layers, bf16",
              "rounds": args.rounds, "new_tokens": args.new_tokens, "threads": args.threads, "bandwidth": bandwidth,
              "host": frontier.host_facts(), "minutes": (time.time() - t_start) / 60, "rows": rows,
              "goal": goal(rows)}
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    g = result["goal"]
    md = (f"# Decode against the roofline: TinyLlama-1.1B shape ({args.layers} layers, random weights)\n\n"
          f"`{result['command']}`\n\n"
          f"Read bandwidth {bandwidth['gb_s']:.1f} GB/s with {args.threads} threads ({bandwidth['gb_s_1_thread']:.1f} with 1; "
          f"{bandwidth['method']}); {args.rounds} interleaved rounds of {args.new_tokens} greedy tokens at batch 1 "
          f"(median), {args.threads} threads; {os.cpu_count()} CPUs ({result['host'].get('cpu')}); llama.cpp: "
          f"{result['host'].get('llama_cpp_system_info')}; {result['minutes']:.0f} min.\n\n" + markdown(rows) +
          f"\n\n- {g['goal']}: {'met by ' + ', '.join(g['met_by']) if g['met_by'] else 'not met'}\n")
    (args.out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
