"""The ONNX artifact's graph names and component tags, graph rewrites the quantizers share, block
layouts along K, and saving past protobuf's 2 GB."""
from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

# The onnx-community layout: three graphs.
VISION, EMBED, DECODER = "vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx"
GRAPHS = (VISION, EMBED, DECODER)
COMPONENT_KEY = "edgemed.component"  # node metadata written after export


def graph_component(name: str) -> str:
    return {"vision_encoder.onnx": "vision+projector", "embed_tokens.onnx": "embed",
            "decoder_model_merged.onnx": "language+lm_head"}[name]


def node_components(model) -> dict[str, str]:
    out = {}
    for node in model.graph.node:
        for p in node.metadata_props:
            if p.key == COMPONENT_KEY:
                out[node.name] = p.value
    return out


def _block_size(v: int) -> int:
    """MatMulNBits blocks run along K in powers of two from 16."""
    if v < 16 or v & (v - 1):
        raise ValueError("block_size must be a power of two >= 16")
    return v


BlockSize = Annotated[int, AfterValidator(_block_size)]


def fit_block(k: int, block: int) -> int:
    """The largest power-of-two block <= `block` (and >= 16) that divides K, else `block` (such a
    MatMul goes to ONNX Runtime's rtn, which pads the last block). SmolLM2's K = 576 takes 64
    when 128 is asked: padded rtn blocks of 128 there cost KLD 1.48 on the demo model, fmin
    blocks of 64 1.01."""
    b = block
    while k % b and b > 16:
        b //= 2
    return b if k % b == 0 else block


def fold_weight_transposes(model) -> int:
    """MatMul(x, Transpose(W)) -> MatMul(x, W^T) with W^T stored: ONNX Runtime's weight quantizers
    only see constant B inputs, and a tied lm_head arrives as a Transpose of the embedding."""
    import numpy as np
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    folded = 0
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] in inits:
            continue
        tr = producers.get(node.input[1])
        if tr is None or tr.op_type != "Transpose" or tr.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), None)
        w = numpy_helper.to_array(inits[tr.input[0]])
        if w.ndim != 2 or perm not in (None, [1, 0]):
            continue
        name = tr.input[0] + "_transposed"
        if name not in inits:
            t = numpy_helper.from_array(np.ascontiguousarray(w.T), name)
            model.graph.initializer.append(t)
            inits[name] = t
        node.input[1] = name
        folded += 1
    if folded:
        # Drop initializers and Transposes nobody reads any more.
        used = {i for n in model.graph.node for i in n.input}
        outs = {o.name for o in model.graph.output}
        keep = [n for n in model.graph.node if n.op_type != "Transpose" or any(o in used or o in outs for o in n.output)]
        replace_nodes(model, keep, [])
    return folded


