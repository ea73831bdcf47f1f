"""Shared pieces of the energy meters: the reading, the meter protocol, the null meter, the
sampler thread and the per-request summary.

Every number a meter returns comes from a hardware counter or a power sensor read during the
window. When no counter is readable the reading says so (``joules=None`` plus an
``unavailable_reason``); there is deliberately no estimate or constant-power fallback, because a
modelled figure (codecarbon's flat 42.5 W CPU, for instance) printed next to measured ones is
worse than no figure.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from edgemed.errors import BadInputError

Clock = Callable[[], float]

__all__ = ["Clock", "EnergyReading", "EnergyMeter", "NullMeter", "energy_summary"]


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
# helpers the sampling meters share


class Sampler:
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


def trapezoid_joules(times_s: Sequence[float], power_mw: Sequence[float]) -> float:
    """Integrate milliwatt samples over seconds into joules (trapezoid rule)."""
    total = 0.0
    for i in range(1, len(times_s)):
        total += 0.5 * (power_mw[i] + power_mw[i - 1]) * (times_s[i] - times_s[i - 1])
    return total / 1000.0


# --------------------------------------------------------------------------------------------
# the report.json energy block


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
