"""The demo's training data, made on the fly from the synthetic-cxr generator: images, labels,
captions and the question-answer turns of each training stage, tokenized the way the demo's chat
template renders them (edgemed.demo.train trains on them)."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Callable

import numpy as np

from edgemed.demo.cxr import IMAGE_TOKEN

CLOSED_SUFFIX = "\nAnswer yes or no."  # edgemed.bench.suites' synthetic-cxr prompts, verbatim
OPEN_SUFFIX = "\nAnswer the question using a single word or phrase."


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
    from edgemed.data.synthetic_cxr import FINDINGS, presence_question, questions_for

    qs = [(q["question"] + (CLOSED_SUFFIX if q["answer_type"] == "closed" else OPEN_SUFFIX), q["answer"])
          for q in questions_for(spec, seed)]
    asked = {q for q, _ in qs}
    if contrastive:
        extra = [("Is this chest radiograph normal?", "yes" if spec.normal else "no"),
                 ("Is there an abnormality?", "no" if spec.normal else "yes")]
        if spec.laterality is not None:
            extra += [(presence_question(spec.finding, side), "yes" if side == spec.laterality else "no")
                      for side in ("left", "right")]
    else:
        extra = [(presence_question(f), "yes" if f == spec.finding else "no") for f in FINDINGS[1:]]
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
