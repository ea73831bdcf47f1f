"""CPU package energy from the Linux powercap RAPL counters."""
from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edgemed.bench.energy.base import Clock, EnergyMeter, EnergyReading, Sampler
from edgemed.errors import BadInputError
from edgemed.host import read_int, read_text

__all__ = ["RaplMeter", "RAPL_PERMISSION_REASON"]

_RAPL_PACKAGE_DIR = re.compile(r"^intel-rapl:(\d+)$")
_RAPL_SUBZONE_DIR = re.compile(r"^intel-rapl:(\d+):(\d+)$")
RAPL_PERMISSION_REASON = "RAPL energy_uj not readable (needs root or a udev rule)"


@dataclass
class _RaplZone:
    key: str  # "package-0" or "package-0/core"
    path: Path
    max_range_uj: int
    counts_to_total: bool
    last_uj: int = 0
    accum_uj: int = 0


class RaplMeter(EnergyMeter):
    """CPU package energy from the Linux powercap RAPL interface (Intel, and AMD on 5.8+ kernels).

    Only top-level ``intel-rapl:N`` zones named ``package-*`` make the total: subzones
    (``intel-rapl:N:M``: core, uncore, dram) are already inside their package, ``psys`` (a
    platform zone on some laptops) contains the packages, and ``intel-rapl-mmio:*`` repeats the
    package counter through another interface. All are still listed in ``rails``.

    The counters are 32- to 64-bit microjoule values that wrap at ``max_energy_range_uj``. One
    wrap between two reads is corrected by adding the range; more than one is invisible, so long
    windows should pass ``sample_interval_s`` (a daemon thread calling :meth:`poll`), or call
    :meth:`poll` from the benchmark loop.
    """

    method = "rapl"
    LONG_WINDOW_WARN_S = 60.0

    def __init__(self, root: str | os.PathLike = "/sys/class/powercap", *,
                 sample_interval_s: float | None = None, clock: Clock = time.monotonic,
                 power_mode: str | None = None):
        super().__init__(clock=clock, power_mode=power_mode)
        if sample_interval_s is not None and sample_interval_s <= 0:
            raise BadInputError("sample_interval_s", f"must be positive, got {sample_interval_s}",
                                "pass a poll interval in seconds, e.g. 1.0, or None for no thread")
        self.root = Path(root)
        self.sample_interval_s = sample_interval_s
        self._zones: list[_RaplZone] = []
        self._lock = threading.Lock()
        self._sampler: Sampler | None = None

    def _discover(self) -> list[_RaplZone]:
        if not self.root.is_dir():
            return []
        packages: dict[str, str] = {}
        entries = sorted(os.listdir(self.root))
        zones: list[_RaplZone] = []
        for entry in entries:
            m = _RAPL_PACKAGE_DIR.match(entry)
            if not m or not (self.root / entry / "energy_uj").exists():
                continue
            d = self.root / entry
            named = (d / "name").exists()
            name = read_text(d / "name") if named else entry
            packages[m.group(1)] = name
            zones.append(_RaplZone(name, d / "energy_uj", read_int(d / "max_energy_range_uj"),
                                   counts_to_total=name.startswith("package") or not named))
        for entry in entries:
            m = _RAPL_SUBZONE_DIR.match(entry)
            if not m or m.group(1) not in packages or not (self.root / entry / "energy_uj").exists():
                continue
            d = self.root / entry
            name = read_text(d / "name") if (d / "name").exists() else entry
            zones.append(_RaplZone(f"{packages[m.group(1)]}/{name}", d / "energy_uj",
                                   read_int(d / "max_energy_range_uj"), counts_to_total=False))
        return zones

    def unavailable_reason(self) -> str | None:
        try:
            zones = self._discover()
            if not any(z.counts_to_total for z in zones):
                return f"no RAPL package zones under {self.root}"
            for z in zones:
                if z.counts_to_total:
                    read_int(z.path)
        except PermissionError:
            return RAPL_PERMISSION_REASON
        except (OSError, ValueError) as e:
            return f"RAPL powercap under {self.root} is unreadable ({e})"
        return None

    def _permission_reason(self, e: PermissionError) -> str:
        return RAPL_PERMISSION_REASON

    def _begin(self) -> None:
        with self._lock:
            self._zones = self._discover()
            for z in self._zones:
                z.last_uj, z.accum_uj = read_int(z.path), 0
        if self.sample_interval_s is not None:
            self._sampler = Sampler(self.poll, self.sample_interval_s, "edgemed-rapl-poll")
            self._sampler.start()

    def poll(self) -> None:
        """Fold the counters' progress since the last read into the running totals.

        Safe to call from a sampler thread while the main thread benchmarks; call it at least
        once per wrap period (range / power: about an hour at 70 W for a 2^38 µJ range).
        """
        with self._lock:
            for z in self._zones:
                now = read_int(z.path)
                if now < z.last_uj:  # wrapped once
                    z.accum_uj += now + z.max_range_uj - z.last_uj
                else:
                    z.accum_uj += now - z.last_uj
                z.last_uj = now

    def _stop_sampler(self) -> list[str]:
        if self._sampler is None:
            return []
        self._sampler.stop()
        errors, self._sampler = self._sampler.errors, None
        return errors

    def _end_unavailable(self) -> None:
        self._stop_sampler()

    def _end(self, duration_s: float) -> EnergyReading:
        polled = self._sampler is not None
        errors = self._stop_sampler()
        self.poll()
        rails = {z.key: z.accum_uj / 1e6 for z in self._zones}
        totals = tuple(z.key for z in self._zones if z.counts_to_total)
        warnings = []
        if not polled and duration_s > self.LONG_WINDOW_WARN_S:
            warnings.append(f"{duration_s:.0f} s window read without a background poll: a counter "
                            "that wrapped more than once would be undercounted; pass sample_interval_s")
        if errors:
            warnings.append(f"{len(errors)} background RAPL reads failed (first: {errors[0]})")
        notes = ["RAPL covers the CPU package only (not DRAM on most client parts, not the board, "
                 "GPU or power supply)"]
        excluded = [z.key for z in self._zones if not z.counts_to_total and "/" not in z.key]
        if excluded:
            notes.append(f"top-level zones not added to the total: {', '.join(excluded)}")
        return EnergyReading(sum(rails[k] for k in totals), self.method, None, rails, duration_s,
                             self.power_mode, totals, tuple(warnings), tuple(notes))
