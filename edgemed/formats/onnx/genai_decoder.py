"""Decoder graph from onnxruntime-genai's model builder.

The builder emits ONNX Runtime's fused operators (GroupQueryAttention with rotary embedding,
SkipSimplifiedLayerNormalization, packed QKV) that a plain torch.onnx export does not, which made
it about 1.4x faster at fp32 and 3x faster at int4 on SmolLM2-135M here. It is a well-kept Microsoft
library, so edgemed uses it for the text decoder where it supports the architecture and keeps its
own exporter for the vision encoder, the embeddings, and decoders the builder cannot express
(Gemma 3's bidirectional attention over image tokens). The builder writes fp32; quantization then
goes through edgemed's onnx-quantize step like every other graph, so the component policy applies.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx

from edgemed.formats.onnx.graph import COMPONENT_KEY, DECODER
from edgemed.models import CompositeModel, decoder_facts


def builder_arch(decoder_model_type: str) -> str | None:
    """The CausalLM architecture the builder knows for a text decoder (None: unsupported)."""
    facts = decoder_facts(decoder_model_type)
    return facts.builder_arch if facts else None


def builder_unsupported_reason(cm: CompositeModel) -> str | None:
    """None when the builder can write this model's decoder, else why not."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return "onnxruntime-genai is not installed (pip install 'edgemed[genai]')"
    if cm.adapter.decoder_token_type_ids:
        return f"{cm.family} attends bidirectionally over image tokens, which the builder's graph cannot express"
    if builder_arch(cm.text.decoder_model_type) is None:
        return f"the builder does not support text decoders of type '{cm.text.decoder_model_type}'"
    return None


def _write_text_model(cm: CompositeModel, folder: Path) -> None:
    """The language model and lm_head as a standalone CausalLM folder (what the builder reads)."""
    from safetensors.torch import save_file

    tc = cm.adapter.text_config(cm.config)
    tc = tc.__class__.from_dict(tc.to_dict())
    tc.architectures = [builder_arch(cm.text.decoder_model_type)]
    tc.tie_word_embeddings = False  # lm_head is written out explicitly below
    tc.save_pretrained(folder)
    # transformers 5 keeps rope_theta inside rope_parameters; the builder (0.18) reads only the
    # top-level key and silently falls back to 10000, which parity caught on SmolLM2 (KLD 6).
    cfg = json.loads((folder / "config.json").read_text())
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in cfg:
        cfg["rope_theta"] = theta
    # A model read from a GGUF keeps transformers' `quantization_config` (quant_method gguf) though
    # its weights are dequantized in memory; the builder refuses any such config, so the decoder of
    # every GGUF-sourced model (the demo's SmolLM2 included) fell back to torch.onnx. The weights
    # written below are plain floats.
    cfg.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    lm = cm.adapter.language_model(cm.model)
    tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in lm.state_dict().items()}
    tensors["lm_head.weight"] = cm.adapter.lm_head(cm.model).weight.detach().contiguous().clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cm.tokenizer.save_pretrained(folder)


def export_decoder_genai(cm: CompositeModel, out_dir: Path) -> None:
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    with tempfile.TemporaryDirectory(dir=out_dir.parent) as td:
        src, dst, cache = Path(td) / "hf", Path(td) / "onnx", Path(td) / "cache"
        src.mkdir()
        _write_text_model(cm, src)
        extra = ["exclude_embeds=true", f"filename={DECODER}"]
        sink = io.StringIO()
        root = logging.getLogger()
        saved = (root.level, list(root.handlers))
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                opts = parse_extra_options(None, str(src), str(dst), "fp32", "cpu", str(cache), extra)
                create_model(None, str(src), str(dst), "fp32", "cpu", str(cache), **opts)
        finally:  # the builder configures the root logger at INFO; give the process its own back
            root.setLevel(saved[0])
            root.handlers[:] = saved[1]
        for name in os.listdir(dst):
            if name.startswith(DECODER):  # the graph and its external data file
                shutil.move(str(dst / name), str(out_dir / name))
    _tag_builder_components(out_dir / DECODER, cm.text.head_dim)


def _tag_builder_components(path: Path, head_dim: int) -> None:
    """The builder names nodes after the module they implement (/model/layers.N/..., /lm_head/MatMul).
    Its KV-cache inputs and outputs name the head size symbolically ('kv_cache_dim'); it is written
    as the number it is, since front ends size an empty cache from the graph's declared shape
    (transformers.js resolves an unknown symbol to 0, and GroupQueryAttention then refuses it)."""
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        comp = "lm_head" if node.name.startswith("/lm_head/") else "language"
        entry = node.metadata_props.add()
        entry.key, entry.value = COMPONENT_KEY, comp
    for value in [*model.graph.input, *model.graph.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            dims = value.type.tensor_type.shape.dim
            if len(dims) == 4 and dims[3].dim_param:
                dims[3].dim_value = head_dim  # replaces the symbol (a oneof)
    onnx.save(model, str(path))
