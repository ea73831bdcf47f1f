"""YAML <-> pydantic with errors that name the file and the key."""
from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from edgemed.errors import BadInputError

M = TypeVar("M", bound=BaseModel)


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise BadInputError(str(path), "file not found", "check the path") from None
    except yaml.YAMLError as e:
        raise BadInputError(str(path), f"not valid YAML ({e})", "fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise BadInputError(str(path), "expected a mapping at the top level", "see recipes/ or targets/ for the layout")
    return data


def validate(model: type[M], data: dict, source: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown key '{key}'")
            else:
                problems.append(f"key '{key}': {err['msg']}")
        raise BadInputError(source, "; ".join(problems), "fix or remove the key(s) named above") from None


def dump_yaml(model: BaseModel) -> str:
    return yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False)
