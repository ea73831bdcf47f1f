"""MoE distillation: every dense FFN of the language model becomes a mixture of experts.

MoEfication (Zhang et al. 2022) observed that a trained dense FFN's channels fire in groups; cutting
the channels into experts along those groups and routing each token to a few experts keeps most of
the layer's output while computing a fraction of it. Med-MoE adds an always-on shared ("meta")
expert. Per decoder block, on calibration passes through the parent:

1. the FFN's channel activations a = SiLU(gate x) * up x are recorded (down_proj's input);
2. the `shared_fraction` most important channels (Wanda-style ||a_j|| * ||W_down[:, j]||) form the
   shared expert, which every token uses;
3. the other channels are split into `num_experts` equal experts by balanced k-means on their
   co-activation profiles (channels that fire on the same tokens land together);
4. a linear router is trained to imitate the dense layer: for each token, the softmax target is
   the share of the routed output each expert contributes (||W_down[:, e] a_e||), so its top-k
   experts are the ones that carried the most of that token's FFN output.

The result is a standard Qwen2-MoE decoder (Hugging Face `qwen2_moe`, llama.cpp `qwen2moe`):
softmax gating without top-k renormalisation, and a shared expert scaled by sigmoid(gate . x).
Exactness at initialisation: the shared gate starts near 0 (sigmoid ~ 0.5, so the shared expert's
down_proj is doubled) and the router logits are scaled small, so each selected expert's weight is
close to 1/E and the experts' down_proj are multiplied by E: with all experts selected the MoE
equals the dense FFN up to that small softmax spread. A `distill` step after this one (logit KD
from the dense parent) recovers what top-k routing drops.

Attention and embeddings are unchanged (Llama/Mistral/Qwen2 weights map 1:1 onto Qwen2-MoE's
attention; Llama's q/k rotate the same halves in Hugging Face's layout).
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field, model_validator

from edgemed.errors import BadInputError
from edgemed.steps import Step, StepArgs
from edgemed.reference.parent import parity_prompt_logits
from edgemed.reference.parity import run_calibration
from edgemed.transforms.prune import has_qkv_bias

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.context import Context

MAX_TOKENS_PER_LAYER = 4096  # calibration tokens kept per block for clustering and the router


class MoeArgs(StepArgs):
    num_experts: int = Field(8, ge=2, le=256)
    top_k: int = Field(2, ge=1)
    # share of the FFN's channels in the always-on shared expert
    shared_fraction: float = Field(0.125, ge=0, lt=1)
    # expert widths are multiples of this (the K of each expert's down_proj: Q8_0/Q4_0 blocks are 32)
    multiple_of: int = Field(32, ge=1, le=1024)
    calibration_count: int = Field(32, ge=1, le=4096)
    router_steps: int = Field(300, ge=1, le=100000)
    router_lr: float = Field(1e-2, gt=0)
    # std of the router logits after scaling (small: gating weights stay near 1/E, see module doc)
    router_logit_std: float = Field(0.05, gt=0)
    kmeans_iters: int = Field(15, ge=1, le=200)
    seed: int = 0

    @model_validator(mode="after")
    def _top_k_fits(self):
        if self.top_k >= self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be smaller than num_experts ({self.num_experts})")
        return self


def expert_sizes(intermediate: int, a: MoeArgs, what: str) -> tuple[int, int]:
    """(routed expert width r, shared expert width s) with E * r + s == intermediate."""
    routed = intermediate * (1.0 - a.shared_fraction)
    r = int(routed // a.num_experts // a.multiple_of) * a.multiple_of
    if r < a.multiple_of:
        raise BadInputError(
            what, f"{a.num_experts} experts do not divide the FFN: {intermediate} channels "
            f"({1 - a.shared_fraction:.0%} routed) give experts narrower than {a.multiple_of} channels",
            f"use at most {max(1, int(routed // a.multiple_of))} experts, a smaller shared_fraction, "
            "or a smaller multiple_of")
    s = intermediate - a.num_experts * r
    if s < 0:  # pragma: no cover - r is rounded down
        raise AssertionError
    return r, s


def check_supported(config, what: str) -> Any:
    from edgemed.models.base import decoders_supporting

    tc = getattr(config, "text_config", None) or config
    mt = getattr(tc, "model_type", None)
    supported = decoders_supporting("moe")
    if mt not in supported:
        raise BadInputError(what, f"MoE distillation supports language models of type "
                            f"{', '.join(supported)}, not '{mt}'",
                            "use a Llama/Mistral/Qwen2-based model (plain or LLaVA), or drop the moe recipe")
    if getattr(tc, "mlp_bias", False) or getattr(tc, "attention_bias", False) and not has_qkv_bias(tc):
        raise BadInputError(what, "the language model has MLP/attention biases Qwen2-MoE cannot hold",
                            "drop the moe recipe for this model")
    if getattr(tc, "hidden_act", "silu") != "silu":
        raise BadInputError(what, f"FFN activation '{tc.hidden_act}' is not SiLU", "drop the moe recipe")
    return tc


def moe_config(tc, a: MoeArgs, r: int, s: int):
    """The Qwen2-MoE config holding the same attention as `tc` (a Llama/Mistral/Qwen2 config)."""
    from transformers import Qwen2MoeConfig

    d = tc.to_dict()
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id",
            "pad_token_id", "rope_parameters", "rope_theta", "rope_scaling", "initializer_range", "head_dim")
    kw = {k: d[k] for k in keep if d.get(k) is not None}
    heads = tc.num_attention_heads
    if kw.get("head_dim") not in (None, tc.hidden_size // heads):
        raise BadInputError("moe", f"head_dim {kw['head_dim']} != hidden_size / heads", "drop the moe recipe")
    kw.pop("head_dim", None)
    return Qwen2MoeConfig(
        **kw, hidden_act="silu", intermediate_size=tc.intermediate_size, moe_intermediate_size=r,
        shared_expert_intermediate_size=s, num_experts=a.num_experts, num_experts_per_tok=a.top_k,
        norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=has_qkv_bias(tc),
        use_sliding_window=False, output_router_logits=False, attention_dropout=0.0,
    )


def balanced_kmeans(feats: np.ndarray, k: int, iters: int, seed: int) -> np.ndarray:
    """Cluster rows of `feats` into k clusters of exactly len/k rows (cosine similarity, greedy
    balanced assignment: the most similar (row, cluster) pairs are taken first while a cluster has
    room). Returns the cluster id per row."""
    n = feats.shape[0]
    cap = n // k
    if cap * k != n:
        raise ValueError(f"{n} rows do not split into {k} equal clusters")
    x = feats / (np.linalg.norm(feats, axis=1, keepdims=True) + 1e-12)
    rng = np.random.default_rng(seed)
    cent = x[rng.choice(n, size=k, replace=False)]
    assign = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        sim = x @ cent.T  # (n, k)
        order = np.argsort(-sim, axis=None)
        room = np.full(k, cap)
        assign[:] = -1
        left = n
        for flat in order:
            i, c = divmod(int(flat), k)
            if assign[i] >= 0 or room[c] == 0:
                continue
            assign[i] = c
            room[c] -= 1
            left -= 1
            if left == 0:
                break
        new = np.stack([x[assign == c].mean(0) for c in range(k)])
        new /= np.linalg.norm(new, axis=1, keepdims=True) + 1e-12
        if np.allclose(new, cent):
            break
        cent = new
    return assign


class MoeDistill(Step):
    name = "moe-distill"
    stage = "model"
    summary = "turn each dense FFN into a shared expert + top-k routed experts (Qwen2-MoE layout)"
    Args = MoeArgs

    def _what(self) -> str:
        a = self.args
        return f"step {self.name} num_experts={a.num_experts} top_k={a.top_k}"

    def plan_config(self, config):
        tc = check_supported(config, self._what())
        r, s = expert_sizes(tc.intermediate_size, self.args, self._what())
        new = moe_config(tc, self.args, r, s)
        if getattr(config, "text_config", None) is not None:
            config = copy.deepcopy(config)
            config.text_config = new
            return config
        return new

    def run(self, ctx: "Context") -> None:
        import torch

        from edgemed.reference.metrics import compare_logits
        from edgemed.calibration.samples import calibration_set

        a = self.args
        cm = ctx.cm
        tc = check_supported(cm.config, self._what())
        r, s = expert_sizes(tc.intermediate_size, a, self._what())
        lm = cm.adapter.language_model(cm.model)
        before = cm.component_params()
        ref = parity_prompt_logits(cm)
        calib = calibration_set(cm, ctx.recipe.calibration, "multimodal" if cm.multimodal else "text",
                                a.calibration_count)
        acts, inputs = self._record(ctx, lm, calib)
        qcfg = moe_config(tc, a, r, s)
        layers_info = []
        with torch.no_grad():
            new_lm = self._build(lm, qcfg)
            for i, (layer, new_layer) in enumerate(zip(lm.layers, new_lm.layers)):
                ctx.progress(f"moe-distill: block {i + 1}/{len(lm.layers)}: experts and router")
                layers_info.append(self._convert_block(layer.mlp, new_layer.mlp, acts[i], inputs[i], r, s, i))
        del acts, inputs
        self._install(cm, new_lm, qcfg)
        after = cm.component_params()
        got = parity_prompt_logits(cm)
        kld = compare_logits(np.concatenate(ref), np.concatenate(got))
        dense_ffn = 3 * tc.hidden_size * tc.intermediate_size
        active_ffn = 3 * tc.hidden_size * (s + a.top_k * r) + tc.hidden_size * (a.num_experts + 1)
        ctx.runtime["moe"] = {
            "args": a.model_dump(mode="json"), "architecture": qcfg.model_type, "num_experts": a.num_experts,
            "top_k": a.top_k, "expert_intermediate_size": r, "shared_expert_intermediate_size": s,
            "dense_intermediate_size": tc.intermediate_size,
            "ffn_params_per_block": {"dense": dense_ffn, "active": active_ffn,
                                     "total": 3 * tc.hidden_size * (s + a.num_experts * r)
                                     + tc.hidden_size * (a.num_experts + 1)},
            "active_ffn_ratio": active_ffn / dense_ffn,
            "params_before": before, "params_after": after,
            "router_top_k_recall": float(np.mean([li["router_top_k_recall"] for li in layers_info])),
            "blocks": layers_info, "kld_vs_dense": kld, "calibration": calib.record(),
        }
        if ctx.calibration is None:
            ctx.calibration = calib.record()
        ctx.notes.append(f"moe-distill: {a.num_experts} experts (top {a.top_k}) + shared expert per block; "
                         f"active FFN {active_ffn / dense_ffn:.1%} of dense; KLD vs dense before distillation "
                         f"{kld['kld_mean']:.4g}")

    # --- pieces -------------------------------------------------------------------------------
    def _record(self, ctx, lm, calib):
        """Per block: down_proj inputs (channel activations) and the MLP inputs, subsampled."""
        import torch

        n = len(lm.layers)
        acts: list[list] = [[] for _ in range(n)]
        inputs: list[list] = [[] for _ in range(n)]

        def hook(i):
            def fn(mod, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                inputs[i].append(x)
                acts[i].append(mod.act_fn(mod.gate_proj(x)) * mod.up_proj(x))
            return fn

        handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(lm.layers)]
        try:
            ctx.progress(f"moe-distill: FFN activations over {len(calib.samples)} calibration passes")
            with torch.no_grad():
                run_calibration(ctx.cm, calib)
        finally:
            for h in handles:
                h.remove()
        g = torch.Generator().manual_seed(self.args.seed)
        out_a, out_x = [], []
        for i in range(n):
            A, X = torch.cat(acts[i]), torch.cat(inputs[i])
            if len(A) > MAX_TOKENS_PER_LAYER:
                keep = torch.randperm(len(A), generator=g)[:MAX_TOKENS_PER_LAYER]
                A, X = A[keep], X[keep]
            out_a.append(A)
            out_x.append(X)
        return out_a, out_x

    @staticmethod
    def _build(lm, qcfg):
        """A Qwen2MoeModel with the parent's embeddings, norms and attention."""
        import torch
        from transformers import Qwen2MoeModel

        with torch.device("meta"):
            new = Qwen2MoeModel(qcfg)
        new = new.to_empty(device="cpu").float()
        new.rotary_emb = type(new.rotary_emb)(config=qcfg)  # buffers are recomputed, not loaded
        new.embed_tokens.weight.copy_(lm.embed_tokens.weight)
        new.norm.weight.copy_(lm.norm.weight)
        for old, nl in zip(lm.layers, new.layers):
            nl.input_layernorm.weight.copy_(old.input_layernorm.weight)
            nl.post_attention_layernorm.weight.copy_(old.post_attention_layernorm.weight)
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                src, dst = getattr(old.self_attn, p), getattr(nl.self_attn, p)
                dst.weight.copy_(src.weight)
                if dst.bias is not None:
                    dst.bias.copy_(src.bias if src.bias is not None else torch.zeros_like(dst.bias))
        return new

    def _convert_block(self, dense, moe, A, X, r: int, s: int, block: int) -> dict[str, Any]:
        import torch

        a = self.args
        E = a.num_experts
        Wg, Wu, Wd = dense.gate_proj.weight, dense.up_proj.weight, dense.down_proj.weight
        col = Wd.double().norm(dim=0)
        importance = A.double().norm(dim=0) * col
        order = torch.argsort(importance, descending=True)
        shared = torch.sort(order[:s]).values
        routed = torch.sort(order[s:s + E * r]).values
        # co-activation profile: |a_j| over tokens, each channel's contribution scale folded in
        prof = (A[:, routed].abs() * col[routed].float()).T.contiguous().numpy()
        assign = balanced_kmeans(prof, E, a.kmeans_iters, a.seed + block)
        groups = [routed[torch.from_numpy(np.flatnonzero(assign == e))] for e in range(E)]
        # shared expert: sigmoid(0) = 0.5 at start, so its down_proj is doubled
        moe.shared_expert.gate_proj.weight.copy_(Wg[shared])
        moe.shared_expert.up_proj.weight.copy_(Wu[shared])
        moe.shared_expert.down_proj.weight.copy_(2.0 * Wd[:, shared])
        # ... and its gate is tiny but not zero: llama.cpp computes sigmoid(x) as silu(x) / x (0/0 at 0)
        g = torch.Generator().manual_seed(self.args.seed + 7919 * (block + 1))
        moe.shared_expert_gate.weight.copy_(torch.randn(moe.shared_expert_gate.weight.shape, generator=g)
                                            * (1e-3 / Wg.shape[1] ** 0.5))
        ex = moe.experts
        for e, ch in enumerate(groups):
            ex.gate_up_proj[e].copy_(torch.cat([Wg[ch], Wu[ch]], 0))
            ex.down_proj[e].copy_(E * Wd[:, ch])  # selected weights start near 1/E
        # router target: each expert's share of the routed output, per token
        contrib = torch.stack([(A[:, ch] @ Wd[:, ch].T).norm(dim=1) for ch in groups], 1)  # (T, E)
        target = contrib / contrib.sum(1, keepdim=True).clamp(min=1e-12)
        w, recall = self._train_router(X, target, E, a.top_k)
        logits = X @ w.T
        w = w * (a.router_logit_std / float(logits.std().clamp(min=1e-12)))
        moe.gate.weight.copy_(w)
        return {"block": block, "shared_channels": int(s), "expert_channels": int(r),
                "router_top_k_recall": recall}

    def _train_router(self, X, target, E: int, k: int):
        """Softmax regression onto the experts' output shares (full batch, Adam)."""
        import torch

        a = self.args
        g = torch.Generator().manual_seed(a.seed)
        w = (torch.randn(E, X.shape[1], generator=g) * 0.01).requires_grad_(True)
        opt = torch.optim.Adam([w], lr=a.router_lr)
        Xn = X / X.norm(dim=1, keepdim=True).clamp(min=1e-6) * (X.shape[1] ** 0.5)  # scale-free for Adam
        with torch.enable_grad():
            for _ in range(a.router_steps):
                loss = -(target * torch.log_softmax(Xn @ w.T, -1)).sum(1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        w = w.detach()
        # The router sees X, not Xn: logits of X differ per token by a positive factor, so the
        # top-k of X @ w.T is the top-k of Xn @ w.T.
        true_top = target.topk(k, dim=1).indices
        got_top = (X @ w.T).topk(k, dim=1).indices
        hit = (got_top[:, :, None] == true_top[:, None, :]).any(-1).float().mean().item()
        return w, hit

    @staticmethod
    def _install(cm, new_lm, qcfg) -> None:
        """Swap the decoder in: a LLaVA keeps its wrapper (text_config replaced); a plain decoder
        becomes a Qwen2MoeForCausalLM around the same lm_head."""
        from transformers import Qwen2MoeForCausalLM

        model = cm.model
        head = cm.adapter.lm_head(model)
        tied = head.weight.data_ptr() == cm.adapter.embed_tokens(model).weight.data_ptr()
        if getattr(cm.config, "text_config", None) is not None:
            model.model.language_model = new_lm
            cm.config.text_config = qcfg
            model.config.text_config = qcfg
        else:
            import torch

            with torch.device("meta"):
                wrapper = Qwen2MoeForCausalLM(qcfg)
            wrapper.model = new_lm
            wrapper.lm_head = head
            wrapper.generation_config = model.generation_config
            wrapper.eval()
            cm.model = wrapper
            cm.config = qcfg
        if tied:
            cm.adapter.lm_head(cm.model).weight = cm.adapter.embed_tokens(cm.model).weight
        cm.text.decoder_model_type = qcfg.model_type  # exporters pick their path by it
        cm.model.eval()