def gemm_to_matmul(model) -> int:
    """Gemm(x, W, transB=1) with a constant W and no bias -> MatMul(x, W^T), same node name (the
    component tag follows it). torch.onnx writes a Linear on a 2-D input as Gemm (the MoE block
    flattens tokens), and ONNX Runtime's weight quantizers only take MatMul."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    nodes, converted = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type == "Gemm" and len(node.input) == 2 and node.input[1] in inits
                and attrs.get("transA", 0) == 0 and attrs.get("alpha", 1.0) == 1.0):
            w = numpy_helper.to_array(inits[node.input[1]])
            if attrs.get("transB", 0):
                w = np.ascontiguousarray(w.T)
            name = node.input[1] + ("_transposed" if attrs.get("transB", 0) else "")
            if name not in inits:
                t = numpy_helper.from_array(w, name)
                model.graph.initializer.append(t)
                inits[name] = t
            mm = helper.make_node("MatMul", [node.input[0], name], list(node.output), name=node.name)
            mm.metadata_props.extend(node.metadata_props)
            nodes.append(mm)
            converted += 1
        else:
            nodes.append(node)
    if converted:
        replace_nodes(model, nodes, [])
    return converted


def replace_nodes(model, nodes: list, new_initializers: list) -> None:
    """Make `nodes` the graph's node list, add `new_initializers`, and drop the initializers no
    node reads any more (the float weights a quantizer replaced)."""
    used = {i for n in nodes for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used] + list(new_initializers)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def inputs_of(model, nodes: list[str]) -> list[str]:
    wanted = set(nodes)
    return sorted({n.input[0] for n in model.graph.node if n.name in wanted})


def by_fitted_block(model, nodes: list[str], block: int) -> dict[int, list[str]]:
    """Group MatMuls by fit_block(K, block), for the quantizers that take one block size per call."""
    dims = {t.name: t.dims[0] for t in model.graph.initializer if len(t.dims) == 2}
    wanted = set(nodes)
    k_of = {n.name: dims.get(n.input[1], block) for n in model.graph.node if n.name in wanted}
    groups: dict[int, list[str]] = {}
    for name in nodes:
        groups.setdefault(fit_block(k_of.get(name, block), block), []).append(name)
    return groups


PROTO_LIMIT = 1_800_000_000  # protobuf caps a message at 2 GB; keep a margin for the graph itself


def tensor_bytes(model) -> int:
    """Bytes of weights a ModelProto holds in itself. Protobuf's ByteSize() raises EncodeError
    past 2 GB instead of answering, so the size is counted from the tensors."""
    return sum(len(t.raw_data) + 4 * len(t.float_data) + 8 * len(t.int64_data) + 4 * len(t.int32_data)
               for t in _tensors(model.graph))


def session_source(model, folder: Path, min_bytes: int = 1024, limit: int = PROTO_LIMIT):
    """What onnxruntime.InferenceSession takes for `model`: its bytes when under protobuf's
    limit, else the path of a copy in `folder` whose large initializers are in one external-data
    file. `model` is left as it was (onnx.save with external data would empty its tensors), and no
    second in-memory copy of the weights is made: each tensor's bytes are written out, detached
    while the graph is serialized, then put back."""
    if tensor_bytes(model) < limit:
        return model.SerializeToString()
    from onnx import TensorProto

    folder = Path(folder)
    data_name = "probe.onnx.data"
    moved = []
    try:
        with open(folder / data_name, "wb") as out:
            for t in model.graph.initializer:
                if len(t.raw_data) < min_bytes:
                    continue
                offset = out.tell()
                raw = t.raw_data
                out.write(raw)
                moved.append((t, raw))
                t.ClearField("raw_data")
                t.data_location = TensorProto.EXTERNAL
                for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, value
                del raw
        path = folder / "probe.onnx"
        path.write_bytes(model.SerializeToString())
        return str(path)
    finally:
        for t, raw in moved:
            t.ClearField("external_data")
            t.ClearField("data_location")
            t.raw_data = raw


def probe_session(model, tensors: list[str]):
    """An ONNX Runtime CPU session of `model` with the named intermediate tensors as extra fp32
    outputs (for calibration statistics). The outputs are added in place and taken off again, and
    the session reads a graph past protobuf's 2 GB limit through external data (session_source):
    a copy of the model would hold a second set of weights (4.4 GB for a 1.1B decoder in fp32)."""
    import tempfile

    import onnxruntime as ort
    from onnx import TensorProto, helper

    kept = len(model.graph.output)
    have = {o.name for o in model.graph.output}
    for name in dict.fromkeys(tensors):
        if name not in have:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        with tempfile.TemporaryDirectory(prefix="edgemed-probe-") as tmp:
            return ort.InferenceSession(session_source(model, Path(tmp)), opts, providers=["CPUExecutionProvider"])
    finally:
        del model.graph.output[kept:]


def save_model(model, path: Path) -> None:
    """Write an in-memory graph as `path`, with its weights in `path.data` past external.INLINE_LIMIT: the
    file external.save_streamed writes for the same graph read from external data."""
    from edgemed.formats.onnx.external import save_streamed

    save_streamed(model, path, path.parent)


def _tensors(graph):
    """Every TensorProto a graph holds: initializers, sparse initializers, node attributes, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def check_external_data(root: Path, rel: str, listed: set[str]) -> None:
    """Refuse a graph whose external data lies outside the artifact or in a file the manifest does not
    list (BadInputError), reading the graph without its external data."""
    import onnx
    from onnx import TensorProto

    from edgemed.artifact import contained_path
    from edgemed.errors import BadInputError

    try:
        model = onnx.load(str(root / rel), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: a damaged or foreign file
        raise BadInputError(f"{root}: {rel}", f"is not a readable ONNX graph ({type(e).__name__})",
                            "re-run `edgemed compress`") from None
    for tensor in _tensors(model.graph):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        # ONNX Runtime reads a location relative to the graph's own folder (onnx/ in this layout).
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        location = location if "\\" in location else posixpath.normpath(posixpath.join(posixpath.dirname(rel), location))
        contained_path(root, location, f"{rel}: external data of tensor {tensor.name}")
        if location not in listed:
            raise BadInputError(f"{root}: {rel}", f"reads tensor {tensor.name} from '{location}', which the manifest "
                                "does not list", "re-run `edgemed compress`")
