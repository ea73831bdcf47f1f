"""The sequential layer pass of GPTQ and llm-compressor, for statistics a decoder layer at a time.

The calibration feeds' inputs to layer 0 are caught (with the keyword arguments the model passes its
layers: masks, rotary tables) by one pass in which no layer runs, then each layer runs on every
feed's hidden states in turn, its weights held for all of them (a streamed parent, `compress
--low-memory`, reads each layer once a pass, not once a feed), and its outputs become the next
layer's inputs. Hooks on a layer's modules see exactly what a full forward of the model passes
them, so statistics collected this way equal those of forward hooks over whole-model passes, with
one layer's activations and weights resident. Users: the ONNX path's parent statistics (mse
importance, GPTQ Hessians: formats.onnx.parent_stats), the GGUF path's imatrix
(formats.gguf.imatrix), a streamed parent's pruning (transforms.prune) and its layer-local
distillation (transforms.distill_local).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from edgemed.models import CompositeModel


class LayerPass:
    """The sequential pass over a model's decoder layers on decoder feeds (calibration.feeds)."""

    def __init__(self, cm: "CompositeModel", feeds: list[dict]):
        self.cm, self.feeds = cm, feeds

    def layers(self):
        return self.cm.adapter.language_model(self.cm.model).layers

    def layer_linears(self, index: int) -> list:
        import torch

        return [m for m in self.layers()[index].modules() if isinstance(m, torch.nn.Linear)]

    def catch_layer_inputs(self) -> tuple[list, list[list[tuple[tuple, dict, bool]]]]:
        """One pass of the model over the feeds, catching what it passes each decoder layer: every
        feed's hidden states into layer 0, and for every layer each feed's other arguments (masks
        and rotary tables, the same objects for most layers; a family with sliding and global layers
        passes each its own mask). The layers themselves do not run (nor read their weights)."""
        import torch

        hidden0: list = []
        rest: list[list[tuple[tuple, dict, bool]]] = [[] for _ in self.layers()]

        def catcher(index: int):
            def catch(module, args, kwargs):  # (args but the hidden states, kwargs, whether it came by name)
                if index == 0:
                    hidden0.append(args[0] if args else kwargs["hidden_states"])
                rest[index].append((args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}, not args))
            return catch

        def skip(*args, **kwargs):  # the layer's own computation is the sequential pass's
            return args[0] if args else kwargs["hidden_states"]

        lm = self.cm.adapter.language_model(self.cm.model)
        layers = list(self.layers())
        handles = [layer.register_forward_pre_hook(catcher(i), with_kwargs=True) for i, layer in enumerate(layers)]
        own = [layer.__dict__.get("forward") for layer in layers]
        for layer in layers:
            layer.forward = skip
        try:
            with torch.no_grad():
                for feed in self.feeds:
                    lm(inputs_embeds=torch.from_numpy(feed["inputs_embeds"]),
                       attention_mask=torch.from_numpy(feed["attention_mask"]),
                       position_ids=torch.from_numpy(feed["position_ids"]), use_cache=False)
        finally:
            for h in handles:
                h.remove()
            for layer, forward in zip(layers, own):
                del layer.forward
                if forward is not None:
                    layer.forward = forward
        return hidden0, rest

    def run_layer(self, index: int, hidden: list, rest: list[tuple[tuple, dict, bool]],
                   linears=(), hook=None) -> tuple[list, dict]:
        """Layer `index` on every feed's hidden states -> (its outputs, {id(Linear): H} for `linears`);
        with `hook`, that forward hook on `linears` instead (and no Hessians)."""
        import torch

        # Linears that read the same tensor (q/k/v, gate/up) share one sum: X^T X once per input.
        sums: dict[int, torch.Tensor] = {}  # by the first Linear to read each input
        group: dict[int, int] = {}  # id(Linear) -> the key of its input's sum
        last: dict = {"x": None, "key": None}

        def hessian(mod, args, out):
            if args[0] is not last["x"]:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                last["x"], last["key"] = args[0], id(mod)
                sums[id(mod)] = sums.get(id(mod), 0) + x.T @ x
            group[id(mod)] = last["key"]

        layer = self.layers()[index]
        handles = [m.register_forward_hook(hook or hessian) for m in dict.fromkeys(linears)]
        out = []
        try:
            with torch.no_grad(), self.holding(layer):
                for h, (args, kwargs, by_name) in zip(hidden, rest):
                    y = layer(hidden_states=h, **kwargs) if by_name else layer(h, *args, **kwargs)
                    out.append(y[0] if isinstance(y, tuple) else y)
        finally:
            for h in handles:
                h.remove()
        last.clear()
        return out, {m: sums[key].numpy() for m, key in group.items()}

    def input_square_sums(self) -> tuple[dict[int, "torch.Tensor"], dict[int, int]]:
        """Every Linear's input sum of squares per column (float64) and row count, by id(module), for
        the decoder layers and the lm_head (on the final norm of the last layer's outputs), one layer at
        a time over all feeds: llama.cpp's imatrix in_sum2 and counts, whose ratio is the mse grids'
        importance. A streamed parent reads each layer's weights once, not once a feed (a 7B's full
        pass reads its 14.5 GB checkpoint: from disk, each time, where the page cache cannot hold it)."""
        import torch

        sums: dict[int, torch.Tensor] = {}
        rows: dict[int, int] = {}

        def hook(mod, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[id(mod)] = sums.get(id(mod), 0) + (x * x).sum(0)
            rows[id(mod)] = rows.get(id(mod), 0) + x.shape[0]

        hidden, rest = self.catch_layer_inputs()
        for index in range(len(self.layers())):
            hidden, _ = self.run_layer(index, hidden, rest[index], self.layer_linears(index), hook)
        head = self.cm.adapter.lm_head(self.cm.model)
        handle = head.register_forward_hook(hook)
        try:
            with torch.no_grad(), self.holding(head):
                for h in self.final_norm(hidden):
                    head(h)
        finally:
            handle.remove()
        return sums, rows

    def holding(self, *modules):
        """A streamed parent's weights of `modules` read once for every feed, not once a feed."""
        import contextlib

        streamed = getattr(self.cm, "streamed", None)
        return streamed.hold(*modules) if streamed is not None else contextlib.nullcontext()

    def final_norm(self, hidden: list) -> list:
        """What the language model returns for the last layer's outputs (its final norm)."""
        import torch

        norm = self.cm.adapter.language_model(self.cm.model).norm
        with torch.no_grad():
            return [norm(h) for h in hidden]
