"""TensorRT sessions over the engines `edgemed build-engine` wrote, with OnnxSession's interface.

The engines replace the three ONNX Runtime sessions one for one (vision encoder, embeddings,
decoder with a KV cache in the torch.onnx `concat` layout); preprocessing, prompts, image-token
splicing and greedy decoding are OnnxSession's own code, so a TensorRT artifact answers exactly as
its ONNX twin would. Buffers live in device memory allocated through cuda-python (no torch). The
KV cache stays on the device: a step's present.* outputs are bound as the next step's past.*
inputs, two buffers per tensor swapped in turn (ping-pong), so per step only the new embeddings go
up and the logits come down. Not done: CUDA graphs (the decode shapes change every step, so a
captured graph would need TensorRT's static-shape profiles per context length).

Without engines, or without tensorrt, `open_tensorrt` returns an ONNX Runtime session over the
artifact's Q/DQ ONNX graphs: the layout is the same, so the host checks parity on what the
device will build from.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgemed.errors import BadInputError, MissingDependencyError
from edgemed.formats.onnx.session import OnnxSession

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.artifact import Manifest

ENGINE_GRAPHS = ("vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx")


def engines_built(path: Path, manifest: "Manifest") -> dict[str, Path] | None:
    """{graph: engine path} when build-engine recorded engines and every file is present."""
    trt_rec = manifest.runtime.get("trt") or {}
    engines = trt_rec.get("engines")
    if not engines:
        return None
    out = {g: path / rel for g, rel in engines.items()}
    return out if all(p.is_file() for p in out.values()) else None


def tensorrt_available() -> str | None:
    """None if tensorrt and cuda-python import, else the reason."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the 'tensorrt' package is not installed (it comes with JetPack, or NVIDIA's pip index on x86)"
    try:
        load_cudart()
    except ImportError:
        return "the 'cuda-python' package is not installed (pip install cuda-python)"
    return None


def open_tensorrt(path: Path, manifest: "Manifest", backend: str = "auto", device=None, **kwargs):
    """backend 'auto': engines if built here and tensorrt imports, else the Q/DQ ONNX on ONNX
    Runtime; 'tensorrt' insists on engines; 'onnxruntime' always runs the Q/DQ ONNX. A device
    chosen by edgemed.runtime decides it: "cuda" the engines, "cpu" the Q/DQ ONNX on the CPU."""
    if device is not None and backend == "auto":
        backend = "tensorrt" if device.device == "cuda" else "onnxruntime"
        kwargs["device"] = device
    engines = engines_built(path, manifest)
    if backend == "onnxruntime" or (backend == "auto" and (engines is None or tensorrt_available())):
        return QdqOnnxSession(path, manifest, engines_present=engines is not None, **kwargs)
    if engines is None:
        raise BadInputError(str(path), "no TensorRT engines have been built for this artifact",
                            f"run `edgemed build-engine {path}` on the device")
    reason = tensorrt_available()
    if reason:
        raise MissingDependencyError(f"{path}: TensorRT session ({reason})", "tensorrt", extra="tensorrt")
    return TrtSession(path, manifest, engines, **kwargs)


# TensorRT multiplies the int8 values exactly (int32 accumulation), which is float math on the
# dequantized tensors. ONNX Runtime would fuse Q/DQ + MatMul into its own int8 kernels, and on a CPU
# without VNNI (AVX2) those shift s8 activations to u8 and pair them in VPMADDUBSW, whose int16 sums
# saturate (ONNX Runtime's quantization guide, docs/performance/model-optimizations/quantization.md, on
# reduce_range and U8U8 for non-VNNI CPUs): parity measured there was the CPU kernel's error, not the
# artifact's (Gemma 3 replica on an AVX2 EPYC: KLD 1.8e-3 and top-1 0.15 fused, 1.4e-5 and 0.83
# unfused). Unfused (DequantizeLinear then a float MatMul), every host computes what the engine will;
# slower on a CPU, where this session is the stand-in for parity, not the deployment.
QDQ_AS_TENSORRT = {"session.disable_quant_qdq": "1"}


