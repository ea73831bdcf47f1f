"""Load a model (hub id, local folder, or a .gguf file) as a CompositeModel with named parts."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgemed._resources import OFFLINE_FIX, online
from edgemed.errors import BadInputError
from edgemed.models.base import (FAMILIES, Adapter, DecoderFacts, ImageFacts, Normaliser, TextFacts, count_params,
                                 decoder_facts, ensure_model_types, family_for, model_types, normaliser_for,
                                 text_facts)

__all__ = [
    "CompositeModel", "FAMILIES", "ImageFacts", "TextFacts", "load_model", "load_config",
    "adapter_for", "component_param_counts", "DecoderFacts", "decoder_facts",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class CompositeModel:
    """A loaded VLM or LLM: the PyTorch module, its named components and the facts exporters need."""

    source: str
    family: str
    adapter: type[Adapter]
    config: Any
    model: Any  # transformers PreTrainedModel (eval mode, fp32)
    tokenizer: Any
    processor: Any | None
    image: ImageFacts | None
    text: TextFacts
    source_files: list[Path] = field(default_factory=list)
    chat_template: str | None = None
    # Set where the weights stay on disk (load_model(low_memory=True), edgemed.models.streamed).
    streamed: Any = None

    def weight_reader(self, param):
        """A loader of one parameter as float32 numpy, called when a writer needs it (streamed
        from the checkpoint where the weights stay on disk)."""
        if self.streamed is None:
            return lambda: param.detach().float().cpu().numpy()
        read = self.streamed.reader(param)
        if read is None:
            raise BadInputError(self.source, "a writer asked for a tensor that is not one of the checkpoint's own "
                                "(a slice of a fused tensor)", "compress without --low-memory")
        return read

    @property
    def multimodal(self) -> bool:
        return self.image is not None

    def components(self) -> dict:
        return self.adapter.components(self.model)

    def component_params(self) -> dict[str, int]:
        return _component_counts(self.adapter, self.model)

    def image_features(self, pixel_values):
        return self.adapter.image_features(self.model, pixel_values)

    @property
    def chat(self):
        """How this model turns a conversation into ids, exactly as the runtime does
        (edgemed.runtime.prompt.ChatFormat), so parity compares the same token ids."""
        from edgemed.runtime.prompt import ChatFormat

        return ChatFormat.of_record(self.text.to_dict(), self.image.to_dict() if self.image else None,
                                    self.chat_template)

    def build_prompt(self, prompt: str, with_image: bool, grid: tuple[int, int] = (0, 0)) -> str:
        """The rendered text of one user turn (images expanded; `grid`: the image's tiles)."""
        from edgemed.runtime.prompt import user_turn

        with_image = with_image and self.image is not None
        return self.chat.render(user_turn(prompt, with_image), grids=[grid] if with_image else [])

    def prompt_ids(self, prompt: str, with_image: bool, answer: str = "", grid: tuple[int, int] = (0, 0)):
        """Token ids of one user turn (and, for teacher forcing, the answer after it)."""
        import numpy as np

        chat = self.chat
        ids = chat.tokenize(self.tokenizer, self.build_prompt(prompt, with_image, grid) + answer)
        return np.asarray(ids, dtype=np.int64)


def adapter_for(config, what: str) -> type[Adapter]:
    mt = getattr(config, "model_type", None)
    adapter = family_for(mt)
    if adapter is None:
        raise unsupported(what, mt)
    return adapter


def unsupported(what: str, model_type: str | None, raw: dict | None = None) -> BadInputError:
    """The refusal for a model_type edgemed cannot load: the exact reason where edgemed knows the
    model (refusals.KNOWN), else the supported families."""
    from edgemed.models.refusals import known_refusal

    known = known_refusal(raw or {"model_type": model_type})
    if known:
        return BadInputError(what, known[0], known[1])
    return BadInputError(
        what, f"unknown architecture (model_type '{model_type}')",
        f"edgemed supports model_type {', '.join(model_types())}, and converts checkpoints of the original "
        "LLaVA code (llava_mistral, llava_llama: LLaVA-Med v1.5) with `edgemed convert`; for another "
        "architecture add an adapter in edgemed/models/families/")


def raw_config(source: str) -> dict | None:
    """config.json of a local folder as written (None for a hub id, a GGUF file or an unreadable file)."""
    p = Path(source) / "config.json"
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except (OSError, ValueError):
        return None


def _split_gguf(source: str) -> tuple[str, str | None]:
    p = Path(source)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise BadInputError(source, "GGUF file not found", "check the path")
        return str(p.parent), p.name
    return source, None


def load_config(source: str, trust_remote_code: bool = False, vision_tower: str | None = None):
    """The model's config (from a folder holding only config.json, a hub id, or a GGUF file); a
    checkpoint of a model's own code (LLaVA-Med) as the config of the family it is normalised into."""
    from transformers import AutoConfig

    raw = raw_config(source)
    ensure_model_types(raw)
    normaliser = normaliser_for(raw)
    if normaliser is not None:
        return normaliser.config(Path(source), raw, vision_tower)
    base, gguf_file = _split_gguf(source)
    p = Path(base)
    if p.exists() and p.is_dir() and gguf_file is None and not (p / "config.json").exists():
        raise BadInputError(source, "folder has no config.json", "point at a Hugging Face model folder or hub id")
    if not p.exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise BadInputError(source, "no such folder", "check the path, or give a hub id like org/name")
    if raw is not None and not trust_remote_code and raw.get("model_type") not in model_types():
        from transformers import CONFIG_MAPPING

        if raw.get("model_type") not in CONFIG_MAPPING:  # transformers would only say "unrecognized"
            raise unsupported(source, raw.get("model_type"), raw)
    try:
        return AutoConfig.from_pretrained(base, gguf_file=gguf_file, trust_remote_code=trust_remote_code,
                                          local_files_only=not online())
    except (OSError, ValueError, KeyError) as e:
        fix = "check the model id or folder" + ("" if online() or p.exists() else f"; {OFFLINE_FIX}")
        raise BadInputError(source, f"could not read the model config ({_short(e)})", fix) from None


def component_param_counts(config) -> dict[str, int]:
    """Exact parameter counts per component from a config alone (the model is built on the meta
    device: no weights, no memory)."""
    return param_counts(config)[0]


def param_counts(config) -> tuple[dict[str, int], dict[str, int]]:
    """component_param_counts, and the language model's Linear layers by qualified name ->
    weight parameters (what a recipe that treats some projections apart needs to count)."""
    import torch

    adapter = adapter_for(config, f"model_type '{getattr(config, 'model_type', None)}'")
    cls = adapter.model_class()
    with torch.device("meta"):
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
    language = adapter.components(model)["language"]
    linears = {name: m.weight.numel() for name, m in language.named_modules() if isinstance(m, torch.nn.Linear)}
    return _component_counts(adapter, model), linears


def _component_counts(adapter, model) -> dict[str, int]:
    comps = adapter.components(model)
    counts = {k: count_params(v) for k, v in comps.items() if k != "language"}
    # 'language' means the decoder blocks and final norm, without the embedding table.
    counts["language"] = count_params(comps["language"]) - counts.get("embed", 0)
    return counts


def load_model(source: str, *, allow_pickle: bool = False, trust_remote_code: bool = False,
               vision_tower: str | None = None, low_memory: bool = False) -> CompositeModel:
    """Load for export/compression: fp32, eval mode, safetensors only unless allow_pickle.
    `vision_tower`: the folder of the CLIP tower a LLaVA-Med-style checkpoint names (mm_vision_tower).
    `low_memory`: leave the weights on disk and read each module's own while it runs
    (edgemed.models.streamed): the same numbers, memory of one module instead of the model."""
    import torch
    from transformers import AutoProcessor, AutoTokenizer

    base, gguf_file = _split_gguf(source)
    config = load_config(source, trust_remote_code, vision_tower)
    adapter = adapter_for(config, source)
    normaliser = normaliser_for(raw_config(source))
    files: list[Path] = []
    p = Path(base)
    if p.is_dir():
        if gguf_file:
            files = [p / gguf_file]
        else:
            files = sorted(f for f in p.iterdir() if f.is_file())
            weights = [f for f in files if f.suffix == ".safetensors"]
            pickles = [f for f in files if f.suffix in PICKLE_SUFFIXES]
            if not weights and not pickles:
                raise BadInputError(source, "the folder holds a config but no weights",
                                    "`edgemed plan` works from a config alone; `compress` needs the model's *.safetensors")
            if not weights and not allow_pickle:
                raise BadInputError(source, f"weights are pickle files ({pickles[0].name}), which can run code when loaded",
                                    "convert them to safetensors, or pass --allow-pickle if you trust the source")
            for f in weights:
                check_safetensors(f)
    kwargs: dict[str, Any] = dict(dtype=torch.float32, trust_remote_code=trust_remote_code,
                                  local_files_only=not online())
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    else:
        kwargs["use_safetensors"] = None if allow_pickle else True
    if low_memory and (normaliser is not None or gguf_file or not p.is_dir()):
        raise BadInputError(source, "--low-memory reads a local folder of Hugging Face safetensors shards",
                            "convert the checkpoint first (`edgemed convert` for LLaVA-Med), or compress without --low-memory")
    streamed = None
    try:
        if low_memory:
            from edgemed.models.streamed import shard_files, streamed_model

            model, streamed = streamed_model(adapter.model_class(), config, shard_files(p), source)
        elif normaliser is not None:
            model = _normalised_model(normaliser, Path(base), config, vision_tower, allow_pickle, adapter)
        else:
            model = adapter.model_class().from_pretrained(base, **kwargs).eval()
        tokenizer = AutoTokenizer.from_pretrained(base, gguf_file=gguf_file, trust_remote_code=trust_remote_code,
                                                  local_files_only=not online())
    except (OSError, ValueError) as e:
        fix = "check that the folder holds config, safetensors weights and tokenizer files"
        raise BadInputError(source, f"could not load the model ({_short(e)})",
                            fix + ("" if online() or p.exists() else f"; {OFFLINE_FIX}")) from None
    processor = None
    if normaliser is not None:
        processor = normaliser.processor(Path(base), raw_config(source), config, tokenizer, vision_tower)
    elif adapter.multimodal:
        try:
            processor = AutoProcessor.from_pretrained(base, trust_remote_code=trust_remote_code,
                                                      local_files_only=not online())
        except (OSError, ValueError, TypeError, ImportError):
            processor = None
    image = adapter.image_facts(config, tokenizer, processor) if adapter.multimodal else None
    template = getattr(tokenizer, "chat_template", None)
    if processor is not None and getattr(processor, "chat_template", None):
        template = template or processor.chat_template
    return CompositeModel(
        source=source, family=adapter.family, adapter=adapter, config=config, model=model,
        tokenizer=tokenizer, processor=processor, image=image, text=text_facts(adapter, config, tokenizer),
        source_files=files, chat_template=template if isinstance(template, str) else None, streamed=streamed,
    )


def _normalised_model(normaliser: type[Normaliser], folder: Path, config, vision_tower, allow_pickle, adapter):
    import torch

    from transformers.initialization import no_init_weights

    state = normaliser.state_dict(folder, raw_config(str(folder)), config, vision_tower, allow_pickle)
    with no_init_weights():  # every weight comes from the checkpoint: skip the random init
        model = adapter.model_class()(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BadInputError(str(folder), f"does not hold a complete {normaliser.what} (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})", "check that every *.safetensors shard is present")
    return model.eval()


def check_safetensors(path: Path) -> None:
    """A truncated or damaged *.safetensors is refused by name before loading: its JSON header must
    parse and every tensor's data must lie inside the file (a cut download or a full disk)."""
    import struct

    size = path.stat().st_size
    fix = "download or copy the checkpoint again (compare its size and sha256 with the source)"
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a {size}-byte file")
            header = json.loads(fh.read(n))
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise BadInputError(str(path), f"is not a readable safetensors file ({_short(e)})", fix) from None
    if 8 + n + end > size:
        raise BadInputError(str(path), f"is truncated: its header promises {8 + n + end} bytes, the file has {size}", fix)


def _short(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__
