"""Recovery by distillation: logit KD from the untransformed parent after pruning or MoE distillation.

The teacher is the model as loaded, before the recipe's first model-stage step (compress keeps a
copy when the recipe has a `distill` step); the student is the pruned / MoE model. On the
calibration set (prompt + answer, the image for a VLM) the student's next-token distribution is
pulled towards the teacher's at every position: KL(teacher || student) at temperature T, the
objective Minitron and MoE upcycling recipes recover with. Full fine-tuning of the decoder blocks
(or only the FFNs / experts), AdamW, gradient accumulation over `batch` samples: CPU-feasible for
language models up to a few hundred million parameters (SmolLM2-135M: ~1 s per sample on 2 cores).

Resumable: the trainable weights, optimizer state and step are checkpointed every
`checkpoint_every` steps under EDGEMED_HOME/distill/<key>.pt (key = model source + recipe), and a
re-run of the same compress command continues from there; the checkpoint is removed when done.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from edgemed.errors import BadInputError
from edgemed.steps import Step, StepArgs

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.context import Context

# Refused above this many language-model parameters: hours per hundred steps on a CPU.
MAX_STUDENT_PARAMS = 2_000_000_000


class DistillArgs(StepArgs):
    steps: int = Field(100, ge=1, le=1_000_000)
    lr: float = Field(5e-5, gt=0, lt=1)
    batch: int = Field(4, ge=1, le=1024)  # samples per optimizer step (gradient accumulation)
    calibration_count: int = Field(64, ge=1, le=100_000)
    temperature: float = Field(1.0, gt=0, le=100)
    # blocks: every decoder block (attention, FFN, norms); ffn: only the FFNs / experts and router
    train: Literal["blocks", "ffn"] = "blocks"
    checkpoint_every: int = Field(25, ge=1)
    seed: int = 0


def _cache_dir():
    from edgemed._resources import cache_dir

    return cache_dir() / "distill"


class Distill(Step):
    name = "distill"
    stage = "model"
    summary = "recover a pruned / MoE model by logit distillation from the untransformed parent"
    Args = DistillArgs

    def host_bytes(self, shape) -> int:
        """What training adds to compress's peak RAM (plan.host_estimate): gradients and AdamW's two
        moments, fp32, for the transformed model's decoder blocks (`shape`: plan's _ModelShape;
        `train: ffn` trains fewer and is planned the same, an upper bound). Measured by
        bench_memory.py: prune-width-25 + q8_0 peaked at 3.29 / 6.25 GB where the plan says 3.62 / 6.78."""
        return 3 * 4 * shape.counts.get("language", 0)

    def run(self, ctx: "Context") -> None:
        import torch
        from tqdm import tqdm

        from edgemed.reference.metrics import compare_logits
        from edgemed.calibration.samples import calibration_set
        from edgemed.reference.parent import parity_prompt_logits

        a = self.args
        cm = ctx.cm
        if ctx.teacher is None:
            raise BadInputError(f"step {self.name}", "has no transform step before it to recover from",
                                "put distill after a prune-* or moe-distill step in the recipe")
        lm = cm.adapter.language_model(cm.model)
        n_params = sum(p.numel() for p in lm.parameters())
        if n_params > MAX_STUDENT_PARAMS:
            raise BadInputError(f"step {self.name}", f"the language model has {n_params / 1e9:.1f}B parameters; "
                                "logit distillation here runs on the CPU", "distill on a GPU machine, or drop the step")
        teacher_cm = dataclasses.replace(cm, model=ctx.teacher)
        ref = np.concatenate(parity_prompt_logits(teacher_cm))
        before = compare_logits(ref, np.concatenate(parity_prompt_logits(cm)))
        calib = calibration_set(cm, ctx.recipe.calibration, "multimodal" if cm.multimodal else "text",
                                a.calibration_count)
        samples = self._encode(cm, calib)
        params = self._trainable(lm)
        for p in cm.model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        # Sparsity from prune-sparse stays: zeros are re-applied after every update.
        masks = ([(p, p != 0) for p in params if p.dim() == 2] if ctx.runtime.get("sparsity") else [])
        opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / max(1, a.steps // 10)) * 0.5 * (1 + np.cos(np.pi * s / a.steps)))
        ckpt = _cache_dir() / f"{self._key(cm, ctx)}.pt"
        step, losses = 0, []
        if ckpt.is_file():
            state = torch.load(ckpt, weights_only=True)
            with torch.no_grad():
                for p, v in zip(params, state["params"]):
                    p.copy_(v)
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            step, losses = int(state["step"]), list(state["losses"])
            ctx.notes.append(f"distill: resumed from step {step} ({ckpt})")
        rng = np.random.default_rng(a.seed)
        order = [rng.permutation(len(samples)) for _ in range((a.steps * a.batch) // len(samples) + 1)]
        order = np.concatenate(order)
        t0 = time.perf_counter()
        cm.model.train()
        bar = tqdm(total=a.steps, initial=step, desc="distill (KD from the parent)", disable=None)
        try:
            while step < a.steps:
                opt.zero_grad(set_to_none=True)
                total = 0.0
                for j in order[step * a.batch:(step + 1) * a.batch]:
                    loss = self._kd_loss(cm, ctx.teacher, samples[int(j)], a.temperature) / a.batch
                    loss.backward()
                    total += loss.item()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                with torch.no_grad():
                    for p, keep in masks:
                        p.mul_(keep)
                step += 1
                losses.append(total)
                bar.update(1)
                bar.set_postfix(kd=f"{total:.4f}")
                if step % a.checkpoint_every == 0 and step < a.steps:
                    ckpt.parent.mkdir(parents=True, exist_ok=True)
                    tmp = ckpt.with_suffix(".tmp")
                    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict(),
                                "sched": sched.state_dict(), "step": step, "losses": losses}, tmp)
                    os.replace(tmp, ckpt)
        finally:
            bar.close()
            cm.model.eval()
            for p in params:
                p.requires_grad_(False)
        after = compare_logits(ref, np.concatenate(parity_prompt_logits(cm)))
        ckpt.unlink(missing_ok=True)
        ctx.runtime["distill"] = {
            "args": a.model_dump(mode="json"), "teacher": "the loaded model before the recipe's transforms",
            "trainable_params": int(sum(p.numel() for p in params)), "samples": len(samples),
            "tokens_per_epoch": int(sum(len(s[0]) for s in samples)),
            "kd_loss_first": losses[0] if losses else None,
            "kd_loss_last_10": float(np.mean(losses[-10:])) if losses else None,
            "seconds": round(time.perf_counter() - t0, 1),
            # On the parity prompts, every position, against the teacher (the untransformed model).
            "kld_vs_parent_before": before, "kld_vs_parent_after": after,
            "sparsity_kept": bool(masks),
            "calibration": calib.record(),
        }
        ctx.notes.append(f"distill: {a.steps} steps; KLD vs the untransformed parent {before['kld_mean']:.4g} -> "
                         f"{after['kld_mean']:.4g}")
        ctx.teacher = None  # free it: nothing after this step needs the teacher

    # --- pieces -------------------------------------------------------------------------------
    def _trainable(self, lm) -> list:
        if self.args.train == "ffn":
            return [p for layer in lm.layers for p in layer.mlp.parameters()]
        return [p for p in lm.layers.parameters()]

    @staticmethod
    def _encode(cm, calib) -> list[tuple[np.ndarray, np.ndarray | None]]:
        from edgemed.runtime.preprocess import tiles

        out = []
        for prompt, answer, image in calib.samples:
            pv, rows, cols = tiles(image, cm.image.to_dict()) if image is not None else (None, 0, 0)
            out.append((cm.prompt_ids(prompt, image is not None, answer, grid=(rows, cols)), pv))
        return out

    @staticmethod
    def _kd_loss(cm, teacher, sample, temperature: float):
        import torch

        from edgemed.reference.parity import parent_inputs

        kw = parent_inputs(cm, *sample)
        with torch.no_grad():
            t_logits = teacher(**kw).logits[0].float() / temperature
        s_logits = cm.model(**kw).logits[0].float() / temperature
        t_logp = torch.log_softmax(t_logits, -1)
        s_logp = torch.log_softmax(s_logits, -1)
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean() * temperature ** 2

    def _key(self, cm, ctx) -> str:
        blob = json.dumps({"source": str(cm.source), "recipe": ctx.recipe.model_dump(mode="json")}, sort_keys=True,
                          default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]
