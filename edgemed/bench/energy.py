"""Energy meters for benchmark windows: RAPL, NVML, Jetson INA3221 and tegrastats logs.

Every number this module returns comes from a hardware counter or a power sensor read during
the window. When no counter is readable the reading says so (``joules=None`` plus an
``unavailable_reason``); there is deliberately no estimate or constant-power fallback, because a
modelled figure (codecarbon's flat 42.5 W CPU, for instance) printed next to measured ones is
worse than no figure.

Meters share one small surface so the benchmark loop does not care which one it got::

    meter = auto_meter()
    with meter:
        run_requests()
    summary = energy_summary(meter.reading, n_requests=..., n_tokens=...)

or ``meter.start()`` ... ``reading = meter.stop()``. Clocks and samplers are injectable so tests
run on fake sysfs trees without sleeping.

Only numpy-free standard library code lives here; ``pynvml`` (from ``nvidia-ml-py``) is imported
lazily inside :class:`NvmlMeter` and is optional.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgemed.errors import BadInputError

Clock = Callable[[], float]

__all__ = [
    "EnergyReading",
    "EnergyMeter",
    "NullMeter",
    "RaplMeter",
    "NvmlMeter",
    "Ina3221Meter",
    "TegrastatsLog",
    "PowerMode",
    "parse_tegrastats_line",
    "resolve_total_rails",
    "read_power_mode",
    "auto_meter",
    "energy_summary",
]


@dataclass(frozen=True)
class EnergyReading:
    """What one measured window cost.

    ``joules`` is None whenever the host could not measure it; ``unavailable_reason`` then says
    why in words a user can act on. ``rails`` holds every rail or zone that was read (joules
    each), including ones that are *not* part of ``joules`` (sub-rails, psys), so the total can be
    audited. ``warnings`` flag a number that may be wrong (a window shorter than the counter's
    update period); ``notes`` give context needed to compare it (what the total covers).
    """

    joules: float | None
    method: str
    unavailable_reason: str | None = None
    rails: dict[str, float] = field(default_factory=dict)
    duration_s: float | None = None
    power_mode: str | None = None
    total_rails: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total_rails"] = list(self.total_rails)
        d["warnings"] = list(self.warnings)
        d["notes"] = list(self.notes)
        return d


# --------------------------------------------------------------------------------------------
# base class


class EnergyMeter:
    """Start/stop (or ``with``) protocol shared by all meters.

    A meter never raises because the hardware is missing or unreadable: a benchmark should still
    produce its latency numbers, with energy reported as unavailable. It does raise on misuse
    (``stop()`` without ``start()``) and on bad user arguments (:class:`BadInputError`).
    """

    method = "none"

    def __init__(self, *, clock: Clock = time.monotonic, power_mode: str | None = None):
        self._clock = clock
        self.power_mode = power_mode
        self.reading: EnergyReading | None = None
        self._t0: float | None = None
        self._unavailable: str | None = None

    # subclasses override these three
    def unavailable_reason(self) -> str | None:
        """Why this meter cannot measure on this host, or None if it can. Cheap; starts nothing."""
        return None

    def _begin(self) -> None:
        pass

    def _end(self, duration_s: float) -> EnergyReading:
        raise NotImplementedError

    def start(self) -> EnergyMeter:
        self.reading = None
        self._unavailable = self.unavailable_reason()
        self._t0 = self._clock()
        if self._unavailable is None:
            try:
                self._begin()
            except PermissionError as e:
                self._unavailable = self._permission_reason(e)
            except OSError as e:
                self._unavailable = f"{self.method}: reading the counter failed at start ({e})"
        return self

    def stop(self) -> EnergyReading:
        if self._t0 is None:
            raise RuntimeError(f"{type(self).__name__}.stop() called before start()")
        if self._unavailable is None:
            try:
                end_reading = self._end(self._clock() - self._t0)
            except PermissionError as e:
                end_reading = self._unavailable_reading(self._permission_reason(e))
            except OSError as e:
                end_reading = self._unavailable_reading(
                    f"{self.method}: reading the counter failed at stop ({e})")
        else:
            self._end_unavailable()
            end_reading = self._unavailable_reading(self._unavailable)
        self._t0 = None
        self.reading = end_reading
        return end_reading

    def __enter__(self) -> EnergyMeter:
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    # helpers
    def _end_unavailable(self) -> None:
        """Release resources (threads) when the window ends without a measurement."""

    def _permission_reason(self, e: PermissionError) -> str:
        return f"{self.method}: permission denied ({e})"

    def _unavailable_reading(self, reason: str, duration_s: float | None = None) -> EnergyReading:
        if duration_s is None and self._t0 is not None:
            duration_s = self._clock() - self._t0
        return EnergyReading(None, self.method, reason, duration_s=duration_s, power_mode=self.power_mode)


class NullMeter(EnergyMeter):
    """The meter for hosts with no counter: every reading is ``joules=None`` with the reason."""

    method = "none"

    def __init__(self, reason: str, **kw):
        super().__init__(**kw)
        self.reason = reason

    def unavailable_reason(self) -> str | None:
        return self.reason


# --------------------------------------------------------------------------------------------
# small sysfs helpers (module level so tests can monkeypatch one place)


def _read_text(path: Path) -> str:
    with open(path) as f:
        return f.read().strip()


def _read_int(path: Path) -> int:
    return int(_read_text(path))


class _Sampler:
    """A daemon thread calling ``fn`` every ``interval_s`` until stopped.

    ``Event.wait`` rather than ``time.sleep`` so ``stop()`` returns immediately instead of after
    up to one interval.
    """

    def __init__(self, fn: Callable[[], None], interval_s: float, name: str):
        self._fn, self._interval = fn, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.errors: list[str] = []

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._fn()
            except OSError as e:  # a transient sysfs hiccup must not kill the window
                self.errors.append(str(e))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)


def _trapezoid_joules(times_s: Sequence[float], power_mw: Sequence[float]) -> float:
    """Integrate milliwatt samples over seconds into joules (trapezoid rule)."""
    total = 0.0
    for i in range(1, len(times_s)):
        total += 0.5 * (power_mw[i] + power_mw[i - 1]) * (times_s[i] - times_s[i - 1])
    return total / 1000.0


# --------------------------------------------------------------------------------------------
# RAPL

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
        self._sampler: _Sampler | None = None

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
            name = _read_text(d / "name") if named else entry
            packages[m.group(1)] = name
            zones.append(_RaplZone(name, d / "energy_uj", _read_int(d / "max_energy_range_uj"),
                                   counts_to_total=name.startswith("package") or not named))
        for entry in entries:
            m = _RAPL_SUBZONE_DIR.match(entry)
            if not m or m.group(1) not in packages or not (self.root / entry / "energy_uj").exists():
                continue
            d = self.root / entry
            name = _read_text(d / "name") if (d / "name").exists() else entry
            zones.append(_RaplZone(f"{packages[m.group(1)]}/{name}", d / "energy_uj",
                                   _read_int(d / "max_energy_range_uj"), counts_to_total=False))
        return zones

    def unavailable_reason(self) -> str | None:
        try:
            zones = self._discover()
            if not any(z.counts_to_total for z in zones):
                return f"no RAPL package zones under {self.root}"
            for z in zones:
                if z.counts_to_total:
                    _read_int(z.path)
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
                z.last_uj, z.accum_uj = _read_int(z.path), 0
        if self.sample_interval_s is not None:
            self._sampler = _Sampler(self.poll, self.sample_interval_s, "edgemed-rapl-poll")
            self._sampler.start()

    def poll(self) -> None:
        """Fold the counters' progress since the last read into the running totals.

        Safe to call from a sampler thread while the main thread benchmarks; call it at least
        once per wrap period (range / power: about an hour at 70 W for a 2^38 µJ range).
        """
        with self._lock:
            for z in self._zones:
                now = _read_int(z.path)
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


# --------------------------------------------------------------------------------------------
# NVML

class NvmlMeter(EnergyMeter):
    """GPU board energy from ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since driver load).

    The counter exists on Volta and newer and updates every 20-100 ms, so a short window can read
    0 J or a value quantized to one update. Such a window gets a warning, and a window whose
    counter never moved reports ``joules=None`` rather than a false 0.
    """

    method = "nvml"
    MIN_RELIABLE_WINDOW_S = 0.1

    def __init__(self, index: int = 0, *, nvml=None, clock: Clock = time.monotonic,
                 power_mode: str | None = None):
        super().__init__(clock=clock, power_mode=power_mode)
        self.index = index
        self._nvml = nvml  # an injected module (tests) or None to import pynvml lazily
        self._handle = None
        self._e0_mj: int | None = None
        self._inited = False

    def _module(self):
        if self._nvml is None:
            import pynvml  # noqa: PLC0415  (optional: nvidia-ml-py)

            self._nvml = pynvml
        return self._nvml

    def _init(self):
        nvml = self._module()
        if not self._inited:
            nvml.nvmlInit()
            self._inited = True
        return nvml

    def _shutdown(self) -> None:
        if self._inited:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001  shutting down must not hide the measurement
                pass
            self._inited = False

    def unavailable_reason(self) -> str | None:
        try:
            nvml = self._module()
        except ImportError:
            return "NVML unavailable: the pynvml module is not installed (pip install nvidia-ml-py)"
        try:
            self._init()
            count = nvml.nvmlDeviceGetCount()
            if count == 0:
                return "NVML unavailable: no NVIDIA GPU found"
            if self.index >= count:
                return f"NVML unavailable: GPU index {self.index} requested but only {count} present"
            h = nvml.nvmlDeviceGetHandleByIndex(self.index)
            nvml.nvmlDeviceGetTotalEnergyConsumption(h)
        except Exception as e:  # noqa: BLE001  pynvml raises NVMLError subclasses for every cause
            self._shutdown()
            if type(e).__name__ == "NVMLError_NotSupported":
                return "NVML: this GPU has no total-energy counter (needs Volta or newer)"
            return f"NVML unavailable: no usable NVIDIA GPU or driver ({type(e).__name__}: {e})"
        finally:
            if self._t0 is None:  # a probe, not a window: do not hold NVML open
                self._shutdown()
        return None

    def _begin(self) -> None:
        nvml = self._init()
        self._handle = nvml.nvmlDeviceGetHandleByIndex(self.index)
        self._e0_mj = int(nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def _end(self, duration_s: float) -> EnergyReading:
        try:
            e1 = int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except Exception as e:  # noqa: BLE001  NVMLError (GPU lost, driver reset) ends the window
            return EnergyReading(None, self.method, f"NVML read failed at stop ({type(e).__name__}: "
                                 f"{e})", {}, duration_s, self.power_mode)
        finally:
            self._shutdown()
        delta_mj = e1 - (self._e0_mj or 0)
        short = duration_s < self.MIN_RELIABLE_WINDOW_S
        notes = ("NVML covers the GPU board only (not the CPU, host memory or power supply)",)
        if delta_mj <= 0:
            reason = (f"NVML energy counter did not advance over a {duration_s * 1000:.0f} ms window "
                      "(it updates every 20-100 ms); measure a longer window or more requests")
            return EnergyReading(None, self.method, reason, {}, duration_s, self.power_mode,
                                 notes=notes)
        warnings = ()
        if short:
            warnings = (f"window of {duration_s * 1000:.0f} ms is shorter than NVML's 20-100 ms "
                        "counter update: the joules are quantized to whole updates",)
        gpu = f"gpu{self.index}"
        return EnergyReading(delta_mj / 1000.0, self.method, None, {gpu: delta_mj / 1000.0},
                             duration_s, self.power_mode, (gpu,), warnings, notes)


# --------------------------------------------------------------------------------------------
# Jetson rails: which rails make the module total

MODULE_INPUT_RAILS = frozenset({"VDD_IN", "VIN", "POM_5V_IN"})
"""Rails measuring the module's whole input; every other rail on the same board is inside them."""

