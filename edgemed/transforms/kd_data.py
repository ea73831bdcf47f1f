"""Sequence-level distillation data: text the parent itself writes (distill `data: parent`).

Recovering a pruned / MoE student needs text the teacher is confident on, and no corpus can be
downloaded here. Sequence-level KD (Kim & Rush 2016; the MiniLLM / DistiLLM line) samples the
teacher's own answers to a diverse prompt set and trains the student to match the teacher's
distribution at every position of those sequences. The prompts are task x topic crossings
(calibration/builtin.py); held-out topics give the KLD-vs-steps curve text the student never trains
on. Sampling (temperature, top-p) is seeded; the sequences are cached beside the distill checkpoint
so a resumed run trains on the same data.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def distill_prompts(n: int, seed: int, heldout: bool = False) -> list[str]:
    """`n` prompts: task x topic pairs in a seeded order (training topics, or the held-out ones)."""
    from edgemed.calibration.builtin import DISTILL_HELDOUT_TOPICS, DISTILL_TASKS, DISTILL_TOPICS

    topics = DISTILL_HELDOUT_TOPICS if heldout else DISTILL_TOPICS
    pairs = [task.format(t=topic) for task in DISTILL_TASKS for topic in topics]
    rng = np.random.default_rng(seed + (7919 if heldout else 0))
    order = np.concatenate([rng.permutation(len(pairs)) for _ in range(n // len(pairs) + 1)])[:n]
    return [pairs[int(i)] for i in order]


def generate(cm, teacher, prompts: list[str], max_new_tokens: int, temperature: float, top_p: float, seed: int,
             batch: int = 16, progress=None) -> list[np.ndarray]:
    """The teacher's sampled answers: prompt ids + generated ids (up to and including its EOS), one
    array per prompt. Batched with left padding (transformers' generate)."""
    import torch

    eos = list(cm.text.eos_token_ids) or None
    pad = cm.text.pad_token_id if cm.text.pad_token_id is not None else (eos[0] if eos else 0)
    out: list[np.ndarray] = []
    torch.manual_seed(seed)
    for start in range(0, len(prompts), batch):
        chunk = [cm.prompt_ids(p, False) for p in prompts[start:start + batch]]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, c in enumerate(chunk):
            ids[r, width - len(c):] = torch.from_numpy(c)
            mask[r, width - len(c):] = 1
        with torch.no_grad():
            gen = teacher.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                                   temperature=temperature, top_p=top_p, top_k=0, eos_token_id=eos,
                                   pad_token_id=pad)
        for r, c in enumerate(chunk):
            new = gen[r, width:].tolist()
            for j, t in enumerate(new):
                if eos and t in eos:
                    new = new[:j + 1]
                    break
            out.append(np.concatenate([c, np.asarray(new, dtype=np.int64)]))
        if progress:
            progress(f"distill: the parent wrote {len(out)}/{len(prompts)} answers")
    return out


def cached_sequences(path: Path, make) -> list[np.ndarray]:
    """The sequences stored at `path` (JSON lists of token ids), else `make()`'s, written atomically."""
    if path.is_file():
        return [np.asarray(s, dtype=np.int64) for s in json.loads(path.read_text())]
    seqs = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([s.tolist() for s in seqs]))
    os.replace(tmp, path)
    return seqs


def heldout_kld(teacher, student, cm, seqs: list[np.ndarray]) -> dict[str, float]:
    """KLD(teacher || student) and top-1 agreement over every position of `seqs`, position-weighted."""
    import torch

    from edgemed.reference.metrics import compare_logits
    from edgemed.reference.parity import parent_inputs

    n, kld, top1 = 0, 0.0, 0.0
    was_training = student.training
    student.eval()
    with torch.no_grad():
        for s in seqs:
            kw = parent_inputs(cm, s, None)
            m = compare_logits(teacher(**kw).logits[0].float().numpy(), student(**kw).logits[0].float().numpy())
            n += m["positions"]
            kld += m["kld_mean"] * m["positions"]
            top1 += m["top1_agreement"] * m["positions"]
    student.train(was_training)
    return {"positions": n, "kld_mean": kld / max(n, 1), "top1_agreement": top1 / max(n, 1)}
