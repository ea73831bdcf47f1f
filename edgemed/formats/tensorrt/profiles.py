"""TensorRT build profiles: min/opt/max shapes per graph input, precision flags and workspace bytes,
written beside the graphs so `edgemed build-engine` can build engines on the device."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from edgemed.formats.tensorrt.args import BUILDER_FLAGS, QDQ_PRECISIONS, TrtExportArgs


# --- build profiles --------------------------------------------------------------------------------

def tiles_per_image(image: dict) -> int:
    """The most pixel_values rows one image becomes: Idefics3 / SmolVLM cut it into up to
    (longest_edge / tile)^2 tiles plus the whole image; other families feed one."""
    if not image.get("tile_marker"):
        return 1
    import math

    side = math.ceil(image["longest_edge"] / image["image_size"])
    return side * side + 1


def build_profiles(work_dir: Path, text: dict, image: dict | None, precisions: dict[str, dict[str, str]],
                   args: TrtExportArgs, usable_memory_gb: float) -> dict[str, Any]:
    """Optimization profiles (min/opt/max per input), precision flags and workspace per graph.

    The decoder gets two profiles, as TensorRT-LLM builds them: `prefill` (any chunk length, any
    past) and `decode` (one token, past >= 1, tuned at half the context); the runtime selects the
    profile per call."""
    ctx = args.max_context
    n_img_tok = image["num_image_tokens"] if image else 0
    opt_prompt = min(ctx, n_img_tok + 48)
    kv, hd, d = text["num_kv_heads"], text["head_dim"], text["hidden_size"]
    workspace = int(min(usable_memory_gb * 1e9 * args.workspace_fraction, args.max_workspace_gb * 1e9))
    graphs: dict[str, Any] = {}
    for name, comp_prec in precisions.items():
        flags = sorted({BUILDER_FLAGS[p] for p in comp_prec.values() if p in BUILDER_FLAGS})
        if args.fp16_fallback and any(p in QDQ_PRECISIONS for p in comp_prec.values()) and "FP16" not in flags:
            flags.append("FP16")
        entry: dict[str, Any] = {"engine": f"engines/{Path(name).stem}.engine", "precision_flags": sorted(flags),
                                 "precisions": comp_prec, "workspace_bytes": workspace}
        if name == "vision_encoder.onnx":
            s = image["image_size"]
            per_image = tiles_per_image(image)
            entry["profiles"] = [{"name": "images", "shapes": {
                "pixel_values": _mom([1, 3, s, s], [per_image, 3, s, s], [args.max_images * per_image, 3, s, s])}}]
        elif name == "embed_tokens.onnx":
            entry["profiles"] = [{"name": "tokens", "shapes": {"input_ids": _mom([1, 1], [1, opt_prompt], [1, ctx])}}]
        else:
            past_in = _past_names(work_dir / name)
            prefill = {"inputs_embeds": _mom([1, 1, d], [1, opt_prompt, d], [1, ctx, d]),
                       "attention_mask": _mom([1, 1], [1, opt_prompt], [1, ctx]),
                       "position_ids": _mom([1, 1], [1, opt_prompt], [1, ctx])}
            decode = {"inputs_embeds": _mom([1, 1, d], [1, 1, d], [1, 1, d]),
                      "attention_mask": _mom([1, 2], [1, ctx // 2 + 1], [1, ctx]),
                      "position_ids": _mom([1, 1], [1, 1], [1, 1])}
            if "token_type_ids" in _input_names(work_dir / name):
                prefill["token_type_ids"] = prefill["position_ids"]
                decode["token_type_ids"] = decode["position_ids"]
            for p in past_in:
                prefill[p] = _mom([1, kv, 0, hd], [1, kv, 0, hd], [1, kv, ctx - 1, hd])
                decode[p] = _mom([1, kv, 1, hd], [1, kv, ctx // 2, hd], [1, kv, ctx - 1, hd])
            entry["profiles"] = [{"name": "prefill", "shapes": prefill}, {"name": "decode", "shapes": decode}]
        graphs[name] = entry
    return {"max_context": ctx, "max_images": args.max_images, "graphs": graphs}


def _mom(lo, opt, hi) -> dict[str, list[int]]:
    return {"min": lo, "opt": opt, "max": hi}


def _input_names(path: Path) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


def _past_names(path: Path) -> list[str]:
    return [n for n in _input_names(path) if n.startswith("past_key_values.")]


def validate_profiles(profiles: dict[str, Any], artifact_dir: Path) -> list[str]:
    """Every graph input has a shape in every profile, of the graph's rank, matching its static
    dims, with min <= opt <= max; no profile names an input the graph lacks."""
    import onnx

    problems = []
    for name, entry in profiles.get("graphs", {}).items():
        path = artifact_dir / name
        if not path.exists():
            problems.append(f"{name}: profile for a graph that is not in the artifact")
            continue
        inputs = {i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
                  for i in onnx.load(str(path), load_external_data=False).graph.input}
        if not entry.get("profiles"):
            problems.append(f"{name}: no optimization profile")
        for prof in entry.get("profiles", []):
            where = f"{name} profile {prof.get('name')}"
            missing = set(inputs) - set(prof["shapes"])
            extra = set(prof["shapes"]) - set(inputs)
            if missing:
                problems.append(f"{where}: no shape for {sorted(missing)}")
            if extra:
                problems.append(f"{where}: shapes for inputs the graph lacks {sorted(extra)}")
            for inp, mom in prof["shapes"].items():
                dims = inputs.get(inp)
                if dims is None:
                    continue
                lo, opt, hi = mom["min"], mom["opt"], mom["max"]
                if not len(lo) == len(opt) == len(hi) == len(dims):
                    problems.append(f"{where}: {inp} rank {len(lo)}/{len(opt)}/{len(hi)} != graph rank {len(dims)}")
                    continue
                for k, static in enumerate(dims):
                    if not (0 <= lo[k] <= opt[k] <= hi[k]):
                        problems.append(f"{where}: {inp} dim {k} not 0 <= min <= opt <= max ({lo[k]}, {opt[k]}, {hi[k]})")
                    if static is not None and static > 0 and not (lo[k] == opt[k] == hi[k] == static):
                        problems.append(f"{where}: {inp} dim {k} is {static} in the graph")
    return problems
