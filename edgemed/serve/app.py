"""The OpenAI-compatible HTTP app over one artifact session (Starlette; run by uvicorn).

    GET  /                       an example clinic page (static/index.html): image + question, streamed answer
    GET  /health                 {"status": "ok", "model": NAME, "device": "cpu" | "cuda"}
    GET  /v1/models              the one model this server holds
    POST /v1/chat/completions    OpenAI chat completions: text and image_url parts (data: URIs of
                                 PNG/JPEG/... or DICOM, application/dicom), stream: true as
                                 server-sent events, temperature / top_p / top_k / seed / stop /
                                 max_tokens (max_completion_tokens)

One session answers one request at a time (its KV cache is its own); requests wait in a bounded
queue, and past it get 503 with Retry-After. Errors are OpenAI error objects with the HTTP status
the OpenAI API uses. Logs hold request ids, sizes and timings, never prompt, image or answer text.
Nothing is fetched: an image given by an http(s) URL is refused.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemed.errors import BadInputError

log = logging.getLogger("edgemed.serve")

MAX_BODY_BYTES = 32 * 1024 * 1024  # a few radiographs as base64 in one request
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGES = 8
DICOM_MEDIA = ("application/dicom", "application/dicom+octet-stream")


@dataclass
class ServeSettings:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_images: int = MAX_IMAGES
    queue_size: int = 8  # requests waiting or running; more get 503
    max_tokens_default: int = 256
    retry_after_s: int = 2


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, type, param, code."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def create_app(session, settings: ServeSettings):
    """The Starlette app answering for `session` (an edgemed runtime session, verified by the caller)."""
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    slots = threading.BoundedSemaphore(settings.queue_size)
    # Generation runs on threads of its own (asyncio's default pool has cpu + 4 threads, which
    # requests waiting for the session would fill); each request waits there for the session.
    workers = ThreadPoolExecutor(max_workers=settings.queue_size + 1, thread_name_prefix="edgemed-generate")
    created = int(time.time())

    def error_response(e: ApiError) -> Response:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided.", "invalid_request_error", code="invalid_api_key")

    async def health(request: Request) -> Response:
        choice = getattr(session, "device", None)
        return JSONResponse({"status": "ok", "model": settings.model_name,
                             "device": choice.device if choice is not None else "cpu"})

    async def models(request: Request) -> Response:
        try:
            check_key(request)
        except ApiError as e:
            return error_response(e)
        return JSONResponse({"object": "list", "data": [
            {"id": settings.model_name, "object": "model", "created": created, "owned_by": "edgemed"}]})

    async def chat(request: Request) -> Response:
        rid = "chatcmpl-" + uuid.uuid4().hex[:24]
        t0 = time.perf_counter()
        try:
            check_key(request)
            body = await _read_json(request, settings.max_body_bytes)
            req = parse_chat_request(body, settings)
        except ApiError as e:
            log.info("%s rejected: %s %s", rid, e.status, e.code or e.type)
            return error_response(e)
        if not slots.acquire(blocking=False):
            log.info("%s rejected: 503 queue full", rid)
            return error_response(ApiError(503, "The server is busy: too many requests are queued. Retry later.",
                                           "server_error", code="queue_full",
                                           headers={"Retry-After": str(settings.retry_after_s)}))
        if req["stream"]:
            release = _once(slots.release)  # by the stream's end, or after the response if it never started
            return StreamingResponse(_sse(session, req, rid, settings, release, t0, workers),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                     background=BackgroundTask(release))
        try:
            result = await asyncio.get_running_loop().run_in_executor(workers, _generate, session, req)
        except ApiError as e:
            log.info("%s failed: %s", rid, e.status)
            return error_response(e)
        finally:
            slots.release()
        log.info("%s done: %d prompt + %d completion tokens in %.3f s", rid, result.prompt_tokens,
                 len(result.token_ids), time.perf_counter() - t0)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": int(time.time()), "model": settings.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": _finish(result.finish_reason), "logprobs": None}],
            "usage": _usage(result),
        })

    async def page(request: Request) -> Response:
        """The example clinic page: an image and a question, the answer streamed (static/index.html)."""
        return FileResponse(Path(__file__).parent / "static" / "index.html", media_type="text/html")

    async def on_error(request: Request, exc: Exception) -> Response:
        log.exception("internal error")
        return error_response(ApiError(500, "internal server error", "server_error"))

    routes = [Route("/", page), Route("/health", health), Route("/v1/models", models),
              Route("/v1/chat/completions", chat, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={Exception: on_error},
                     lifespan=_shutdown_workers(workers))


def _shutdown_workers(workers):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        workers.shutdown(wait=True)  # in-flight generations finish before the process exits

    return lifespan


async def _read_json(request, limit: int) -> dict[str, Any]:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise ApiError(413, f"Request body of {int(size)} bytes exceeds the limit of {limit} bytes.",
                       code="request_too_large")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"Request body exceeds the limit of {limit} bytes.", code="request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except ValueError:
        raise ApiError(400, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def parse_chat_request(body: dict[str, Any], settings: ServeSettings) -> dict[str, Any]:
    """An OpenAI chat completions body -> generate() arguments (messages with typed parts, images)."""
    model = body.get("model")
    if model is not None and model != settings.model_name:
        raise ApiError(404, f"The model `{model}` does not exist; this server holds `{settings.model_name}`.",
                       param="model", code="model_not_found")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "`messages` must be a non-empty array.", param="messages")
    messages, images = [], []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant.", param=f"messages[{i}]")
        role = "system" if m["role"] == "developer" else m["role"]
        content = m.get("content")
        if isinstance(content, str):
            messages.append({"role": role, "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list):
            raise ApiError(400, f"messages[{i}].content must be a string or an array of parts.",
                           param=f"messages[{i}].content")
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else None
                images.append(decode_image_url(url, where, settings))
                parts.append({"type": "image"})
            else:
                raise ApiError(400, f"{where}: unsupported part type {kind!r} (use text or image_url).", param=where)
        messages.append({"role": role, "content": parts})
    if len(images) > settings.max_images:
        raise ApiError(400, f"{len(images)} images in one request; the limit is {settings.max_images}.",
                       param="messages")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = settings.max_tokens_default if max_tokens is None else max_tokens
    opts = {"temperature": body.get("temperature", 0.0), "top_p": body.get("top_p", 1.0),
            "top_k": body.get("top_k", 0), "seed": body.get("seed"), "stop": body.get("stop")}
    for key, default in (("temperature", 0.0), ("top_p", 1.0), ("top_k", 0)):  # JSON null: the default
        if opts[key] is None:
            opts[key] = default
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, f"max_tokens must be a positive integer, got {max_tokens!r}.", param="max_tokens")
    if body.get("n", 1) not in (1, None):
        raise ApiError(400, "Only n=1 is supported.", param="n")
    stream_opts = body.get("stream_options") or {}
    return {"messages": messages, "images": images, "max_new_tokens": max_tokens, "stream": bool(body.get("stream")),
            "include_usage": bool(stream_opts.get("include_usage")) if isinstance(stream_opts, dict) else False,
            **opts}


def decode_image_url(url: Any, where: str, settings: ServeSettings):
    """A data: URI -> an RGB PIL image (raster formats through Pillow, DICOM through edgemed.imaging)."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise ApiError(400, f"{where}: images must be data: URIs (base64); edgemed serve fetches nothing "
                       "from the network.", param=where, code="invalid_image_url")
    head, _, payload = url[5:].partition(",")
    media = head.split(";")[0].lower()
    if ";base64" not in head:
        raise ApiError(400, f"{where}: the data: URI must be base64-encoded.", param=where, code="invalid_image_url")
    if len(payload) * 3 // 4 > settings.max_image_bytes:
        raise ApiError(413, f"{where}: the image exceeds {settings.max_image_bytes} bytes.", param=where,
                       code="image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: the base64 payload is not valid.", param=where, code="invalid_image_url") from None
    try:
        return _load_image(data, media, where)
    except BadInputError as e:
        raise ApiError(400, f"{where}: {e.what} ({e.fix})" if hasattr(e, "what") else f"{where}: {e}",
                       param=where, code="invalid_image") from None


