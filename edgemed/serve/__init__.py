"""`edgemed serve ARTIFACT`: an OpenAI-compatible local server for clinic apps.

Clinic software talks to a local model server the way it talks to llama.cpp's `llama-server`,
Ollama or vLLM: `POST /v1/chat/completions`. This module verifies the artifact (the trust-boundary
checks of `edgemed.runtime.load`), builds the app (`edgemed.serve.app`) and runs it with uvicorn.
It binds to loopback by default and refuses another address without an API key; it logs request
ids and timings only.
"""
from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

from edgemed.errors import BadInputError, MissingDependencyError
from edgemed.serve.app import ApiError, ServeSettings, create_app, parse_chat_request

__all__ = ["ApiError", "ServeSettings", "build_app", "check_bind", "create_app", "parse_chat_request", "serve"]


def check_bind(host: str, api_key: str | None) -> None:
    """Loopback without a key; any other address only with one (a clinic network is still a network)."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise BadInputError(f"--host {host}", "is not an IP address or 'localhost'",
                            "use 127.0.0.1 (this machine only) or an address of this machine") from None
    if not loopback and not api_key:
        raise BadInputError(f"--host {host}", "binds beyond this machine without an API key",
                            "pass --api-key KEY (clients send 'Authorization: Bearer KEY'), or keep --host 127.0.0.1")


def build_app(artifact: str | Path, *, model_name: str | None = None, api_key: str | None = None,
              verify: bool = True, queue_size: int = 8, **session_kwargs):
    """The app for one artifact, after `edgemed.runtime.load` verified it; also returns the session."""
    _require()
    from edgemed.runtime import load

    session = load(artifact, verify=verify, **session_kwargs)
    name = model_name or Path(artifact).resolve().name
    if queue_size < 1:
        raise BadInputError("--queue-size", f"must be >= 1, got {queue_size}", "pass e.g. 8")
    return create_app(session, ServeSettings(model_name=name, api_key=api_key, queue_size=queue_size)), session


def serve(artifact: str | Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, queue_size: int = 8, verify: bool = True, log_level: str = "info",
          device: str = "auto") -> None:
    """Serve until interrupted; on SIGINT/SIGTERM in-flight requests finish first (up to 30 s).
    `device` as edgemed.runtime.load takes it (auto, cpu, cuda)."""
    check_bind(host, api_key)
    app, session = build_app(artifact, model_name=model_name, api_key=api_key, verify=verify, queue_size=queue_size,
                             device=device)
    import uvicorn

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    choice = session.device
    logging.getLogger("edgemed.serve").info("serving on %s (%s)", choice.device, choice.reason)
    # access_log off: uvicorn's access lines are harmless, but the app's own lines say what matters
    # (request id, status, token counts, seconds) and nothing of the prompt or image.
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=30,
                limit_concurrency=max(queue_size * 4, 16))


def _require() -> None:
    import importlib.util

    for module, package in (("starlette", "starlette"), ("uvicorn", "uvicorn")):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError("edgemed serve", package, "serve")
