"""Parity: every exported artifact against its PyTorch parent, on the same pixels and tokens, at
every position (a first-token-only check misses real bugs). Numbers go into the manifest."""
from __future__ import annotations

from typing import Any

import numpy as np

from edgemed.calibration.builtin import PARITY_PROMPTS, synthetic_test_image
from edgemed.models import CompositeModel
from edgemed.reference.metrics import compare_logits


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def parent_inputs(cm: CompositeModel, ids: np.ndarray, pixel_values: np.ndarray | None) -> dict[str, Any]:
    """The keyword arguments of the parent's own forward for one prompt (and image)."""
    import torch

    pv = torch.from_numpy(pixel_values) if pixel_values is not None else None
    return cm.adapter.parent_inputs(torch.from_numpy(ids)[None], pv, cm.image.image_token_id if cm.image else None)


def parent_logits(cm: CompositeModel, ids: np.ndarray, pixel_values: np.ndarray | None) -> np.ndarray:
    """The parent's own forward pass through transformers (not edgemed's decomposition)."""
    import torch

    with torch.no_grad():
        return cm.model(**parent_inputs(cm, ids, pixel_values)).logits[0].float().numpy()


def parent_image_features(cm: CompositeModel, pixel_values: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return cm.image_features(torch.from_numpy(pixel_values)).float().numpy()


def run_calibration(cm, calib) -> int:
    """Forward every calibration sample (prompt + answer, image for a VLM) through the parent."""
    from edgemed.runtime.preprocess import tiles

    tokens = 0
    for prompt, answer, image in calib.samples:
        pv, rows, cols = tiles(image, cm.image.to_dict()) if image is not None else (None, 0, 0)
        ids = cm.prompt_ids(prompt, image is not None, answer, grid=(rows, cols))
        parent_logits(cm, ids, pv)
        tokens += len(ids)
    return tokens


def check_parity(cm: CompositeModel, session, prompts=PARITY_PROMPTS,
                 original: list[np.ndarray] | None = None, parent: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compare an artifact session (edgemed.runtime) with its parent on every prompt and position,
    through the prefill path and through the KV-cache decode path.

    `original`: the logits of the model as the user gave it on the same prompts
    (reference.parent.parity_prompt_logits, taken before a prune / MoE transform changed `cm`). Then
    the headline numbers (what gates judge) are against the original, and `transformed_parent`
    keeps the same record against the transformed model (the export's own fidelity).
    `parent`: reference.parent.parent_parity_refs(cm) taken earlier; used wherever the session's ids and pixels are
    the ones it was computed on, else the parent runs again on the session's own inputs."""
    result: dict[str, Any] = {"prompts": len(prompts), "processor": processor_agreement(cm)}
    pv, grid, same_pixels = None, (0, 0), False
    if cm.multimodal:
        pv, grid = session.pixel_values(synthetic_test_image()), session.image_grid(synthetic_test_image())
        same_pixels = parent is not None and np.array_equal(parent.get("pixel_values"), pv)
        ref_feats = parent["features"] if same_pixels else parent_image_features(cm, pv)
        got_feats = session.encode_image(pv)
        cos = cosine_rows(ref_feats, got_feats)
        result["vision_cosine_min"] = float(cos.min())
        result["vision_cosine_mean"] = float(cos.mean())
        result["vision_max_abs_diff"] = float(np.abs(ref_feats - got_feats).max())
    from edgemed.runtime.session import logits_many

    refs, requests = [], []
    for i, prompt in enumerate(prompts):
        with_image = pv is not None and i % 2 == 0
        ids = session.prompt_ids(prompt, with_image, grid)
        if parent is not None and np.array_equal(parent["ids"][i], ids) and (not with_image or same_pixels):
            refs.append(parent["logits"][i])
        else:
            refs.append(parent_logits(cm, ids, pv if with_image else None))
        requests += [(ids, pv if with_image else None, None),
                     (ids, pv if with_image else None, max(1, len(ids) // 2))]
    got = logits_many(session, requests)  # prefill, and the KV-cache decode path from the middle
    gots, gots_dec = got[0::2], got[1::2]
    if original is not None:
        if [o.shape for o in original] != [r.shape for r in refs]:
            raise ValueError("the original parent's parity logits do not cover the same prompts")
        result.update(_fidelity(original, gots, gots_dec), reference="original parent (before transforms)")
        result["transformed_parent"] = _fidelity(refs, gots, gots_dec)
    else:
        result.update(_fidelity(refs, gots, gots_dec), reference="original parent")
    # Facts a runtime states about its own path (e.g. a known upstream bug), next to the numbers.
    if hasattr(session, "parity_record"):
        result.update(session.parity_record())
    return result


def processor_agreement(cm: CompositeModel) -> dict[str, Any]:
    """Whether edgemed's prompt ids (and pixels) are what the model's own transformers processor
    (for a text LLM: its tokenizer's apply_chat_template) makes of the same conversation: with and
    without an image, with a system prompt and history. Checked before any logits are compared."""
    from edgemed.runtime.preprocess import image_grid, preprocess

    convs = [[{"role": "user", "content": [{"type": "text", "text": PARITY_PROMPTS[0]}]}],
             [{"role": "system", "content": [{"type": "text", "text": "You are a radiology assistant."}]},
              {"role": "user", "content": [{"type": "text", "text": PARITY_PROMPTS[1]}]},
              {"role": "assistant", "content": [{"type": "text", "text": "No."}]},
              {"role": "user", "content": [{"type": "text", "text": PARITY_PROMPTS[0]}]}]]
    image = synthetic_test_image()
    if cm.multimodal:
        convs.append([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PARITY_PROMPTS[0]}]}])
    if not cm.chat_template:
        return {"checked": False, "reason": "the model has no chat template"}
    if cm.multimodal and cm.processor is None:
        return {"checked": False, "reason": "the model folder has no processor files"}
    out: dict[str, Any] = {"checked": True, "conversations": len(convs), "ids_equal": True}
    grid = image_grid(image, cm.image.to_dict()) if cm.multimodal else (0, 0)
    for conv in convs:
        ours = cm.chat.ids(cm.tokenizer, conv, grids=[grid] * sum(p["type"] == "image" for m in conv for p in m["content"]))
        try:
            if cm.multimodal:
                msgs = [{**m, "content": [{**p, "image": image} if p["type"] == "image" else p for p in m["content"]]}
                        for m in conv]
                ref = cm.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True, return_tensors="np")
                theirs = ref["input_ids"][0]
            else:
                msgs = [{**m, "content": "".join(p["text"] for p in m["content"])} for m in conv]
                theirs = np.asarray(cm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                                     return_dict=True)["input_ids"])
        except Exception as e:  # a template that refuses a system turn refuses it in both
            out.setdefault("skipped", []).append(f"{len(conv)} message(s): {str(e)[:120]}")
            continue
        if ours.tolist() != np.asarray(theirs).reshape(-1).tolist():
            out["ids_equal"] = False
            out.setdefault("differs", []).append({"messages": len(conv), "edgemed": len(ours), "processor": len(theirs)})
        if cm.multimodal and "pixel_values" in ref:
            theirs_pv = np.asarray(ref["pixel_values"]).reshape((-1,) + tuple(ref["pixel_values"].shape[-3:]))
            mine = preprocess(image, cm.image.to_dict())
            out["pixels_max_abs_diff"] = (float(np.abs(mine - theirs_pv).max()) if theirs_pv.shape == mine.shape
                                          else f"shapes differ: {mine.shape} vs {theirs_pv.shape}")
    return out


def _fidelity(refs: list[np.ndarray], gots: list[np.ndarray], gots_dec: list[np.ndarray]) -> dict[str, Any]:
    """Prefill and KV-cache decode comparisons, and the headline (the worse of the two paths), named
    as report.json names fidelity."""
    out: dict[str, Any] = {"prefill": compare_logits(np.concatenate(refs), np.concatenate(gots)),
                           "decode": compare_logits(np.concatenate(refs), np.concatenate(gots_dec)),
                           "greedy_sequences_identical": float(np.mean(
                               [(r.argmax(-1) == g.argmax(-1)).all() for r, g in zip(refs, gots_dec)]))}
    for k in ("kld_mean", "kld_p99", "logits_max_abs_diff"):
        out[k] = max(out["prefill"][k], out["decode"][k])
    out["top1_agreement"] = min(out["prefill"]["top1_agreement"], out["decode"]["top1_agreement"])
    return out


GATE_METRICS = {
    "max_kld_mean": ("kld_mean", "<="),
    "max_kld_p99": ("kld_p99", "<="),
    "min_top1_agreement": ("top1_agreement", ">="),
    "max_logits_abs_diff": ("logits_max_abs_diff", "<="),
    # Measured on the gate suite by edgemed.reference.cache.compare_with_reference (compress runs it).
    "max_flip_rate": ("answer_flip_rate", "<="),
    "min_closed_acc_retention": ("closed_acc_retention", ">="),
}


def evaluate_gates(gates: dict[str, float], metrics: dict[str, Any],
                   reasons: dict[str, str] | None = None) -> list[str]:
    """Failures as readable strings; gates whose metric was not measured fail too (never pass
    silently). ``reasons`` maps a metric name to why it could not be measured."""
    failures = []
    for gate, threshold in gates.items():
        key, op = GATE_METRICS.get(gate, (None, None))
        value = metrics.get(key) if key else None
        if value is None:
            why = (reasons or {}).get(key) if key else None
            failures.append(f"{gate}: metric not measured for this artifact" + (f" ({why})" if why else ""))
        elif not np.isfinite(value):  # NaN compares False both ways: it must fail, not pass
            failures.append(f"{gate}: {key} is {value} (the artifact computes non-finite logits)")
        elif (op == "<=" and value > threshold) or (op == ">=" and value < threshold):
            failures.append(f"{gate}: {key} = {value:.4g} (threshold {op} {threshold})")
    return failures
