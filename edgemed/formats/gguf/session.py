"""llama.cpp session over a GGUF artifact (llama-cpp-python; no torch).

The language model runs through llama.cpp's own decode with logits kept at every position (the
batch marks every row as an output) and an F32 KV cache by default, so parity measures the
quantized weights rather than KV-cache rounding. Images go through llama.cpp's mtmd (clip.cpp)
with the artifact's mmproj; its embeddings are injected into the prompt at the image-token
positions with embedding batches (`llama_batch.embd`), the way mtmd's own helper decodes images.

- `encode_image(pixel_values)`: for parity, the pixels edgemed preprocessed (numpy, identical to the
  parent's processor) are turned back into the square 8-bit RGB image they came from and handed to
  mtmd, whose resize to the tower's own size is then a no-op: the numbers compared are clip.cpp's
  encoder and projector against the parent's.
- `generate(image, prompt)`: the image itself goes to mtmd, so llama.cpp's own preprocessing runs,
  as it would in llama-mtmd-cli. For Idefics3, mtmd emits tiles plus an overview; edgemed's prompt
  holds one global image here, so the overview's embeddings are used (the ONNX and TensorRT
  sessions feed the tiles too, as the transformers processor does; see `global_image_only`).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgemed.errors import BadInputError, MissingDependencyError
from edgemed.runtime.preprocess import as_image, global_image_only
from edgemed.runtime.prompt import PromptAndPixels, user_turn
from edgemed.runtime.session import GreedyGeneration

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.artifact import Manifest

CLIP_CLS_ISSUE = ("ggml-org/llama.cpp#25814: clip.cpp appends the CLIP class token after the patches instead of "
                  "before them, so this tower's image embeddings are wrong upstream")
GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise MissingDependencyError("GGUF artifacts", "llama-cpp-python", "llamacpp") from None
    return llama_cpp


@contextlib.contextmanager
def _model_params(lc, **fields):
    """llama_model_params fields that llama_cpp.Llama() takes no argument for (use_extra_bufts, the
    weight repacking llama.cpp's --no-repack turns off): Llama() builds its params from
    llama_model_default_params() while it loads, so the defaults are amended for that call only."""
    module = lc.llama_cpp
    default = module.llama_model_default_params

    def params():
        p = default()
        for name, value in fields.items():
            setattr(p, name, value)
        return p

    module.llama_model_default_params = params
    try:
        yield
    finally:
        module.llama_model_default_params = default


def check_gguf_file(path: Path, expected_bytes: int | None = None) -> None:
    """Refuse a missing, truncated or corrupt GGUF before llama.cpp sees it (BadInputError, exit 2)."""
    if not path.is_file():
        raise BadInputError(str(path), "GGUF file missing", "re-run `edgemed compress`")
    size = path.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        raise BadInputError(str(path), f"size {size} != {expected_bytes} bytes in the manifest (truncated or replaced)",
                            "re-copy the artifact, or check it with `edgemed inspect --verify`")
    try:
        import gguf

        reader = gguf.GGUFReader(path)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:  # gguf-py raises ValueError/IndexError/struct errors on damaged headers
        raise BadInputError(str(path), f"not a readable GGUF file ({type(e).__name__}: {str(e)[:200]})",
                            "the file is damaged: re-run `edgemed compress` or re-copy the artifact") from None
    if end > size:
        raise BadInputError(str(path), f"truncated: tensor data ends at byte {end} but the file has {size}",
                            "re-copy the artifact, or check it with `edgemed inspect --verify`")


class GgufSession(PromptAndPixels, GreedyGeneration):
    """kv_f32: an F32 KV cache (the CPU default) so parity measures the weights, not KV rounding;
    pass kv_f32=False to time the F16 cache llama.cpp deploys with. On device "cuda" every layer is
    offloaded (n_gpu_layers=-1), the mmproj's encoder runs on the GPU and the KV cache is F16 unless
    kv_f32=True is passed: llama.cpp's own GPU deployment.

    use_mmap=False reads the weights into memory once instead of mapping the file: on a CPU where
    llama.cpp repacks Q4_0/Q4_K/IQ4_NL weights for its SIMD kernels, the mapped file pages stay
    resident beside the repacked copy (a 668 MB Q4_K_M held 1.18 GB of RSS mapped, 0.72 GB read;
    measured here). repack=False turns the repacking off (llama.cpp's --no-repack): the kernels
    read the mapped file itself, so the weights stay file-backed pages the kernel can take back
    rather than anonymous memory that grows with the model; `compress --low-memory` opens its
    parity session so (the same quantized blocks, the plain vec-dot kernels)."""

    def __init__(self, path: Path, manifest: "Manifest", n_threads: int | None = None, n_ctx: int | None = None,
                 kv_f32: bool | None = None, n_gpu_layers: int | None = None, device=None, use_mmap: bool = True,
                 repack: bool = True):
        from tokenizers import Tokenizer

        from edgemed.runtime.device import DeviceChoice

        lc = _llama_cpp()
        self._lc = lc
        self.device = device or DeviceChoice("cpu", "cpu", "the session's default")
        on_gpu = self.device.device == "cuda"
        n_gpu_layers = (-1 if on_gpu else 0) if n_gpu_layers is None else n_gpu_layers
        kv_f32 = (not on_gpu) if kv_f32 is None else kv_f32
        self.n_gpu_layers = n_gpu_layers
        self.path, self.manifest = Path(path), manifest
        self.text: dict[str, Any] = manifest.model.text
        self.image: dict[str, Any] | None = global_image_only(manifest.model.image)
        self.chat_template: str | None = manifest.model.chat_template
        self.tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        self.eos = set(self.text.get("eos_token_ids") or [])
        sizes = {f.path: f.bytes for f in manifest.files}
        models = sorted(p for p in self.path.glob("*.gguf") if not p.name.startswith("mmproj-") and p.name != "imatrix.gguf")
        if len(models) != 1:
            raise BadInputError(str(self.path), f"expected one language-model *.gguf, found {[p.name for p in models]}",
                                "pass a GGUF artifact written by `edgemed compress`")
        self.model_path = models[0]
        projs = sorted(self.path.glob("mmproj-*.gguf"))
        self.mmproj_path = projs[0] if projs else None
        for p in [self.model_path, *projs]:
            check_gguf_file(p, sizes.get(p.name))
        self.n_threads = n_threads or max(1, min(4, os.cpu_count() or 1))
        ctx_len = n_ctx or min(int(self.text.get("max_position_embeddings") or 2048), 4096)
        kw: dict[str, Any] = {}
        if kv_f32:
            kw.update(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
        # n_ubatch: an image block decoded non-causally (Gemma 3) must fit in one micro-batch.
        try:
            with _model_params(lc, use_extra_bufts=repack):
                self.llm = lc.Llama(model_path=str(self.model_path), n_ctx=ctx_len, n_batch=ctx_len,
                                    n_ubatch=min(ctx_len, 1024), n_threads=self.n_threads, n_gpu_layers=n_gpu_layers,
                                    verbose=False, use_mmap=use_mmap, **kw)
        except (ValueError, RuntimeError) as e:
            raise BadInputError(str(self.model_path), f"llama.cpp could not load it ({str(e)[:200]})",
                                "re-run `edgemed compress`; check the file with `edgemed inspect --verify`") from None
        self._model = self.llm._model.model
        self._ctx = self.llm._ctx.ctx
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self._model))
        self.n_embd = lc.llama_model_n_embd(self._model)
        self.n_ctx = self.context_tokens = ctx_len
        self._mtmd = None
        self._image_non_causal = False

    # --- lifecycle -----------------------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "_mtmd", None) is not None:
            from llama_cpp import mtmd_cpp

            mtmd_cpp.mtmd_free(self._mtmd)
            self._mtmd = None
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # --- building blocks (parity and the benchmark use them) -------------------------------------------
    def _mtmd_ctx(self):
        if self._mtmd is None:
            if self.mmproj_path is None:
                raise BadInputError(str(self.path), "has no mmproj-*.gguf", "re-export with a VLM and a GGUF recipe")
            from llama_cpp import _logger, mtmd_cpp

            # clip/mtmd log through llama-cpp-python's logger (quiet unless verbose), not stderr.
            mtmd_cpp.mtmd_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
            params = mtmd_cpp.mtmd_context_params_default()
            params.use_gpu = self.device.device == "cuda"
            params.print_timings = False
            params.n_threads = self.n_threads
            params.warmup = False
            self._mtmd = mtmd_cpp.mtmd_init_from_file(str(self.mmproj_path).encode(), self._model, params)
            if not self._mtmd:
                self._mtmd = None
                raise BadInputError(str(self.mmproj_path), "llama.cpp's mtmd could not load this mmproj",
                                    "re-run `edgemed compress`")
        return self._mtmd

    def mtmd_image_embeddings(self, rgb: np.ndarray) -> list[np.ndarray]:
        """llama.cpp's own preprocessing + clip encoder + projector on an HxWx3 uint8 image.
        Returns one [n_tokens, n_embd] array per image chunk mtmd makes (tiles, then overview)."""
        from llama_cpp import mtmd_cpp

        mctx = self._mtmd_ctx()
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        h, w = rgb.shape[:2]
        buf = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
        bitmap = mtmd_cpp.mtmd_bitmap_init(w, h, buf)
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        try:
            marker = mtmd_cpp.mtmd_default_marker()
            text = mtmd_cpp.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
            bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
            rc = mtmd_cpp.mtmd_tokenize(mctx, chunks, ctypes.byref(text), bitmaps, 1)
            if rc != 0:
                raise BadInputError("image", f"llama.cpp's mtmd could not tokenize the image (rc={rc})",
                                    "pass an RGB radiograph or photograph")
            out = []
            for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
                chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
                if mtmd_cpp.mtmd_input_chunk_get_type(chunk) != mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    continue
                n = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
                # Gemma 3's image tokens attend to each other both ways while they are decoded.
                self._image_non_causal = bool(mtmd_cpp.mtmd_decode_use_non_causal(mctx, chunk))
                if mtmd_cpp.mtmd_encode_chunk(mctx, chunk) != 0:
                    raise RuntimeError("mtmd_encode_chunk failed")
                ptr = mtmd_cpp.mtmd_get_output_embd(mctx)
                out.append(np.ctypeslib.as_array(ptr, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy())
            return out
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            mtmd_cpp.mtmd_bitmap_free(bitmap)

    def _global_image(self, embeds: list[np.ndarray]) -> np.ndarray:
        n = self.image["num_image_tokens"]
        fits = [e for e in embeds if e.shape[0] == n]
        if not fits:
            raise BadInputError("image", f"mtmd produced {[e.shape[0] for e in embeds]} image tokens, the prompt holds {n}",
                                "the mmproj does not match this artifact's model")
        return fits[-1]  # the overview comes last where mtmd also emits tiles (Idefics3)

    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        """[1, 3, S, S] edgemed pixel values -> [1, T, D] image embeddings from the mmproj."""
        img = self.image
        x = pixel_values[0].transpose(1, 2, 0).astype(np.float64)
        x = (x * np.asarray(img["image_std"]) + np.asarray(img["image_mean"])) / img["rescale_factor"]
        rgb = np.clip(np.rint(x), 0, 255).astype(np.uint8)
        return self._global_image(self.mtmd_image_embeddings(rgb))[None]

    # --- decoding -----------------------------------------------------------------------------------------
    def _segments(self, ids: np.ndarray, feats: np.ndarray | None):
        """Runs of consecutive token ids and of image embeddings, in prompt order."""
        if feats is None:
            return [("tok", ids)]
        pos = ids == self.image["image_token_id"]
        feats = feats.reshape(-1, feats.shape[-1])
        if int(pos.sum()) != len(feats):
            raise ValueError(f"prompt has {int(pos.sum())} image tokens but the encoder gave {len(feats)} features")
        segs, start, k = [], 0, 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or pos[i] != pos[start]:
                if pos[start]:
                    segs.append(("emb", feats[k:k + i - start]))
                    k += i - start
                else:
                    segs.append(("tok", ids[start:i]))
                start = i
        return segs

    def _decode(self, kind: str, data: np.ndarray, pos0: int, all_logits: bool = True) -> np.ndarray:
        """One llama_decode of tokens or embeddings at positions pos0..; logits [n, V] for every row
        (or [1, V] for the last row only, which is all generation needs)."""
        lc = self._lc
        n = len(data)
        if pos0 + n > self.n_ctx:
            raise BadInputError("prompt", f"{pos0 + n} positions exceed the context of {self.n_ctx}",
                                "shorten the prompt or open the session with a larger n_ctx")
        batch = lc.llama_batch_init(n, self.n_embd if kind == "emb" else 0, 1)
        try:
            batch.n_tokens = n
            if kind == "emb":
                flat = np.ascontiguousarray(data, dtype=np.float32).reshape(-1)
                ctypes.memmove(batch.embd, flat.ctypes.data, flat.nbytes)
            for i in range(n):
                if kind == "tok":
                    batch.token[i] = int(data[i])
                batch.pos[i] = pos0 + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if (all_logits or i == n - 1) else 0
            non_causal = kind == "emb" and self._image_non_causal
            if non_causal:
                lc.llama_set_causal_attn(self._ctx, False)
            try:
                rc = lc.llama_decode(self._ctx, batch)
            finally:
                if non_causal:
                    lc.llama_set_causal_attn(self._ctx, True)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            rows = n if all_logits else 1
            ptr = lc.llama_get_logits(self._ctx)
            return np.ctypeslib.as_array(ptr, shape=(rows * self.n_vocab,)).reshape(rows, self.n_vocab).copy()
        finally:
            lc.llama_batch_free(batch)

    def _reset(self) -> None:
        self._lc.llama_memory_clear(self._lc.llama_get_memory(self._ctx), True)

    def _run(self, ids: np.ndarray, feats: np.ndarray | None, decode_from: int | None) -> np.ndarray:
        self._reset()
        rows, pos = [], 0
        split = len(ids) if decode_from is None else max(1, min(decode_from, len(ids)))
        for kind, data in self._segments(ids, feats):
            n = len(data)
            head = max(0, min(n, split - pos))  # rows that belong to the prefill
            if head:
                rows.append(self._decode(kind, data[:head], pos))
            for j in range(head, n):  # the rest one position at a time through the KV cache
                rows.append(self._decode(kind, data[j:j + 1], pos + j))
            pos += n
        return np.concatenate(rows).astype(np.float32)

    def logits(self, ids: np.ndarray, pixel_values: np.ndarray | None = None,
               decode_from: int | None = None) -> np.ndarray:
        """Teacher-forced logits at every position [S, V]; decode_from=k runs positions >= k one at a time."""
        feats = self.encode_image(pixel_values) if pixel_values is not None else None
        return self._run(np.asarray(ids, dtype=np.int64), feats, decode_from)

    def parity_record(self) -> dict[str, Any]:
        """Facts parity should state next to its numbers (e.g. known upstream bugs on this path)."""
        from edgemed.calibration.builtin import PARITY_PROMPTS

        out: dict[str, Any] = {"runtime": "llama.cpp", "kv_cache": "f32" if self.llm.context_params.type_k == 0 else "f16"}
        # edgemed feeds llama.cpp the parent's token ids; a llama.cpp front end (llama-cli, Ollama)
        # tokenizes with the GGUF's own vocabulary instead. State whether the two agree.
        agree = []
        for prompt in PARITY_PROMPTS:
            chat = self.chat
            text = chat.render(user_turn(prompt, False))
            ids = chat.tokenize(self.tokenizer, text)
            plain = self.tokenizer.encode(text, add_special_tokens=False).ids
            agree.append(self.llm.tokenize(text.encode(), add_bos=ids != plain, special=True) == ids)
        out["llama_cpp_tokenizer_agrees"] = all(agree)
        if self.mmproj_path is not None:
            import gguf

            names = {t.name for t in gguf.GGUFReader(self.mmproj_path).tensors}
            if "v.class_embd" in names:
                out["vision_upstream_issue"] = CLIP_CLS_ISSUE
        return out

    # --- generation hooks (the loop is edgemed.runtime.session.GreedyGeneration) ---------------------------
    def _image_input(self, image):
        """llama.cpp's own mtmd/clip preprocesses and encodes the image: it takes RGB pixels."""
        if self.image is None:
            raise BadInputError("image", "this artifact's model is text-only", "call generate() without an image")
        return np.asarray(as_image(image))

    def _encode(self, rgb):
        return self._global_image(self.mtmd_image_embeddings(rgb))

    def _prefill(self, ids: np.ndarray, image_features, max_new_tokens: int) -> np.ndarray:
        self._reset()
        self._pos, last = 0, None
        for kind, data in self._segments(ids, image_features):
            last = self._decode(kind, data, self._pos, all_logits=False)
            self._pos += len(data)
        return last[-1]

    def _step(self, token: int) -> np.ndarray:
        step = self._decode("tok", np.asarray([token]), self._pos, all_logits=False)
        self._pos += 1
        return step[-1]

