"""GPU board energy from NVML's total-energy counter.

``pynvml`` (from ``nvidia-ml-py``) is optional and imported lazily inside :class:`NvmlMeter`.
"""
from __future__ import annotations

import time

from edgemed.bench.energy.base import Clock, EnergyMeter, EnergyReading

__all__ = ["NvmlMeter"]


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
