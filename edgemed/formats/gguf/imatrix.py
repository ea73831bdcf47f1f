"""A medical multimodal importance matrix (imatrix) for llama.cpp's quantizers.

llama.cpp's own `llama-imatrix` runs text through the language model only, so the statistics
never see the image-token positions a clinic's requests are full of. Here the VLM runs in PyTorch
on calibration images and prompts (the vision tower's features in place of the image tokens) and
a forward hook on every Linear of the language model accumulates, per input column, the sum of
squared activations and the number of rows, exactly the two numbers llama.cpp stores; the decoder
runs one layer at a time over every sample (calibration.sequential).

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
    """The imatrix of the language model's Linears (llama.cpp's weight names) over the calibration
    samples, taken one decoder layer at a time over all of them (calibration.sequential: the same
    sums as hooks over whole-model passes, and a streamed parent reads each layer once, not once a
    sample)."""
    from edgemed.calibration.feeds import feeds_for
    from edgemed.calibration.sequential import LayerPass
    from edgemed.formats.gguf.language import language_tensors

    say = progress or (lambda msg: None)
    feeds = feeds_for(cm, calib)
    say(f"imatrix: {len(feeds)} samples, one decoder layer at a time")
    sums, rows = LayerPass(cm, feeds).input_square_sums()
    # Linear modules of the decoder and lm_head, named as llama.cpp names their weights.
    names = {id(p): new for _, new, p in language_tensors(cm)}
    by_name = {names[id(m.weight)]: id(m) for m in cm.model.modules()
               if id(m) in sums and id(getattr(m, "weight", None)) in names}
    if not by_name:
        raise BadInputError(cm.source, "no language-model Linear layer saw an activation", "check the model")
    return ImatrixStats(sums={k: sums[i].float().numpy() for k, i in by_name.items()},
                        counts={k: rows[i] for k, i in by_name.items()}, chunks=len(feeds),
                        tokens=int(sum(f["attention_mask"].sum() for f in feeds)))


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
