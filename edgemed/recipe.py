"""Recipes: pydantic models that round-trip through YAML and fully determine an artifact."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgemed._resources import shipped_dir, shipped_names
from edgemed._yaml import dump_yaml, read_yaml, validate
from edgemed.errors import BadInputError

# Bits per weight for every precision name a policy may use (ONNX, TensorRT and GGUF spellings).
PRECISION_BITS: dict[str, float] = {
    "fp32": 32, "fp16": 16, "bf16": 16, "fp8": 8, "int8": 8, "int4": 4, "fp4": 4,
    "f32": 32, "f16": 16, "q8_0": 8.5, "q6_k": 6.5625, "q5_k_m": 5.5, "q5_0": 5.5,
    "q4_k_m": 4.5, "q4_0": 4.5, "q4_1": 5, "iq4_xs": 4.25, "q3_k_m": 3.4375, "q2_k": 2.625,
}
COMPONENTS = ("vision", "projector", "embed", "language", "lm_head")


def _precision(v: str) -> str:
    v = v.lower()
    if v not in PRECISION_BITS:
        raise ValueError(f"unknown precision '{v}'; use one of {', '.join(PRECISION_BITS)}")
    return v


class ComponentPolicy(BaseModel):
    """Which precision each named component gets, written once and compiled to each backend."""

    model_config = ConfigDict(extra="forbid")
    vision: str = "fp32"
    projector: str = "fp32"
    embed: str = "fp32"
    language: str = "fp32"
    lm_head: str = "fp32"
    # The vision tower and projector stay at >= 8 bits unless a recipe opts out explicitly.
    allow_low_bit_vision: bool = False

    @field_validator(*COMPONENTS)
    @classmethod
    def _known(cls, v: str) -> str:
        return _precision(v)

    @model_validator(mode="after")
    def _check(self) -> "ComponentPolicy":
        if not self.allow_low_bit_vision:
            for comp in ("vision", "projector"):
                if PRECISION_BITS[getattr(self, comp)] < 8:
                    raise ValueError(
                        f"{comp} at {getattr(self, comp)} is below 8 bits; set allow_low_bit_vision: true to insist"
                    )
        return self

    def bits(self, component: str) -> float:
        return PRECISION_BITS[getattr(self, component)]

    def precisions(self) -> set[str]:
        return {getattr(self, c) for c in COMPONENTS}


class Gates(BaseModel):
    """Acceptance thresholds evaluated by `compress` after export (names match report.json)."""

    model_config = ConfigDict(extra="forbid")
    max_kld_mean: float | None = Field(None, ge=0)
    max_kld_p99: float | None = Field(None, ge=0)
    min_top1_agreement: float | None = Field(None, ge=0, le=1)
    max_flip_rate: float | None = Field(None, ge=0, le=1)
    min_closed_acc_retention: float | None = Field(None, ge=0)
    max_logits_abs_diff: float | None = Field(None, ge=0)

    def active(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class StepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step: str
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _resolve(self) -> "StepSpec":
        from edgemed.steps import STEPS

        if self.step not in STEPS:
            raise ValueError(f"unknown step '{self.step}'; registered steps: {', '.join(STEPS)}")
        # Fill every default so the manifest's recipe reproduces the artifact on its own.
        self.args = STEPS.get(self.step).Args.model_validate(self.args).model_dump(mode="json")
        return self

    def build(self):
        from edgemed.steps import STEPS

        cls = STEPS.get(self.step)
        return cls(cls.Args.model_validate(self.args))


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    policy: ComponentPolicy = Field(default_factory=ComponentPolicy)
    steps: list[StepSpec]
    calibration: str | None = None
    gates: Gates = Field(default_factory=Gates)

    @property
    def format(self) -> str | None:
        """The artifact format: the format of the (last) export step, if any."""
        from edgemed.steps import STEPS

        fmt = None
        for s in self.steps:
            cls = STEPS.get(s.step)
            if cls.stage == "export":
                fmt = cls.formats[0]
        return fmt

    def step_args(self, step: str):
        """The typed args of the recipe's first `step` step, or that step's defaults when it has none
        (what the planner asks of a backend's steps; never untyped dicts with repeated defaults)."""
        from edgemed.steps import STEPS

        spec = next((s for s in self.steps if s.step == step), None)
        return STEPS.get(step).Args.model_validate(spec.args if spec else {})

    def to_yaml(self) -> str:
        return dump_yaml(self)


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A shipped recipe by name (`int8`) or a YAML file."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = shipped_dir("recipes") / f"{name_or_path}.yaml"
        if not path.exists():
            raise BadInputError(
                f"recipe '{name_or_path}'",
                "no shipped recipe of that name and no such file",
                f"use one of: {', '.join(shipped_names('recipes'))}, or a path to a YAML file",
            )
    return validate(Recipe, read_yaml(path), f"recipe {path}")


def compose(recipes: list[Recipe]) -> Recipe:
    """`--recipe A --recipe B`: steps run in the order given; later policies, gates and
    calibration override earlier ones key by key."""
    if not recipes:
        raise BadInputError("--recipe", "no recipe given", "pass --recipe NAME (see `edgemed recipes`)")
    if len(recipes) == 1:
        return recipes[0]
    policy: dict[str, Any] = {}
    gates: dict[str, Any] = {}
    calibration = None
    for r in recipes:
        policy.update({k: getattr(r.policy, k) for k in r.policy.model_fields_set})
        gates.update(r.gates.active())
        calibration = r.calibration or calibration
    exports = [s for r in recipes for s in r.steps if _stage(s.step) == "export"]
    if len({s.step for s in exports}) > 1:
        raise BadInputError(
            "--recipe", f"the recipes export to more than one format ({', '.join(s.step for s in exports)})",
            "combine transform recipes (prune, moe) with exactly one format recipe",
        )
    # A transform-only recipe placed after a format recipe would run after export; keep the
    # user's order for model-stage steps and move them before the export.
    steps = [s for r in recipes for s in r.steps if _stage(s.step) == "model"]
    seen_export = False
    for r in recipes:
        for s in r.steps:
            if _stage(s.step) == "export":
                if seen_export:
                    continue
                seen_export = True
            if _stage(s.step) != "model":
                steps.append(s)
    return Recipe(
        name="+".join(r.name for r in recipes),
        description="; ".join(r.description for r in recipes if r.description),
        policy=ComponentPolicy(**policy),
        steps=steps,
        calibration=calibration,
        gates=Gates(**gates),
    )


def _stage(step: str) -> str:
    from edgemed.steps import STEPS

    return STEPS.get(step).stage