class QdqOnnxSession(OnnxSession):
    """The TensorRT artifact's Q/DQ ONNX graphs on ONNX Runtime (CPU unless providers say otherwise)."""

    backend = "onnxruntime (Q/DQ ONNX)"

    def __init__(self, path: Path, manifest: "Manifest", engines_present: bool = False, **kwargs):
        # ONNX Runtime 1.32's QDQPropagationTransformer copies Q nodes across Reshape with an
        # opset-21 output_dtype that contradicts their zero point and the session fails to load;
        # the graph is valid without it (the propagation is only a CPU speed-up).
        kwargs.setdefault("disabled_optimizers", ["QDQPropagationTransformer"])
        kwargs.setdefault("session_config", QDQ_AS_TENSORRT)
        super().__init__(path, manifest, **kwargs)
        self._engines_present = engines_present

    def parity_record(self) -> dict[str, Any]:
        why = ("engines exist but tensorrt is not importable here" if self._engines_present
               else "TensorRT engines are built on the device by `edgemed build-engine`")
        return {"runtime_backend": f"onnxruntime on the Q/DQ ONNX graphs ({why})"}


# --- CUDA and TensorRT plumbing --------------------------------------------------------------------

def load_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def cuda_check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else (rest or None)


class _DeviceBuffer:
    """A device allocation that grows to the largest tensor seen (shapes change every call)."""

    def __init__(self, cudart):
        self.cudart, self.ptr, self.nbytes = cudart, 0, 0

    def ensure(self, nbytes: int) -> int:
        nbytes = max(nbytes, 1)  # TensorRT wants a valid address even for empty tensors (past at 0)
        if nbytes > self.nbytes:
            if self.ptr:
                cuda_check(self.cudart.cudaFree(self.ptr))
            self.ptr = int(cuda_check(self.cudart.cudaMalloc(nbytes)))
            self.nbytes = nbytes
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            self.cudart.cudaFree(self.ptr)
            self.ptr, self.nbytes = 0, 0

    def __del__(self):  # a finished generation's KV buffers are dropped, not closed: free them here
        try:
            self.free()
        except Exception:  # noqa: BLE001  interpreter shutdown
            pass


class DeviceTensor:
    """A tensor in device memory: the buffer, its shape and dtype."""

    def __init__(self, buffer: _DeviceBuffer, shape: tuple, dtype):
        self.buffer, self.shape, self.dtype = buffer, tuple(int(d) for d in shape), np.dtype(dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


class DeviceKV:
    """The decoder's KV cache in device memory (the `concat` layout: past in, past+new out)."""

    def __init__(self, tensors: dict[str, DeviceTensor]):
        self.tensors = tensors
        self.length = next(iter(tensors.values())).shape[2]


class TrtEngineRunner:
    """One deserialized engine with `run(None, feeds) -> [outputs]`, ONNX Runtime's calling shape,
    so OnnxSession's encode_image and input_embeds work unchanged."""

    def __init__(self, trt, runtime, engine_path: Path, profile_names: list[str], cudart, stream):
        self.trt, self.cudart, self.stream = trt, cudart, stream
        self.engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise BadInputError(str(engine_path), "TensorRT could not deserialize this engine (built with another "
                                "TensorRT version or for another GPU?)", "run `edgemed build-engine --force` here")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.buffers = {n: _DeviceBuffer(cudart) for n in names}
        self.profile_names = profile_names
        self.profile = 0

    def select_profile(self, name: str) -> None:
        idx = self.profile_names.index(name) if name in self.profile_names else 0
        if idx != self.profile:
            self.context.set_optimization_profile_async(idx, self.stream)
            self.profile = idx

    def run(self, _output_names, feeds: dict[str, Any], on_device: frozenset[str] = frozenset()) -> list[Any]:
        """Outputs for host feeds (numpy, copied up) and DeviceTensor feeds (bound where they lie).
        Outputs named in `on_device` stay on the device: DeviceTensor over this runner's buffer,
        which the caller takes (swap_buffer) before the next run writes it again."""
        cudart = self.cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        keep = []
        for name in self.inputs:
            feed = feeds[name]
            if isinstance(feed, DeviceTensor):
                self.context.set_input_shape(name, feed.shape)
                self.context.set_tensor_address(name, feed.buffer.ensure(feed.nbytes))
                continue
            arr = np.ascontiguousarray(feed, dtype=self.dtypes[name])
            keep.append(arr)
            ptr = self.buffers[name].ensure(arr.nbytes)
            if arr.nbytes:
                cuda_check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self.stream))
            self.context.set_input_shape(name, tuple(arr.shape))
            self.context.set_tensor_address(name, ptr)
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if name in on_device:
                out = DeviceTensor(self.buffers[name], shape, self.dtypes[name])
                self.context.set_tensor_address(name, out.buffer.ensure(out.nbytes))
            else:
                out = np.empty(shape, self.dtypes[name])
                self.context.set_tensor_address(name, self.buffers[name].ensure(out.nbytes))
            outs.append(out)
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        for name, out in zip(self.outputs, outs):
            if isinstance(out, np.ndarray) and out.nbytes:
                cuda_check(cudart.cudaMemcpyAsync(out.ctypes.data, self.buffers[name].ptr, out.nbytes, d2h, self.stream))
        cuda_check(cudart.cudaStreamSynchronize(self.stream))
        return outs

    def swap_buffer(self, name: str, buffer: "_DeviceBuffer") -> None:
        """Hand this runner `buffer` for output `name` (the one it wrote is now the caller's)."""
        self.buffers[name] = buffer

    def close(self) -> None:
        for b in self.buffers.values():
            b.free()


