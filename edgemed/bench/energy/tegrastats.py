"""Jetson energy and clocks from ``tegrastats``: a log captured around a run (TegrastatsLog), or
tegrastats run by the meter itself for the window (TegrastatsMeter, the fallback where the INA3221
sysfs rails cannot be read, e.g. in a container without /sys/bus/i2c)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from edgemed.bench.energy.base import Clock, EnergyMeter, EnergyReading, trapezoid_joules
from edgemed.bench.energy.jetson_rails import CARRIER_NOTE, resolve_total_rails
from edgemed.errors import BadInputError

__all__ = ["TegrastatsLog", "TegrastatsMeter", "parse_tegrastats_line"]

_TS_DATE = re.compile(r"^(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s+")
_TS_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_TS_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_TS_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_TS_FREQ = r"\b{name} (?:(\d+)%)?(?:@(?:\[([\d,]+)\]|(\d+)))?"
_TS_EMC = re.compile(_TS_FREQ.format(name="EMC_FREQ"))
_TS_GR3D = re.compile(_TS_FREQ.format(name="GR3D_FREQ"))
_TS_RAIL_MW = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*) (\d+)mW/(\d+)mW(?:/(\d+)mW)?")
# JetPack 4 printed rails without units ("VDD_IN 14025/14416"); only trust rail-like names there.
_TS_RAIL_BARE = re.compile(r"\b((?:VDD|POM|VIN)[A-Za-z0-9_]*) (\d+)/(\d+)(?=\s|$)")
_TS_TEMP = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")


def _freq(m: re.Match | None) -> dict | None:
    if m is None or all(g is None for g in m.groups()):
        return None
    load = int(m.group(1)) if m.group(1) is not None else None
    if m.group(2) is not None:  # JetPack 7 per-GPC array "@[1300,1300]"
        mhz: int | list[int] | None = [int(x) for x in m.group(2).split(",") if x]
    elif m.group(3) is not None:
        mhz = int(m.group(3))
    else:  # "GR3D_FREQ 0%": load only
        mhz = None
    return {"load_pct": load, "freq_mhz": mhz}


def parse_tegrastats_line(line: str) -> dict:
    """Parse one tegrastats line into numbers.

    Handles JetPack 5/6 rails (``VDD_IN 5136mW/5136mW``: current/average), JetPack 7 rails
    (``VDD_GPU_SOC 5139mW/5139mW/5139mW``: current/average/max), JetPack 4 unit-less rails, the
    optional leading timestamp, ``CPU [23%@2201,off,...]`` (None for an offline core),
    ``EMC_FREQ 3%@3199`` and ``GR3D_FREQ`` as ``12%@1300``, ``12%@[1300,1300]`` or Thor's
    ``@[1000,1000,1000]`` (no load). Fields absent from the line are absent from the dict.
    """
    out: dict = {}
    if m := _TS_DATE.match(line):
        out["timestamp"] = m.group(1)
    if m := _TS_RAM.search(line):
        out["ram_used_mb"], out["ram_total_mb"] = int(m.group(1)), int(m.group(2))
    if m := _TS_SWAP.search(line):
        out["swap_used_mb"], out["swap_total_mb"] = int(m.group(1)), int(m.group(2))
    if m := _TS_CPU.search(line):
        cores: list[dict | None] = []
        for tok in m.group(1).split(","):
            cm = re.fullmatch(r"\s*(\d+)%@(\d+)\s*", tok)
            cores.append({"load_pct": int(cm.group(1)), "freq_mhz": int(cm.group(2))} if cm else None)
        out["cpu"] = cores
    if (f := _freq(_TS_EMC.search(line))) is not None:
        out["emc_freq"] = f
    if (f := _freq(_TS_GR3D.search(line))) is not None:
        out["gr3d_freq"] = f
    rails: dict[str, dict[str, int]] = {}
    for m in _TS_RAIL_MW.finditer(line):
        r = {"cur_mw": int(m.group(2)), "avg_mw": int(m.group(3))}
        if m.group(4) is not None:
            r["max_mw"] = int(m.group(4))
        rails[m.group(1)] = r
    if not rails:
        for m in _TS_RAIL_BARE.finditer(line):
            rails[m.group(1)] = {"cur_mw": int(m.group(2)), "avg_mw": int(m.group(3))}
    out["rails"] = rails
    temps = {m.group(1): float(m.group(2)) for m in _TS_TEMP.finditer(line)}
    if temps:
        out["temps_c"] = temps
    return out


class TegrastatsLog:
    """Energy from a ``tegrastats --interval N --logfile F`` log captured around a run.

    Each line is one sample ``interval_ms`` apart (the timestamps tegrastats prints have one
    second resolution, too coarse to integrate with); each rail's instantaneous (first) value is
    integrated with the trapezoid rule, the same as :class:`Ina3221Meter`.
    """

    method = "tegrastats"

    def __init__(self, source: str | os.PathLike | Iterable[str], interval_ms: float, *,
                 total_rails: Sequence[str] | None = None):
        if not interval_ms or interval_ms <= 0:
            raise BadInputError("interval_ms", f"must be positive, got {interval_ms}",
                                "pass the --interval tegrastats ran with (milliseconds)")
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.is_file():
                raise BadInputError(str(path), "tegrastats log not found",
                                    "run tegrastats --interval N --logfile FILE during the benchmark")
            lines = path.read_text().splitlines()
        else:
            lines = list(source)
        self.interval_ms = float(interval_ms)
        self.total_rails = list(total_rails) if total_rails is not None else None
        self.samples = [s for s in (parse_tegrastats_line(ln) for ln in lines if ln.strip())
                        if s["rails"]]

    def rails_joules(self) -> dict[str, float]:
        """Joules per rail; a rail missing from some lines is integrated over the lines that have it."""
        names = sorted({k for s in self.samples for k in s["rails"]})
        dt = self.interval_ms / 1000.0
        out = {}
        for name in names:
            pts = [(i * dt, s["rails"][name]["cur_mw"]) for i, s in enumerate(self.samples)
                   if name in s["rails"]]
            out[name] = trapezoid_joules([t for t, _ in pts], [p for _, p in pts])
        return out

    def reading(self, power_mode: str | None = None) -> EnergyReading:
        if len(self.samples) < 2:
            return EnergyReading(None, self.method, f"tegrastats log has {len(self.samples)} line(s) "
                                 "with power rails; need at least 2 to integrate", power_mode=power_mode)
        rails = self.rails_joules()
        totals, notes, reason = resolve_total_rails(rails, self.total_rails)
        duration = (len(self.samples) - 1) * self.interval_ms / 1000.0
        if totals is None:
            return EnergyReading(None, self.method, reason, rails, duration, power_mode)
        notes = [f"total = {' + '.join(totals)}", *notes, CARRIER_NOTE]
        return EnergyReading(sum(rails[r] for r in totals), self.method, None, rails, duration,
                             power_mode, tuple(totals), (), tuple(notes))


class TegrastatsMeter(EnergyMeter):
    """Runs ``tegrastats --interval N --logfile F`` for the measured window and integrates the
    log as TegrastatsLog does (each line's instantaneous rail power, N ms apart)."""

    method = "tegrastats"

    def __init__(self, *, interval_ms: int = 100, total_rails: Sequence[str] | None = None,
                 executable: str = "tegrastats", clock: Clock = time.monotonic, power_mode: str | None = None):
        super().__init__(clock=clock, power_mode=power_mode)
        self.interval_ms, self.total_rails, self.executable = int(interval_ms), total_rails, executable
        self._proc: subprocess.Popen | None = None
        self._log: Path | None = None

    def unavailable_reason(self) -> str | None:
        if shutil.which(self.executable) is None:
            return f"no {self.executable} on PATH (not a Jetson)"
        return None

    def _begin(self) -> None:
        fd, name = tempfile.mkstemp(prefix="edgemed-tegrastats-", suffix=".log")
        os.close(fd)
        self._log = Path(name)
        self._proc = subprocess.Popen([self.executable, "--interval", str(self.interval_ms), "--logfile", name],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _stop_process(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
            self._proc = None

    def _end(self, duration_s: float) -> EnergyReading:
        self._stop_process()
        try:
            log = TegrastatsLog(self._log.read_text().splitlines(), self.interval_ms, total_rails=self.total_rails)
            return log.reading(self.power_mode)
        finally:
            self._log.unlink(missing_ok=True)

    def _end_unavailable(self) -> None:
        self._stop_process()
