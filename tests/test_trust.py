"""An artifact folder is a trust boundary: what runtime.load, `edgemed bench` and `inspect --verify`
refuse, on attack folders built here from a real compressed artifact."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import edgemed.runtime
from edgemed.artifact import FileRecord, read_manifest, sha256_file, write_manifest
from edgemed.cli import main
from edgemed.errors import BadInputError, VerificationError


@pytest.fixture
def copy(artifact, tmp_path):
    """A fresh copy of a real tiny LLaVA int8 artifact."""
    def make(name: str = "a") -> Path:
        out = tmp_path / name
        shutil.copytree(artifact("llava-siglip", "int8"), out)
        return out
    return make


def _relist(root: Path, path: str, target: Path | None = None) -> None:
    """Point the manifest entry `path` at the file's current bytes (an attacker updating hashes)."""
    m = read_manifest(root)
    f = target or root / path
    rec = m.file(path)
    rec.sha256, rec.bytes = sha256_file(f), f.stat().st_size
    write_manifest(root, m)


def _refused(root: Path, match: str, **kw):
    with pytest.raises(BadInputError, match=match) as e:
        edgemed.runtime.load(root, **kw)
    assert e.value.exit_code == 2
    assert main(["inspect", str(root), "--verify"]) == 2


def test_the_untouched_artifact_loads_and_verifies(copy):
    out = copy()
    assert edgemed.runtime.load(out).generate(None, "hi", max_new_tokens=2, stop_at_eos=False).token_ids
    assert main(["inspect", str(out), "--verify"]) == 0


@pytest.mark.parametrize("entry", ["../../../../etc/passwd", "/etc/passwd", "sub/../../x", "./tokenizer.json",
                                   "C:\\windows\\x", ""])
def test_a_manifest_path_that_leaves_the_folder_is_refused(copy, entry):
    out = copy()
    m = read_manifest(out)
    target = Path("/etc/passwd")
    m.files.append(FileRecord(path=entry, sha256=sha256_file(target), bytes=target.stat().st_size, component="support"))
    write_manifest(out, m)
    _refused(out, "not a relative, normalised path inside the artifact")


def test_a_symlink_to_an_outside_graph_is_refused(copy, tmp_path):
    out, other = copy("a"), copy("outside")
    (out / "onnx/embed_tokens.onnx").unlink()
    os.symlink(other / "onnx/embed_tokens.onnx", out / "onnx/embed_tokens.onnx")
    _relist(out, "onnx/embed_tokens.onnx", other / "onnx/embed_tokens.onnx")
    _refused(out, "symbolic link")


