"""Jetson module energy from the INA3221 power monitors over sysfs (hwmon and the older IIO
driver), sampled in a thread and integrated."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgemed.bench.energy.base import Clock, EnergyMeter, EnergyReading, Sampler, trapezoid_joules
from edgemed.bench.energy.jetson_rails import CARRIER_NOTE, resolve_total_rails
from edgemed.errors import BadInputError
from edgemed.host import read_int, read_text

__all__ = ["Ina3221Meter", "discover_ina3221_rails"]


@dataclass(frozen=True)
class _InaRail:
    name: str
    power_path: Path | None = None  # ina3221x: mW directly
    mv_path: Path | None = None  # ina3221 hwmon: mV and mA
    ma_path: Path | None = None

    def read_mw(self) -> float:
        if self.power_path is not None:
            return float(read_int(self.power_path))
        return read_int(self.mv_path) * read_int(self.ma_path) / 1000.0


def discover_ina3221_rails(root: str | os.PathLike = "/sys/bus/i2c/drivers") -> dict[str, _InaRail]:
    """Find Jetson power rails under both driver layouts.

    JetPack 5+ (upstream hwmon ``ina3221`` driver): ``ina3221/<bus-addr>/hwmon/hwmon*/in{1,2,3}_label``
    with ``in*_input`` (mV) and ``curr*_input`` (mA); unconnected channels are labelled ``NC``.
    Older L4T (NVIDIA's IIO ``ina3221x`` driver): ``ina3221x/<bus-addr>/iio:device*/rail_name_{0,1,2}``
    with ``in_power{N}_input`` (mW). Layouts as read by energymon's jetson/ina3221.c and
    jetson/ina3221x.c.
    """
    root = Path(root)
    rails: dict[str, _InaRail] = {}

    def add(rail: _InaRail, where: str) -> None:
        key = rail.name if rail.name not in rails else f"{rail.name}@{where}"
        rails[key] = _InaRail(key, rail.power_path, rail.mv_path, rail.ma_path)

    hw = root / "ina3221"
    if hw.is_dir():
        for dev in sorted(hw.glob("*/hwmon/hwmon*")):
            for ch in (1, 2, 3):
                label = dev / f"in{ch}_label"
                if not label.exists():
                    continue
                name = read_text(label)
                if not name or name.upper() == "NC":
                    continue
                add(_InaRail(name, mv_path=dev / f"in{ch}_input", ma_path=dev / f"curr{ch}_input"),
                    dev.parent.parent.name)
    iio = root / "ina3221x"
    if iio.is_dir():
        for dev in sorted(iio.glob("*/iio:device*")):
            for ch in (0, 1, 2):
                label = dev / f"rail_name_{ch}"
                if not label.exists():
                    continue
                name = read_text(label)
                if name:
                    add(_InaRail(name, power_path=dev / f"in_power{ch}_input"), dev.parent.name)
    return rails


class Ina3221Meter(EnergyMeter):
    """Jetson module energy: INA3221 rail power sampled in a thread and integrated (trapezoid).

    The sensor reports power, not energy, so the result depends on sampling; 50 ms is well under
    the time scale of a decode step burst, and the sampler thread costs little CPU. Only the
    rails in ``total_rails`` make ``joules`` (auto-detected per module when None, see
    :data:`JETSON_TOTAL_RAILS`); every rail's joules are in ``rails``.

    Pass ``sample_interval_s=None`` to drive sampling yourself with :meth:`sample` (tests, or a
    loop that already ticks).
    """

    method = "jetson-ina3221"

    def __init__(self, root: str | os.PathLike = "/sys/bus/i2c/drivers", *,
                 total_rails: Sequence[str] | None = None, sample_interval_s: float | None = 0.05,
                 clock: Clock = time.monotonic, power_mode: str | None = None):
        super().__init__(clock=clock, power_mode=power_mode)
        if sample_interval_s is not None and sample_interval_s <= 0:
            raise BadInputError("sample_interval_s", f"must be positive, got {sample_interval_s}",
                                "pass a sampling interval in seconds, e.g. 0.05")
        self.root = Path(root)
        self.total_rails = list(total_rails) if total_rails is not None else None
        self.sample_interval_s = sample_interval_s
        self._rails: dict[str, _InaRail] = {}
        self._totals: tuple[str, ...] = ()
        self._notes: list[str] = []
        self._times: list[float] = []
        self._power: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        self._sampler: Sampler | None = None
        self._failed_samples: list[str] = []

    def unavailable_reason(self) -> str | None:
        try:
            rails = discover_ina3221_rails(self.root)
        except PermissionError:
            return "Jetson INA3221 rails not readable (permission denied)"
        except OSError as e:
            return f"Jetson INA3221 sysfs unreadable ({e})"
        if not rails:
            return f"no Jetson INA3221 rails under {self.root} (ina3221 or ina3221x driver)"
        totals, _notes, reason = resolve_total_rails(rails, self.total_rails)
        return reason

    def _begin(self) -> None:
        self._rails = discover_ina3221_rails(self.root)
        totals, notes, _ = resolve_total_rails(self._rails, self.total_rails)
        self._totals, self._notes = totals or (), notes
        self._times, self._power, self._failed_samples = [], {k: [] for k in self._rails}, []
        self.sample()
        if self.sample_interval_s is not None:
            self._sampler = Sampler(self.sample, self.sample_interval_s, "edgemed-ina3221")
            self._sampler.start()

    def sample(self) -> None:
        """Read every rail once, stamped with the meter's clock; a failed read drops the sample."""
        t = self._clock()
        try:
            values = {k: r.read_mw() for k, r in self._rails.items()}
        except (OSError, ValueError) as e:
            self._failed_samples.append(str(e))
            return
        with self._lock:
            self._times.append(t)
            for k, v in values.items():
                self._power[k].append(v)

    def _stop_sampler(self) -> None:
        if self._sampler is not None:
            self._sampler.stop()
            self._failed_samples.extend(self._sampler.errors)
            self._sampler = None

    def _end_unavailable(self) -> None:
        self._stop_sampler()

    def _end(self, duration_s: float) -> EnergyReading:
        self._stop_sampler()
        self.sample()
        with self._lock:
            times = list(self._times)
            rails = {k: trapezoid_joules(times, v) for k, v in self._power.items()}
        warnings = []
        if len(times) < 3:
            warnings.append(f"only {len(times)} power samples in a {duration_s * 1000:.0f} ms window: "
                            "the integral is coarse; use a longer window or a shorter interval")
        if self._failed_samples:
            warnings.append(f"{len(self._failed_samples)} INA3221 samples failed and were skipped "
                            f"(first: {self._failed_samples[0]})")
        notes = [f"total = {' + '.join(self._totals)}", *self._notes, CARRIER_NOTE]
        return EnergyReading(sum(rails[r] for r in self._totals), self.method, None, rails,
                             duration_s, self.power_mode, self._totals, tuple(warnings), tuple(notes))
