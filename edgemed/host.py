"""Facts about the machine edgemed runs on, read from sysfs and host tools.

Low level on purpose: format backends (a TensorRT build records the power mode it was built
under) and the benchmark meters both read these, so this module imports nothing from the rest of
edgemed. Standard library only; nothing here raises because a file or tool is missing.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PowerMode", "read_power_mode", "read_text", "read_int"]


def read_text(path: Path) -> str:
    """One sysfs value file, stripped."""
    with open(path) as f:
        return f.read().strip()


def read_int(path: Path) -> int:
    return int(read_text(path))


@dataclass(frozen=True)
class PowerMode:
    """The Jetson clock configuration a measurement ran under.

    nvpmodel names are clock caps, not power budgets (an Orin NX "25W" mode measured 16.9 W), so
    the mode is recorded rather than trusted. ``jetson_clocks`` is inferred without root: it pins
    every CPU's and the GPU's minimum frequency to the maximum. None means unknown.
    """

    nvpmodel: str | None
    nvpmodel_id: int | None
    jetson_clocks: bool | None
    raw: str = ""

    def __str__(self) -> str:
        mode = self.nvpmodel or "unknown"
        if self.nvpmodel_id is not None:
            mode += f" (id {self.nvpmodel_id})"
        jc = {True: "on", False: "off", None: "unknown"}[self.jetson_clocks]
        return f"nvpmodel {mode}, jetson_clocks {jc}"


def _pinned(min_path: Path, max_path: Path) -> bool | None:
    try:
        return read_int(min_path) == read_int(max_path)
    except (OSError, ValueError):
        return None


def _jetson_clocks_active(sys_root: Path) -> bool | None:
    cpus = sorted((sys_root / "devices/system/cpu").glob("cpu[0-9]*/cpufreq"))
    cpu = [_pinned(c / "scaling_min_freq", c / "scaling_max_freq") for c in cpus]
    gpus = [d for d in sorted((sys_root / "class/devfreq").glob("*"))
            if "gpu" in d.name or re.search(r"\.g[a-z]\d+b$", d.name)]
    gpu = [_pinned(d / "min_freq", d / "max_freq") for d in gpus]
    if not cpu or not gpu or None in cpu or None in gpu:
        return None
    return all(cpu) and all(gpu)


def read_power_mode(*, runner: Callable[[list[str]], str] | None = None,
                    sys_root: str | os.PathLike = "/sys") -> PowerMode | None:
    """``nvpmodel -q`` and whether jetson_clocks is active, or None off-Jetson. Never raises."""
    if runner is None:
        if shutil.which("nvpmodel") is None:
            return None

        def runner(cmd: list[str]) -> str:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout

    try:
        raw = runner(["nvpmodel", "-q"])
    except (OSError, subprocess.SubprocessError):
        return None
    name = mode_id = None
    if m := re.search(r"NV Power Mode:\s*(\S+)", raw or ""):
        name = m.group(1)
    if m := re.search(r"^\s*(\d+)\s*$", raw or "", re.MULTILINE):
        mode_id = int(m.group(1))
    try:
        jc = _jetson_clocks_active(Path(sys_root))
    except OSError:
        jc = None
    return PowerMode(name, mode_id, jc, (raw or "").strip())
