"""prune-sparse: unstructured or 2:4 sparsity by magnitude or Wanda (|W| x input-norm), distilled with
the zeros fixed. No speedup on CPU runtimes (dense shapes); 2:4 is for TensorRT's sparse kernels
(SPARSE_WEIGHTS)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from edgemed.errors import BadInputError
from edgemed.steps import Step, StepArgs
from edgemed.transforms.prune import check_supported

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.context import Context


class PruneSparseArgs(StepArgs):
    method: Literal["magnitude", "wanda"] = "wanda"
    # unstructured: the fraction of each matrix's weights set to zero, (0, 1) exclusive;
    # "2:4": two of every four consecutive input weights per output row (50%, NVIDIA's pattern).
    sparsity: float | None = Field(None, gt=0, lt=1)
    pattern: Literal["unstructured", "2:4"] = "unstructured"
    calibration_count: int = Field(16, ge=1, le=4096)

    @model_validator(mode="after")
    def _one_of(self):
        if self.pattern == "unstructured" and self.sparsity is None:
            raise ValueError("unstructured pruning needs `sparsity` in (0, 1), e.g. 0.5")
        if self.pattern == "2:4" and self.sparsity not in (None, 0.5):
            raise ValueError("the 2:4 pattern is 50% sparse by definition: leave `sparsity` out")
        return self


def sparsity_mask(w, score, pattern: str, sparsity: float | None):
    """Boolean keep-mask for one [out, in] matrix. Scores are compared within each output row
    (Wanda's per-output comparison group; magnitude uses the same groups), or within each group
    of 4 consecutive inputs for 2:4."""
    import torch

    out, inp = w.shape
    if pattern == "2:4":
        if inp % 4:
            raise BadInputError("prune-sparse pattern=2:4", f"a matrix has {inp} inputs, not a multiple of 4",
                                "use the unstructured pattern for this model")
        g = score.reshape(out, inp // 4, 4)
        top = g.topk(2, dim=-1).indices
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, top, True)
        return keep.reshape(out, inp)
    k = int(round(inp * (1.0 - sparsity)))
    top = score.topk(max(k, 1), dim=1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, top, True)


class PruneSparse(Step):
    """Zero weights of the language model's linear layers: magnitude (|W|) or Wanda
    (|W| * ||x_j||_2 from calibration activations; Sun et al. 2023), unstructured or 2:4.

    The matrices keep their dense shapes: ONNX Runtime and llama.cpp on CPU read and multiply the
    same bytes, so this makes nothing faster there (said in the manifest). 2:4 is the pattern
    NVIDIA's sparse tensor cores run (Ampere and later, so Jetson Orin); a TensorRT artifact built
    from it gets the SPARSE_WEIGHTS builder flag."""

    name = "prune-sparse"
    stage = "model"
    summary = "unstructured or 2:4 sparsity in the language model (magnitude or Wanda); no CPU speedup"
    Args = PruneSparseArgs

    def run(self, ctx: "Context") -> None:
        import torch

        from edgemed.reference.parent import parity_prompt_logits
        from edgemed.reference.metrics import compare_logits
        from edgemed.reference.parity import run_calibration

        a = self.args
        cm = ctx.cm
        what = f"step {self.name} method={a.method} pattern={a.pattern}"
        check_supported(cm.config, what)
        lm = cm.adapter.language_model(cm.model)
        linears = [(f"layers.{i}.{n}", m) for i, layer in enumerate(lm.layers) for n, m in layer.named_modules()
                   if isinstance(m, torch.nn.Linear)]
        ref = parity_prompt_logits(cm)
        norms: dict[str, Any] = {}
        calib_rec = None
        if a.method == "wanda":
            from edgemed.calibration.samples import calibration_set

            calib = calibration_set(cm, ctx.recipe.calibration, "multimodal" if cm.multimodal else "text",
                                    a.calibration_count)
            calib_rec = calib.record()

            def hook(name):
                def fn(mod, args):
                    x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                    s = (x * x).sum(0)
                    norms[name] = s if name not in norms else norms[name] + s
                return fn

            handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears]
            try:
                ctx.progress(f"prune-sparse: input norms over {len(calib.samples)} calibration passes")
                with torch.no_grad():
                    run_calibration(cm, calib)
            finally:
                for h in handles:
                    h.remove()
        zeros = total = 0
        with torch.no_grad():
            for name, m in linears:
                w = m.weight.data
                score = w.abs().double()
                if a.method == "wanda":
                    score = score * norms[name].sqrt()[None, :]
                keep = sparsity_mask(w, score, a.pattern, a.sparsity)
                w.mul_(keep.to(w.dtype))
                zeros += int((~keep).sum())
                total += keep.numel()
        kld = compare_logits(np.concatenate(ref), np.concatenate(parity_prompt_logits(cm)))
        ctx.runtime["sparsity"] = {
            "args": a.model_dump(mode="json"), "pattern": a.pattern, "method": a.method,
            "zero_fraction": zeros / total, "matrices": len(linears), "kld_vs_dense": kld,
            "calibration": calib_rec,
            "speedup_note": "the matrices keep their dense shapes: ONNX Runtime and llama.cpp on CPU read and "
                            "multiply the same bytes, so decode speed does not change there"
                            + ("; TensorRT on Ampere+ GPUs (Jetson Orin) can use 2:4 sparse kernels"
                               if a.pattern == "2:4" else ""),
        }
        if ctx.calibration is None and calib_rec is not None:
            ctx.calibration = calib_rec
        ctx.notes.append(f"prune-sparse: {zeros / total:.1%} of the language model's linear weights zeroed "
                         f"({a.method}, {a.pattern}); no speedup on CPU runtimes; KLD vs dense {kld['kld_mean']:.4g}")
