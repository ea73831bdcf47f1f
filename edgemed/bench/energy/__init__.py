"""Energy meters for benchmark windows: RAPL, NVML, Jetson INA3221 and tegrastats logs.

One module per meter (``rapl``, ``nvml``, ``ina3221``, ``tegrastats``); the reading, the meter
protocol and :class:`NullMeter` are in ``base``. Every number comes from a hardware counter or a
power sensor read during the window, never an estimate (see ``base``).

Meters share one small surface so the benchmark loop does not care which one it got::

    meter = auto_meter()
    with meter:
        run_requests()
    summary = energy_summary(meter.reading, n_requests=..., n_tokens=...)

or ``meter.start()`` ... ``reading = meter.stop()``. Clocks and samplers are injectable so tests
run on fake sysfs trees without sleeping.

Standard library only; ``pynvml`` (from ``nvidia-ml-py``) is imported lazily inside
:class:`NvmlMeter` and is optional.
"""
from __future__ import annotations

import os
import time

from edgemed.bench.energy.base import Clock, EnergyMeter, EnergyReading, NullMeter, energy_summary
from edgemed.bench.energy.ina3221 import Ina3221Meter, discover_ina3221_rails
from edgemed.bench.energy.jetson_rails import (
    AGX_ORIN_TOTAL_NOTE,
    CARRIER_NOTE,
    JETSON_TOTAL_RAILS,
    MODULE_INPUT_RAILS,
    resolve_total_rails,
)
from edgemed.bench.energy.nvml import NvmlMeter
from edgemed.bench.energy.rapl import RAPL_PERMISSION_REASON, RaplMeter
from edgemed.bench.energy.tegrastats import TegrastatsLog, TegrastatsMeter, parse_tegrastats_line
from edgemed.host import PowerMode, read_power_mode

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
    "TegrastatsMeter",
    "resolve_total_rails",
    "read_power_mode",
    "auto_meter",
    "energy_summary",
    "Clock",
    "discover_ina3221_rails",
    "RAPL_PERMISSION_REASON",
    "MODULE_INPUT_RAILS",
    "AGX_ORIN_TOTAL_NOTE",
    "CARRIER_NOTE",
    "JETSON_TOTAL_RAILS",
]


def auto_meter(*, clock: Clock = time.monotonic, rapl_root: str | os.PathLike = "/sys/class/powercap",
               ina_root: str | os.PathLike = "/sys/bus/i2c/drivers", nvml=None,
               power_mode: str | None | bool = True) -> EnergyMeter:
    """The best counter this host has: NVML GPU, then Jetson INA3221, then tegrastats (a Jetson
    whose rails are not readable from sysfs), then RAPL, else a NullMeter.

    The NullMeter's reason lists why each counter was ruled out. ``power_mode=True`` reads it
    with :func:`read_power_mode` (None off-Jetson); pass a string or None to set it.
    """
    if power_mode is True:
        pm = read_power_mode()
        power_mode = str(pm) if pm is not None else None
    candidates: list[EnergyMeter] = [
        NvmlMeter(nvml=nvml, clock=clock, power_mode=power_mode),
        Ina3221Meter(ina_root, clock=clock, power_mode=power_mode),
        TegrastatsMeter(clock=clock, power_mode=power_mode),
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
