"""The shipped hardware profiles: they load, say where their numbers come from, and refuse typos."""
from __future__ import annotations

import pytest

from edgemed._resources import shipped_dir, shipped_names
from edgemed.errors import BadInputError
from edgemed.recipe import PRECISION_BITS
from edgemed.target import load_target

SHIPPED = {
    "cpu-x86-avx2": 51.2,
    "cpu-arm64": None,  # a published board's figure; any positive value
    "jetson-orin-nano-8gb": 68,
    "jetson-orin-nx-16gb": 102.4,
    "jetson-agx-orin-64gb": 204.8,
    "jetson-thor": 273,
    "rtx-4060-8gb": 272,
    "rtx-4090-24gb": 1008,
}
ORIN = ("jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb")
GGUF_TYPES = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "iq4_xs", "f16", "f32")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_target_loads_with_sources(name):
    t = load_target(name)
    assert t.name == name
    assert SHIPPED[name] is None or t.memory_bandwidth_gb_s == pytest.approx(SHIPPED[name])
    assert 0 < t.usable_memory_gb <= t.memory_gb
    assert t.sources, f"{name} must say where its numbers come from"
    assert set(t.precisions) <= set(PRECISION_BITS), "every precision must be one a policy can name"
    assert "fp32" in t.precisions
    if "gguf" in t.formats:
        assert "llama.cpp" in t.runtimes
        assert set(GGUF_TYPES) <= set(t.precisions)
    if t.accelerator is not None:
        assert t.accelerator.compute_capability and t.accelerator.compute_capability.startswith("sm_")
        assert "tensorrt" in t.formats


def test_all_eight_ship():
    assert set(SHIPPED) <= set(shipped_names("targets"))


@pytest.mark.parametrize("name", ORIN)
def test_orin_has_no_fp8_or_fp4(name):
    t = load_target(name)
    assert t.accelerator.compute_capability == "sm_87"
    assert not {"fp8", "fp4"} & set(t.precisions)
    assert {"fp16", "int8", "int4"} <= set(t.precisions)


def test_orin_nano_facts():
    t = load_target("jetson-orin-nano-8gb")
    assert (t.memory_gb, t.usable_memory_gb) == (8, 5.2)
    assert t.power.method == "ina3221" and t.power.total_rails == ["VDD_IN"]
    assert "102" in t.description  # the Super mode's bandwidth is named


def test_agx_orin_rails_note_the_5v_rail():
    t = load_target("jetson-agx-orin-64gb")
    assert t.power.total_rails == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"]
    assert "VIN_SYS_5V0" in t.power.notes and "5 V" in t.power.notes


def test_thor_and_ada_low_precisions():
    thor = load_target("jetson-thor")
    assert {"fp8", "fp4"} <= set(thor.precisions) and thor.power.total_rails == ["VIN"]
    assert thor.memory_gb == 128
    for name in ("rtx-4060-8gb", "rtx-4090-24gb"):
        t = load_target(name)
        assert t.arch == "x86_64" and t.power.method == "nvml"
        assert {"fp16", "int8", "fp8"} <= set(t.precisions) and "fp4" not in t.precisions


def test_cpu_targets_have_no_accelerator():
    for name in ("cpu-x86-avx2", "cpu-arm64"):
        t = load_target(name)
        assert t.accelerator is None and set(t.formats) == {"onnx", "gguf"}
    assert load_target("cpu-x86-avx2").power.method == "rapl"


def test_unknown_key_is_rejected_naming_key_and_file(tmp_path):
    text = (shipped_dir("targets") / "cpu-x86-avx2.yaml").read_text()
    bad = tmp_path / "my-laptop.yaml"
    bad.write_text(text + "\nbandwith_gb_s: 60\n")
    with pytest.raises(BadInputError) as e:
        load_target(bad)
    msg = str(e.value)
    assert "bandwith_gb_s" in msg and str(bad) in msg


def test_unknown_target_name_lists_the_shipped_ones():
    with pytest.raises(BadInputError) as e:
        load_target("jetson-nano-2gb")
    msg = str(e.value)
    assert "jetson-nano-2gb" in msg
    for name in SHIPPED:
        assert name in msg