def _external_graph(path: Path, location: str) -> None:
    """A one-initializer ONNX graph whose weights live in external data at `location`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "64")):
        w.external_data.add(key=k, value=v)
    g = helper.make_graph([helper.make_node("MatMul", ["input_ids", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    onnx.save(helper.make_model(g), str(path))


@pytest.mark.parametrize("location", ["../../secret.bin", "/etc/passwd", "not_listed.bin"])
def test_onnx_external_data_outside_or_unlisted_is_refused_before_onnx_runtime(copy, location):
    out = copy()
    _external_graph(out / "onnx/embed_tokens.onnx", location)  # a location is relative to onnx/
    _relist(out, "onnx/embed_tokens.onnx")
    _refused(out, "does not list" if location == "not_listed.bin" else "external data of tensor w")


def test_a_rejected_artifact_runs_only_when_allowed(copy):
    out = copy()
    m = read_manifest(out)
    m.status, m.status_reason = "rejected", "max_kld_mean: kld_mean = 3.1 (threshold <= 0.05)"
    write_manifest(out, m)
    with pytest.raises(BadInputError, match="gates rejected this artifact .*max_kld_mean"):
        edgemed.runtime.load(out)
    assert edgemed.runtime.load(out, allow_rejected=True) is not None
    assert main(["bench", str(out), "--runs", "2", "--max-new-tokens", "2"]) == 2


def test_changed_missing_and_unlisted_files_are_refused(copy):
    out = copy()
    p = out / "onnx/decoder_model_merged.onnx"
    data = bytearray(p.read_bytes())
    data[-1] ^= 1  # same size, other bytes
    p.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="sha256 differs"):
        edgemed.runtime.load(out)
    assert main(["bench", str(out), "--runs", "2"]) == 2
    # verify=False skips the hashes (the cost on a big artifact), never the sizes or the paths
    p.write_bytes(bytes(data[:-1]))
    with pytest.raises(VerificationError, match="truncated or replaced"):
        edgemed.runtime.load(out, verify=False)

    out = copy("b")
    (out / "extra.py").write_text("print('hello')")
    _refused(out, "extra.py: not listed in the manifest")


def test_a_component_file_missing_from_folder_and_manifest_is_named(copy):
    out = copy()
    (out / "onnx/vision_encoder.onnx").unlink()
    m = read_manifest(out)
    m.files = [f for f in m.files if f.path != "onnx/vision_encoder.onnx"]
    write_manifest(out, m)
    _refused(out, "needs vision_encoder.onnx")


def test_overwrite_replaces_only_an_artifact(copy, tmp_path):
    from edgemed.artifact import ArtifactWriter

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "x.jpg").write_bytes(b"\xff\xd8")
    for target in (a_file, foreign):
        with pytest.raises(BadInputError, match="--overwrite|not an edgemed artifact"):
            ArtifactWriter(target, overwrite=True)
        assert main(["compress", "edgemed-demo-tiny", "-o", str(target), "--overwrite"]) == 2
    assert a_file.read_text() == "mine" and (foreign / "x.jpg").exists()

    old = copy("old")
    with ArtifactWriter(old, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (old / "manifest.json").exists()  # the old artifact stays until the new one is complete
    assert (old / "new.txt").exists() and not (old / "manifest.json").exists()
    assert oct(old.stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # normal permissions, not mkdtemp's 0700
    assert not list(tmp_path.glob(".old.*"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_failed_write_leaves_nothing_and_stale_folders_of_dead_runs_go(tmp_path):
    import json
    import subprocess
    import sys

    from edgemed.artifact import ArtifactWriter
    from edgemed.atomic import WRITER_FILE, stale_siblings

    out = tmp_path / "art"
    with pytest.raises(RuntimeError):
        with ArtifactWriter(out) as tmp:
            (tmp / "half.onnx").write_bytes(b"0" * 10)
            raise RuntimeError("boom")
    assert not out.exists() and not list(tmp_path.iterdir())

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tmp_path / ".art.tmp-killed00"
    killed.mkdir()
    import socket
    (killed / WRITER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    live = tmp_path / ".art.tmp-running0"
    live.mkdir()
    (live / WRITER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    other_host = tmp_path / ".art.tmp-elsewher"
    other_host.mkdir()
    (other_host / WRITER_FILE).write_text(json.dumps({"host": "another-machine", "pid": 1}))
    assert stale_siblings(out) == [killed]
    writer = ArtifactWriter(out)
    assert writer.removed_stale == [killed] and not killed.exists() and live.exists() and other_host.exists()


@pytest.mark.slow  # several real compress runs, killed part-way
def test_sigkill_during_compress_never_leaves_a_folder_marked_complete(tmp_path, edgemed_home):
    """A real `edgemed compress` killed with SIGKILL at several points: the output either does not
    exist or is a complete artifact that verifies; the next run removes the killed runs' folders."""
    import signal
    import subprocess
    import sys
    import time

    from edgemed.artifact import verify
    from edgemed.demo import tiny_model_dir

    tiny_model_dir()  # built once, outside the timed runs
    out = tmp_path / "art"
    cmd = [sys.executable, "-m", "edgemed", "compress", "edgemed-demo-tiny", "--recipe", "int8", "-o", str(out)]
    env = {**os.environ, "EDGEMED_HOME": str(edgemed_home)}
    killed_with_temp = 0
    for delay in (1.5, 4.0, 8.0):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():  # it finished before the kill: then it is whole
            assert (out / "manifest.json").is_file() and verify(out) == []
            shutil.rmtree(out)
        killed_with_temp += bool(list(tmp_path.glob(".art.tmp-*")))
    # One more kill that lands mid-write whatever the machine's speed: when the run's own temporary
    # folder appears (a run's start removes the folders earlier kills left, and a fast run may finish
    # before a fixed delay).
    before = set(tmp_path.glob(".art.tmp-*"))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not set(tmp_path.glob(".art.tmp-*")) - before and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_with_temp += bool(list(tmp_path.glob(".art.tmp-*")))
    assert killed_with_temp >= 2 and list(tmp_path.glob(".art.tmp-*"))  # the last kill landed mid-write
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert verify(out) == [] and not list(tmp_path.glob(".art.*"))
    assert "was killed" in run.stderr


