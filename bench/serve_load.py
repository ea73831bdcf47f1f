#!/usr/bin/env python3
"""A bounded load test of `edgemed serve` with the official `openai` client, over loopback.

    python bench/serve_load.py ARTIFACT [--clients 8] [--requests 20] [--max-tokens 16] [--out bench/results/serve_load]

Starts the server in this process (uvicorn on a free 127.0.0.1 port, queue large enough for every
client), then runs --clients threads, each sending --requests chat completions one after another
(every other request with the demo's chest radiograph as a PNG data: URI, every third streamed).
Records per-request latency (seconds from send to the last byte; streamed: also time to the first
content chunk), HTTP errors and lost requests (sent but never answered), and writes results.json +
results.md. The check: zero errors and zero lost requests. The server answers one request at a time
per artifact (its KV cache is its own), so latency grows with the queue: p50/p90 say how much.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTIONS = ["Is there a pleural effusion?", "Describe the findings.", "Is the heart enlarged?",
             "Is there a pneumothorax?"]


def _image_url() -> str:
    from edgemed.calibration.builtin import synthetic_test_image

    buf = io.BytesIO()
    synthetic_test_image().save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out", default="bench/results/serve_load")
    a = ap.parse_args()

    import uvicorn
    from openai import OpenAI

    from edgemed.serve import build_app

    app, session = build_app(a.artifact, model_name="edgemed", queue_size=a.clients + 1)
    multimodal = session.image is not None
    image = _image_url() if multimodal else None
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    records: list[dict] = []
    lock = threading.Lock()

    def client_loop(c: int) -> None:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="local", max_retries=0, timeout=600)
        for i in range(a.requests):
            q = QUESTIONS[(c + i) % len(QUESTIONS)]
            content = ([{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": q}]
                       if multimodal and i % 2 == 0 else q)
            stream = i % 3 == 0
            rec = {"client": c, "request": i, "image": isinstance(content, list), "stream": stream}
            t0 = time.perf_counter()
            try:
                if stream:
                    first, text = None, ""
                    for chunk in client.chat.completions.create(model="edgemed", max_tokens=a.max_tokens, stream=True,
                                                                messages=[{"role": "user", "content": content}]):
                        for ch in chunk.choices:
                            if ch.delta.content and first is None:
                                first = time.perf_counter() - t0
                            text += ch.delta.content or ""
                    rec["ttfc_s"] = first
                else:
                    r = client.chat.completions.create(model="edgemed", max_tokens=a.max_tokens,
                                                       messages=[{"role": "user", "content": content}])
                    text = r.choices[0].message.content
                rec.update(ok=True, latency_s=time.perf_counter() - t0, chars=len(text))
            except Exception as e:  # noqa: BLE001 - every failure is a counted error
                rec.update(ok=False, latency_s=time.perf_counter() - t0, error=f"{type(e).__name__}: {str(e)[:200]}")
            with lock:
                records.append(rec)

    t_start = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    server.should_exit = True
    thread.join(timeout=30)

    sent = a.clients * a.requests
    lat = sorted(r["latency_s"] for r in records if r["ok"])
    q = statistics.quantiles(lat, n=10) if len(lat) >= 2 else lat * 9
    summary = {
        "artifact": str(a.artifact), "clients": a.clients, "requests_per_client": a.requests,
        "max_tokens": a.max_tokens, "sent": sent, "answered": len(records),
        "lost": sent - len(records), "errors": sum(not r["ok"] for r in records),
        "latency_p50_s": statistics.median(lat) if lat else None, "latency_p90_s": q[8] if lat else None,
        "latency_max_s": lat[-1] if lat else None, "wall_s": wall, "requests_per_s": len(lat) / wall,
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
        "command": " ".join(["python", "bench/serve_load.py", *sys.argv[1:]]),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"summary": summary, "requests": records}, indent=2))
    md = ["# edgemed serve: bounded load test", "", f"`{summary['command']}`", "",
          "| clients x requests | answered | errors | lost | p50 s | p90 s | max s | req/s |",
          "|---|---|---|---|---|---|---|---|",
          f"| {a.clients} x {a.requests} | {summary['answered']} | {summary['errors']} | {summary['lost']} | "
          f"{summary['latency_p50_s']:.2f} | {summary['latency_p90_s']:.2f} | {summary['latency_max_s']:.2f} | "
          f"{summary['requests_per_s']:.2f} |", ""]
    (out / "results.md").write_text("\n".join(md))
    print("\n".join(md))
    errors = [r["error"] for r in records if not r["ok"]]
    if errors:
        print("errors:", *errors[:5], sep="\n  ")
    return 0 if summary["errors"] == 0 and summary["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
