"""ONNX Runtime session over the three graphs of an ONNX artifact, with a KV cache."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgemed.errors import BadInputError
from edgemed.formats.onnx.graph import DECODER, EMBED, VISION
from edgemed.formats.onnx.layout import TEXT_MODEL, graph_file
from edgemed.runtime.device import DeviceChoice, onnx_providers
from edgemed.runtime.prompt import PromptAndPixels
from edgemed.runtime.session import GreedyGeneration

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.artifact import Manifest

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _trt_ep_cache(path: Path, manifest: "Manifest") -> str:
    """Where TensorRT's execution provider keeps the engines it builds for this artifact: in the
    user's cache, keyed by the manifest's hash of the decoder (never inside the verified artifact)."""
    import os

    key = next((f.sha256 for f in manifest.files if f.path.endswith(".onnx") and f.sha256), None) or path.resolve().name
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgemed" / "trt-ep"
    return str(root / str(key)[:16])


class OnnxSession(PromptAndPixels, GreedyGeneration):
    def __init__(self, path: Path, manifest: "Manifest", providers: list | None = None,
                 intra_op_threads: int | None = None, disabled_optimizers: list[str] | None = None,
                 device: DeviceChoice | None = None, session_config: dict[str, str] | None = None,
                 layered: bool = False):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.path, self.manifest = path, manifest
        self.text: dict[str, Any] = manifest.model.text
        self.image: dict[str, Any] | None = manifest.model.image
        self.chat_template: str | None = manifest.model.chat_template
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))

        def options():
            opts = ort.SessionOptions()
            if intra_op_threads:
                opts.intra_op_num_threads = intra_op_threads
            opts.log_severity_level = 3
            for key, value in (session_config or {}).items():
                opts.add_session_config_entry(key, value)
            return opts

        opts = options()
        self.device = device or DeviceChoice("cpu", "cpu", "the session's default")
        # Where the KV cache lives between steps: on the GPU with CUDA (IOBinding keeps it there; only
        # the logits come back to the host), in host memory on the CPU. Same code path on both.
        self._ort_device = "cuda" if self.device.device == "cuda" else "cpu"
        if not providers:
            available = ort.get_available_providers()
            cache = None
            if self.device.device == "cuda" and "TensorrtExecutionProvider" in available:
                cache = _trt_ep_cache(path, manifest)
                Path(cache).mkdir(parents=True, exist_ok=True)
            providers = onnx_providers(self.device.device, available, trt_cache_dir=cache)

        def sess(name):
            return ort.InferenceSession(str(graph_file(path, name)), opts, providers=providers,
                                        disabled_optimizers=disabled_optimizers)

        def decoder(name):
            # `layered` (compress --low-memory's parity): one decoder layer's weights resident at a time.
            if layered:
                from edgemed.formats.onnx.layered import LayeredDecoder

                dec = LayeredDecoder(graph_file(path, name), options(), providers, disabled_optimizers)
                if dec.layers > 1:
                    return dec
            return sess(name)

        if graph_file(path, TEXT_MODEL).exists():  # a text LLM: embedding and decoder in one graph
            self.decoder, self.embed = decoder(TEXT_MODEL), None
        else:
            self.decoder, self.embed = decoder(DECODER), sess(EMBED)
        self.vision = sess(VISION) if graph_file(path, VISION).exists() else None
        # A tiled vision graph (layout.tile_vision_input) takes [1, tiles, 3, H, W] and a pixel mask.
        vision_ins = {i.name: i for i in self.vision.get_inputs()} if self.vision is not None else {}
        self._tiled_vision = len(vision_ins.get("pixel_values").shape) == 5 if vision_ins else False
        self._pixel_mask = "pixel_attention_mask" in vision_ins
        ins = {i.name: i for i in self.decoder.get_inputs()}
        self._kv_dtype = _ORT_DTYPES[ins["past_key_values.0.key"].type]
        # What forward() feeds: the embeddings, or the ids where the graph embeds them itself.
        self._first_input = "inputs_embeds" if "inputs_embeds" in ins else "input_ids"
        self._emb_dtype = _ORT_DTYPES[ins["inputs_embeds"].type] if self.embed is not None else np.int64
        self._has_position_ids = "position_ids" in ins
        self._has_token_type_ids = "token_type_ids" in ins
        self._shared_kv = manifest.runtime.get("kv_cache") == "shared_buffer"
        self.n_layers = self.text["num_layers"]
        # The most positions the model holds (RoPE's trained range); generate() never plans past it.
        self.context_tokens = int(self.text.get("max_position_embeddings") or 2048)
        self.eos = set(self.text.get("eos_token_ids") or [])
        self.providers = self.decoder.get_providers()
        if self.device.device == "cuda" and self.providers[0] == "CPUExecutionProvider":
            raise BadInputError(str(path), "ONNX Runtime could not open the CUDA execution provider "
                                "(a CUDA or cuDNN library is missing or does not match this onnxruntime-gpu)",
                                "check `python -c \"import onnxruntime; print(onnxruntime.get_device())\"`, "
                                "or run with --device cpu")

    @property
    def on_accelerator(self) -> bool:
        return self.device.device == "cuda"

    # --- building blocks (also used by parity and the benchmark) ------------------------------
    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        pv = pixel_values.astype(np.float32)
        if not getattr(self, "_tiled_vision", False):  # TensorRT's session borrows this method: 4-D graphs
            return self.vision.run(None, {"pixel_values": pv})[0]
        feeds = {"pixel_values": pv[None]}
        if getattr(self, "_pixel_mask", False):
            feeds["pixel_attention_mask"] = np.ones((1, pv.shape[0], *pv.shape[2:]), bool)
        return self.vision.run(None, feeds)[0]

    def input_embeds(self, ids: np.ndarray, image_features: np.ndarray | None) -> np.ndarray:
        """[1, S, D] embeddings with the image features in place; for a one-graph text LLM the ids
        themselves ([1, S]), which its graph embeds."""
        if self.embed is None:
            return np.asarray(ids, np.int64)[None]
        emb = self.embed.run(None, {"input_ids": ids[None]})[0]
        if image_features is not None:
            pos = np.flatnonzero(ids == self.image["image_token_id"])
            feats = image_features.reshape(-1, image_features.shape[-1])
            if len(pos) != len(feats):
                raise ValueError(f"prompt has {len(pos)} image tokens but the encoder gave {len(feats)} features")
            emb[0, pos] = feats
        return emb.astype(self._emb_dtype)

    def empty_past(self, capacity: int = 0) -> "KVCache":
        """An empty KV cache. Graphs whose attention is ONNX Runtime's GroupQueryAttention (the
        onnxruntime-genai builder's) read and write one preallocated buffer per layer in place;
        torch.onnx graphs return past+new as fresh tensors."""
        shape = (1, self.text["num_kv_heads"], 0, self.text["head_dim"])
        if self._shared_kv:
            return SharedKV(self.n_layers, shape, self._kv_dtype, max(capacity, 256), self._ort_device)
        return ConcatKV.empty([f"past_key_values.{i}.{kv}" for i in range(self.n_layers) for kv in ("key", "value")],
                              shape, self._kv_dtype, self._ort_device)

    def feeds(self, embeds: np.ndarray, start: int, ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The decoder's inputs but the cache for new embeddings at positions start.. (see forward)."""
        seq = embeds.shape[1]
        total = start + seq
        feeds = {self._first_input: np.ascontiguousarray(embeds), "attention_mask": np.ones((1, total), np.int64)}
        if self._has_position_ids:
            feeds["position_ids"] = np.arange(start, total, dtype=np.int64)[None]
        if self._has_token_type_ids:
            tti = np.zeros((1, seq), np.int64)
            if ids is not None and self.image is not None:
                tti[0] = ids == self.image["image_token_id"]
            feeds["token_type_ids"] = tti
        return feeds

    @property
    def batches_passes(self) -> bool:
        """Whether logits_many / greedy_answers run many passes at once (runtime.session.logits_many):
        a layered decoder (formats/onnx/layered.py) over one buffer per layer, whose passes it runs
        layer by layer."""
        return not hasattr(self.decoder, "io_binding") and self._shared_kv

    def logits_many(self, requests: list[tuple]) -> list[np.ndarray]:
        from edgemed.formats.onnx.layered import logits_many

        return logits_many(self, requests)

    def greedy_answers(self, items: list[tuple], max_new_tokens: int, drafts: list | None = None) -> list[str]:
        from edgemed.formats.onnx.layered import greedy_answers

        return greedy_answers(self, items, max_new_tokens, drafts)

    def forward(self, embeds: np.ndarray, past: "KVCache",
                ids: np.ndarray | None = None) -> tuple[np.ndarray, "KVCache"]:
        """Run the decoder on new embeddings after `past`; returns logits [S, V] and the cache.
        `ids` (the chunk's token ids) marks image tokens for decoders that need token_type_ids."""
        total = past.length + embeds.shape[1]
        feeds = self.feeds(embeds, past.length, ids)
        if not hasattr(self.decoder, "io_binding"):  # a LayeredDecoder
            return self.decoder.forward(feeds, past, total, self._ort_device)
        binding = past.binding(self.decoder, total)
        binding.bind_output("logits")  # rebound in place: its shape changes between prefill and decode
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        self.decoder.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return outs[0].numpy()[0], past.after(outs[1:], total)

    def logits(self, ids: np.ndarray, pixel_values: np.ndarray | None = None,
               decode_from: int | None = None) -> np.ndarray:
        """Teacher-forced logits at every position [S, V]. With decode_from=k, positions >= k are
        computed one token at a time through the KV cache (exercises the decode path)."""
        feats = self.encode_image(pixel_values) if pixel_values is not None else None
        embeds = self.input_embeds(ids, feats)
        if decode_from is None or decode_from >= len(ids):
            return self.forward(embeds, self.empty_past(len(ids)), ids)[0].astype(np.float32)
        out, past = self.forward(embeds[:, :decode_from], self.empty_past(len(ids)), ids[:decode_from])
        rows = [out]
        for t in range(decode_from, len(ids)):
            step, past = self.forward(embeds[:, t:t + 1], past, ids[t:t + 1])
            rows.append(step)
        return np.concatenate(rows).astype(np.float32)

    # --- the user-facing call --------------------------------------------------------------------
    def _prefill(self, ids: np.ndarray, image_features, max_new_tokens: int) -> np.ndarray:
        logits, self._past = self.forward(self.input_embeds(ids, image_features),
                                          self.empty_past(len(ids) + max_new_tokens), ids)
        return logits[-1]

    def _step(self, token: int) -> np.ndarray:
        step, self._past = self.forward(self.input_embeds(np.asarray([token], np.int64), None), self._past)
        return step[-1]


