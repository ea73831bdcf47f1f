"""A parent whose weights stay on disk (`compress --low-memory`): peak memory one module, not the model.

The model is built on the meta device, every parameter is replaced by a shape-only placeholder
(one zero broadcast to the shape: no memory), and each module that owns parameters gets a
forward pre-hook that reads its own tensors from the checkpoint's safetensors shards in fp32 and a
forward hook that drops them again. transformers' own forward code then runs unchanged (masks,
rotary, the KV cache of a generation), one Linear's weights resident at a time, so the parent's
logits, generations and activation statistics (imatrix) are exactly those of the in-memory fp32
parent (bf16/fp16 checkpoint values upcast the same way `from_pretrained(dtype=float32)` does).
Exporters read the same tensors by name (`StreamedWeights.reader`), tensor by tensor.

Reads open the shard, copy one tensor and close it again: safetensors reads through a memory map,
and pages touched through a map that stays open count in the process's RSS until it is closed, so
a handle kept open for the whole run would make a 7B model's 14 GB resident after one pass.
The skeleton is accelerate's `init_empty_weights`; its disk offload (AlignDevicesHook) is not used
because it would first write an fp32 copy of a bf16 checkpoint to its offload folder (29 GB for a 7B).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgemed.errors import BadInputError


class CheckpointTensors:
    """name -> tensor of a folder of safetensors shards, read one tensor at a time."""

    def __init__(self, files: list[Path]):
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            self.add(f, new=False)

    def add(self, file: Path, new: bool = True) -> list[str]:
        """The tensors of one more safetensors file (a shard, or a transform's results written
        beside the checkpoint's: transforms.prune); `new`: its keys must be new. Returns them."""
        from safetensors import safe_open

        added = []
        with safe_open(str(file), framework="pt") as h:
            for k in h.keys():
                if new and k in self.where:
                    raise ValueError(f"{file}: tensor {k} is in {self.where[k]} already")
                self.where[k] = file
                self.shapes[k] = tuple(h.get_slice(k).get_shape())
                added.append(k)
        return added

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def model_names(self, model) -> dict[str, str]:
        """The model's parameter name -> checkpoint key, by transformers' own renaming rules for this
        model (conversion_mapping: e.g. a LLaVA checkpoint's `language_model.model.*` is the model's
        `model.language_model.*`). Keys a converter fuses or splits are left out (not 1:1)."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta = dict.fromkeys(n for n, _ in model.named_parameters(remove_duplicate=False))
        out = {}
        for key in self.where:
            name, fused = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
            if fused is None:
                out[name] = key
        return out

    def get(self, key: str, stored: bool = False):
        """The tensor as float32 (torch), read from its shard now; `stored`: in the shard's own dtype."""
        import torch
        from safetensors import safe_open

        with safe_open(str(self.where[key]), framework="pt") as h:
            t = h.get_tensor(key)
        return t.to(torch.float32) if t.is_floating_point() and not stored else t


class StreamedWeights:
    """The hooks that load each module's own parameters for its forward and drop them after it."""

    def __init__(self, model, tensors: CheckpointTensors, tied: dict[str, str], source: str):
        import torch

        self.tensors = tensors
        self.keys: dict[int, str] = {}  # id(placeholder parameter) -> checkpoint key
        self.resident = 0  # bytes of parameters loaded now (tests check that it returns to 0)
        self.peak_resident = 0
        self.pinned = 0  # inside hold(): forwards leave the loaded weights in place
        placeholders: dict[int, Any] = {}
        names = tensors.model_names(model)
        missing = []
        for mod_name, module in model.named_modules():
            for name, p in list(module.named_parameters(recurse=False)):
                full = f"{mod_name}.{name}" if mod_name else name
                if id(p) not in placeholders:
                    key = names.get(full) or names.get(tied.get(full, ""))
                    if key is None:
                        missing.append(full)
                        continue
                    if tuple(p.shape) != tensors.shapes[key]:
                        raise BadInputError(source, f"tensor {key} has shape {tensors.shapes[key]}, the config "
                                            f"makes {tuple(p.shape)}", "check that config.json belongs to these weights")
                    ph = torch.nn.Parameter(torch.zeros((), dtype=torch.float32).expand(p.shape), requires_grad=False)
                    placeholders[id(p)] = ph
                    self.keys[id(ph)] = key
                module._parameters[name] = placeholders[id(p)]
        if missing:
            raise BadInputError(source, f"--low-memory reads each parameter under its own name from the safetensors, and "
                                f"{len(missing)} are not there under the names this transformers version gives them "
                                f"(first: {missing[0]})",
                                "compress without --low-memory, or re-save the checkpoint with this transformers version")
        for module in model.modules():
            if any(True for _ in module.parameters(recurse=False)):
                module.register_forward_pre_hook(self._load)
                module.register_forward_hook(self._drop)
        self.model = model

    def _load(self, module, args):
        for p in module.parameters(recurse=False):
            if p.dim() == 0 or p.stride() != (0,) * p.dim():
                continue  # loaded already (a tied weight whose other owner is running)
            p.data = self.tensors.get(self.keys[id(p)])
            self.resident += p.numel() * 4
        self.peak_resident = max(self.peak_resident, self.resident)

    def _drop(self, module, args, output):
        import torch

        if self.pinned:
            return
        for p in module.parameters(recurse=False):
            if p.dim() and p.stride() != (0,) * p.dim():
                self.resident -= p.numel() * 4
                p.data = torch.zeros((), dtype=torch.float32).expand(p.shape)

    @contextlib.contextmanager
    def hold(self, *modules):
        """The weights of `modules` (and their children) loaded for the whole block, for work that
        runs them as a whole rather than by forward hooks (torch.onnx tracing a vision tower)."""
        loaded = [m for top in modules for m in top.modules() if any(True for _ in m.parameters(recurse=False))]
        self.pinned += 1
        try:
            for m in loaded:
                self._load(m, None)
            yield
        finally:
            self.pinned -= 1
            if not self.pinned:
                for m in loaded:
                    self._drop(m, None, None)

    def replace(self, module, name: str, key: str) -> None:
        """module.<name> becomes the checkpoint tensor `key` (added with CheckpointTensors.add): a
        transform that changes a parameter's shape (pruning) leaves its result on disk as well, and
        forwards, exporters and readers see it in place of the checkpoint's own."""
        import torch

        old = module._parameters[name]
        if old.dim() and old.stride() != (0,) * old.dim():  # resident now (inside hold())
            self.resident -= old.numel() * 4
        self.keys.pop(id(old), None)
        ph = torch.nn.Parameter(torch.zeros((), dtype=torch.float32).expand(self.tensors.shapes[key]),
                                requires_grad=False)
        self.keys[id(ph)] = key
        module._parameters[name] = ph

    def read(self, param):
        """One parameter as float32 (torch), read from the checkpoint now (placeholders only)."""
        return self.tensors.get(self.keys[id(param)])

    def reader(self, param) -> Callable[[], np.ndarray] | None:
        """A loader of one parameter as float32 numpy (for writers that stream tensor by tensor)."""
        key = self.keys.get(id(param))
        if key is None:
            return None
        return lambda: self.tensors.get(key).numpy()


def streamed_model(cls, config, files: list[Path], source: str):
    """`cls` built from `config` with every weight left on disk (see the module doc)."""
    from accelerate import init_empty_weights
    from transformers.initialization import no_init_weights

    # Parameters on the meta device; buffers computed at construction (rotary frequencies, Gemma's
    # embedding scale) are real, as transformers' own from_pretrained builds them.
    _malloc_returns_big_blocks()
    # from_config stamps its dtype on the sub-configs (text_config, vision_config), which
    # from_pretrained leaves as the checkpoint said; the artifact's config.json is written from them.
    subs = {k: getattr(config, k) for k in getattr(config, "sub_configs", {}) if getattr(config, k, None) is not None}
    dtypes = {k: getattr(sub, "dtype", None) for k, sub in subs.items()}
    with init_empty_weights(include_buffers=False), no_init_weights():
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
    for k, sub in subs.items():
        sub.dtype = dtypes[k]
    model = model.eval()
    tensors = CheckpointTensors(files)
    tied = {}
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False) or \
            getattr(model.config, "tie_word_embeddings", False):
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
        names = {id(m): n for n, m in model.named_modules()}
        if inp is not None and out is not None:
            tied[f"{names[id(out)]}.weight"] = f"{names[id(inp)]}.weight"
    return model, StreamedWeights(model, tensors, tied, source)


def _malloc_returns_big_blocks() -> None:
    """glibc serves a block from its heap unless it is above the mmap threshold, and after the first
    large free it raises that threshold up to 32 MB: a 1B model's 16 MB weight tensors, read and
    freed once per forward, then fragment the heap and stay resident (measured: +0.4 GB at 22
    layers over 11). A fixed 1 MB threshold (mallopt M_MMAP_THRESHOLD, which also stops the
    adjustment) gives every tensor its own mapping, returned to the system when freed."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to tune
        pass


def shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    return sorted(folder.glob("*.safetensors"))
