"""Structured pruning of the language model: fewer blocks (depth) or narrower FFNs (width).

Unstructured and 2:4 sparsity leave every matrix its dense shape, so ONNX Runtime and llama.cpp
on CPU read and multiply the same bytes as before. Structured pruning removes whole blocks or
whole FFN channels: the pruned model is the same architecture with a smaller `num_hidden_layers`
or `intermediate_size`, every exporter takes it unchanged, and each decoded token reads and
computes proportionally less.

- prune-depth: drops the decoder blocks that change their input least on calibration passes,
  by Block Influence BI = 1 - cos(h_in, h_out) averaged over tokens (ShortGPT, Men et al. 2024).
- prune-width: drops the FFN intermediate channels whose contribution to the block output is
  smallest, scored Wanda-style as ||x_j||_2 * ||W_down[:, j]||_2 where x_j is the channel's
  SiLU(gate) * up activation on calibration tokens (Sun et al. 2023; Minitron ranks the same way).

Both record in the manifest (runtime.pruning) the parameters before and after, what was removed
and the KL divergence of the pruned PyTorch model against the unpruned one on the parity prompts:
that is the quality cost of pruning, while the artifact's own parity compares it with the pruned
parent (exporter fidelity).
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from edgemed.errors import BadInputError
from edgemed.reference.parent import parity_prompt_logits
from edgemed.reference.parity import run_calibration
from edgemed.steps import Step, StepArgs

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.context import Context

def _text_configs(*configs) -> list:
    """The distinct text-config objects among the given (composite or text) configs."""
    out: list = []
    for c in configs:
        if c is None:
            continue
        tc = getattr(c, "text_config", None) or c
        if all(tc is not o for o in out):
            out.append(tc)
    return out


def check_supported(config, what: str) -> None:
    """BadInputError before any heavy work when the language model is not a supported decoder."""
    from edgemed.models.base import decoders_supporting

    tc = getattr(config, "text_config", None) or config
    mt = getattr(tc, "model_type", None)
    supported = decoders_supporting("prune")
    if mt not in supported:
        raise BadInputError(
            what, f"pruning supports language models of type {', '.join(supported)}, "
            f"not '{mt}'",
            "use a Llama/Mistral/Qwen2-based model (plain, LLaVA or Idefics3/SmolVLM), or drop the prune recipe",
        )


def depth_plan(num_layers: int, fraction: float, what: str) -> int:
    """How many blocks to drop; the first and the last block always stay."""
    n_drop = int(round(fraction * num_layers))
    if n_drop < 1:
        raise BadInputError(what, f"fraction {fraction} of {num_layers} blocks drops no block",
                            f"use fraction >= {0.5 / num_layers:.3g}")
    if n_drop > num_layers - 2:
        raise BadInputError(what, f"fraction {fraction} would drop {n_drop} of {num_layers} blocks, "
                            "but the first and the last block are kept",
                            f"use fraction <= {(num_layers - 2) / num_layers:.3g}")
    return n_drop


def block_params(tc, intermediate_size: int | None = None) -> int:
    """Parameters of one decoder block from its config (attention, FFN, two norms)."""
    h, heads = tc.hidden_size, tc.num_attention_heads
    hd = getattr(tc, "head_dim", None) or h // heads
    kv = getattr(tc, "num_key_value_heads", None) or heads
    i = tc.intermediate_size if intermediate_size is None else intermediate_size
    attn = h * heads * hd * 2 + h * kv * hd * 2
    if has_qkv_bias(tc) or getattr(tc, "attention_bias", False):
        attn += heads * hd + 2 * kv * hd + (h if getattr(tc, "attention_bias", False) else 0)
    ffn = 3 * h * i + ((2 * i + h) if getattr(tc, "mlp_bias", False) else 0)
    return attn + ffn + 2 * h


def has_qkv_bias(tc) -> bool:
    """q/k/v projections carry biases although attention_bias is unset (Qwen2), per DecoderFacts."""
    from edgemed.models import decoder_facts

    facts = decoder_facts(getattr(tc, "model_type", None))
    return bool(facts and facts.qkv_bias)


def width_plan(tc, fraction: float, of: str, multiple_of: int, what: str) -> int:
    """The new intermediate size.

    Rounded to a multiple of `multiple_of` (32 by default) because the pruned size becomes the K
    dimension of down_proj, and the block quantizers split K into blocks: GGUF Q8_0/Q4_0 and ONNX
    Runtime MatMulNBits use blocks of 32 (llama.cpp's k-quants want 256 and fall back to another
    type for tensors whose rows do not divide)."""
    inter = tc.intermediate_size
    if of == "ffn_channels":
        target = inter * (1 - fraction)
    else:  # the share of the whole block's parameters, taken from FFN channels alone
        per_channel = (block_params(tc, inter) - block_params(tc, inter - 1))
        target = inter - fraction * block_params(tc) / per_channel
    new = int(round(target / multiple_of)) * multiple_of
    if new >= inter:
        raise BadInputError(what, f"fraction {fraction} removes no multiple of {multiple_of} channels from "
                            f"intermediate_size {inter}", "use a larger fraction or a smaller multiple_of")
    if new < multiple_of:
        raise BadInputError(what, f"fraction {fraction} of the {of.replace('_', ' ')} leaves fewer than {multiple_of} "
                            f"of {inter} FFN channels", "use a smaller fraction")
    return new


class PruneArgs(StepArgs):
    # (0, 1) exclusive: 0 prunes nothing and 1 would leave no model.
    fraction: float = Field(..., gt=0, lt=1)
    # Calibration passes through the parent for the importance scores (prompts + answers, images
    # for a VLM), from the recipe's calibration set or edgemed's built-in one.
    calibration_count: int = Field(16, ge=1, le=4096)


class PruneWidthArgs(PruneArgs):
    # block_params: fraction of each decoder block's parameters to remove (taken from FFN
    # channels, so `prune-width-25` and `prune-depth-25` both leave ~75% of the block parameters);
    # ffn_channels: fraction of the FFN channels themselves.
    of: Literal["block_params", "ffn_channels"] = "block_params"
    importance: Literal["wanda", "activation"] = "wanda"
    multiple_of: int = Field(32, ge=1, le=1024)
    # Attention heads too: this fraction of each block's KV-head groups (a key/value head with the
    # query heads that share it) is removed, least important first (Wanda-style on o_proj's input).
    # Rounded down; at least one group stays. 0 keeps every head.
    head_fraction: float = Field(0.0, ge=0, lt=1)


def head_plan(tc, fraction: float, what: str) -> int:
    """KV-head groups to keep."""
    kv = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    drop = int(fraction * kv)
    if fraction > 0 and drop == 0:
        raise BadInputError(what, f"head_fraction {fraction} of {kv} key/value head groups removes none",
                            f"use head_fraction >= {1 / kv:.3g}, or 0 to keep every head")
    return max(1, kv - drop)


class _Prune(Step):
    stage = "model"

    def _what(self) -> str:
        return f"step {self.name} fraction={self.args.fraction}"

    def run(self, ctx: "Context") -> None:
        import torch

        cm = ctx.cm
        check_supported(cm.config, self._what())
        lm = cm.adapter.language_model(cm.model)
        before = self._params(cm, lm)
        ref = parity_prompt_logits(cm)
        calib = self._calibration(ctx)
        with torch.no_grad():
            record = self.transform(ctx, lm, calib)
        for tc in _text_configs(cm.config, cm.model.config, lm.config):
            self.update_config(tc, record)
        cm.text.num_layers = len(lm.layers)
        after = self._params(cm, lm)
        from edgemed.reference.metrics import compare_logits

        got = parity_prompt_logits(cm)
        kld = compare_logits(np.concatenate(ref), np.concatenate(got))
        ctx.runtime["pruning"] = {
            **ctx.runtime.get("pruning", {}),
            self.name: {
                "args": self.args.model_dump(mode="json"),
                **record,
                "params_before": before,
                "params_after": after,
                "block_params_ratio": after["blocks"] / before["blocks"],
                # Quality cost: the pruned PyTorch model against the unpruned one on the parity
                # prompts, every position. The artifact's `parity` is against the pruned model.
                "kld_vs_unpruned": kld,
                "calibration": calib.record(),
            },
        }
        if ctx.calibration is None:
            ctx.calibration = calib.record()
        ctx.notes.append(f"{self.name}: language block parameters {before['blocks']} -> {after['blocks']} "
                         f"({after['blocks'] / before['blocks']:.1%}); KLD vs unpruned {kld['kld_mean']:.4g}")

    # --- shared ------------------------------------------------------------------------------
    def _params(self, cm, lm) -> dict[str, int]:
        from edgemed.models.base import count_params

        counts = cm.component_params()
        return {"blocks": count_params(lm.layers), "language": counts["language"], "total": sum(counts.values()),
                "num_layers": len(lm.layers), "intermediate_size": int(lm.layers[0].mlp.down_proj.in_features)}

    def _calibration(self, ctx: "Context"):
        from edgemed.calibration.samples import calibration_set

        cm = ctx.cm
        return calibration_set(cm, ctx.recipe.calibration, "multimodal" if cm.multimodal else "text",
                               self.args.calibration_count)

    def plan_config(self, config):
        """The config of the pruned model, so `plan` counts what will be exported."""
        check_supported(config, self._what())
        config = copy.deepcopy(config)
        for tc in _text_configs(config):
            self.update_config(tc, self.planned_record(tc))
        return config

    def transform(self, ctx, lm, calib) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def planned_record(self, tc) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def update_config(self, tc, record: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class PruneDepth(_Prune):
    name = "prune-depth"
    summary = "drop whole decoder blocks of the language model by Block Influence (1 - cos(in, out))"
    Args = PruneArgs

    def planned_record(self, tc) -> dict[str, Any]:
        n = tc.num_hidden_layers
        n_drop = depth_plan(n, self.args.fraction, self._what())
        # Which blocks go is known only after calibration; for counting, any n_drop middle blocks.
        return {"kept_layers": [0, *range(n_drop + 1, n)], "num_layers_before": n}

    def transform(self, ctx, lm, calib) -> dict[str, Any]:
        import torch

        layers = lm.layers
        n = len(layers)
        n_drop = depth_plan(n, self.args.fraction, self._what())
        influence = torch.zeros(n, dtype=torch.float64)
        counts = torch.zeros(n, dtype=torch.float64)

        def hook(i):
            def fn(mod, args, kwargs, out):
                h_in = args[0] if args else kwargs["hidden_states"]
                h_out = out[0] if isinstance(out, tuple) else out
                a = h_in.detach().reshape(-1, h_in.shape[-1]).double()
                b = h_out.detach().reshape(-1, h_out.shape[-1]).double()
                influence[i] += (1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).sum()
                counts[i] += a.shape[0]
            return fn

        handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            ctx.progress(f"prune-depth: block influence over {len(calib.samples)} calibration passes")
            tokens = run_calibration(ctx.cm, calib)
        finally:
            for h in handles:
                h.remove()
        bi = (influence / counts.clamp(min=1)).tolist()
        middle = sorted(range(1, n - 1), key=lambda i: bi[i])
        dropped = sorted(middle[:n_drop])
        keep = [i for i in range(n) if i not in dropped]
        lm.layers = torch.nn.ModuleList([layers[i] for i in keep])
        # The KV cache is indexed by layer_idx: renumber so cache slot i is block i of the pruned model.
        for new_idx, layer in enumerate(lm.layers):
            layer.self_attn.layer_idx = new_idx
        return {"kept_layers": keep, "dropped_layers": dropped, "num_layers_before": n,
                "block_influence": [round(float(v), 6) for v in bi], "calibration_tokens": tokens}

    def update_config(self, tc, record: dict[str, Any]) -> None:
        keep = record["kept_layers"]
        lt = getattr(tc, "layer_types", None)
        if lt is not None and len(lt) == record["num_layers_before"]:
            tc.layer_types = [lt[i] for i in keep]
        if getattr(tc, "max_window_layers", None) is not None:  # Qwen2: sliding from this layer on
            tc.max_window_layers = min(tc.max_window_layers, len(keep))
        tc.num_hidden_layers = len(keep)


class PruneWidth(_Prune):
    name = "prune-width"
    summary = "remove FFN channels of the language model by activation importance (Wanda-style)"
    Args = PruneWidthArgs
    streams = True  # with the weights on disk: _transform_streamed

    def stream_refusal(self, target=None) -> str | None:
        if self.args.head_fraction:
            return "head_fraction > 0 (attention head pruning) needs the whole model in memory"
        return None

    def planned_record(self, tc) -> dict[str, Any]:
        a = self.args
        rec = {"intermediate_size": width_plan(tc, a.fraction, a.of, a.multiple_of, self._what())}
        if a.head_fraction:
            rec.update(self._head_record(tc, head_plan(tc, a.head_fraction, self._what())))
        return rec

    @staticmethod
    def _head_record(tc, kv_keep: int) -> dict[str, Any]:
        kv = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
        group = tc.num_attention_heads // kv
        return {"num_key_value_heads": kv_keep, "num_attention_heads": kv_keep * group,
                "head_dim": getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads,
                "num_key_value_heads_before": kv}

    def transform(self, ctx, lm, calib) -> dict[str, Any]:
        a = self.args
        tc = ctx.cm.adapter.text_config(ctx.cm.config)
        new = width_plan(tc, a.fraction, a.of, a.multiple_of, self._what())
        if ctx.cm.streamed is not None:
            return self._transform_streamed(ctx, lm, new)
        mlps = [layer.mlp for layer in lm.layers]
        stats = [None] * len(mlps)

        def hook(i):
            def fn(mod, args):
                # down_proj's input is the SiLU(gate) * up product: one column per FFN channel.
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                s = (x * x).sum(0) if a.importance == "wanda" else x.abs().sum(0)
                stats[i] = s if stats[i] is None else stats[i] + s
            return fn

        handles = [m.down_proj.register_forward_pre_hook(hook(i)) for i, m in enumerate(mlps)]
        try:
            ctx.progress(f"prune-width: channel importance over {len(calib.samples)} calibration passes")
            tokens = run_calibration(ctx.cm, calib)
        finally:
            for h in handles:
                h.remove()
        old = mlps[0].down_proj.in_features
        for m, s in zip(mlps, stats):
            keep = self._keep(s, m.down_proj.weight, new)
            m.gate_proj = _slice_linear(m.gate_proj, keep, dim=0)
            m.up_proj = _slice_linear(m.up_proj, keep, dim=0)
            m.down_proj = _slice_linear(m.down_proj, keep, dim=1)
            if hasattr(m, "intermediate_size"):
                m.intermediate_size = new
        record = {"intermediate_size_before": old, "intermediate_size": new, "calibration_tokens": tokens}
        if a.head_fraction:
            record.update(self._prune_heads(ctx, lm, tc, calib))
        return record

    def _keep(self, stat, down_weight, new: int):
        """The `new` FFN channels kept, in order: by Wanda's score (the channel's activation norm x its
        down_proj column norm) or the mean absolute activation."""
        import torch

        score = stat.sqrt() * down_weight.double().norm(dim=0) if self.args.importance == "wanda" else stat
        return torch.sort(torch.topk(score, new).indices).values

    def _transform_streamed(self, ctx, lm, new: int) -> dict[str, Any]:
        """The same channels as in memory from a parent whose weights stay on disk: the importance
        comes from the sequential layer pass (calibration.sequential: each layer's statistics on the
        unpruned layers before it, as the in-memory hooks see them), and each layer's kept gate/up
        rows and down_proj columns, exact slices in the checkpoint's dtype, are written to a
        safetensors file in the artifact's scratch folder, which the streamed model then reads in
        place of the checkpoint's tensors (StreamedWeights.replace): one layer resident."""
        from safetensors.torch import save_file

        from edgemed.calibration.feeds import decoder_feeds
        from edgemed.calibration.sequential import LayerPass

        a, cm, streamed = self.args, ctx.cm, ctx.cm.streamed
        feeds = decoder_feeds(cm, ctx.recipe.calibration, a.calibration_count)
        seq = LayerPass(cm, feeds)
        ctx.progress(f"prune-width: channel importance, one layer at a time over {len(feeds)} calibration feeds")
        hidden, rest = seq.catch_layer_inputs()
        old = lm.layers[0].mlp.down_proj.in_features
        for i, layer in enumerate(lm.layers):
            acc: dict[str, Any] = {}

            def hook(mod, args, out):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                s = (x * x).sum(0) if a.importance == "wanda" else x.abs().sum(0)
                acc["s"] = s if "s" not in acc else acc["s"] + s

            m = layer.mlp
            hidden, _ = seq.run_layer(i, hidden, rest[i], [m.down_proj], hook)
            keep = self._keep(acc["s"], streamed.read(m.down_proj.weight), new)
            moves = [(lin, name, p, dim) for lin, dim in ((m.gate_proj, 0), (m.up_proj, 0), (m.down_proj, 1))
                     for name, p in lin._parameters.items() if p is not None and (p.dim() == 2 or dim == 0)]
            out = {f"{self.name}.{streamed.keys[id(p)]}":
                   streamed.tensors.get(streamed.keys[id(p)], stored=True).index_select(dim, keep).contiguous()
                   for _, _, p, dim in moves}
            file = ctx.scratch() / f"{self.name}-layer{i}.safetensors"
            save_file(out, str(file))
            streamed.tensors.add(file)
            for (lin, name, p, dim), key in zip(moves, out):
                streamed.replace(lin, name, key)
            m.gate_proj.out_features = m.up_proj.out_features = m.down_proj.in_features = new
            if hasattr(m, "intermediate_size"):
                m.intermediate_size = new
        tokens = int(sum(f["attention_mask"].sum() for f in feeds))
        return {"intermediate_size_before": old, "intermediate_size": new, "calibration_tokens": tokens}

    def _prune_heads(self, ctx, lm, tc, calib) -> dict[str, Any]:
        """Remove whole KV groups: q rows of the group's query heads, the k/v rows of its key/value
        head, o_proj's columns. The ratio of query to key/value heads stays, so GQA is unchanged."""
        import torch

        kv_keep = head_plan(tc, self.args.head_fraction, self._what())
        rec = self._head_record(tc, kv_keep)
        kv, hd = rec["num_key_value_heads_before"], rec["head_dim"]
        group = tc.num_attention_heads // kv
        attns = [layer.self_attn for layer in lm.layers]
        stats = [None] * len(attns)

        def hook(i):
            def fn(mod, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                stats[i] = (x * x).sum(0) if stats[i] is None else stats[i] + (x * x).sum(0)
            return fn

        handles = [att.o_proj.register_forward_pre_hook(hook(i)) for i, att in enumerate(attns)]
        try:
            ctx.progress(f"prune-width: attention head importance over {len(calib.samples)} calibration passes")
            run_calibration(ctx.cm, calib)
        finally:
            for h in handles:
                h.remove()
        kept_groups = []
        for att, st in zip(attns, stats):
            score = (st.sqrt() * att.o_proj.weight.double().norm(dim=0)).reshape(kv, group * hd).sum(1)
            keep_g = torch.sort(torch.topk(score, kv_keep).indices).values
            q_rows = torch.cat([torch.arange(g * group * hd, (g + 1) * group * hd) for g in keep_g.tolist()])
            kv_rows = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in keep_g.tolist()])
            att.q_proj = _slice_linear(att.q_proj, q_rows, dim=0)
            att.k_proj = _slice_linear(att.k_proj, kv_rows, dim=0)
            att.v_proj = _slice_linear(att.v_proj, kv_rows, dim=0)
            att.o_proj = _slice_linear(att.o_proj, q_rows, dim=1)
            for name, value in (("num_heads", rec["num_attention_heads"]), ("num_key_value_heads", kv_keep)):
                if hasattr(att, name):
                    setattr(att, name, value)
            kept_groups.append(keep_g.tolist())
        ctx.cm.text.num_kv_heads = kv_keep
        ctx.cm.text.head_dim = hd
        return {**rec, "kept_kv_groups": kept_groups}

    def update_config(self, tc, record: dict[str, Any]) -> None:
        tc.intermediate_size = record["intermediate_size"]
        if "num_key_value_heads" in record:
            tc.head_dim = record["head_dim"]  # explicit now: hidden_size != heads * head_dim
            tc.num_attention_heads = record["num_attention_heads"]
            tc.num_key_value_heads = record["num_key_value_heads"]


def _slice_linear(lin, keep, dim: int):
    """A new Linear holding only the kept output rows (dim 0) or input columns (dim 1)."""
    import torch

    w = lin.weight.data.index_select(dim, keep).clone()
    out = torch.nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, dtype=w.dtype, device=w.device)
    out.weight.data.copy_(w)
    if lin.bias is not None:
        out.bias.data.copy_(lin.bias.data if dim == 1 else lin.bias.data.index_select(0, keep))
    return out