class TrtSession(OnnxSession):
    """OnnxSession's interface (generate, logits, prompt_ids, pixel_values, encode_image) on
    TensorRT engines."""

    backend = "tensorrt"

    def __init__(self, path: Path, manifest: "Manifest", engines: dict[str, Path], device=None, **_ignored):
        import tensorrt as trt
        from tokenizers import Tokenizer

        from edgemed.runtime.device import DeviceChoice

        self.path, self.manifest = path, manifest
        self.device = device or DeviceChoice("auto", "cuda", "TensorRT engines run on the GPU they were built on")
        self.text = manifest.model.text
        self.image = manifest.model.image
        self.chat_template = manifest.model.chat_template
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self._cudart = load_cudart()
        self._stream = cuda_check(self._cudart.cudaStreamCreate())
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        graphs = manifest.runtime["trt"]["graphs"]

        def runner(graph):
            profiles = [p["name"] for p in graphs[graph]["profiles"]]
            return TrtEngineRunner(trt, runtime, engines[graph], profiles, self._cudart, self._stream)

        self.decoder = runner("decoder_model_merged.onnx")
        self.embed = runner("embed_tokens.onnx")
        self.vision = runner("vision_encoder.onnx") if "vision_encoder.onnx" in engines else None
        self._kv_dtype = self.decoder.dtypes["past_key_values.0.key"]
        self._emb_dtype = self.decoder.dtypes["inputs_embeds"]
        self._has_position_ids = "position_ids" in self.decoder.inputs
        self._has_token_type_ids = "token_type_ids" in self.decoder.inputs
        self._shared_kv = False
        self.n_layers = self.text["num_layers"]
        self.context_tokens = int(manifest.runtime["trt"]["max_context"])  # the engines' largest profile
        self.eos = set(self.text.get("eos_token_ids") or [])

    @property
    def on_accelerator(self) -> bool:
        return True

    def empty_past(self, capacity: int = 0) -> DeviceKV:
        shape = (1, self.text["num_kv_heads"], 0, self.text["head_dim"])
        return DeviceKV({f"past_key_values.{i}.{kv}": DeviceTensor(_DeviceBuffer(self._cudart), shape, self._kv_dtype)
                         for i in range(self.n_layers) for kv in ("key", "value")})

    def forward(self, embeds: np.ndarray, past: DeviceKV, ids: np.ndarray | None = None):
        seq = embeds.shape[1]
        total = past.length + seq
        feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, total), np.int64), **past.tensors}
        if self._has_position_ids:
            feeds["position_ids"] = np.arange(past.length, total, dtype=np.int64)[None]
        if self._has_token_type_ids:
            tti = np.zeros((1, seq), np.int64)
            if ids is not None and self.image is not None:
                tti[0] = ids == self.image["image_token_id"]
            feeds["token_type_ids"] = tti
        self.decoder.select_profile("decode" if seq == 1 and past.length > 0 else "prefill")
        names = {name: name.replace("past_key_values", "present") for name in past.tensors}
        outs = dict(zip(self.decoder.outputs, self.decoder.run(None, feeds, on_device=frozenset(names.values()))))
        for name, out_name in names.items():  # the old past's buffer takes the next step's present
            self.decoder.swap_buffer(out_name, past.tensors[name].buffer)
        return outs["logits"][0], DeviceKV({name: outs[out_name] for name, out_name in names.items()})

    def close(self) -> None:
        for r in (self.decoder, self.embed, self.vision):
            if r is not None:
                r.close()

    def parity_record(self) -> dict[str, Any]:
        return {"runtime_backend": "tensorrt engines"}
