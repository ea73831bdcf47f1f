"""A medical multimodal importance matrix (imatrix) for llama.cpp's quantizers.

llama.cpp's own `llama-imatrix` runs text through the language model only, so the statistics
never see the image-token positions a clinic's requests are full of. Here the whole VLM runs in
PyTorch on calibration images and prompts (the parent's own forward pass, image tokens included)
and a forward hook on every Linear of the language model accumulates, per input column, the sum
of squared activations and the number of rows, exactly the two numbers llama.cpp stores.

The result is written in llama.cpp's imatrix GGUF format (`<tensor>.in_sum2`, `<tensor>.counts`,
`imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size`; tools/imatrix, common/imatrix-loader)
so `llama-quantize --imatrix imatrix.gguf` reads it too, and is handed to
`llama_model_quantize` in memory as in_sum2 / counts, as llama-quantize does after loading.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgemed.errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.calibration.samples import Calibration
    from edgemed.models import CompositeModel


@dataclass
class ImatrixStats:
    """Per GGUF weight name: sum over rows of x^2 per input column, and the number of rows."""

    sums: dict[str, np.ndarray]
    counts: dict[str, int]
    chunks: int
    tokens: int


def compute_imatrix(cm: "CompositeModel", calib: "Calibration", progress=None) -> ImatrixStats:
    import torch

    from edgemed.formats.gguf.language import language_tensors
    from edgemed.reference.parity import parent_logits
    from edgemed.runtime.preprocess import tiles

    say = progress or (lambda msg: None)
    # Linear modules of the decoder and lm_head, named as llama.cpp names their weights.
    weight_names = {id(p): new for _, new, p in language_tensors(cm)}
    modules = []
    for module in cm.model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) in weight_names:
            modules.append((weight_names[id(module.weight)], module))
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def fn(mod, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules]
    tokens = 0
    try:
        for i, (prompt, answer, image) in enumerate(calib.samples):
            pv, rows, cols = tiles(image, cm.image.to_dict()) if image is not None else (None, 0, 0)
            ids = cm.prompt_ids(prompt, image is not None, answer, grid=(rows, cols))
            parent_logits(cm, ids, pv)
            tokens += len(ids)
            if i % 8 == 0:
                say(f"imatrix pass {i + 1}/{len(calib.samples)}")
    finally:
        for h in handles:
            h.remove()
    if not sums:
        raise BadInputError(cm.source, "no language-model Linear layer saw an activation", "check the model")
    return ImatrixStats(sums={k: v.float().numpy() for k, v in sums.items()}, counts=counts,
                        chunks=len(calib.samples), tokens=tokens)


def write_imatrix_gguf(path: Path, stats: ImatrixStats, datasets: list[str]) -> None:
    import gguf

    w = gguf.GGUFWriter(path, "imatrix")
    w.add_type("imatrix")
    w.add_array(gguf.Keys.IMatrix.DATASETS, datasets)
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, stats.chunks)
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, max(1, stats.tokens // max(1, stats.chunks)))
    for name in sorted(stats.sums):
        w.add_tensor(f"{name}.in_sum2", stats.sums[name].astype(np.float32)[None, :])
        w.add_tensor(f"{name}.counts", np.asarray([[stats.counts[name]]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_imatrix(path: Path) -> dict[str, np.ndarray]:
    """in_sum2 / counts per weight, as llama-quantize computes the values it passes to the quantizer."""
    import gguf

    r = gguf.GGUFReader(path)
    sums, cnts = {}, {}
    for t in r.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
        elif t.name.endswith(".counts"):
            cnts[t.name[: -len(".counts")]] = float(np.asarray(t.data).reshape(-1)[0])
    if not sums or set(sums) != set(cnts):
        raise BadInputError(str(path), "is not a llama.cpp imatrix (in_sum2/counts pairs missing)",
                            "recompute it with imatrix: multimodal or text")
    return {k: (v / cnts[k] if cnts[k] > 0 else np.ones_like(v)) for k, v in sums.items()}
