"""manifest.json as a typed Manifest: it round-trips, keeps fields it does not know, and a damaged
file is a BadInputError naming the field."""
import json

import pytest

from edgemed.artifact import FileRecord, Manifest, ModelRecord, read_manifest, write_manifest
from edgemed.errors import BadInputError


def _manifest() -> Manifest:
    return Manifest(format="onnx", model=ModelRecord(text={"num_layers": 2}, chat_template="{{ x }}"),
                    files=[FileRecord(path="a.onnx", sha256="0" * 64, bytes=3, component="language")],
                    runtime={"kv_cache": "concat"})


def test_round_trip_keeps_unknown_fields(tmp_path):
    m = _manifest()
    write_manifest(tmp_path, m)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert list(raw)[:4] == ["schema_version", "created_utc", "edgemed_version", "format"]
    raw["from_a_newer_edgemed"] = {"x": 1}
    raw["files"][0]["checked_by"] = "someone"
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    back = read_manifest(tmp_path)
    assert back.file("a.onnx").bytes == 3 and back.model.text == {"num_layers": 2}
    write_manifest(tmp_path, back)
    again = json.loads((tmp_path / "manifest.json").read_text())
    assert again["from_a_newer_edgemed"] == {"x": 1} and again["files"][0]["checked_by"] == "someone"
    assert again == raw


def test_a_damaged_field_names_itself(tmp_path):
    raw = _manifest().model_dump(mode="json")
    raw["files"][0]["bytes"] = "many"
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BadInputError, match=r"files\.0\.bytes"):
        read_manifest(tmp_path)
