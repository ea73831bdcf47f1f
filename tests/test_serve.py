"""`edgemed serve` against a client we did not write: the official `openai` package, over loopback,
on a real uvicorn server (started and stopped here), checked against the runtime session's own
answers for the same conversation."""
from __future__ import annotations

import base64
import io
import logging
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openai")
pytest.importorskip("uvicorn")

QUESTION = "Is there a pleural effusion?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn running the app in a thread on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def _png(seed=0, w=64, h=48) -> str:
    from PIL import Image

    img = Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image_of(url: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


@pytest.fixture(scope="module")
def served(artifact):
    from edgemed.serve import build_app

    path = artifact("llava-clip", "int8")
    app, session = build_app(path, model_name="cxr-int8", api_key="secret-key", queue_size=2)
    with Server(app) as server:
        yield server, session


@pytest.fixture()
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served[0].base_url, api_key="secret-key", max_retries=0, timeout=120)


def test_plain_chat_equals_the_runtime(served, client, caplog):
    _, session = served
    messages = [{"role": "system", "content": "You are a radiology assistant."},
                {"role": "user", "content": QUESTION}]
    with caplog.at_level(logging.INFO, logger="edgemed.serve"):
        r = client.chat.completions.create(model="cxr-int8", messages=messages, max_tokens=8)
    ref = session.generate(messages=messages, max_new_tokens=8)
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("length" if ref.finish_reason == "length" else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.prompt_tokens, len(ref.token_ids))
    assert r.model == "cxr-int8" and r.id.startswith("chatcmpl-")
    logged = " ".join(rec.getMessage() for rec in caplog.records)
    assert r.id in logged and QUESTION not in logged and ref.text not in logged  # ids and timings only
    import json
    import urllib.request

    with urllib.request.urlopen(served[0].base_url.removesuffix("/v1") + "/health", timeout=30) as resp:
        health = json.loads(resp.read())
    assert health == {"status": "ok", "model": "cxr-int8", "device": "cpu"}


def test_streaming_gives_the_same_text(served, client):
    _, session = served
    messages = [{"role": "user", "content": QUESTION}]
    stream = client.chat.completions.create(model="cxr-int8", messages=messages, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    ref = session.generate(messages=messages, max_new_tokens=12)
    assert "".join(pieces) == ref.text and finish in ("stop", "length")
    assert usage.completion_tokens == len(ref.token_ids)


def test_image_and_dicom_parts(served, client):
    """image_url parts as data: URIs: a PNG, and a DICOM read through edgemed.imaging (pydicom's CT sample)."""
    import pydicom.data

    _, session = served
    url = _png()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": QUESTION}]}]
    r = client.chat.completions.create(model="cxr-int8", messages=messages, max_tokens=6)
    ref = session.generate(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                           images=[_image_of(url)], max_new_tokens=6)
    assert r.choices[0].message.content == ref.text and r.usage.prompt_tokens == ref.prompt_tokens
    dcm = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    durl = "data:application/dicom;base64," + base64.b64encode(dcm.read_bytes()).decode()
    messages[0]["content"][0]["image_url"]["url"] = durl
    r = client.chat.completions.create(model="cxr-int8", messages=messages, max_tokens=6)
    ref = session.generate(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                           images=[dcm], max_new_tokens=6)
    assert r.choices[0].message.content == ref.text


def test_sampling_is_deterministic_under_a_seed(client):
    kw = dict(model="cxr-int8", messages=[{"role": "user", "content": QUESTION}], max_tokens=10, temperature=1.2,
              top_p=0.95, seed=7)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_errors_are_openai_errors_with_their_status(served, client):
    import openai

    server, _ = served
    msgs = [{"role": "user", "content": QUESTION}]
    bad = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="cxr-int8", messages=msgs)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=msgs)
    huge = "data:image/png;base64," + "A" * (21 * 1024 * 1024 // 3 * 4)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="cxr-int8", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": huge}}, {"type": "text", "text": QUESTION}]}])
    assert e.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="data: URIs"):
        client.chat.completions.create(model="cxr-int8", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.org/cxr.png"}}]}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="cxr-int8", messages=msgs, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="cxr-int8", messages=msgs, max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="could not be decoded"):
        client.chat.completions.create(model="cxr-int8", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}}]}])
    assert [m.id for m in client.models.list()] == ["cxr-int8"]


def test_a_full_queue_answers_503_with_retry_after(served):
    """queue_size 2: with the session busy (its lock held here) two requests wait, the third is refused."""
    import json
    import urllib.error
    import urllib.request

    server, session = served
    body = json.dumps({"model": "cxr-int8", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2})

    def post():
        req = urllib.request.Request(server.base_url + "/chat/completions", data=body.encode(), method="POST",
                                     headers={"Authorization": "Bearer secret-key", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read())

    results = []
    with session._lock:
        waiting = [threading.Thread(target=lambda: results.append(post())) for _ in range(2)]
        for t in waiting:
            t.start()
        time.sleep(1.0)
        status, headers, third = post()
    for t in waiting:
        t.join()
    assert status == 503 and int(headers["retry-after"]) > 0 and third["error"]["code"] == "queue_full"
    assert [r[0] for r in results] == [200, 200]


def test_serve_refuses_a_public_address_without_a_key(artifact):
    from edgemed.cli import main

    assert main(["serve", str(artifact("llava-clip", "int8")), "--host", "0.0.0.0"]) == 2


def _browser():
    """Headless Debian chromium driven by selenium through Debian's chromedriver (nothing downloaded)."""
    import os
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("EDGEMED_REQUIRE_BROWSER") == "1":  # CI installs them: there, missing is a failure
            pytest.fail("chromium and chromedriver are required (apt-get install chromium chromium-driver)")
        pytest.skip("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service(driver))


def test_clinic_page_streams_the_answer_in_a_real_browser(served, tmp_path):
    """The example page edgemed serve ships at /: a PNG picked in a file input, the question, the API
    key; the browser's fetch streams the SSE answer into the page, which equals the runtime's."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, session = served
    png = tmp_path / "cxr.png"
    png.write_bytes(base64.b64decode(_png(seed=3).split(",", 1)[1]))
    browser = _browser()
    try:
        browser.get(server.base_url[: -len("/v1")] + "/")
        browser.find_element(By.ID, "image").send_keys(str(png))
        question = browser.find_element(By.ID, "question")
        question.clear()
        question.send_keys(QUESTION)
        browser.find_element(By.ID, "key").send_keys("secret-key")
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 120).until(
            lambda b: b.find_element(By.ID, "answer").get_attribute("data-done") == "1"
            or "error" in b.find_element(By.ID, "status").text)
        answer = browser.find_element(By.ID, "answer").text
        status = browser.find_element(By.ID, "status").text
    finally:
        browser.quit()
    ref = session.generate(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                           images=[png], max_new_tokens=256)
    assert status.startswith("done"), status
    assert answer == ref.text.strip() and answer  # the page shows the streamed text (selenium trims it)
