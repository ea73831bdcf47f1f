"""Fidelity against the parent: the parent's logits and answers cached in the artifact at compress
time, and the comparison an artifact session runs against that cache on any device (no torch).

The cache (``parent_reference.npz``, component "reference" in the manifest) holds, for every
item of the gate suite: the token ids that were teacher-forced (prompt + the parent's greedy
answer), the parent's answer, the gate image as uint8 pixels, and the parent's distribution at
every position, stored one of two ways (``mode`` in its meta):

* ``full``: the raw logits in float16, when positions x vocabulary x 2 bytes <= 16 MB (tiny and
  small-vocabulary models). KLD is then exact up to float16 rounding (~1e-5 nats).
* ``topk``: per position the parent's top-64 token ids and log-probs plus the log of the tail
  mass (everything outside the top 64). KLD is then computed between the two distributions
  coarsened to those 64 tokens + one tail bucket: a lower bound on the full KLD (coarsening
  never increases a KL divergence), tight when the parent's mass is in its top 64, as it
  almost always is. Top-1 agreement is exact in both modes.

numpy ``.npz`` with no object arrays; it is read with ``np.load(allow_pickle=False)`` and the
metadata is one JSON string. Only :func:`cache_parent_reference` needs torch (imported lazily,
through :class:`edgemed.reference.parent.ParentSession`).

The gate suite (:func:`gate_items`) is small and built in: yes/no finding questions on
`synthetic-cxr` radiographs (normal ones, ones with a nodule, ones with an effusion), a few yes/no
medical facts as text, and the parity prompts. Its images are drawn by the generator under seeds
101-106, disjoint from the parity image and from the calibration split (seed 0), so gates are not
scored on what a quantizer calibrated on.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgemed.bench.suites import VQA_CLOSED_TEMPLATE, Item
from edgemed.errors import BadInputError

__all__ = ["REFERENCE_FILE", "gate_items", "cache_parent_reference", "load_reference",
           "compare_with_reference", "gate_values", "closed_label", "flip_summary"]

REFERENCE_FILE = "parent_reference.npz"
FORMAT_VERSION = 1
FULL_LOGITS_MAX_BYTES = 16_000_000
TOPK = 64
GATE_MAX_NEW_TOKENS = 8
# Teacher-forced logits of the gate items held at once (compare_with_reference's batches).
LOGITS_BATCH_BYTES = 256 << 20

_FINDING_QUESTIONS = {  # the synthetic-cxr generator's own wording
    "nodule": "Is there a nodule?",
    "effusion": "Is there a pleural effusion?",
}
_TEXT_FACTS = (
    ("Is the heart located in the thorax?", "yes"),
    ("Is the femur a bone of the upper arm?", "no"),
    ("Is a pneumothorax air in the pleural space?", "yes"),
    ("Is the liver mainly in the left upper quadrant of the abdomen?", "no"),
)
_GATE_IMAGES = (("normal", 101), ("normal", 102), ("nodule", 103), ("nodule", 104),
                ("effusion", 105), ("effusion", 106))


def gate_image(finding: str, seed: int, size: int = 96):
    """A `synthetic-cxr` radiograph with `finding` (normal, nodule, effusion, ...), drawn by the
    generator under its own seed, so no calibration or training split holds it. 96 px: the size
    of the parity image (the reference cache holds one image size)."""
    from PIL import Image

    from edgemed.data.synthetic_cxr import FINDINGS, image_spec, render, to_uint8

    spec = image_spec(seed, "test", FINDINGS.index(finding))  # the finding cycles with the index
    return Image.fromarray(to_uint8(render(spec, size, seed))).convert("RGB")


def gate_items(multimodal: bool = True) -> list[Item]:
    """The built-in gate suite (see the module docstring); ``id`` and subgroups are stable."""
    from edgemed.calibration.builtin import PARITY_PROMPTS, synthetic_test_image

    items: list[Item] = []
    if multimodal:
        for finding, seed in _GATE_IMAGES:
            img = gate_image(finding, seed)
            for asked, q in _FINDING_QUESTIONS.items():
                items.append(Item(id=f"gate-img{seed}-{asked}", question=q,
                                  answer="yes" if finding == asked else "no", answer_type="closed", image=img,
                                  modality="synthetic-cxr", finding=asked, normal=finding == "normal",
                                  subgroups={"image_finding": finding}))
    for i, (q, a) in enumerate(_TEXT_FACTS):
        items.append(Item(id=f"gate-text{i}", question=q, answer=a, answer_type="closed",
                          subgroups={"image_finding": "text-only"}))
    for i, q in enumerate(PARITY_PROMPTS):  # unscored (no gold answer): logits and answer flips only
        items.append(Item(id=f"gate-parity{i}", question=q, answer="", answer_type="open",
                          image=synthetic_test_image() if multimodal and i % 2 == 0 else None,
                          subgroups={"image_finding": "parity"}))
    return items


def _gate_prompt(item: Item) -> str:
    return VQA_CLOSED_TEMPLATE.format(question=item.question) if item.answer_type == "closed" else item.question


def _as_items(prompts: Sequence[str | Item] | None, multimodal: bool) -> list[Item]:
    if prompts is None:
        return gate_items(multimodal)
    from edgemed.calibration.builtin import synthetic_test_image

    items = []
    for i, p in enumerate(prompts):
        if isinstance(p, Item):
            items.append(p)
        else:
            items.append(Item(id=f"prompt{i}", question=str(p), answer="", answer_type="open",
                              image=synthetic_test_image() if multimodal and i % 2 == 0 else None))
    return items


# --------------------------------------------------------------------------------------------
# compress time (torch)


def cache_parent_reference(cm, out_dir: str | Path, prompts: Sequence[str | Item] | None = None, *,
                           max_new_tokens: int = GATE_MAX_NEW_TOKENS, topk: int = TOPK,
                           full_logits_max_bytes: int = FULL_LOGITS_MAX_BYTES) -> str:
    """Run the PyTorch parent on the gate suite (or ``prompts``) and write its answers and
    per-position distributions to ``out_dir/parent_reference.npz``. Returns the relative path.

    ``prompts`` may mix plain strings (asked with the parity image on even indices, as parity
    does) and :class:`Item` objects; None means the built-in :func:`gate_items`.
    """
    from edgemed.reference.parent import ParentSession
    from edgemed.runtime.preprocess import as_image

    parent = ParentSession(cm)
    items = _as_items(prompts, cm.multimodal)
    images: list[np.ndarray] = []
    image_keys: dict[int, int] = {}
    seqs, prompt_lens, answer_ids, answers, records = [], [], [], [], []
    # Per item: top-k always, float16 logits only while they stay under the size limit, so a
    # 7B model's 600-image-token prompts never hold positions x 32k float32 logits at once.
    full_rows: list[np.ndarray] | None = []
    full_bytes = 0
    topk_rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    vocab = 0
    for it in items:
        img_idx = -1
        pv = None
        if it.image is not None and cm.multimodal:
            key = id(it.image)
            if key not in image_keys:
                image_keys[key] = len(images)
                images.append(np.asarray(as_image(it.image), dtype=np.uint8))
            img_idx = image_keys[key]
            pv = parent.pixel_values(images[img_idx])
        prompt = _gate_prompt(it)
        gen = parent.generate(images[img_idx] if img_idx >= 0 else None, prompt, max_new_tokens=max_new_tokens,
                              stop_at_eos=True)
        ids = parent.prompt_ids(prompt, img_idx >= 0, parent.image_grid(images[img_idx]) if img_idx >= 0 else (0, 0))
        seq = np.concatenate([ids, np.asarray(gen.token_ids[:-1], np.int64)])
        logits = parent.logits(seq, pv).astype(np.float32)
        vocab = logits.shape[-1]
        topk_rows.append(_topk(logits, min(topk, vocab)))
        full_bytes += logits.size * 2
        if full_rows is not None:
            full_rows = full_rows + [logits.astype(np.float16)] if full_bytes <= full_logits_max_bytes else None
        seqs.append(seq)
        prompt_lens.append(len(ids))
        answer_ids.append(np.asarray(gen.token_ids, np.int64))
        answers.append(gen.text)
        records.append({"id": it.id, "prompt": prompt, "question": it.question, "answer": it.answer,
                        "answer_type": it.answer_type, "image_index": img_idx, "finding": it.finding,
                        "normal": it.normal, "subgroups": it.subgroups, "parent_answer": gen.text})
    positions = sum(len(x) for x in seqs)
    mode = "full" if full_rows is not None else "topk"
    arrays: dict[str, np.ndarray] = {
        "ids": np.concatenate(seqs), "offsets": np.cumsum([0] + [len(s) for s in seqs]).astype(np.int64),
        "prompt_lens": np.asarray(prompt_lens, np.int64),
        "answer_ids": np.concatenate(answer_ids) if answer_ids else np.zeros(0, np.int64),
        "answer_offsets": np.cumsum([0] + [len(a) for a in answer_ids]).astype(np.int64),
    }
    if images:
        shapes = {im.shape for im in images}
        if len(shapes) != 1:
            raise BadInputError("prompts", f"images of different sizes {sorted(shapes)}", "use one image size")
        arrays["images"] = np.stack(images)
    if mode == "full":
        arrays["logits_f16"] = np.concatenate(full_rows)
    else:
        arrays.update(topk_ids=np.concatenate([t[0] for t in topk_rows]),
                      topk_logp=np.concatenate([t[1] for t in topk_rows]),
                      tail_logp=np.concatenate([t[2] for t in topk_rows]))
    meta = {"format_version": FORMAT_VERSION, "mode": mode, "topk": topk if mode == "topk" else None,
            "vocab_size": int(vocab), "positions": int(positions), "max_new_tokens": max_new_tokens,
            "parent": {"model": cm.source, "family": cm.family}, "items": records,
            "kld_note": ("exact (float16 logits)" if mode == "full" else
                         f"top-{topk} + tail bucket: a lower bound on the full KLD")}
    arrays["meta"] = np.asarray(json.dumps(meta))
    out = Path(out_dir) / REFERENCE_FILE
    with open(out, "wb") as f:
        np.savez_compressed(f, **arrays)
    return REFERENCE_FILE


def _topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [S, k] int32 sorted by probability, their log-probs, log of the mass outside them)."""
    from edgemed.reference.metrics import log_softmax

    lp = log_softmax(logits)
    idx = np.argpartition(-lp, k - 1, axis=-1)[:, :k]
    top = np.take_along_axis(lp, idx, -1)
    order = np.argsort(-top, axis=-1)
    idx, top = np.take_along_axis(idx, order, -1), np.take_along_axis(top, order, -1)
    tail = np.clip(1.0 - np.exp(top).sum(-1), 1e-12, 1.0)
    return idx.astype(np.int32), top.astype(np.float32), np.log(tail).astype(np.float32)


