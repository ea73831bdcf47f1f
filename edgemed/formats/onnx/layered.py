"""The decoder graph run one decoder layer at a time: compress --low-memory's parity session.

Parity runs the artifact it verifies, and a whole ONNX Runtime session holds every weight of it
(MatMulNBits repacks them into its own buffers): a 7B int4 artifact is 5-6 GB, more than the
rest of a streamed compress. Here the decoder graph is cut into its runs of nodes that belong to
one decoder layer (the onnxruntime-genai builder names every node ``/model/layers.{i}/...``; the
nodes before the first layer and after the last are runs of their own), each run becomes a graph
of its own over the same external-data file, and a forward pass opens one run's session at a
time, runs it, and drops it before the next: the same nodes and kernels on the same tensors as
the whole graph, so the same logits (tests/test_streamed compares the parity records), with one
layer's weights resident.

Costs: a pass over the layers opens every run's session again (1.6 s for the 22-layer TinyLlama
shape here), so requests are batched: parity's prompts, prefill and decode path, and the gate suite's
teacher-forced items go in one pass (`run_many`: each run's session runs every request's passes
before the next opens), and the gate suite's greedy answers are checked against the parent's
answers as drafts, many tokens a pass, as speculative decoding checks a draft (`greedy_answers`).
Why not ONNX Runtime alone: it has no option to page weights in and out; why
not onnx.utils.Extractor: it loads and copies every weight to cut a graph (here only node
protos move; the weights stay in the artifact's file, read by offset).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_LAYER = re.compile(r"/layers\.(\d+)/")
_ELEM = {"tensor(float)": 1, "tensor(int32)": 6, "tensor(int64)": 7, "tensor(bool)": 9, "tensor(float16)": 10,
         "tensor(bfloat16)": 16}
# The session option that resolves external-data locations of a graph loaded from bytes.
_EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"


@dataclass
class Run:
    """Consecutive nodes of one decoder layer (or of none): what they read from before them,
    what later runs (or the graph's outputs) read of theirs, and what no run reads after them."""
    nodes: list
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    last_use: list[str] = field(default_factory=list)
    model: bytes | None = None  # the serialized graph, built once its inputs' types are known


def split_runs(graph) -> list[Run]:
    """The graph's nodes in their (topological) order, cut where the layer a node names changes."""
    runs: list[Run] = []
    key = object()
    for node in graph.node:
        m = _LAYER.search(node.name)
        k = int(m.group(1)) if m else None
        if not runs or k != key:
            runs.append(Run([]))
            key = k
        runs[-1].nodes.append(node)
    inits = {i.name for i in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    last: dict[str, int] = {}
    for ri, run in enumerate(runs):
        for node in run.nodes:
            for name in node.input:
                if name:
                    last[name] = ri
    for ri, run in enumerate(runs):
        made = {o for node in run.nodes for o in node.output}
        for node in run.nodes:
            for name in node.input:
                if name and name not in made and name not in inits and name not in run.inputs:
                    run.inputs.append(name)
        run.outputs = [o for node in run.nodes for o in node.output
                       if o and (o in graph_outputs or last.get(o, -1) > ri)]
        run.last_use = [name for name in run.inputs if last.get(name) == ri]
    return runs


class _Arg:
    """What OnnxSession reads of InferenceSession.get_inputs(): name, type, shape."""

    def __init__(self, value_info):
        import onnx

        t = value_info.type.tensor_type
        self.name = value_info.name
        self.type = f"tensor({onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name})".replace(
            "float32", "float")
        self.shape = [d.dim_param or d.dim_value for d in t.shape.dim]


class LayeredDecoder:
    """Stands in for the decoder's InferenceSession in OnnxSession (get_inputs, get_providers) and
    runs a forward pass run by run (`run`)."""

    def __init__(self, path: Path, options, providers: list, disabled_optimizers: list[str] | None = None):
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        self._graph, self._opset, self._ir = model.graph, list(model.opset_import), model.ir_version
        self._inits = {i.name: i for i in model.graph.initializer}
        self._graph_inputs = {i.name: i for i in model.graph.input}
        self._graph_outputs = {o.name: o for o in model.graph.output}
        self.runs = split_runs(model.graph)
        # Runs that are one decoder layer (0 or 1: the graph does not name its layers; run it whole).
        self.layers = sum(1 for run in self.runs if _LAYER.search(run.nodes[0].name))
        self._types = {name: vi.type.tensor_type.elem_type for name, vi in self._graph_inputs.items()}
        options.add_session_config_entry(_EXTERNAL_FOLDER, str(Path(path).parent))
        self._options, self._providers, self._disabled = options, providers, disabled_optimizers
        self._inputs = [_Arg(vi) for vi in model.graph.input]
        self.peak_run_weights = 0  # the most initializer bytes one run's graph names (its own tensors)

    def get_inputs(self) -> list[_Arg]:
        return self._inputs

    def get_providers(self) -> list[str]:
        return [p if isinstance(p, str) else p[0] for p in self._providers]

    def _session(self, ri: int):
        import onnx
        import onnxruntime as ort

        run = self.runs[ri]
        if run.model is None:  # inputs from earlier runs have the types their sessions reported
            ins = [self._graph_inputs[n] if n in self._graph_inputs
                   else onnx.helper.make_tensor_value_info(n, self._types[n], None) for n in run.inputs]
            outs = [self._graph_outputs.get(n) or onnx.helper.make_empty_tensor_value_info(n) for n in run.outputs]
            names = dict.fromkeys(i for node in run.nodes for i in node.input if i in self._inits)
            inits = [self._inits[n] for n in names]
            self.peak_run_weights = max(self.peak_run_weights, sum(_init_bytes(i) for i in inits))
            graph = onnx.helper.make_graph(run.nodes, f"{self._graph.name}.run{ri}", ins, outs, initializer=inits)
            model = onnx.helper.make_model(graph, opset_imports=self._opset, ir_version=self._ir)
            run.model = model.SerializeToString()
        sess = ort.InferenceSession(run.model, self._options, providers=self._providers,
                                    disabled_optimizers=self._disabled)
        for out in sess.get_outputs():
            self._types.setdefault(out.name, _ELEM[out.type])
        return sess

    def forward(self, feeds: dict[str, np.ndarray], past, total: int, device: str):
        """OnnxSession.forward's pass: `feeds` are the graph's inputs but the cache, `past` the
        session's KV cache (its buffers are bound as they are to the whole graph). Returns the
        logits [S, V] and the cache after the pass."""
        import onnxruntime as ort

        past.reserve(total)
        outs = self.run(feeds, past.value, past.present_buffer, device)
        presents = [outs[n.replace("past_key_values", "present")] for n in past.past_names]
        presents = [ort.OrtValue.ortvalue_from_numpy(v, device, 0) if isinstance(v, np.ndarray) else v
                    for v in presents]  # past+new of a concatenating graph, as the next pass's past
        return outs["logits"][0], past.after(presents, total)

    def run(self, feeds: dict[str, np.ndarray], kv_input, kv_output, device: str) -> dict[str, Any]:
        """One pass, run by run. `feeds`: the graph inputs other than the cache; `kv_input(name)`:
        the OrtValue of a past_key_values input; `kv_output(name)`: the OrtValue a present output is
        written into, or None to let ONNX Runtime allocate it. Returns the graph's outputs: host
        arrays, and the cache's own buffers where `kv_output` named them."""
        return self.run_many([(feeds, kv_input, kv_output)], device)[0]

    def run_many(self, passes: list[tuple], device: str) -> list[dict[str, Any]]:
        """Several passes (feeds, kv_input, kv_output as in `run`, and optionally whether to keep
        only the last row of its logits), layer-major: each run's session opens once and runs every
        pass in order before the next run's opens, so a pass that reads a cache another pass wrote
        (a decode step after its prompt) comes after it in `passes`. Each pass computes what it
        would alone (the same inputs reach the same kernels)."""
        envs: list[dict[str, Any]] = [{} for _ in passes]
        for ri, run in enumerate(self.runs):
            sess = self._session(ri)
            for env, (feeds, kv_input, kv_output, *last_row) in zip(envs, passes):
                binding = sess.io_binding()
                for name in run.inputs:
                    if name in feeds:
                        binding.bind_cpu_input(name, feeds[name])
                    elif name.startswith("past_key_values."):
                        binding.bind_ortvalue_input(name, kv_input(name))
                    else:
                        binding.bind_cpu_input(name, env[name])
                for name in run.outputs:
                    buf = kv_output(name) if name.startswith("present.") else None
                    if buf is not None:
                        binding.bind_ortvalue_output(name, buf)
                    else:
                        binding.bind_output(name, device)
                sess.run_with_iobinding(binding)
                # Host copies, and the cache's own buffers: an OrtValue the binding hands back keeps
                # the session, and with it the run's repacked weights, alive.
                outs = binding.get_outputs()
                for name, value in zip(run.outputs, outs):
                    own = kv_output(name) if name.startswith("present.") else None
                    env[name] = own if own is not None else value.numpy()
                    if name == "logits" and last_row and last_row[0]:
                        env[name] = env[name][:, -1:].copy()
                del outs, value, binding
                for name in run.last_use:
                    env.pop(name, None)
            del sess  # this run's weights go before the next run's come
            _trim()
        return [{name: env[name] for name in self._graph_outputs} for env in envs]


def _passes(session, requests: list[tuple], answer_rows: bool = False) -> list[np.ndarray]:
    """logits(ids, pixel_values, decode_from) of each request, with the KV cache of `capacity`
    positions, computed by the same passes: the prompt (to decode_from), then a token a pass.
    A request may end with (past, start): that cache (start 0: filled from the prompt; start > 0:
    holding positions before start, fed a token a pass from there, its rows only).
    `answer_rows`: only the rows from decode_from - 1 on (the prompt's are not kept)."""
    passes, spans = [], []
    for ids, pv, decode_from, capacity, *cache in requests:
        if cache and cache[1] > 0:  # (past, start): positions before start are in `past`; a token a pass on
            past, start = cache
            embeds = session.input_embeds(ids[start:], None)
            cuts = list(range(start, len(ids) + 1))
            spans.append((len(passes), len(cuts) - 1))
            for a, b in zip(cuts, cuts[1:]):
                passes.append((session.feeds(embeds[:, a - start:b - start], a, ids[a:b]), past.value,
                               past.present_buffer))
            continue
        feats = session.encode_image(pv) if pv is not None else None
        embeds = session.input_embeds(ids, feats)
        past = cache[0] if cache else session.empty_past(capacity)
        first = len(ids) if decode_from is None or decode_from >= len(ids) else decode_from
        cuts = [0, first, *range(first + 1, len(ids) + 1)]
        spans.append((len(passes), len(cuts) - 1))
        for a, b in zip(cuts, cuts[1:]):
            passes.append((session.feeds(embeds[:, a:b], a, ids[a:b]), past.value, past.present_buffer,
                           answer_rows and a == 0))
    outs = session.decoder.run_many(passes, session._ort_device)
    return [np.concatenate([o["logits"][0] for o in outs[i:i + n]]).astype(np.float32) for i, n in spans]


def logits_many(session, requests: list[tuple]) -> list[np.ndarray]:
    """OnnxSession.logits of each (ids, pixel_values, decode_from), in one pass over the layers."""
    return _passes(session, [(ids, pv, d, len(ids)) for ids, pv, d in requests])


def greedy_answers(session, items: list[tuple], max_new_tokens: int, drafts: list | None = None) -> list[str]:
    """OnnxSession.generate(image, prompt, max_new_tokens, stop_at_eos=True).text of each item,
    a few passes over the layers in all. Each round feeds every unfinished item what its cache lacks
    (the prompt, first), then its answer so far and the rest of its draft, a token a pass
    (generate()'s own passes, with its cache size), and keeps the greedy tokens up to the first that
    differs from what was fed: a draft the artifact agrees with is checked in one round, an answer
    without one grows a token a round."""
    prompts = []
    for image, prompt in items:
        pv = session.pixel_values(image) if image is not None else None
        grid = session.image_grid(image) if image is not None else (0, 0)
        prompts.append((session.prompt_ids(prompt, image is not None, grid), pv))
    budgets = [min(max_new_tokens, int(session.context_tokens) - len(ids)) for ids, _ in prompts]
    for budget, (image, prompt) in zip(budgets, items):
        if budget < 1:  # generate() refuses it, and says why
            session.generate(image, prompt, max_new_tokens=max_new_tokens)
    drafts = [list(map(int, d)) if d is not None else [] for d in (drafts or [None] * len(items))]
    out: list[list[int]] = [[] for _ in items]
    # Each item's cache, kept across rounds: the prompt and the answer tokens fed and kept (a rejected
    # draft token's entry is written over by the next pass at its position before anything reads it).
    caches = [session.empty_past(len(ids) + budget) for (ids, _), budget in zip(prompts, budgets)]
    todo = list(range(len(items)))
    while todo:
        fed, requests = [], []
        for j in todo:
            rest = drafts[j][len(out[j]):] if drafts[j][:len(out[j])] == out[j] else []
            fed.append((out[j] + rest)[:budgets[j] - 1])  # the last answer token is never fed
            ids, pv = prompts[j]
            seq = np.concatenate([ids, np.asarray(fed[-1], np.int64)])
            if out[j]:  # the prompt and out[j][:-1] are cached: feed from out[j][-1]
                requests.append((seq, pv, None, 0, caches[j], len(ids) + len(out[j]) - 1))
            else:
                requests.append((seq, pv, len(ids), len(ids) + budgets[j], caches[j], 0))
        logits = _passes(session, requests, answer_rows=True)
        left = []
        for j, f, rows in zip(todo, fed, logits):
            base = len(out[j])  # rows[i] predicts answer token base + i
            while True:
                k = len(out[j])
                out[j].append(int(np.argmax(rows[k - base])))
                if out[j][-1] in session.eos or len(out[j]) == budgets[j]:
                    break
                if k >= len(f) or f[k] != out[j][-1]:  # not fed: its successor is the next round's
                    left.append(j)
                    break
        todo = left
    return [session.tokenizer.decode([t for t in o if t not in session.eos], skip_special_tokens=True) for o in out]


def _trim() -> None:
    """Hand freed heap pages back to the system (glibc keeps them otherwise: a run's repacked
    weights, freed, would hold the peak of the largest run plus the heap's fragments)."""
    import ctypes
    import ctypes.util

    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        _LIBC = ctypes.CDLL(name) if name else False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def _init_bytes(init) -> int:
    import onnx

    if init.data_location == onnx.TensorProto.EXTERNAL:
        return next((int(e.value) for e in init.external_data if e.key == "length"), 0)
    return init.ByteSize()
