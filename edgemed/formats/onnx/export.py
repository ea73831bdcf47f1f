"""CompositeModel -> three ONNX graphs in the onnx-community layout.

    vision_encoder.onnx         pixel_values [N,3,H,W] -> image_features [N,T,D] (tower + projector)
    embed_tokens.onnx           input_ids [B,S] -> inputs_embeds [B,S,D]
    decoder_model_merged.onnx   inputs_embeds, attention_mask, position_ids, past_key_values.{i}.key|value
                                -> logits, present.{i}.key|value   (one graph: prefill with an empty
                                past, decode with one token)

torch.onnx's dynamo exporter is used (optimum-onnx cannot export LLaVA and pins old transformers).
Every node keeps the module path it came from (`pkg.torch.onnx.name_scopes`), which is how the
component policy is compiled to per-node quantization choices.
"""
from __future__ import annotations

import contextlib

import logging
import warnings
from pathlib import Path

import onnx

from edgemed.formats.onnx.graph import COMPONENT_KEY, DECODER, EMBED, VISION
from edgemed.models import CompositeModel

log = logging.getLogger(__name__)

EXTERNAL_DATA_BYTES = 1_500_000_000  # ONNX protobufs cap at 2 GB
TORCH_STACK_TRACE = "pkg.torch.onnx.stack_trace"  # node metadata torch.onnx writes; dropped after export


def _torch():
    import torch

    return torch


def export_onnx(cm: CompositeModel, out_dir: Path, opset: int = 18, progress=None,
                decoder_builder: str = "torch") -> tuple[list[str], str, str]:
    """Write the graphs into out_dir. decoder_builder 'genai' writes the decoder with
    onnxruntime-genai's model builder (edgemed.formats.onnx.genai_decoder); 'auto' tries the builder and
    falls back to torch.onnx. Returns the file names written, the exporter that wrote the decoder
    ('genai' or 'torch') and a sentence saying so (with the reason, after a fallback)."""
    torch = _torch()
    say = progress or (lambda msg: None)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(VISION, _export_vision)] if cm.multimodal else []
    jobs += [(EMBED, _export_embed), (DECODER, _export_decoder)]
    used, decoder_note = "torch", "decoder graph written by torch.onnx (dynamo)"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in jobs:
            if name == DECODER and decoder_builder in ("genai", "auto"):
                say(f"export {name} (onnxruntime-genai builder)")
                try:
                    _export_decoder_with_builder(cm, out_dir)
                    used, decoder_note = "genai", "decoder graph written by the onnxruntime-genai model builder"
                    continue
                except Exception as e:  # the builder's own limits, e.g. its Phi-3 RoPE variants
                    if decoder_builder == "genai":
                        raise
                    decoder_note = (f"decoder graph written by torch.onnx: the onnxruntime-genai builder failed "
                                    f"({type(e).__name__}: {str(e)[:200]})")
            say(f"export {name}")
            with _resident(cm, name):
                fn(cm, out_dir / name, opset)
            _tag_components(cm, out_dir / name)
    return [name for name, _ in jobs], used, decoder_note


def _resident(cm: CompositeModel, name: str):
    """With the weights on disk (`--low-memory`), the modules a vision or embedding graph is traced
    from, loaded for the trace (one component: a vision tower is a few hundred MB in fp32). A
    decoder traced by torch.onnx would need them all: only the builder writes it then."""
    if cm.streamed is None:
        return contextlib.nullcontext()
    if name == DECODER:
        raise ValueError("a streamed decoder is written by the onnxruntime-genai builder, not traced")
    comps = cm.components()
    parts = ("vision", "projector") if name == VISION else ("embed",)
    return cm.streamed.hold(*[comps[p] for p in parts if comps.get(p) is not None])