def test_sigterm_during_compress_removes_its_temporary_folder(tmp_path, edgemed_home):
    """`kill` (a job scheduler's SIGTERM) mid-compress: exit 143 and the temporary sibling it was
    writing in is gone at once, not left for the next run (a 7B's holds a 28 GB fp32 decoder)."""
    import signal
    import subprocess
    import sys
    import time

    from edgemed.demo import tiny_model_dir

    tiny_model_dir()
    out = tmp_path / "art"
    proc = subprocess.Popen([sys.executable, "-m", "edgemed", "compress", "edgemed-demo-tiny", "--recipe", "int8",
                             "-o", str(out)], env={**os.environ, "EDGEMED_HOME": str(edgemed_home)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".art.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "compress ended before its temporary folder was seen"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert not out.exists() and not list(tmp_path.glob(".art*"))


def test_usage_errors_exit_2_without_a_traceback(capsys):
    assert main(["recipes", "--bogus"]) == 2
    assert main(["inspect"]) == 2
    err = capsys.readouterr().err
    assert "No such option" in err and "Missing argument" in err and "Traceback" not in err


def test_a_truncated_safetensors_is_bad_input_and_nothing_is_written(tiny_dir, tmp_path):
    src = tmp_path / "model"
    shutil.copytree(tiny_dir("llama"), src)
    w = src / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size - 100])
    out = tmp_path / "out"
    assert main(["compress", str(src), "--recipe", "int8", "-o", str(out)]) == 2
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    from edgemed.models import load_model

    with pytest.raises(BadInputError, match="model.safetensors: is truncated"):
        load_model(str(src))


@pytest.mark.parametrize("fmt", ["int8", "q8_0"])
def test_generation_limits_are_checked_before_allocating_and_the_context_end_returns_what_was_made(artifact, fmt):
    if fmt == "q8_0":
        pytest.importorskip("llama_cpp")
    path = artifact("llava-siglip", fmt)
    s = edgemed.runtime.load(path, **({"n_ctx": 64} if fmt == "q8_0" else {}))
    s.context_tokens = min(s.context_tokens, 64)
    for bad in (-1, 0, 1.5, True):
        with pytest.raises(BadInputError, match="max_new_tokens"):
            s.generate(None, "hi", max_new_tokens=bad)
    with pytest.raises(BadInputError, match="context of 64 tokens"):
        s.generate(None, "word " * 80, max_new_tokens=4)
    n_prompt = len(s.prompt_ids("hi", False))
    r = s.generate(None, "hi", max_new_tokens=10**9, stop_at_eos=False)  # no 10**9-token KV cache
    assert r.finish_reason == "length" and len(r.token_ids) == 64 - n_prompt
    r = s.generate(None, "hi", max_new_tokens=3, stop_at_eos=False)
    assert r.finish_reason == "length" and len(r.token_ids) == 3


_NET_BLOCK = """
import os, socket
def _deny(*args, **kwargs):
    with open(os.environ["EDGEMED_NET_LOG"], "a") as fh:
        fh.write(repr(args[:2]) + "\\n")
    raise OSError("network blocked by the test")
socket.socket.connect = _deny
socket.socket.connect_ex = _deny
socket.create_connection = _deny
socket.getaddrinfo = _deny
"""


def test_offline_by_default_nothing_touches_the_network(artifact, tmp_path):
    """plan / compress with a hub id not in the local cache, and bench with a hub suite, in processes
    whose sockets record any attempt: exit 2 naming --online, and no connection tried."""
    import subprocess
    import sys

    (tmp_path / "sitecustomize.py").write_text(_NET_BLOCK)
    log = tmp_path / "net.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                                    "EDGEMED_ONLINE"))}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]), EDGEMED_NET_LOG=str(log),
               HF_HOME=str(tmp_path / "hf"))
    runs = [["plan", "some-org/some-model", "--recipe", "int8"],
            ["compress", "some-org/some-model", "--recipe", "int8", "-o", str(tmp_path / "out")],
            ["bench", str(artifact("llava-siglip", "int8")), "--suite", "vqa-rad", "--runs", "2",
             "--max-new-tokens", "2", "-o", str(tmp_path / "r.json")]]
    for args in runs:
        run = subprocess.run([sys.executable, "-m", "edgemed", *args], env=env, capture_output=True, text=True)
        assert run.returncode == 2, (args, run.stderr[-1500:])
        assert "--online" in run.stderr, run.stderr[-1500:]
    assert not log.exists() or log.read_text() == ""
    assert not (tmp_path / "out").exists()
