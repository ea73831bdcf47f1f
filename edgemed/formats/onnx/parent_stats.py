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

from edgemed.calibration.sequential import LayerPass
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


class ParentStats(LayerPass):
    """Calibration statistics of the builder decoder's MatMul inputs, by graph input name, from the
    parent over the calibration feeds (decoder_feeds): every Linear input's mean squares from one
    pass of its language model and lm_head, GPTQ's Hessians one decoder layer at a time."""

    def __init__(self, cm: "CompositeModel", feeds: list[dict]):
        super().__init__(cm, feeds)
        self._by_module: dict[int, np.ndarray] | None = None
        # The sequential pass of hessians(): every feed's hidden states into layer `at`, the other
        # arguments of every layer, and the Hessians of layer `layer`'s Linears (one layer's only).
        self._seq: dict = {}

    def _collect(self) -> dict[int, np.ndarray]:
        """Every Linear's input mean squares (language model and lm_head), one decoder layer at a
        time over all feeds (LayerPass.input_square_sums)."""
        if self._by_module is None:
            sums, rows = self.input_square_sums()
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
                (seq["hidden"], seq["rest"]), seq["at"] = self.catch_layer_inputs(), 0
            while seq["at"] < index:  # layers no MatMul asks for
                seq["hidden"], _ = self.run_layer(seq["at"], seq["hidden"], seq["rest"][seq["at"]])
                seq["at"] += 1
            seq["hidden"], seq["held"] = self.run_layer(index, seq["hidden"], seq["rest"][index],
                                                         self.layer_linears(index))
            seq["at"], seq["layer"] = index + 1, index
        return seq["held"][id(linear)]

    def _head_hessian(self) -> np.ndarray:
        """The lm_head input's Hessian: the sequential pass carried past the last layer (where the
        layers' Hessians left it) and the model's final norm."""
        seq, n = self._seq, len(self.layers())
        if "rest" not in seq:
            (seq["hidden"], seq["rest"]), seq["at"] = self.catch_layer_inputs(), 0
        seq["layer"], seq["held"] = None, {}
        while seq["at"] < n:
            seq["hidden"], _ = self.run_layer(seq["at"], seq["hidden"], seq["rest"][seq["at"]])
            seq["at"] += 1
        acc = 0
        for h in self.final_norm(seq["hidden"]):
            x = h.reshape(-1, h.shape[-1]).double()
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