# --------------------------------------------------------------------------------------------
# on the device (no torch)


def load_reference(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(str(path), "no cached parent reference",
                            "re-create the artifact with this edgemed version (compress writes it)")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("meta")))
    if meta.get("format_version") != FORMAT_VERSION:
        raise BadInputError(str(path), f"reference format {meta.get('format_version')} is not {FORMAT_VERSION}",
                            "re-create the artifact with this edgemed version")
    return meta, arrays


def closed_label(text: str, labels: Sequence[str] = ("yes", "no")) -> str | None:
    """The first yes/no (or label) word of an answer, as strict_closed reads it; None if absent."""
    import re

    alts = "|".join(re.escape(x) for x in sorted(labels, key=len, reverse=True))
    m = re.search(rf"\b({alts})\b", str(text), re.IGNORECASE)
    return m.group(1).lower() if m else None


def _kld_rows(meta: dict, arrays: dict, lo: int, hi: int, got_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-position KLD(parent || artifact) and top-1 agreement for reference rows lo:hi."""
    from edgemed.reference.metrics import log_softmax

    lq = log_softmax(got_logits)
    if meta["mode"] == "full":
        lp = log_softmax(arrays["logits_f16"][lo:hi].astype(np.float32))
        kld = (np.exp(lp) * (lp - lq)).sum(-1)
        agree = lp.argmax(-1) == lq.argmax(-1)
        return kld, agree
    idx = arrays["topk_ids"][lo:hi].astype(np.int64)
    lp = arrays["topk_logp"][lo:hi].astype(np.float64)
    lp_tail = arrays["tail_logp"][lo:hi].astype(np.float64)
    lq_k = np.take_along_axis(lq, idx, -1)
    q_tail = np.clip(1.0 - np.exp(lq_k).sum(-1), 1e-12, 1.0)
    kld = (np.exp(lp) * (lp - lq_k)).sum(-1) + np.exp(lp_tail) * (lp_tail - np.log(q_tail))
    agree = idx[:, 0] == lq.argmax(-1)
    return np.maximum(kld, 0.0), agree


def flip_summary(pairs: Sequence[tuple[str, str, str, bool]]) -> dict[str, Any]:
    """Answer flips between parent and artifact. ``pairs``: (id, parent answer, artifact answer,
    closed?). A closed item flips when its yes/no label changes (None counts as a label: an
    answer that stops saying yes or no has flipped); open items are compared as normalized text
    and reported separately, since a reworded open answer is not necessarily a worse one."""
    from edgemed.bench.scoring import bootstrap_ci, normalize_answer

    closed_flags, open_flags, changed = [], [], []
    directions: dict[str, int] = {}
    for item_id, p, a, closed in pairs:
        if closed:
            lp_, la = closed_label(p), closed_label(a)
            flipped = lp_ != la
            closed_flags.append(float(flipped))
            if flipped:
                d = f"{lp_ or 'none'}->{la or 'none'}"
                directions[d] = directions.get(d, 0) + 1
                changed.append({"id": item_id, "parent": p, "artifact": a, "direction": d})
        else:
            flipped = normalize_answer(p) != normalize_answer(a)
            open_flags.append(float(flipped))
            if flipped:
                changed.append({"id": item_id, "parent": p, "artifact": a, "direction": "open-text-changed"})
    rate = float(np.mean(closed_flags)) if closed_flags else None
    return {
        "answer_flip_rate": rate,
        "answer_flip_rate_ci95": list(bootstrap_ci(closed_flags)) if closed_flags else None,
        "answer_flip_n": len(closed_flags),
        "answer_flip_directions": directions,
        "open_answer_changed_rate": float(np.mean(open_flags)) if open_flags else None,
        "open_answer_n": len(open_flags),
        "changed_items": changed,
        **({} if closed_flags else {"answer_flip_rate_unavailable_reason": "no closed (yes/no) items"}),
    }


def hallucination_probe(rows: Sequence[dict]) -> dict[str, Any]:
    """On normal images, the rate of "yes" to finding-presence questions (lower is better).
    ``rows``: dicts with normal, finding, and answers under 'parent' and/or 'artifact'."""
    from edgemed.bench.scoring import bootstrap_ci

    probe = [r for r in rows if r.get("normal") and r.get("finding")]
    out: dict[str, Any] = {"n": len(probe)}
    if not probe:
        out["unavailable_reason"] = "no finding-presence questions on normal images in this suite"
        return out
    for who in ("parent", "artifact"):
        answers = [r.get(who) for r in probe]
        if any(a is None for a in answers):
            out[f"{who}_yes_rate"] = None
            continue
        flags = [float(closed_label(a) == "yes") for a in answers]
        out[f"{who}_yes_rate"] = float(np.mean(flags))
        out[f"{who}_yes_rate_ci95"] = list(bootstrap_ci(flags))
    return out


def compare_with_reference(session, ref_path: str | Path, *, generate: bool = True) -> dict[str, Any]:
    """Everything fidelity-related an artifact session can measure against the cached parent:
    KLD mean/p99/max and top-1 agreement teacher-forced over all positions (prefill path), answer
    flips with directions, closed accuracy of parent and artifact on the gate items and its
    retention, the hallucination probe, and per-subgroup closed accuracy."""
    from edgemed.bench.scoring import bootstrap_ci, strict_closed, subgroups

    meta, arrays = load_reference(ref_path)
    offsets, ids_all = arrays["offsets"], arrays["ids"]
    images = arrays.get("images")
    from edgemed.runtime.session import greedy_answers, logits_many

    klds, agrees, pairs, rows, notes = [], [], [], [], []
    mismatched_prompts = own_image_prompts = 0
    todo = []  # per item: its record, image, teacher-forced request and the reference rows it meets
    for i, rec in enumerate(meta["items"]):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        ids = ids_all[lo:hi].astype(np.int64)
        img = images[rec["image_index"]] if rec["image_index"] >= 0 and images is not None else None
        pv = session.pixel_values(img) if img is not None else None
        plen = int(arrays["prompt_lens"][i])
        own = session.prompt_ids(rec["prompt"], img is not None, session.image_grid(img) if img is not None else (0, 0))
        image_id = (getattr(session, "image", None) or {}).get("image_token_id")
        if img is not None and int((own == image_id).sum()) != int((ids[:plen] == image_id).sum()):
            # The session builds its own image block (GGUF: llama.cpp's overview image where the parent
            # saw tiles): teacher-force the parent's answer after the session's own prompt and compare
            # the answer positions, which correspond one to one.
            own_image_prompts += 1
            request = (np.concatenate([own, ids[plen:]]), pv, None)
            todo.append((rec, img, own, ids, plen, request, len(own) - 1, lo + plen - 1, hi))
        else:
            todo.append((rec, img, own, ids, plen, (ids, pv, None), 0, lo, hi))
    # Teacher-forced logits: a session that batches passes runs as many items at once as
    # LOGITS_BATCH_BYTES of logits allow, in one pass over its layers; others one at a time.
    limit = LOGITS_BATCH_BYTES if getattr(session, "batches_passes", False) else 0
    got_all: list[np.ndarray] = []
    batch: list[tuple] = []
    for k, item in enumerate(todo):
        batch.append(item[5])
        if k + 1 == len(todo) or sum(len(r[0]) for r in batch + [todo[k + 1][5]]) * 4 * meta["vocab_size"] > limit:
            got_all += logits_many(session, batch)
            batch = []
    for (rec, img, own, ids, plen, _, skip, lo, hi), got in zip(todo, got_all):
        if got.shape[-1] != meta["vocab_size"]:
            raise BadInputError(str(ref_path), f"artifact vocabulary {got.shape[-1]} != parent's {meta['vocab_size']}",
                                "the reference belongs to another model")
        kld, agree = _kld_rows(meta, arrays, lo, hi, got[skip:])
        klds.append(kld)
        agrees.append(agree)
    if generate:
        # The parent's answer is each prompt's draft: where the artifact agrees, one pass checks it.
        same = [len(own) == plen and np.array_equal(own, ids[:plen]) for _, _, own, ids, plen, *_ in todo]
        mismatched_prompts = same.count(False)
        drafts = [ids[plen:] if ok else None for ok, (_, _, _, ids, plen, *_) in zip(same, todo)]
        answers = greedy_answers(session, [(img, rec["prompt"]) for rec, img, *_ in todo], meta["max_new_tokens"],
                                 drafts=drafts)
        for (rec, *_), ans in zip(todo, answers):
            closed = rec["answer_type"] == "closed"
            pairs.append((rec["id"], rec["parent_answer"], ans, closed))
            rows.append({**rec, "parent": rec["parent_answer"], "artifact": ans,
                         **{k: v for k, v in (rec.get("subgroups") or {}).items()}})
    kld = np.concatenate(klds) if klds else np.zeros(0)
    agree = np.concatenate(agrees) if agrees else np.zeros(0, bool)
    out: dict[str, Any] = {
        "source": "cached parent reference (" + REFERENCE_FILE + ")",
        "mode": meta["mode"], "kld_note": meta["kld_note"], "positions": int(kld.size),
        "items": len(meta["items"]),
        "kld_mean": float(kld.mean()) if kld.size else None,
        "kld_p99": float(np.percentile(kld, 99)) if kld.size else None,
        "kld_max": float(kld.max()) if kld.size else None,
        "top1_agreement": float(agree.mean()) if agree.size else None,
    }
    if not generate:
        return out
    if own_image_prompts:
        notes.append(f"{own_image_prompts} image prompts hold a different image block in the artifact (its own "
                     "preprocessing, e.g. llama.cpp's overview image instead of tiles): their teacher-forced numbers "
                     "cover the answer positions only")
    if mismatched_prompts:
        notes.append(f"{mismatched_prompts} prompts tokenize differently in the artifact than in the parent: "
                     "teacher-forced numbers use the parent's ids, answers the artifact's own")
    out.update(flip_summary(pairs))
    scored = [r for r in rows if r["answer_type"] == "closed" and r["answer"]]
    par = [float(strict_closed(r["parent"], r["answer"])) for r in scored]
    art = [float(strict_closed(r["artifact"], r["answer"])) for r in scored]
    out["closed_n"] = len(scored)
    out["parent_closed_acc"] = float(np.mean(par)) if par else None
    out["closed_acc"] = float(np.mean(art)) if art else None
    out["closed_acc_ci95"] = list(bootstrap_ci(art)) if art else None
    if not par:
        out["closed_acc_retention"] = None
        out["closed_acc_retention_unavailable_reason"] = "no scored closed items"
    elif out["parent_closed_acc"] == 0:
        out["closed_acc_retention"] = None
        out["closed_acc_retention_unavailable_reason"] = ("the parent answers no gate question correctly, so "
                                                          "retention (artifact / parent accuracy) is undefined")
    else:
        out["closed_acc_retention"] = out["closed_acc"] / out["parent_closed_acc"]
    out["hallucination_probe"] = hallucination_probe(rows)
    score_rows = [{"pred": r["artifact"], "answer": r["answer"], "answer_type": "CLOSED",
                   "image_finding": (r.get("subgroups") or {}).get("image_finding")} for r in scored]
    out["subgroups"] = {"image_finding": subgroups(score_rows, "image_finding", "closed_acc")} if score_rows else {}
    out["notes"] = notes
    return out


def gate_values(measured: dict[str, Any]) -> dict[str, Any]:
    """The gate-suite numbers under the names edgemed.reference.parity.GATE_METRICS reads."""
    return {k: measured.get(k) for k in ("answer_flip_rate", "closed_acc_retention")}