def _export_decoder_with_builder(cm: CompositeModel, out_dir: Path) -> None:
    from edgemed.formats.onnx.genai_decoder import export_decoder_genai

    try:
        export_decoder_genai(cm, out_dir)
    except Exception:
        for f in out_dir.glob(DECODER + "*"):  # nothing half-written stays behind
            f.unlink()
        raise


def _save_kwargs(module) -> dict:
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    return {"external_data": nbytes > EXTERNAL_DATA_BYTES}


def _export(module, args, path: Path, input_names, output_names, dynamic_shapes, opset):
    torch = _torch()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    prog = torch.onnx.export(
        module, args, dynamo=True, input_names=input_names, output_names=output_names,
        dynamic_shapes=dynamic_shapes, opset_version=opset, optimize=True, verbose=False,
        report=False,
    )
    prog.save(str(path), **_save_kwargs(module))


def _modules():
    torch = _torch()

    class Vision(torch.nn.Module):
        def __init__(self, cm):
            super().__init__()
            self.m = cm.model
            self.adapter = cm.adapter

        def forward(self, pixel_values):
            return self.adapter.image_features(self.m, pixel_values)

    class Embed(torch.nn.Module):
        def __init__(self, cm):
            super().__init__()
            self.m = cm.model
            self.embed = cm.adapter.embed_tokens(cm.model)

        def forward(self, input_ids):
            return self.embed(input_ids)

    class Decoder(torch.nn.Module):
        def __init__(self, cm):
            super().__init__()
            self.m = cm.model
            self.lm = cm.adapter.language_model(cm.model)
            self.head = cm.adapter.lm_head(cm.model)
            self.n_layers = cm.text.num_layers
            self.adapter = cm.adapter
            self.token_type_ids = cm.adapter.decoder_token_type_ids

        def forward(self, inputs_embeds, attention_mask, position_ids, *rest):
            from transformers import DynamicCache

            tti, past = (rest[0], rest[1:]) if self.token_type_ids else (None, rest)
            # Plain (non-sliding) layers for every block: the cache keeps the whole history and
            # sliding-window layers are handled by the attention mask, so present.* always has
            # length past+seq and the runtime's bookkeeping is the same for every family.
            cache = DynamicCache()
            for i in range(self.n_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            mask = attention_mask
            if tti is not None:
                # The masks see the cache before this chunk is appended, as inside transformers.
                mask = self.adapter.decoder_attention_mask(self.lm, inputs_embeds, attention_mask, position_ids,
                                                           cache, tti)
            out = self.lm(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids,
                          past_key_values=cache, use_cache=True, return_dict=True)
            logits = self.head(out.last_hidden_state)
            flat = []
            for layer in out.past_key_values.layers:
                flat += [layer.keys, layer.values]
            return (logits, *flat)

    return Vision, Embed, Decoder


def _export_vision(cm: CompositeModel, path: Path, opset: int):
    torch = _torch()
    Vision, _, _ = _modules()
    size = cm.image.image_size
    pv = torch.randn(2, 3, size, size)
    _export(Vision(cm).eval(), (pv,), path, ["pixel_values"], ["image_features"],
            {"pixel_values": {0: torch.export.Dim("num_images", min=1, max=64)}}, opset)


def _export_embed(cm: CompositeModel, path: Path, opset: int):
    torch = _torch()
    _, Embed, _ = _modules()
    ids = torch.randint(0, cm.text.vocab_size, (2, 5))
    d = torch.export.Dim
    _export(Embed(cm).eval(), (ids,), path, ["input_ids"], ["inputs_embeds"],
            {"input_ids": {0: d("batch", min=1, max=64), 1: d("sequence", min=1, max=1 << 20)}}, opset)


def decoder_io_names(n_layers: int, token_type_ids: bool = False) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    extra = ["token_type_ids"] if token_type_ids else []
    return ["inputs_embeds", "attention_mask", "position_ids", *extra, *past], ["logits", *present]


def _export_decoder(cm: CompositeModel, path: Path, opset: int):
    torch = _torch()
    _, _, Decoder = _modules()
    t = cm.text
    b, s, p = 2, 5, 3  # a non-empty past so the exporter keeps its length symbolic
    emb = torch.randn(b, s, t.hidden_size)
    am = torch.ones(b, s + p, dtype=torch.int64)
    pos = torch.arange(p, p + s).unsqueeze(0).expand(b, s).contiguous()
    past = [torch.randn(b, t.num_kv_heads, p, t.head_dim) for _ in range(2 * t.num_layers)]
    d = torch.export.Dim
    batch, seq = d("batch", min=1, max=64), d("sequence_length", min=1, max=1 << 20)
    past_len, total = d("past_sequence_length", min=1, max=1 << 20), d("total_sequence_length", min=1, max=1 << 21)
    shapes = {
        "inputs_embeds": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "rest": tuple({0: batch, 2: past_len} for _ in past),
    }
    args = [emb, am, pos]
    if cm.adapter.decoder_token_type_ids:
        tti = torch.zeros(b, s, dtype=torch.int64)
        tti[:, 1:3] = 1  # an image block inside the example, so the mask logic is traced
        args.append(tti)
        shapes["rest"] = ({0: batch, 1: seq}, *shapes["rest"])
    ins, outs = decoder_io_names(t.num_layers, cm.adapter.decoder_token_type_ids)
    with _traceable_experts(cm.model):
        _export(Decoder(cm).eval(), (*args, *past), path, ins, outs, shapes, opset)


@contextlib.contextmanager
def _traceable_experts(model):
    """transformers' default MoE experts loop over the experts a batch hit (a data-dependent
    Python loop the exporter cannot keep); its "batched_mm" form gathers each token's top-k expert
    weights and multiplies them (Gather + batched MatMul): same outputs, one static graph, and per
    decoded token only the selected experts are computed."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "_is_expert_parallel")}
    saved = {k: getattr(c, "_experts_implementation", None) for k, c in configs.items()}
    try:
        for c in configs.values():
            c._experts_implementation = "batched_mm"
        yield
    finally:
        for k, c in configs.items():
            c._experts_implementation = saved[k]


def _component_prefixes(cm: CompositeModel) -> list[tuple[str, str]]:
    """(module path inside the export wrapper, component) pairs, longest path first."""
    names = {id(mod): name for name, mod in cm.model.named_modules()}
    pairs = []
    for comp, mod in cm.components().items():
        if id(mod) in names:
            pairs.append(("m." + names[id(mod)] if names[id(mod)] else "m", comp))
    # The wrappers also expose the decoder and head under short names.
    pairs += [("lm", "language"), ("head", "lm_head"), ("embed", "embed")]
    return sorted(pairs, key=lambda x: -len(x[0]))


def _tag_components(cm: CompositeModel, path: Path) -> None:
    """Record on every node which component (vision, projector, language, lm_head, embed) it
    belongs to, from the module path the exporter stored."""
    import ast

    model = onnx.load(str(path), load_external_data=False)
    prefixes = _component_prefixes(cm)
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = meta.get("pkg.torch.onnx.name_scopes")
        comp = None
        if scopes:
            try:
                scope_list = ast.literal_eval(scopes)
            except (ValueError, SyntaxError):
                scope_list = []
            for s in reversed(scope_list):
                for prefix, c in prefixes:
                    if s == prefix or s.startswith(prefix + "."):
                        comp = c
                        break
                if comp:
                    break
        if comp:
            entry = node.metadata_props.add()
            entry.key, entry.value = COMPONENT_KEY, comp
        # torch.onnx records the Python stack of every op: absolute paths of the machine that exported
        # it (a user's home folder, in an artifact a clinic deploys) and lines that change with any edit.
        kept = [p for p in node.metadata_props if p.key != TORCH_STACK_TRACE]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
    # Loaded without external data: tensors keep pointing at the existing .data file.
    onnx.save(model, str(path))
