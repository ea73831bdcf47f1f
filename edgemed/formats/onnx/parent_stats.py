"""Calibration statistics for the builder's decoder graph, taken from the PyTorch parent.

The importance weights of the mse grids (each input channel's mean square, the diagonal of the
Hessian that llama.cpp's imatrix stores) are collected by forward hooks on the parent's Linear
layers while it runs the calibration passes, as the GGUF path's imatrix is (formats.gguf.imatrix),
rather than by running the exported fp32 graph in ONNX Runtime. That needs no second copy of the
weights (the fp32 graph of a 7B is 28 GB; the streamed parent holds one module at a time), so
`compress --low-memory` and the in-memory path compute the same statistics and write the same
bytes. The onnxruntime-genai builder names each MatMul after the module it implements
(/model/layers.N/attn/qkv_proj/MatMul reads what q_proj, k_proj and v_proj read), which maps each
graph input back to its Linear.

GPTQ's full Hessians (H = X^T X of each Linear's input) are collected one decoder layer at a time,
the sequential scheme of GPTQ and llm-compressor: the calibration feeds' inputs to layer 0 are
caught (with the keyword arguments the model passes its layers: masks, rotary tables), then each
layer runs on the cached inputs of the one before, with hooks on its own Linears, and its outputs
become the next layer's inputs. Only one layer's Hessians are held (a 7B's MLP down projection
alone is 1.6 GB in float64), and a streamed parent holds one module's weights. The inputs are the
parent's own fp32 activations, as the graph probe's are (grids.ProbeStats, kept for decoders that
do not map to the parent: torch.onnx exports).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from edgemed.errors import EdgemedError

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.models import CompositeModel

BUILDER_MATMUL = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMul$")
# The builder's fused projections read the input of their first part.
FUSED_INPUT = {"qkv_proj": "q_proj", "gate_up_proj": "gate_proj"}


def builder_linear(cm: "CompositeModel", node_name: str):
    """The parent's Linear whose input a builder MatMul reads (None: not a builder projection)."""
    if node_name == "/lm_head/MatMul":
        return cm.adapter.lm_head(cm.model)
    m = BUILDER_MATMUL.match(node_name)
    if m is None:
        return None
    layer = cm.adapter.language_model(cm.model).layers[int(m[1])]
    block = getattr(layer, "self_attn" if m[2] == "attn" else "mlp", None)
    return getattr(block, FUSED_INPUT.get(m[3], m[3]), None) if block is not None else None


def builder_graph_mapped(cm: "CompositeModel", model) -> bool:
    """Whether every MatMul with a constant weight in `model` maps to a parent Linear."""
    inits = {t.name for t in model.graph.initializer}
    return all(builder_linear(cm, n.name) is not None for n in model.graph.node
               if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits)


