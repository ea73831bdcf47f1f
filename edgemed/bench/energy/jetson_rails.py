"""Which Jetson power rails add up to the module's energy (shared by the INA3221 meter and the
tegrastats log)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from edgemed.errors import BadInputError

__all__ = ["MODULE_INPUT_RAILS", "AGX_ORIN_TOTAL_NOTE", "CARRIER_NOTE", "JETSON_TOTAL_RAILS",
           "resolve_total_rails"]

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