def _load_image(data: bytes, media: str, where: str):
    import tempfile

    from PIL import Image, UnidentifiedImageError

    from edgemed.runtime.preprocess import as_image

    is_dicom = media in DICOM_MEDIA or data[128:132] == b"DICM"
    if is_dicom:
        from edgemed.imaging import load_medical_image

        with tempfile.TemporaryDirectory() as d:  # pydicom reads files; this one is deleted at once
            p = Path(d) / "image.dcm"
            p.write_bytes(data)
            return as_image(load_medical_image(p))
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise ApiError(400, f"{where}: the image could not be decoded (PNG, JPEG, TIFF, BMP or DICOM).",
                       param=where, code="invalid_image") from None
    return as_image(img)


def _generate(session, req: dict[str, Any], cancel: threading.Event | None = None):
    try:
        return session.generate(**_gen_kwargs(req), cancel=cancel)
    except BadInputError as e:
        raise ApiError(400, str(e), param=_param_of(e)) from None


def _gen_kwargs(req: dict[str, Any]) -> dict[str, Any]:
    return {k: req[k] for k in ("messages", "images", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop")}


def _param_of(e: BadInputError) -> str | None:
    what = getattr(e, "what", None)
    return what if what in ("temperature", "top_p", "top_k", "seed", "stop", "max_new_tokens", "messages") else None


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(result) -> dict[str, int]:
    n = len(result.token_ids)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": n, "total_tokens": result.prompt_tokens + n}


def _once(fn):
    lock, done = threading.Lock(), []

    def call():
        with lock:
            if not done:
                done.append(True)
                fn()

    return call


async def _sse(session, req, rid, settings, release, t0, workers):
    """Server-sent events: a role chunk, content chunks as they are decoded, the finish chunk
    (and usage when asked), then [DONE]. A client that goes away cancels decoding."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    done = object()

    def work():
        try:
            for chunk in session.stream(**_gen_kwargs(req), cancel=cancel):
                loop.call_soon_threadsafe(queue.put_nowait, chunk)
        except BadInputError as e:
            loop.call_soon_threadsafe(queue.put_nowait, ApiError(400, str(e), param=_param_of(e)))
        except Exception as e:  # noqa: BLE001 - reported to the client as a server error
            log.exception("%s failed", rid)
            loop.call_soon_threadsafe(queue.put_nowait, ApiError(500, f"internal server error ({type(e).__name__})",
                                                                 "server_error"))
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, done)

    def event(delta: dict | None, finish: str | None = None, usage: dict | None = None) -> str:
        """One chunk; delta None: the usage-only chunk OpenAI sends last (choices empty)."""
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        obj = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": settings.model_name,
               "choices": choices}
        if usage is not None:
            obj["usage"] = usage
        return f"data: {json.dumps(obj)}\n\n"

    try:
        workers.submit(work)
        yield event({"role": "assistant", "content": ""})
        while True:
            item = await queue.get()
            if item is done:
                break
            if isinstance(item, ApiError):
                yield f"data: {json.dumps(item.body())}\n\n"
                break
            if item.text:
                yield event({"content": item.text})
            if item.result is not None:
                r = item.result
                yield event({}, _finish(r.finish_reason))
                if req["include_usage"]:
                    yield event(None, usage=_usage(r))
                log.info("%s streamed: %d prompt + %d completion tokens in %.3f s", rid, r.prompt_tokens,
                         len(r.token_ids), time.perf_counter() - t0)
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()  # the client went away, or we are done: decoding stops after the current token
        release()
