"""Calibration statistics for the builder's decoder graph, taken from the PyTorch parent.

The importance weights of the mse grids (each input channel's mean square, the diagonal of the
Hessian that llama.cpp's imatrix stores) are collected by forward hooks on the parent's Linear
layers while it runs the calibration passes, as the GGUF path's imatrix is (formats.gguf.imatrix),
rather than by running the exported fp32 graph in ONNX Runtime. That needs no second copy of the
weights (the fp32 graph of a 7B is 28 GB; the streamed parent holds one module at a time), so
`compress --low-memory` and the in-memory path compute the same statistics and write the same
bytes. The onnxruntime-genai builder names each MatMul after the module it implements
(/model/layers.N/attn/qkv_proj/MatMul reads what q_proj, k_proj and v_proj read), which maps each
graph input back to its Linear. GPTQ's full Hessians stay with grids.ProbeStats.
"""
from __future__ import annotations

import re
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
    """Mean squares of every decoder Linear's input over the calibration feeds (decoder_feeds),
    from one pass of the parent's language model and lm_head, by graph input name."""

    def __init__(self, cm: "CompositeModel", feeds: list[dict]):
        self.cm, self.feeds = cm, feeds
        self._by_module: dict[int, np.ndarray] | None = None

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

    def hessians(self, model, input_names: list[str]):
        raise EdgemedError("gptq's Hessians come from the graph probe (grids.ProbeStats), not the parent")