AGX_ORIN_TOTAL_NOTE = ("AGX Orin has no module-input rail: total = VDD_GPU_SOC + VDD_CPU_CV + "
                       "VIN_SYS_5V0, and VIN_SYS_5V0 is a 5 V I/O/system rail, not the module "
                       "total; not directly comparable to VDD_IN on Orin Nano/NX")
CARRIER_NOTE = ("carrier-board and power-supply losses are outside every INA3221 rail "
                "(wall power is higher)")

# (module, rails that identify it, rails that sum to its total, note). Data, not branches:
# a new module is one more row.
JETSON_TOTAL_RAILS: tuple[tuple[str, frozenset[str], tuple[str, ...], str | None], ...] = (
    ("Jetson Orin Nano / Orin NX", frozenset({"VDD_IN"}), ("VDD_IN",), None),
    ("Jetson AGX Thor", frozenset({"VIN"}), ("VIN",), None),
    ("Jetson Nano / TX2", frozenset({"POM_5V_IN"}), ("POM_5V_IN",), None),
    ("Jetson AGX Orin", frozenset({"VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"}),
     ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"), AGX_ORIN_TOTAL_NOTE),
)


def resolve_total_rails(available: Iterable[str], total_rails: Sequence[str] | None
                        ) -> tuple[tuple[str, ...] | None, list[str], str | None]:
    """Pick the rails whose sum is the module's energy: ``(rails, notes, unavailable_reason)``.

    With ``total_rails`` given, check it (unknown names and a module-input rail mixed with its
    own sub-rails are user errors: summing them double counts). With None, match the rail names
    against :data:`JETSON_TOTAL_RAILS`; an unknown board gives a reason instead of a guess.
    """
    names = set(available)
    if total_rails is not None:
        chosen = tuple(total_rails)
        if not chosen:
            raise BadInputError("total_rails", "is empty", "name at least one rail, e.g. ['VDD_IN']")
        missing = [r for r in chosen if r not in names]
        if missing:
            raise BadInputError("total_rails", f"rails {missing} are not on this device "
                                f"(found: {sorted(names)})", "use rail names from the list found")
        inputs = [r for r in chosen if r in MODULE_INPUT_RAILS]
        if inputs and len(chosen) > 1:
            raise BadInputError("total_rails", f"{inputs[0]} is the module input and already "
                                f"contains {[r for r in chosen if r != inputs[0]]}; adding "
                                "sub-rails to it double counts", f"pass ['{inputs[0]}'] alone")
        notes = [AGX_ORIN_TOTAL_NOTE] if "VIN_SYS_5V0" in chosen else []
        return chosen, notes, None
    for _module, marker, rails, note in JETSON_TOTAL_RAILS:
        if marker <= names:
            return rails, ([note] if note else []), None
    return None, [], (f"cannot tell which Jetson rails make the module total (found: "
                      f"{sorted(names)}); pass total_rails=[...]")


# --------------------------------------------------------------------------------------------
# INA3221 over sysfs


@dataclass(frozen=True)
class _InaRail:
    name: str
    power_path: Path | None = None  # ina3221x: mW directly
    mv_path: Path | None = None  # ina3221 hwmon: mV and mA
    ma_path: Path | None = None

    def read_mw(self) -> float:
        if self.power_path is not None:
            return float(_read_int(self.power_path))
        return _read_int(self.mv_path) * _read_int(self.ma_path) / 1000.0


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
                name = _read_text(label)
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
                name = _read_text(label)
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
        self._sampler: _Sampler | None = None
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
            self._sampler = _Sampler(self.sample, self.sample_interval_s, "edgemed-ina3221")
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
            rails = {k: _trapezoid_joules(times, v) for k, v in self._power.items()}
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


# --------------------------------------------------------------------------------------------
# tegrastats

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
            out[name] = _trapezoid_joules([t for t, _ in pts], [p for _, p in pts])
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


# --------------------------------------------------------------------------------------------
# power mode


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
        return _read_int(min_path) == _read_int(max_path)
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


# --------------------------------------------------------------------------------------------
# choosing a meter and summarizing


def auto_meter(*, clock: Clock = time.monotonic, rapl_root: str | os.PathLike = "/sys/class/powercap",
               ina_root: str | os.PathLike = "/sys/bus/i2c/drivers", nvml=None,
               power_mode: str | None | bool = True) -> EnergyMeter:
    """The best counter this host has: NVML GPU, then Jetson INA3221, then RAPL, else a NullMeter.

    The NullMeter's reason lists why each counter was ruled out. ``power_mode=True`` reads it
    with :func:`read_power_mode` (None off-Jetson); pass a string or None to set it.
    """
    if power_mode is True:
        pm = read_power_mode()
        power_mode = str(pm) if pm is not None else None
    candidates: list[EnergyMeter] = [
        NvmlMeter(nvml=nvml, clock=clock, power_mode=power_mode),
        Ina3221Meter(ina_root, clock=clock, power_mode=power_mode),
        RaplMeter(rapl_root, clock=clock, power_mode=power_mode),
    ]
    reasons = []
    for meter in candidates:
        reason = meter.unavailable_reason()
        if reason is None:
            return meter
        reasons.append(reason)
    return NullMeter("no energy counter on this host: " + "; ".join(reasons),
                     clock=clock, power_mode=power_mode)


def energy_summary(reading: EnergyReading, n_requests: int, n_tokens: int) -> dict:
    """The ``energy`` block of report.json: per request, per output token, tokens per joule.

    A value is None when it cannot be measured; ``energy_unavailable_reason`` then says why.
    """
    for what, n in (("n_requests", n_requests), ("n_tokens", n_tokens)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise BadInputError(what, f"must be a non-negative integer, got {n!r}",
                                "pass the count of requests / output tokens in the measured window")
    j = reading.joules
    reason = reading.unavailable_reason
    per_req = per_tok = tok_per_j = None
    if j is not None:
        if n_requests > 0:
            per_req = j / n_requests
        if n_tokens > 0:
            per_tok = j / n_tokens
            if j > 0:
                tok_per_j = n_tokens / j
        if n_requests == 0 or n_tokens == 0:
            reason = reason or "no requests or no output tokens in the measured window"
        elif j <= 0:
            reason = reason or "the counter did not advance during the window"
    return {
        "method": reading.method,
        "joules": j,
        "joules_per_request": per_req,
        "joules_per_token": per_tok,
        "tokens_per_joule": tok_per_j,
        "duration_s": reading.duration_s,
        "power_mode": reading.power_mode,
        "total_rails": list(reading.total_rails),
        "energy_unavailable_reason": reason,
        "warnings": list(reading.warnings),
        "notes": list(reading.notes),
    }
