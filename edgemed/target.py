"""Targets: hardware profiles as pydantic models <-> YAML, with published specs and their sources."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgemed._resources import shipped_dir, shipped_names
from edgemed._yaml import dump_yaml, read_yaml, validate
from edgemed.errors import BadInputError


class Accelerator(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["gpu", "npu"]
    name: str
    compute_capability: str | None = None  # e.g. sm_87
    memory_shared_with_cpu: bool = False


class PowerMeasurement(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["rapl", "nvml", "ina3221", "tegrastats", "none"]
    # Rails whose sum is the module total (never add sub-rails to a total rail).
    total_rails: list[str] = Field(default_factory=list)
    notes: str = ""


class Target(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    arch: Literal["x86_64", "aarch64"]
    accelerator: Accelerator | None = None
    memory_gb: float = Field(gt=0)
    # What a model may use after the OS and runtime (Orin Nano 8GB leaves about 5.2 GB).
    usable_memory_gb: float = Field(gt=0)
    memory_bandwidth_gb_s: float = Field(gt=0)
    precisions: list[str]
    formats: list[str]  # artifact formats that run there (registered backends, edgemed.formats)
    runtimes: list[str]
    power: PowerMeasurement
    sources: list[str] = Field(default_factory=list)

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, v: list[str]) -> list[str]:
        from edgemed.formats.base import FORMATS

        unknown = [f for f in v if f not in FORMATS]
        if unknown:
            raise ValueError(f"unknown format(s) {', '.join(unknown)}; use: {', '.join(FORMATS)}")
        return v

    def to_yaml(self) -> str:
        return dump_yaml(self)


def load_target(name_or_path: str | Path) -> Target:
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = shipped_dir("targets") / f"{name_or_path}.yaml"
        if not path.exists():
            raise BadInputError(
                f"target '{name_or_path}'",
                "no shipped target of that name and no such file",
                f"use one of: {', '.join(shipped_names('targets'))}, or a path to a YAML file",
            )
    return validate(Target, read_yaml(path), f"target {path}")


def host_target_name() -> str:
    """The shipped target that best describes this machine (the default for `compress`)."""
    import platform

    return "cpu-arm64" if platform.machine().lower() in ("aarch64", "arm64") else "cpu-x86-avx2"
