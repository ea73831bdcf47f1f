"""Recovery by distillation: logit KD from the untransformed parent after pruning or MoE distillation.

The teacher is the model as loaded, before the recipe's first model-stage step (compress keeps a
copy when the recipe has a `distill` step); the student is the pruned / MoE model. On the
calibration set (prompt + answer, the image for a VLM) the student's next-token distribution is
pulled towards the teacher's at every position: KL(teacher || student) at temperature T, the
objective Minitron and MoE upcycling recipes recover with. Full fine-tuning of the decoder blocks
(or only the FFNs / experts), AdamW, gradient accumulation over `batch` samples: CPU-feasible for
language models up to a few hundred million parameters (SmolLM2-135M: ~1.7 s per 160-token
sequence on 2 cores).

Resumable: the trainable weights, optimizer state and step are checkpointed every
`checkpoint_every` steps under EDGEMED_HOME/distill/<key>.pt (key = model source + recipe), and a
re-run of the same compress command continues from there; the checkpoint is removed when done.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
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
    # What the student trains on. calibration: the recipe's calibration set (prompt + reference answer,
    # the image for a VLM). parent: answers the parent samples to built-in task x topic prompts
    # (sequence-level KD, kd_data.py); a VLM also keeps the calibration set's image turns.
    data: Literal["calibration", "parent"] = "calibration"
    parent_samples: int = Field(256, ge=1, le=100_000)
    parent_tokens: int = Field(128, ge=8, le=4096)
    parent_temperature: float = Field(1.0, gt=0, le=10)
    parent_top_p: float = Field(0.95, gt=0, le=1)
    # The KLD-vs-steps curve, on the parent's answers to held-out topics: every `eval_every` steps (0: none).
    eval_every: int = Field(0, ge=0)
    eval_samples: int = Field(8, ge=1, le=1000)
    # Before KD, refit each width-pruned FFN's down projection by least squares to the parent's FFN
    # output, one layer at a time (distill_local.refit_ffns: what --low-memory does instead of KD), so
    # that training starts from each layer's own best fit; on the parent's answers with data: parent,
    # else on the calibration set.
    refit: bool = False


# The prompt length refit's plan counts for each sequence it fits on (distill prompts: 30-60 tokens).
REFIT_PROMPT_TOKENS = 64

# Args that do not change what a resumed run trains on: a run continues from a checkpoint written
# with other values (e.g. more steps after a curve that has not flattened).
_RESUMABLE_ACROSS = ("steps", "checkpoint_every", "eval_every", "eval_samples")


def _cache_dir():
    from edgemed._resources import cache_dir

    return cache_dir() / "distill"


class Distill(Step):
    name = "distill"
    stage = "model"
    summary = "recover a pruned / MoE model by logit distillation from the untransformed parent"
    Args = DistillArgs

    # With the weights on disk (--low-memory) the recovery is layer-local: distill_local.py.
    streams = True

    def host_bytes(self, shape, low_memory: bool = False) -> int:
        """What training adds to compress's peak RAM (plan.host_estimate): gradients and AdamW's two
        moments, fp32, for the transformed model's decoder blocks (`shape`: plan's _ModelShape;
        `train: ffn` trains fewer and is planned the same, an upper bound). Measured by
        bench_memory.py: prune-width-25 + q8_0 peaked at 3.29 / 6.25 GB where the plan says 3.62 / 6.78.
        With `refit`, what its layer pass holds besides (_refit_bytes). With `low_memory`, one layer's
        least-squares sums (distill_local.host_bytes)."""
        if low_memory:
            from edgemed.transforms.distill_local import host_bytes

            return host_bytes(shape)
        return 3 * 4 * shape.counts.get("language", 0) + self._refit_bytes(shape)

    def _refit_bytes(self, shape) -> int:
        """What refit's layer pass holds besides: every feed's embeddings and hidden states (fp32,
        hidden wide), each sequence planned at the parent's answer length plus a prompt of
        REFIT_PROMPT_TOKENS (the calibration set's turns are shorter; a VLM's join the parent's
        answers, counted for any model), and one layer's sums."""
        from edgemed.transforms.distill_local import host_bytes

        a = self.args
        if not a.refit:
            return 0
        rows = a.calibration_count + (a.parent_samples if a.data == "parent" else 0)
        positions = rows * (a.parent_tokens + REFIT_PROMPT_TOKENS)
        return 2 * 4 * shape.facts.hidden_size * positions + host_bytes(shape)

    def run(self, ctx: "Context") -> None:
        if ctx.cm.streamed is not None:
            from edgemed.transforms.distill_local import recover

            return recover(self, ctx)
        import torch
        from tqdm import tqdm

        from edgemed.reference.metrics import compare_logits
        from edgemed.calibration.samples import calibration_set
        from edgemed.reference.parent import parity_prompt_logits
        from edgemed.transforms.kd_data import heldout_kld

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
        ckpt = _cache_dir() / f"{self._key(cm, ctx)}.pt"
        samples, heldout = self._data(cm, ctx, calib)
        refit = None
        if a.refit and not ckpt.is_file():  # a resumed run's weights come from its checkpoint
            from edgemed.transforms.distill_local import refit_ffns

            # On what KD trains on: the parent's answers (some 40k positions for 256 of them) leave a
            # refit of ~1k unknowns an output far less room to fit noise than 32 calibration turns.
            seqs = [ids for ids, _ in samples[:a.parent_samples]] if a.data == "parent" else None
            refit = {"data": "calibration" if seqs is None else f"parent answers ({len(seqs)} sequences, "
                                                                 f"{sum(len(s) for s in seqs)} positions)",
                     "layers": refit_ffns(self, ctx, sequences=seqs),
                     "kld_vs_parent": compare_logits(ref, np.concatenate(parity_prompt_logits(cm)))}
        params = self._trainable(lm)
        for p in cm.model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        # Sparsity from prune-sparse stays: zeros are re-applied after every update.
        masks = ([(p, p != 0) for p in params if p.dim() == 2] if ctx.runtime.get("sparsity") else [])
        opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
        # Linear warm-up over a tenth of the steps, then cosine to 0 (python floats: the scheduler's state
        # is checkpointed and torch.load(weights_only=True) refuses numpy scalars).
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, a.steps // 10))
                                                  * 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps)))
        step, losses, curve, spent = 0, [], [], 0.0
        if ckpt.is_file():
            state = torch.load(ckpt, weights_only=True)
            with torch.no_grad():
                for p, v in zip(params, state["params"]):
                    p.copy_(v)
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            step, losses, curve = int(state["step"]), list(state["losses"]), list(state.get("curve", []))
            spent = float(state.get("seconds", 0.0))
            ctx.notes.append(f"distill: resumed from step {step} ({ckpt})")
        rng = np.random.default_rng(a.seed)
        order = [rng.permutation(len(samples)) for _ in range((a.steps * a.batch) // len(samples) + 1)]
        order = np.concatenate(order)
        t0 = time.perf_counter() - spent  # seconds count across resumed runs
        cm.model.train()
        bar = tqdm(total=a.steps, initial=step, desc="distill (KD from the parent)", disable=None)

        def point() -> None:  # one point of the KLD-vs-steps curve
            if heldout and (not curve or curve[-1]["step"] != step):
                curve.append({"step": step, "kd_loss": float(np.mean(losses[-a.eval_every:])) if losses else None,
                              "seconds": round(time.perf_counter() - t0, 1),
                              **heldout_kld(ctx.teacher, cm.model, cm, heldout)})

        try:
            if step == 0:
                point()
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
                if a.eval_every and (step % a.eval_every == 0 or step == a.steps):
                    point()
                    bar.set_postfix(kd=f"{total:.4f}", heldout_kld=f"{curve[-1]['kld_mean']:.4f}")
                if step % a.checkpoint_every == 0 and step < a.steps:
                    ckpt.parent.mkdir(parents=True, exist_ok=True)
                    tmp = ckpt.with_suffix(".tmp")
                    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict(),
                                "sched": sched.state_dict(), "step": step, "losses": losses, "curve": curve,
                                "seconds": time.perf_counter() - t0}, tmp)
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
            "refit": refit,  # with `refit`: each layer's least-squares fit and the KLD it left before KD
            "sparsity_kept": bool(masks),
            "calibration": calib.record(),
            "data": self._data_record(samples, heldout),
            # KLD against the teacher on its own answers to held-out topics, every eval_every steps
            "curve": curve,
        }
        ctx.notes.append(f"distill: {a.steps} steps; KLD vs the untransformed parent {before['kld_mean']:.4g} -> "
                         f"{after['kld_mean']:.4g}")
        ctx.teacher = ctx.teacher_weights = None  # free it: nothing after this step needs the teacher

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

    def _data(self, cm, ctx, calib) -> tuple[list, list[np.ndarray]]:
        """The training samples and the held-out sequences of the curve (none when eval_every is 0)."""
        from edgemed.transforms.kd_data import cached_sequences, distill_prompts, generate

        a = self.args
        if a.data == "calibration":
            samples = self._encode(cm, calib)
        else:
            ctx.progress(f"distill: the parent writes {a.parent_samples} answers of up to {a.parent_tokens} tokens")
            seqs = cached_sequences(_cache_dir() / f"{self._data_key(cm, 'train')}.json", lambda: generate(
                cm, ctx.teacher, distill_prompts(a.parent_samples, a.seed), a.parent_tokens, a.parent_temperature,
                a.parent_top_p, a.seed, progress=ctx.progress))
            samples = [(s, None) for s in seqs] + (self._encode(cm, calib) if cm.multimodal else [])
        heldout = []
        if a.eval_every:
            heldout = cached_sequences(_cache_dir() / f"{self._data_key(cm, 'heldout')}.json", lambda: generate(
                cm, ctx.teacher, distill_prompts(a.eval_samples, a.seed, heldout=True), a.parent_tokens,
                a.parent_temperature, a.parent_top_p, a.seed + 1))
        return samples, heldout

    def _data_record(self, samples, heldout) -> dict:
        a = self.args
        rec = {"kind": a.data, "samples": len(samples), "heldout_sequences": len(heldout),
               "heldout_positions": int(sum(len(s) for s in heldout))}
        if a.data == "parent":
            from edgemed.calibration.builtin import DISTILL_HELDOUT_TOPICS, DISTILL_TASKS, DISTILL_TOPICS

            rec.update(prompts=f"{len(DISTILL_TASKS)} tasks x {len(DISTILL_TOPICS)} topics (calibration/builtin.py), "
                               f"held out: {len(DISTILL_HELDOUT_TOPICS)} other topics",
                       sampling={"temperature": a.parent_temperature, "top_p": a.parent_top_p,
                                 "max_new_tokens": a.parent_tokens, "seed": a.seed})
        return rec

    def _data_key(self, cm, part: str) -> str:
        """The parent's answers depend on the parent and the sampling args only: recipes that distil
        the same parent (prune-width-25, moe-8x-top2) share them (kept under EDGEMED_HOME/distill; a
        changed weight file is a new key)."""
        from pathlib import Path

        a = self.args
        src = Path(str(cm.source))
        files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in src.glob("*.safetensors")) \
            if src.is_dir() else []
        blob = json.dumps({"source": str(cm.source), "files": files, "tokens": a.parent_tokens,
                           "t": a.parent_temperature, "p": a.parent_top_p, "seed": a.seed,
                           "count": a.eval_samples if part == "heldout" else a.parent_samples}, sort_keys=True)
        return f"parent-{part}-" + hashlib.sha256(blob.encode()).hexdigest()[:24]

    def _key(self, cm, ctx) -> str:
        recipe = ctx.recipe.model_dump(mode="json")
        for spec in recipe.get("steps", []):
            if spec.get("step") == self.name:
                for k in _RESUMABLE_ACROSS:
                    (spec.get("args") or {}).pop(k, None)
        blob = json.dumps({"source": str(cm.source), "recipe": recipe}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]
