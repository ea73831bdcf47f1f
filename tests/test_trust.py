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
    (out / "embed_tokens.onnx").unlink()
    os.symlink(other / "embed_tokens.onnx", out / "embed_tokens.onnx")
    _relist(out, "embed_tokens.onnx", other / "embed_tokens.onnx")
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
    _external_graph(out / "embed_tokens.onnx", location)
    _relist(out, "embed_tokens.onnx")
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
    p = out / "decoder_model_merged.onnx"
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
    (out / "vision_encoder.onnx").unlink()
    m = read_manifest(out)
    m.files = [f for f in m.files if f.path != "vision_encoder.onnx"]
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
    assert killed_with_temp >= 1  # at least one kill landed mid-write
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert verify(out) == [] and not list(tmp_path.glob(".art.*"))
    assert "was killed" in run.stderr
