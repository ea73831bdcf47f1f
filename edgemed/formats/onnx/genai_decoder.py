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


def _write_text_model(cm: CompositeModel, folder: Path, weights: bool = True) -> None:
    """The language model and lm_head as a standalone CausalLM folder (what the builder reads);
    `weights` False writes its config and tokenizer only (the builder then reads the streamed parent)."""
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
    cm.tokenizer.save_pretrained(folder)
    if not weights:
        return
    lm = cm.adapter.language_model(cm.model)
    tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in lm.state_dict().items()}
    tensors["lm_head.weight"] = cm.adapter.lm_head(cm.model).weight.detach().contiguous().clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def export_decoder_genai(cm: CompositeModel, out_dir: Path) -> None:
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    with tempfile.TemporaryDirectory(dir=out_dir.parent) as td:
        src, dst, cache = Path(td) / "hf", Path(td) / "onnx", Path(td) / "cache"
        src.mkdir()
        _write_text_model(cm, src, weights=cm.streamed is None)
        extra = ["exclude_embeds=true", f"filename={DECODER}"]
        sink = io.StringIO()
        root = logging.getLogger()
        saved = (root.level, list(root.handlers))
        streamed = builder_streams(cm, src, dst) if cm.streamed is not None else contextlib.nullcontext()
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), streamed:
                opts = parse_extra_options(None, str(src), str(dst), "fp32", "cpu", str(cache), extra)
                create_model(None, str(src), str(dst), "fp32", "cpu", str(cache), **opts)
        finally:  # the builder configures the root logger at INFO; give the process its own back
            root.setLevel(saved[0])
            root.handlers[:] = saved[1]
        for name in os.listdir(dst):
            if name.startswith(DECODER):  # the graph and its external data file
                shutil.move(str(dst / name), str(out_dir / name))
    _tag_builder_components(out_dir / DECODER, cm.text.head_dim)


class _ReadOnAccess(dict):
    """A module's `_parameters` whose values are read from the checkpoint when asked for by name
    (`module.weight`), the last one kept: the builder asks for a weight's shape, then for the weight."""

    def __init__(self, params: dict, keys: dict[str, str], tensors):
        super().__init__(params)
        self.keys, self.tensors = keys, tensors

    def __getitem__(self, name):
        import torch

        key = self.keys.get(name)
        if key is None:
            return super().__getitem__(name)
        last = _ReadOnAccess.last
        if last[0] != key:
            last[:] = [key, torch.nn.Parameter(self.tensors.get(key), requires_grad=False)]
        return last[1]

    last: list = [None, None]


def _streamed_causal_lm(cm: CompositeModel, folder: Path):
    """The CausalLM the builder walks, built on the meta device from the config written in `folder`,
    each parameter read from the parent's checkpoint when the builder reads it."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with init_empty_weights(include_buffers=False), no_init_weights():
        causal = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    lm, head = cm.adapter.language_model(cm.model), cm.adapter.lm_head(cm.model)
    keys = cm.streamed.keys  # id(the parent's placeholder parameter) -> checkpoint key

    def key_for(name: str) -> str:
        param = head.weight if name == "lm_head.weight" else lm.get_parameter(name.removeprefix("model."))
        return keys[id(param)]

    for mod_name, module in causal.named_modules():
        own = {n: f"{mod_name}.{n}" for n, p in module._parameters.items() if p is not None}
        if own:
            module._parameters = _ReadOnAccess(module._parameters, {n: key_for(full) for n, full in own.items()},
                                               cm.streamed.tensors)
    return causal


@contextlib.contextmanager
def builder_streams(cm: CompositeModel, src: Path, dst: Path):
    """The builder with the parent's weights left on disk: it walks a meta-device model whose
    parameters are read from the checkpoint as it asks for them, each initializer it makes is
    written to the decoder's external-data file at once (an onnx_ir ExternalTensor stays in its
    graph), and the graph is saved without reading them back. The builder itself keeps its
    initializers as lazy casts of the torch tensors it was given and writes them all at the end,
    which would hold every weight until then."""
    import sys

    import onnx
    import onnx_ir as ir
    import onnxruntime_genai.models.builder  # noqa: F401  (puts its folder on sys.path: `builders.base`)

    from edgemed.formats.onnx.external import TensorSink

    # builder.py imports its classes as the top-level `builders` package; the same file imported as
    # onnxruntime_genai.models.builders.base is another class object: patch whichever are loaded.
    models = {id(m.Model): m.Model for name in ("builders.base", "onnxruntime_genai.models.builders.base")
              if (m := sys.modules.get(name)) is not None}.values()

    dst.mkdir(parents=True, exist_ok=True)
    data = DECODER + ".data"
    sink = TensorSink(dst / data, data)
    saved = {Model: (Model.load_weights, Model.make_initializer, Model.save_model) for Model in models}

    def externalize(value) -> None:
        t = value.const_value
        if t is None or isinstance(t, ir.ExternalTensor):
            return
        offset, length = sink.write(t.tobytes())
        value.const_value = ir.ExternalTensor(data, offset, length, t.dtype, shape=t.shape, name=t.name,
                                              base_dir=dst)

    def load_weights(self, input_path):
        return _streamed_causal_lm(cm, src)

    def make_initializer(self, tensor, /, name, *, to=None, raw=False):
        saved[next(M for M in type(self).__mro__ if M in saved)][1](self, tensor, name, to=to, raw=raw)
        externalize(self.model.graph.initializers[name])

    def save_model(self, out_dir):
        model = self.model
        model.graph.sort()
        for value in model.graph.initializers.values():
            externalize(value)
        sink.close()
        if hasattr(self, "stamp_build_metadata"):
            self.stamp_build_metadata(model)
        onnx.save(ir.serde.serialize_model(model), os.path.join(out_dir, self.filename))

    for Model in saved:
        Model.load_weights, Model.make_initializer, Model.save_model = load_weights, make_initializer, save_model
    try:
        yield
    finally:
        for Model, methods in saved.items():
            Model.load_weights, Model.make_initializer, Model.save_model = methods
        _ReadOnAccess.last[:] = [None, None]
        sink.close()


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
