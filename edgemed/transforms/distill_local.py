"""The distill step with the weights on disk (`compress --low-memory`): layer-local recovery.

End-to-end logit distillation (distill.py) trains every decoder block at once: gradients and AdamW
moments for the whole student (12 bytes a parameter), which grows with the model. With the weights
left on disk the recovery is local instead, one decoder layer at a time, as the pruning literature's
reconstruction steps are (SparseGPT's and ZipLM's layer-wise reconstruction, FLAP's compensation):
each width-pruned FFN's down projection is refit by least squares so that, on the teacher's own
inputs over the calibration set, the student's FFN reproduces the teacher's FFN output (less its
down_proj bias), every calibration position a row H (the student's kept channel activations,
down_proj's input) -> Y. The fit is ridge regression towards the pruned weights W0,

    W^T = W0^T + (H^T H + lam I)^-1 (H^T Y - H^T H W0^T),

lam chosen by 2-fold cross-validation over the calibration feeds and the fit kept only where it
beats W0 on the held-out fold: a layer has as many unknowns per output as kept channels (3,840 for
the TinyLlama shape), more than a small calibration set has positions, and a plain least-squares
fit would then reproduce the calibration set exactly and generalise to nothing. The step's `steps`,
`lr`, `batch`, `temperature` and `train` do not apply and are recorded as such. One layer of the
teacher and the student is resident, with H^T H (intermediate^2) and H^T Y (intermediate x hidden)
of each fold in float64. The refit weights go to the artifact's scratch folder (fp32) and the
streamed student reads them in place of its own (StreamedWeights.replace), so the export and
parity see the recovered model. The manifest records each layer's chosen lam and its relative
error before and after, held out and on all rows; the KLD before/after on the parity prompts is
in-sample for the default calibration set (its first turns are the parity prompts).

What it recovers is what a layer can on its own: errors that only a change across layers corrects
are end-to-end KD's. Only width pruning (prune-width: the same blocks, narrower FFNs) is recovered
this way; other transforms (depth pruning, MoE) are refused with --low-memory by the planner.
"""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from edgemed.errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.context import Context

# The ridge strengths the refit chooses among by cross-validation, as fractions of H^T H's mean
# diagonal (GPTQ damps by 0.01 of it); also what keeps a channel that never fires solvable.
RIDGE = (0.01, 0.1, 1.0, 10.0)
# The model-stage steps whose result this recovers (plan.streaming_refusal checks the recipe).
RECOVERS = ("prune-width",)


