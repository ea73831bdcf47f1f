"""The distill step with the weights on disk (`compress --low-memory`): layer-local recovery.

End-to-end logit distillation (distill.py) trains every decoder block at once: gradients and AdamW
moments for the whole student (12 bytes a parameter), which grows with the model. With the weights
left on disk the recovery is local instead, one decoder layer at a time, as the pruning literature's
reconstruction steps are (SparseGPT's and ZipLM's layer-wise reconstruction, FLAP's compensation):
each width-pruned FFN's down projection is refit by least squares so that, on the teacher's own
inputs over the calibration set, the student's FFN reproduces the teacher's FFN output,

    W'^T = (H^T H + damp I)^-1 H^T Y

where H holds the student's kept channel activations (down_proj's input) and Y the teacher's FFN
output (less its down_proj bias), every calibration position a row. That is the exact optimum of the
layer's own squared error, in closed form: the step's `steps`, `lr`, `batch`, `temperature` and
`train` do not apply and are recorded as such. One layer of the teacher and the student is
resident, with H^T H (intermediate^2) and H^T Y (intermediate x hidden) in float64. The refit
weights go to the artifact's scratch folder (fp32) and the streamed student reads them in place of
its own (StreamedWeights.replace), so the export and parity see the recovered model.

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

# Ridge damping of H^T H, a fraction of its mean diagonal (GPTQ's percdamp): a channel that never
# fires on the calibration set keeps a solvable system.
DAMP = 0.01
# The model-stage steps whose result this recovers (plan.streaming_refusal checks the recipe).
RECOVERS = ("prune-width",)


def host_bytes(shape) -> int:
    """What the local recovery holds (plan.host_estimate with --low-memory): one layer's H^T H and
    H^T Y in float64, and the solve's copies of each (`shape`: the pruned model's)."""
    h = shape.facts.hidden_size
    k = max([h, *(p // h for name, p in shape.linears.items() if name.endswith("down_proj"))])
    return 2 * 8 * (k * k + k * h)


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
        "damp": DAMP, "layers": fits, "seconds": round(time.perf_counter() - t0, 1),
        "kld_vs_parent_before": before, "kld_vs_parent_after": after, "calibration": record,
    }
    ctx.notes.append(f"distill (--low-memory, layer-local least squares): KLD vs the untransformed parent "
                     f"{before['kld_mean']:.4g} -> {after['kld_mean']:.4g}")
    ctx.teacher = ctx.teacher_weights = None


def refit_ffns(step, ctx: "Context", record: dict | None = None) -> list[dict]:
    """Refit each of the student's (ctx.cm) FFN down projections by least squares to the teacher's
    (ctx.teacher) FFN output on the teacher's inputs, one decoder layer at a time over the step's
    calibration set; a streamed student reads the refit weights from the artifact's scratch folder,
    an in-memory one has them copied in. Returns each layer's relative squared error before and after."""
    import contextlib

    import torch
    from safetensors.torch import save_file

    from edgemed.calibration.feeds import decoder_feeds
    from edgemed.calibration.sequential import LayerPass

    cm, streamed = ctx.cm, ctx.cm.streamed
    teacher = dataclasses.replace(cm, model=ctx.teacher, streamed=ctx.teacher_weights)
    students = cm.adapter.language_model(cm.model).layers
    feeds = decoder_feeds(teacher, ctx.recipe.calibration, step.args.calibration_count, record)
    seq = LayerPass(teacher, feeds)
    if len(seq.layers()) != len(students):
        raise BadInputError(f"step {step.name}", "refits width-pruned FFNs only (the student "
                            f"has {len(students)} layers, the teacher {len(seq.layers())})",
                            "compress without --low-memory to distill end to end, without refit")
    ctx.progress(f"distill: each FFN's down projection refit by least squares, one layer at a time over "
                 f"{len(feeds)} calibration feeds")
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
            acc["hh"] = acc.get("hh", 0) + h.T @ h
            acc["hy"] = acc.get("hy", 0) + h.T @ y
            acc["yy"] = acc.get("yy", 0) + float((y * y).sum())

        handle = s_mlp.down_proj.register_forward_hook(catch_h)
        try:
            with (streamed.hold(s_mlp) if streamed is not None else contextlib.nullcontext()), torch.no_grad():
                hidden, _ = seq.run_layer(i, hidden, rest[i], [t_mlp], teacher_ffn)
        finally:
            handle.remove()
        hh, hy = acc["hh"], acc["hy"]
        damp = DAMP * float(hh.diagonal().mean()) or 1e-8
        w = torch.linalg.solve(hh + damp * torch.eye(hh.shape[0], dtype=hh.dtype), hy).T.float().contiguous()
        old = streamed.read(s_mlp.down_proj.weight) if streamed is not None else s_mlp.down_proj.weight.detach()
        fits.append({"layer": i, **{f"relative_error_{when}": _relative_error(hh, hy, acc["yy"], m.double())
                                    for when, m in (("before", old), ("after", w))}})
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


def _relative_error(hh, hy, yy: float, w) -> float:
    """|H W^T - Y|^2 / |Y|^2 over the calibration rows, from the sums: tr(W HH W^T) - 2 tr(W HY) + |Y|^2."""
    return round(float((w @ hh * w).sum() - 2 * (w * hy.T).sum() + yy) / max(yy, 1e-30), 6)