class ConcatKV:
    """past_key_values fed as inputs; the graph returns past+new as present.* outputs, which stay
    where ONNX Runtime wrote them (OrtValues on the session's device, the GPU under CUDA) and are
    bound as the next step's past: the cache never crosses to the host between steps."""

    def __init__(self, values: dict[str, Any], device: str = "cpu"):
        self.values, self.device = values, device
        self.length = next(iter(values.values())).shape()[2]

    @classmethod
    def empty(cls, names: list[str], shape: tuple, dtype, device: str = "cpu") -> "ConcatKV":
        import onnxruntime as ort

        return cls({n: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), device, 0) for n in names}, device)

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The cache as host arrays (calibration feeds; a copy from the device under CUDA)."""
        return {n: v.numpy() for n, v in self.values.items()}

    @property
    def past_names(self) -> list[str]:
        return list(self.values)

    def value(self, past_name: str):
        return self.values[past_name]

    def present_buffer(self, present_name: str):
        return None  # ONNX Runtime allocates past+new

    def reserve(self, total: int) -> None:
        pass

    def binding(self, session, total: int):
        """A fresh binding with this cache as past and logits + present.* as outputs."""
        binding = session.io_binding()
        binding.bind_output("logits")
        for name, value in self.values.items():
            binding.bind_ortvalue_input(name, value)
            binding.bind_output(name.replace("past_key_values", "present"), self.device)
        return binding

    def after(self, outs, total: int) -> "ConcatKV":
        return ConcatKV(dict(zip(self.values, outs)), self.device)


class SharedKV:
    """One buffer per layer and K/V, bound as both past and present (GroupQueryAttention writes the
    new positions in place; attention_mask's length says how many are valid). Grows by doubling.
    The binding is kept from step to step: only the step's own inputs are bound again (binding
    2 x layers buffers per token cost about 0.15 ms, 2% of a SmolLM2-135M decode step here)."""

    def __init__(self, n_layers: int, shape: tuple, dtype, capacity: int, device: str = "cpu"):
        import onnxruntime as ort

        self._ort, self.device = ort, device
        self.names = [f"{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
        self.shape, self.dtype, self.length = shape, dtype, 0
        self.capacity = capacity
        self.buffers = {n: self._alloc(np.zeros(self._shape(capacity), dtype)) for n in self.names}
        self._binding = None

    def _alloc(self, arr: np.ndarray):
        return self._ort.OrtValue.ortvalue_from_numpy(arr, self.device, 0)

    def _shape(self, cap: int) -> tuple:
        return (self.shape[0], self.shape[1], cap, self.shape[3])

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{n}" for n in self.names]

    def value(self, past_name: str):
        return self.buffers[past_name.split(".", 1)[1]]

    def present_buffer(self, present_name: str):
        return self.buffers[present_name.split(".", 1)[1]]

    def reserve(self, total: int) -> None:
        if total > self.capacity:  # generate() sizes the cache for prompt + answer: this is rare
            cap = max(total, 2 * self.capacity)
            grown = {}
            for n, buf in self.buffers.items():
                arr = np.zeros(self._shape(cap), self.dtype)
                arr[:, :, :self.capacity] = buf.numpy()  # through the host on a GPU: once per doubling
                grown[n] = self._alloc(arr)
            self.buffers, self.capacity = grown, cap
            self._binding = None

    def binding(self, session, total: int):
        self.reserve(total)
        if self._binding is None:
            self._binding = session.io_binding()
            self._binding.bind_output("logits")  # first: forward() reads the outputs in bind order
            for n, buf in self.buffers.items():
                self._binding.bind_ortvalue_input(f"past_key_values.{n}", buf)
                self._binding.bind_ortvalue_output(f"present.{n}", buf)
        return self._binding

    def after(self, outs, total: int) -> "SharedKV":
        self.length = total
        return self


KVCache = ConcatKV | SharedKV