class ParentStats:
    """Calibration statistics of the builder decoder's MatMul inputs, by graph input name, from the
    parent over the calibration feeds (decoder_feeds): every Linear input's mean squares from one
    pass of its language model and lm_head, GPTQ's Hessians one decoder layer at a time."""

    def __init__(self, cm: "CompositeModel", feeds: list[dict]):
        self.cm, self.feeds = cm, feeds
        self._by_module: dict[int, np.ndarray] | None = None
        # The sequential pass of hessians(): every feed's hidden states into layer `at`, the other
        # arguments of every layer, and the Hessians of layer `layer`'s Linears (one layer's only).
        self._seq: dict = {}

    def _collect(self) -> dict[int, np.ndarray]:
        import torch

        if self._by_module is not None:
            return self._by_module
        lm, head = self.cm.adapter.language_model(self.cm.model), self.cm.adapter.lm_head(self.cm.model)
        linears = [m for m in [*lm.modules(), head] if isinstance(m, torch.nn.Linear)]
        sums: dict[int, torch.Tensor] = {}
        rows: dict[int, int] = {}

        def hook(mod, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[id(mod)] = sums.get(id(mod), 0) + (x * x).sum(0)
            rows[id(mod)] = rows.get(id(mod), 0) + x.shape[0]

        handles = [m.register_forward_hook(hook) for m in dict.fromkeys(linears)]
        try:
            with torch.no_grad():
                for feed in self.feeds:
                    out = lm(inputs_embeds=torch.from_numpy(feed["inputs_embeds"]),
                             attention_mask=torch.from_numpy(feed["attention_mask"]),
                             position_ids=torch.from_numpy(feed["position_ids"]), use_cache=False)
                    head(out.last_hidden_state)
        finally:
            for h in handles:
                h.remove()
        self._by_module = {k: (s / max(rows[k], 1)).numpy() for k, s in sums.items()}
        return self._by_module

    def mean_squares(self, model, input_names: list[str]) -> dict[str, np.ndarray]:
        wanted, out = set(input_names), {}
        by_module = self._collect()
        for node in model.graph.node:
            if node.op_type == "MatMul" and node.input[0] in wanted:
                linear = builder_linear(self.cm, node.name)
                if linear is None or id(linear) not in by_module:
                    raise EdgemedError(f"{node.name}: no Linear of the parent reads this MatMul's input; "
                                       "this is a bug in edgemed's builder mapping, please report it")
                out[node.input[0]] = by_module[id(linear)]
        return out

    def hessians(self, model, input_names: list[str]) -> "LayerHessians":
        """H = X^T X (float64) of each named MatMul input, as a mapping that computes a decoder layer's
        Hessians when one of them is first read (read them in layer order: an earlier layer restarts
        the pass) and keeps that layer's only."""
        wanted, where = set(input_names), {}
        for node in model.graph.node:
            if node.op_type == "MatMul" and node.input[0] in wanted:
                linear = builder_linear(self.cm, node.name)
                if linear is None:
                    raise EdgemedError(f"{node.name}: no Linear of the parent reads this MatMul's input; "
                                       "this is a bug in edgemed's builder mapping, please report it")
                m = BUILDER_MATMUL.match(node.name)
                where[node.input[0]] = (int(m[1]) if m else None, linear)
        return LayerHessians(self, where)

    # --- the sequential pass behind LayerHessians ---

    def _layers(self):
        return self.cm.adapter.language_model(self.cm.model).layers

    def _hessian(self, index: int | None, linear) -> np.ndarray:
        """H of `linear`'s input in decoder layer `index` (None: the lm_head). Layers are passed in
        order, once (an earlier layer than the last one starts the pass again), across every
        quantize call on this graph: --low-memory asks one MatMul at a time."""
        if index is None:
            return self._head_hessian()
        seq = self._seq
        if index != seq.get("layer"):
            seq["held"] = {}
            if "rest" not in seq or index < seq["at"]:
                (seq["hidden"], seq["rest"]), seq["at"] = self._catch_layer_inputs(), 0
            while seq["at"] < index:  # layers no MatMul asks for
                seq["hidden"], _ = self._run_layer(seq["at"], seq["hidden"], seq["rest"][seq["at"]])
                seq["at"] += 1
            seq["hidden"], seq["held"] = self._run_layer(index, seq["hidden"], seq["rest"][index],
                                                         self._layer_linears(index))
            seq["at"], seq["layer"] = index + 1, index
        return seq["held"][id(linear)]

    def _layer_linears(self, index: int) -> list:
        import torch

        return [m for m in self._layers()[index].modules() if isinstance(m, torch.nn.Linear)]

    def _catch_layer_inputs(self) -> tuple[list, list[list[tuple[tuple, dict, bool]]]]:
        """One pass of the model over the feeds, catching what it passes each decoder layer: every
        feed's hidden states into layer 0, and for every layer each feed's other arguments (masks
        and rotary tables, the same objects for most layers; a family with sliding and global layers
        passes each its own mask)."""
        import torch

        hidden0: list = []
        rest: list[list[tuple[tuple, dict, bool]]] = [[] for _ in self._layers()]

        def catcher(index: int):
            def catch(module, args, kwargs):  # (args but the hidden states, kwargs, whether it came by name)
                if index == 0:
                    hidden0.append(args[0] if args else kwargs["hidden_states"])
                rest[index].append((args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}, not args))
            return catch

        lm = self.cm.adapter.language_model(self.cm.model)
        handles = [layer.register_forward_pre_hook(catcher(i), with_kwargs=True)
                   for i, layer in enumerate(self._layers())]
        try:
            with torch.no_grad():
                for feed in self.feeds:
                    lm(inputs_embeds=torch.from_numpy(feed["inputs_embeds"]),
                       attention_mask=torch.from_numpy(feed["attention_mask"]),
                       position_ids=torch.from_numpy(feed["position_ids"]), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return hidden0, rest

    def _run_layer(self, index: int, hidden: list, rest: list[tuple[tuple, dict, bool]],
                   linears=()) -> tuple[list, dict]:
        """Layer `index` on every feed's hidden states -> (its outputs, {id(Linear): H} for `linears`)."""
        import torch

        # Linears that read the same tensor (q/k/v, gate/up) share one sum: X^T X once per input.
        sums: dict[int, torch.Tensor] = {}  # by the first Linear to read each input
        group: dict[int, int] = {}  # id(Linear) -> the key of its input's sum
        last: dict = {"x": None, "key": None}

        def hook(mod, args, out):
            if args[0] is not last["x"]:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                last["x"], last["key"] = args[0], id(mod)
                sums[id(mod)] = sums.get(id(mod), 0) + x.T @ x
            group[id(mod)] = last["key"]

        layer = self._layers()[index]
        handles = [m.register_forward_hook(hook) for m in dict.fromkeys(linears)]
        out = []
        try:
            with torch.no_grad():
                for h, (args, kwargs, by_name) in zip(hidden, rest):
                    y = layer(hidden_states=h, **kwargs) if by_name else layer(h, *args, **kwargs)
                    out.append(y[0] if isinstance(y, tuple) else y)
        finally:
            for h in handles:
                h.remove()
        last.clear()
        return out, {m: sums[key].numpy() for m, key in group.items()}

    def _head_hessian(self) -> np.ndarray:
        """The lm_head input's Hessian, from one pass of the whole language model (its final norm
        is the family's own)."""
        import torch

        lm = self.cm.adapter.language_model(self.cm.model)
        acc = 0
        with torch.no_grad():
            for feed in self.feeds:
                out = lm(inputs_embeds=torch.from_numpy(feed["inputs_embeds"]),
                         attention_mask=torch.from_numpy(feed["attention_mask"]),
                         position_ids=torch.from_numpy(feed["position_ids"]), use_cache=False)
                x = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1]).double()
                acc = acc + x.T @ x
        return acc.numpy()


class LayerHessians(Mapping):
    """ParentStats.hessians' mapping: input name -> H (float64), from the parent's sequential pass."""

    def __init__(self, stats: ParentStats, where: dict[str, tuple[int | None, object]]):
        self.stats, self.where = stats, where

    def __len__(self) -> int:
        return len(self.where)

    def __iter__(self):
        return iter(self.where)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.stats._hessian(*self.where[name])
