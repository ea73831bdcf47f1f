"""The folder layout of an ONNX artifact, as front ends we did not write load it.

    config.json                      the parent's transformers config (plus what transformers.js reads)
    generation_config.json           bos/eos/pad ids, as the parent's
    preprocessor_config.json         the image processor (edgemed's runtime reads manifest.json instead)
    processor_config.json            LlavaProcessor's image_token / patch_size (LLaVA family)
    tokenizer.json, tokenizer_config.json, chat_template.jinja
    onnx/vision_encoder.onnx         pixel_values -> image_features (tower + projector)
    onnx/embed_tokens.onnx           input_ids -> inputs_embeds
    onnx/decoder_model_merged.onnx   inputs_embeds, attention_mask, past_key_values.N.{key,value}
                                     -> logits, present.N.{key,value}
    onnx/<graph>.onnx_data           external weights of a graph past 64 MiB (transformers.js's name)
    manifest.json                    edgemed's record: every file's sha256, the recipe, parity

This is the onnx-community layout transformers.js loads for image-text-to-text models
(`LlavaForConditionalGeneration.from_pretrained(dir, {dtype: "fp32"})`: the three sessions by
these names). The file names carry no dtype suffix (`_q4`, `_quantized`): whatever the recipe
quantized is inside them, and config.json's `transformers.js_config.dtype` says "fp32" so
transformers.js asks for exactly these names. manifest.json stays the source of truth: edgemed's
runtime reads the graphs it lists and nothing else.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemed.formats.onnx.graph import GRAPHS

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.context import Context

ONNX_DIR = "onnx"
DATA_SUFFIX = "_data"  # transformers.js fetches `<graph>.onnx_data` for a graph with external data


def graph_file(root: Path, name: str) -> Path:
    """Where an artifact keeps graph `name`: onnx/ (this layout) or the folder itself (artifacts
    written before it, and the TensorRT format's Q/DQ graphs)."""
    inside = root / ONNX_DIR / name
    return inside if inside.exists() else root / name


TEXT_MODEL = "model.onnx"  # a text-only LLM: token embedding and decoder in one graph


def merge_text_model(ctx: "Context") -> None:
    """A text-only LLM as transformers.js and other decoder-only front ends load it: one graph
    `model.onnx` taking `input_ids`, the embedding table's nodes (renamed under `embed_tokens/`) feeding
    the decoder's `inputs_embeds`. Replaces embed_tokens.onnx and decoder_model_merged.onnx (one
    copy of the weights). Opsets: the higher of the two per domain (the embedding is a Gather, or
    ONNX Runtime's GatherBlockQuantized, whose meaning no opset since 13 changed). Both graphs are
    read without their weights and the merged one written tensor by tensor (external.save_streamed),
    so a 7B's decoder is never in memory at once."""
    import onnx
    from onnx import compose, helper

    from edgemed.formats.onnx.external import save_streamed
    from edgemed.formats.onnx.graph import DECODER, EMBED

    root = ctx.work_dir
    embed = onnx.load(str(root / EMBED), load_external_data=False)
    decoder = onnx.load(str(root / DECODER), load_external_data=False)
    compose.add_prefix(embed, "embed_tokens/", rename_inputs=False, rename_outputs=False, inplace=True)
    (link,) = [o.name for o in embed.graph.output]
    if link not in {i.name for i in decoder.graph.input}:
        raise ValueError(f"{DECODER} has no input {link!r} for the embedding's output")
    g = decoder.graph
    nodes = list(embed.graph.node) + list(g.node)
    inputs = list(embed.graph.input) + [i for i in g.input if i.name != link]
    initializers = list(embed.graph.initializer) + list(g.initializer)
    merged = helper.make_graph(nodes, g.name or "model", inputs, list(g.output), initializers,
                               value_info=list(embed.graph.value_info) + list(g.value_info))
    opsets: dict[str, int] = {}
    for m in (embed, decoder):
        for o in m.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    model = helper.make_model(merged, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              ir_version=max(embed.ir_version, decoder.ir_version))
    model.metadata_props.extend(decoder.metadata_props)
    del embed, decoder
    precisions = {ctx.files.get(n, {}).get("precision") for n in (EMBED, DECODER)} - {None}
    save_streamed(model, root / TEXT_MODEL, root)
    for name in (EMBED, DECODER):
        (root / name).unlink()
        for data in root.glob(name + "*"):  # external data files
            data.unlink()
        ctx.files.pop(name, None)
    ctx.describe(TEXT_MODEL, component="embed+language+lm_head", fmt="onnx",
                 precision="+".join(sorted({p for ps in precisions for p in ps.split("+")})) or None)


def tile_vision_input(ctx: "Context") -> None:
    """Give the vision graph the tiled signature (Adapter.vision_input "tiles"): pixel_values
    [batch, tiles, 3, H, W] and pixel_attention_mask [batch, tiles, H, W] (bool), reshaped to the
    [batch x tiles, 3, H, W] the tower computes. The mask is declared, as front ends feed it, and not
    read: one image per request and no padding tiles, every pixel is valid."""
    import onnx
    from onnx import TensorProto, helper

    from edgemed.formats.onnx.graph import VISION

    path = ctx.work_dir / VISION
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    (old,) = [i for i in g.input if i.name == "pixel_values"]
    dims = old.type.tensor_type.shape.dim
    if len(dims) != 4:
        return
    c, h, w = (d.dim_value for d in dims[1:])
    if not (c and h and w):  # edgemed's vision graphs take the tower's fixed size; a symbolic one cannot reshape here
        raise ValueError(f"{VISION}: pixel_values has symbolic sizes {[d.dim_param for d in dims[1:]]}")
    inner = "pixel_values_flat"
    for node in g.node:
        node.input[:] = [inner if x == "pixel_values" else x for x in node.input]
    shape = helper.make_tensor("pixel_values_flat_shape", TensorProto.INT64, [4], [-1, c, h, w])
    g.initializer.append(shape)
    g.node.insert(0, helper.make_node("Reshape", ["pixel_values", shape.name], [inner], name="/tiles/Reshape"))
    new = helper.make_tensor_value_info("pixel_values", old.type.tensor_type.elem_type, ["batch_size", "num_tiles", c, h, w])
    mask = helper.make_tensor_value_info("pixel_attention_mask", TensorProto.BOOL, ["batch_size", "num_tiles", h, w])
    g.input.remove(old)
    g.input.insert(0, new)
    g.input.insert(1, mask)
    onnx.save(model, str(path))


def move_graphs(ctx: "Context") -> dict[str, bool]:
    """Move the graphs the steps wrote into onnx/, their external data renamed to
    `<graph>.onnx_data` (the `location` in the graph rewritten to match, offsets unchanged), and
    keep ctx.files' descriptions with them. Returns {graph: has external data}."""
    import onnx

    root = ctx.work_dir
    (root / ONNX_DIR).mkdir(exist_ok=True)
    external: dict[str, bool] = {}
    for name in (*GRAPHS, TEXT_MODEL):
        src = root / name
        if not src.exists():
            continue
        model = onnx.load(str(src), load_external_data=False)
        locations = {e.value for t in _external_tensors(model.graph) for e in t.external_data if e.key == "location"}
        new_data = name + DATA_SUFFIX
        if len(locations) > 1:
            raise ValueError(f"{name}: weights in {len(locations)} external files; edgemed writes one")
        for old in locations:
            os.replace(root / old, root / ONNX_DIR / new_data)
            for t in _external_tensors(model.graph):
                for e in t.external_data:
                    if e.key == "location":
                        e.value = new_data
            _move_description(ctx, old, f"{ONNX_DIR}/{new_data}")
        if locations:
            onnx.save(model, str(root / ONNX_DIR / name))
            src.unlink()
        else:
            os.replace(src, root / ONNX_DIR / name)
        _move_description(ctx, name, f"{ONNX_DIR}/{name}")
        external[name] = bool(locations)
    return external


def _move_description(ctx: "Context", old: str, new: str) -> None:
    if old in ctx.files:
        ctx.files[new] = ctx.files.pop(old)


def _external_tensors(graph):
    from onnx import TensorProto

    from edgemed.formats.onnx.graph import _tensors

    return [t for t in _tensors(graph) if t.data_location == TensorProto.EXTERNAL]


def write_front_end_files(ctx: "Context", external: dict[str, bool]) -> None:
    """config.json, generation_config.json and processor_config.json beside the graphs (see the
    module docstring); the tokenizer and preprocessor files are written by compress itself."""
    cm = ctx.cm
    root = ctx.work_dir
    config: dict[str, Any] = cm.config.to_dict()
    js: dict[str, Any] = {"dtype": "fp32"}
    if any(external.values()):
        js["use_external_data_format"] = {name: True for name, ext in external.items() if ext}
    config["transformers.js_config"] = js
    (root / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    generation = getattr(cm.model, "generation_config", None)
    gen = generation.to_diff_dict() if generation is not None else {}
    gen = {k: v for k, v in gen.items() if k not in ("transformers_version",)}
    if not gen.get("eos_token_id") and cm.text.eos_token_ids:
        gen["eos_token_id"] = cm.text.eos_token_ids if len(cm.text.eos_token_ids) > 1 else cm.text.eos_token_ids[0]
    (root / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True))
    tok = root / "tokenizer_config.json"
    if cm.chat_template and tok.is_file():
        # transformers 5 writes the template to chat_template.jinja only; transformers.js's tokenizer
        # (and transformers before 4.43) read it from tokenizer_config.json.
        data = json.loads(tok.read_text())
        data.setdefault("chat_template", cm.chat_template)
        tok.write_text(json.dumps(data, indent=2, sort_keys=True))
    processor = cm.processor
    pre = root / "preprocessor_config.json"
    if processor is not None and pre.is_file() and hasattr(processor, "image_processor"):
        # transformers 4 wrote the processor's class into preprocessor_config.json, as the hub's
        # checkpoints still have it; transformers.js's AutoProcessor picks the processor by it.
        data = json.loads(pre.read_text())
        data.setdefault("processor_class", processor.__class__.__name__)
        pre.write_text(json.dumps(data, indent=2, sort_keys=True))
    if processor is not None and hasattr(processor, "to_json_string"):
        # The processor's own settings (image_token, patch_size, image_seq_len, ...), without the
        # sub-processors, which have their own files: what transformers.js's processors read.
        cfg = {k: v for k, v in json.loads(processor.to_json_string()).items() if not isinstance(v, dict)}
        cfg.pop("chat_template", None)  # chat_template.jinja
        (root / "processor_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
