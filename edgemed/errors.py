"""One exception hierarchy for edgemed.

Every error a user can cause names the input that was wrong and how to fix it; the CLI maps the
class to the exit codes of DESIGN.md (2: bad input or infeasible plan, 3: a gate failed).
"""
from __future__ import annotations


class EdgemedError(Exception):
    """Base class; an unexpected failure inside edgemed (exit code 1)."""

    exit_code = 1


class BadInputError(EdgemedError):
    """The user's input is wrong: a path, a recipe key, an image, a model family (exit code 2)."""

    exit_code = 2

    def __init__(self, what: str, reason: str, fix: str | None = None):
        self.what, self.reason, self.fix = what, reason, fix
        msg = f"{what}: {reason}"
        if fix:
            msg += f"\n  fix: {fix}"
        super().__init__(msg)


class MissingDependencyError(BadInputError):
    """An optional package is needed for this input (a decoder, a runtime)."""

    def __init__(self, what: str, package: str, extra: str | None = None):
        fix = f"pip install {package}" if extra is None else f"pip install 'edgemed[{extra}]' (or {package})"
        super().__init__(what, f"needs the optional package '{package}', which is not installed", fix)


class InfeasiblePlanError(EdgemedError):
    """The recipe x target x model combination cannot run (exit code 2)."""

    exit_code = 2


class VerificationError(BadInputError):
    """An artifact's files do not match its manifest (exit code 2)."""


class GateFailedError(EdgemedError):
    """An accuracy gate failed; the artifact is kept but marked rejected (exit code 3)."""

    exit_code = 3