def host_bytes(shape) -> int:
    """What the local recovery holds (plan.host_estimate with --low-memory): one layer's H^T H and
    H^T Y of each fold in float64, their sum, and a solve's matrix, factor and result (`shape`: the
    pruned model's)."""
    h = shape.facts.hidden_size
    k = max([h, *(p // h for name, p in shape.linears.items() if name.endswith("down_proj"))])
    return 8 * (6 * k * k + 4 * k * h)


def recover(step, ctx: "Context") -> None:
    """The distill step with the weights on disk: every pruned FFN's down projection refit against
    the teacher (see the module doc), and the record distill writes."""
    from edgemed.reference.metrics import compare_logits
    from edgemed.reference.parent import parity_prompt_logits

    a, cm = step.args, ctx.cm
    teacher = dataclasses.replace(cm, model=ctx.teacher, streamed=ctx.teacher_weights)
    t0 = time.perf_counter()
    ref = np.concatenate(parity_prompt_logits(teacher))
    before = compare_logits(ref, np.concatenate(parity_prompt_logits(cm)))
    record: dict[str, Any] = {}
    fits = refit_ffns(step, ctx, record)
    after = compare_logits(ref, np.concatenate(parity_prompt_logits(cm)))
    ctx.runtime["distill"] = {
        "args": a.model_dump(mode="json"), "teacher": "the loaded model before the recipe's transforms",
        "method": "layer-local least squares (--low-memory): each FFN's down_proj refit to the teacher's FFN "
                  "output on the teacher's inputs; steps, lr, batch, temperature and train do not apply",
        "ridge": list(RIDGE), "layers": fits, "seconds": round(time.perf_counter() - t0, 1),
        "kld_vs_parent_before": before, "kld_vs_parent_after": after, "calibration": record,
    }
    ctx.notes.append(f"distill (--low-memory, layer-local least squares): KLD vs the untransformed parent "
                     f"{before['kld_mean']:.4g} -> {after['kld_mean']:.4g}")
    ctx.teacher = ctx.teacher_weights = None


def refit_ffns(step, ctx: "Context", record: dict | None = None, sequences=None) -> list[dict]:
    """Refit each of the student's (ctx.cm) FFN down projections by least squares to the teacher's
    (ctx.teacher) FFN output on the teacher's inputs, one decoder layer at a time over the step's
    calibration set, or over `sequences` (token ids: the parent's own answers that distill then
    trains on; a VLM's calibration turns, with their images, join them); a streamed student reads the
    refit weights from the artifact's scratch folder, an in-memory one has them copied in. Returns
    each layer's relative squared error before and after."""
    import contextlib

    import torch
    from safetensors.torch import save_file

    from edgemed.calibration.feeds import decoder_feeds, token_feeds
    from edgemed.calibration.sequential import LayerPass

    cm, streamed = ctx.cm, ctx.cm.streamed
    teacher = dataclasses.replace(cm, model=ctx.teacher, streamed=ctx.teacher_weights)
    students = cm.adapter.language_model(cm.model).layers
    if sequences is None:
        feeds = decoder_feeds(teacher, ctx.recipe.calibration, step.args.calibration_count, record)
    else:
        feeds = token_feeds(teacher, sequences)
        if cm.multimodal:
            feeds += decoder_feeds(teacher, ctx.recipe.calibration, step.args.calibration_count, record)
    seq = LayerPass(teacher, feeds)
    if len(seq.layers()) != len(students):
        raise BadInputError(f"step {step.name}", "refits width-pruned FFNs only (the student "
                            f"has {len(students)} layers, the teacher {len(seq.layers())})",
                            "compress without --low-memory to distill end to end, without refit")
    ctx.progress(f"distill: each FFN's down projection refit by least squares, one layer at a time over "
                 f"{len(feeds)} {'calibration feeds' if sequences is None else 'sequences'}")
    hidden, rest = seq.catch_layer_inputs()
    fits = []
    for i, (t_layer, s_layer) in enumerate(zip(seq.layers(), students)):
        t_mlp, s_mlp = t_layer.mlp, s_layer.mlp
        if not all(hasattr(m, n) for m in (t_mlp, s_mlp) for n in ("gate_proj", "up_proj", "down_proj")):
            raise BadInputError(f"step {step.name}", f"refits gated FFNs only (layer {i}: {type(s_mlp).__name__})",
                                "compress without --low-memory to distill end to end, without refit")
        acc: dict[str, Any] = {}

        def catch_h(mod, args, out):
            acc["h"] = args[0].detach().reshape(-1, args[0].shape[-1]).double()

        def teacher_ffn(mod, args, out):  # the student's FFN on the teacher's input to this one
            s_mlp(args[0])
            h, y = acc.pop("h"), out.detach().reshape(-1, out.shape[-1]).double()
            if t_mlp.down_proj.bias is not None:
                y = y - t_mlp.down_proj.bias.detach().double()
            fold = acc.setdefault("calls", 0) % 2  # feeds alternate between two folds
            acc["calls"] += 1
            for name, v in (("hh", h.T @ h), ("hy", h.T @ y), ("yy", float((y * y).sum()))):
                acc.setdefault(name, [0, 0])[fold] += v

        handle = s_mlp.down_proj.register_forward_hook(catch_h)
        try:
            with (streamed.hold(s_mlp) if streamed is not None else contextlib.nullcontext()), torch.no_grad():
                hidden, _ = seq.run_layer(i, hidden, rest[i], [t_mlp], teacher_ffn)
        finally:
            handle.remove()
        old = (streamed.read(s_mlp.down_proj.weight) if streamed is not None else s_mlp.down_proj.weight.detach()).double()
        fit = _fit(acc["hh"], acc["hy"], acc["yy"], old)
        fits.append({"layer": i, **{k: v for k, v in fit.items() if k != "w"}})
        w = fit["w"].float().contiguous()
        if streamed is None:
            with torch.no_grad():
                s_mlp.down_proj.weight.copy_(w)
            continue
        key = f"{step.name}.{streamed.keys[id(s_mlp.down_proj.weight)]}"
        file = ctx.scratch() / f"{step.name}-layer{i}.safetensors"
        save_file({key: w}, str(file))
        streamed.tensors.add(file)
        streamed.replace(s_mlp.down_proj, "weight", key)
    return fits


def _fit(hh: list, hy: list, yy: list, w0) -> dict:
    """The refit of one down projection from the sums of two folds of the calibration feeds: ridge
    towards the pruned weights w0 [hidden, k] (a weak fit stays near them, not near zero),
    W^T = W0^T + (H^T H + lam I)^-1 (H^T Y - H^T H W0^T), lam chosen among RIDGE x the mean diagonal
    by 2-fold cross-validation (fit on one fold, squared error on the other), kept only where it beats
    w0 on held-out rows: with fewer calibration rows than kept channels an unregularised fit would
    reproduce the calibration set exactly and nothing else. Returns w, lam and the relative errors
    (|H W^T - Y|^2 / |Y|^2) of w0 and of the chosen fit, held out and on all rows."""
    import torch

    def solve(h, r, lam):
        a = h.clone()
        a.diagonal().add_(lam)
        factor = torch.linalg.cholesky(a)
        del a
        return torch.cholesky_solve(r, factor)

    def refit(h, y, lam):
        return w0 + solve(h, y - h @ w0.T, lam).T

    if not isinstance(hh[1], torch.Tensor):  # one calibration feed: no held-out fold to choose or check a fit on
        e = round(_relative_error(hh[0], hy[0], yy[0], w0), 6)
        return {"w": w0, "ridge": None, "heldout_error_before": None, "heldout_error_after": None,
                "relative_error_before": e, "relative_error_after": e}
    scale = float(sum(x.diagonal().mean() for x in hh)) / 2 or 1e-8
    held = {None: sum(_relative_error(hh[1 - f], hy[1 - f], yy[1 - f], w0) for f in (0, 1)) / 2}
    for r in RIDGE:
        held[r] = sum(_relative_error(hh[1 - f], hy[1 - f], yy[1 - f], refit(hh[f], hy[f], r * scale))
                      for f in (0, 1)) / 2
    best = min(held, key=lambda r: (held[r], r is not None))
    h_all, y_all, yy_all = hh[0].add_(hh[1]), hy[0].add_(hy[1]), yy[0] + yy[1]  # the folds are done with
    hh[1] = hy[1] = None
    w = w0 if best is None else refit(h_all, y_all, best * scale)
    return {"w": w, "ridge": best, "heldout_error_before": round(held[None], 6), "heldout_error_after": round(held[best], 6),
            "relative_error_before": round(_relative_error(h_all, y_all, yy_all, w0), 6),
            "relative_error_after": round(_relative_error(h_all, y_all, yy_all, w), 6)}


def _relative_error(hh, hy, yy: float, w) -> float:
    """|H W^T - Y|^2 / |Y|^2 over the calibration rows, from the sums: tr(W HH W^T) - 2 tr(W HY) + |Y|^2."""
    return float((w @ hh * w).sum() - 2 * (w * hy.T).sum() + yy) / max(yy, 1e-30)
