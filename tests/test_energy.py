"""Energy meters against fake sysfs trees, fake NVML and tegrastats fixtures (no hardware, no sleeps
beyond two short sampler-thread checks)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from edgemed import host
from edgemed.bench import energy
from edgemed.bench.energy import (
    AGX_ORIN_TOTAL_NOTE,
    RAPL_PERMISSION_REASON,
    EnergyReading,
    Ina3221Meter,
    NullMeter,
    NvmlMeter,
    RaplMeter,
    TegrastatsLog,
    TegrastatsMeter,
    auto_meter,
    energy_summary,
    parse_tegrastats_line,
    read_power_mode,
    resolve_total_rails,
)
from edgemed.errors import BadInputError

FIXTURES = Path(__file__).parent / "fixtures" / "tegrastats"


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def write(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{value}\n")


# ------------------------------------------------------------------------------------ RAPL


def make_rapl(root: Path, zones: dict[str, tuple[str, int, int]]) -> Path:
    """zones: dir name -> (name, energy_uj, max_energy_range_uj)."""
    for d, (name, uj, rng) in zones.items():
        write(root / d / "name", name)
        write(root / d / "energy_uj", uj)
        write(root / d / "max_energy_range_uj", rng)
    (root / "intel-rapl").mkdir(parents=True, exist_ok=True)  # the control-type dir, no counter
    return root


RANGE = 262_143_328_850


@pytest.fixture
def rapl(tmp_path):
    return make_rapl(tmp_path / "powercap", {
        "intel-rapl:0": ("package-0", 1_000_000, RANGE),
        "intel-rapl:0:0": ("core", 500_000, RANGE),
        "intel-rapl:1": ("package-1", 2_000_000, RANGE),
        "intel-rapl:1:0": ("dram", 10, RANGE),
        "intel-rapl-mmio:0": ("package-0", 1_000_000, RANGE),  # same counter, other interface
    })


def test_rapl_sums_packages_not_subzones_or_mmio(rapl):
    clock = FakeClock()
    meter = RaplMeter(rapl, clock=clock)
    assert meter.unavailable_reason() is None
    with meter:
        clock.t += 2.0
        write(rapl / "intel-rapl:0" / "energy_uj", 4_000_000)  # +3 J
        write(rapl / "intel-rapl:0:0" / "energy_uj", 2_500_000)  # +2 J, inside package-0
        write(rapl / "intel-rapl:1" / "energy_uj", 3_000_000)  # +1 J
        write(rapl / "intel-rapl-mmio:0" / "energy_uj", 4_000_000)
    r = meter.reading
    assert r.method == "rapl" and r.unavailable_reason is None
    assert r.joules == pytest.approx(4.0)
    assert r.total_rails == ("package-0", "package-1")
    assert r.rails["package-0/core"] == pytest.approx(2.0)
    assert "package-0/core" not in r.total_rails
    assert r.duration_s == pytest.approx(2.0)
    assert any("CPU package" in n for n in r.notes)


def test_rapl_psys_zone_is_listed_but_not_added(tmp_path):
    root = make_rapl(tmp_path / "pc", {
        "intel-rapl:0": ("package-0", 0, RANGE),
        "intel-rapl:1": ("psys", 0, RANGE),  # platform zone: contains the package
    })
    meter = RaplMeter(root, clock=FakeClock()).start()
    write(root / "intel-rapl:0" / "energy_uj", 1_000_000)
    write(root / "intel-rapl:1" / "energy_uj", 5_000_000)
    r = meter.stop()
    assert r.joules == pytest.approx(1.0)
    assert r.rails["psys"] == pytest.approx(5.0)
    assert any("psys" in n for n in r.notes)


def test_rapl_amd_style_zone_names(tmp_path):
    root = make_rapl(tmp_path / "pc", {"intel-rapl:0": ("package-0", 10, 2**32),
                                       "intel-rapl:0:0": ("core", 10, 2**32)})
    meter = RaplMeter(root, clock=FakeClock()).start()
    write(root / "intel-rapl:0" / "energy_uj", 10 + 7_000_000)
    assert meter.stop().joules == pytest.approx(7.0)


def test_rapl_wraparound_once(tmp_path):
    root = make_rapl(tmp_path / "pc", {"intel-rapl:0": ("package-0", 900, 1000)})
    meter = RaplMeter(root, clock=FakeClock()).start()
    write(root / "intel-rapl:0" / "energy_uj", 100)  # wrapped: 100 + 1000 - 900 = 200 uJ
    assert meter.stop().joules == pytest.approx(200e-6)


def test_rapl_poll_catches_repeated_wraps(tmp_path):
    root = make_rapl(tmp_path / "pc", {"intel-rapl:0": ("package-0", 900, 1000)})
    meter = RaplMeter(root, clock=FakeClock()).start()
    write(root / "intel-rapl:0" / "energy_uj", 400)  # first wrap: +500
    meter.poll()
    write(root / "intel-rapl:0" / "energy_uj", 100)  # second wrap: +700
    assert meter.stop().joules == pytest.approx(1200e-6)


def test_rapl_background_sampler_thread(tmp_path):
    root = make_rapl(tmp_path / "pc", {"intel-rapl:0": ("package-0", 900, 1000)})
    meter = RaplMeter(root, sample_interval_s=0.005).start()
    write(root / "intel-rapl:0" / "energy_uj", 400)
    deadline = time.monotonic() + 2.0
    while meter._zones[0].last_uj != 400 and time.monotonic() < deadline:
        time.sleep(0.002)
    write(root / "intel-rapl:0" / "energy_uj", 100)
    r = meter.stop()
    assert r.joules == pytest.approx(1200e-6)
    assert meter._sampler is None


def test_rapl_long_window_without_poll_warns(tmp_path):
    root = make_rapl(tmp_path / "pc", {"intel-rapl:0": ("package-0", 0, RANGE)})
    clock = FakeClock()
    meter = RaplMeter(root, clock=clock).start()
    clock.t += 600
    r = meter.stop()
    assert any("sample_interval_s" in w for w in r.warnings)


def test_rapl_permission_denied(rapl, monkeypatch):
    # tests may run as root, where chmod does not deny reads: deny at the read instead
    real = energy.rapl.read_int

    def deny(path):
        if Path(path).name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(energy.rapl, "read_int", deny)
    meter = RaplMeter(rapl, clock=FakeClock())
    assert meter.unavailable_reason() == RAPL_PERMISSION_REASON
    with meter:
        pass
    assert meter.reading.joules is None
    assert meter.reading.unavailable_reason == RAPL_PERMISSION_REASON


def test_rapl_missing_root(tmp_path):
    meter = RaplMeter(tmp_path / "nope", clock=FakeClock())
    assert "no RAPL package zones" in meter.unavailable_reason()
    r = meter.start().stop()
    assert r.joules is None and "no RAPL" in r.unavailable_reason


def test_stop_before_start_is_a_bug():
    with pytest.raises(RuntimeError):
        RaplMeter("/nonexistent").stop()


# ------------------------------------------------------------------------------------ INA3221


def make_hwmon(root: Path, bus: str, hwmon: str, channels: dict[int, tuple[str, int, int]]) -> Path:
    """JetPack 5+ layout; channels: 1..3 -> (label, mV, mA)."""
    d = root / "ina3221" / bus / "hwmon" / hwmon
    for ch, (label, mv, ma) in channels.items():
        write(d / f"in{ch}_label", label)
        write(d / f"in{ch}_input", mv)
        write(d / f"curr{ch}_input", ma)
    write(d / "update_interval", 1)
    return d


def set_power(d: Path, ch: int, mv: int, ma: int) -> None:
    write(d / f"in{ch}_input", mv)
    write(d / f"curr{ch}_input", ma)


def test_ina3221_orin_nano_total_is_vdd_in_only(tmp_path):
    root = tmp_path / "drivers"
    d = make_hwmon(root, "1-0040", "hwmon3", {
        1: ("VDD_IN", 5000, 1000),  # 5 W
        2: ("VDD_CPU_GPU_CV", 5000, 400),  # 2 W, inside VDD_IN
        3: ("VDD_SOC", 5000, 300),  # 1.5 W, inside VDD_IN
    })
    clock = FakeClock(0.0)
    meter = Ina3221Meter(root, sample_interval_s=None, clock=clock)
    assert meter.unavailable_reason() is None
    meter.start()  # sample at t=0: 5 W
    clock.t = 1.0
    set_power(d, 1, 5000, 2000)  # 10 W
    meter.sample()
    clock.t = 2.0
    r = meter.stop()  # sample at t=2: still 10 W
    # trapezoid: (5+10)/2*1 + (10+10)/2*1 = 17.5 J
    assert r.joules == pytest.approx(17.5)
    assert r.total_rails == ("VDD_IN",)
    assert r.rails["VDD_CPU_GPU_CV"] == pytest.approx(4.0)
    assert r.rails["VDD_SOC"] == pytest.approx(3.0)
    assert r.method == "jetson-ina3221"
    assert any("carrier" in n for n in r.notes)


def test_ina3221_agx_orin_sums_three_rails_and_notes_5v_rail(tmp_path):
    root = tmp_path / "drivers"
    make_hwmon(root, "1-0040", "hwmon2", {
        1: ("VDD_GPU_SOC", 1000, 5000),  # 5 W
        2: ("VDD_CPU_CV", 1000, 3000),  # 3 W
        3: ("VIN_SYS_5V0", 5000, 1000),  # 5 W
    })
    make_hwmon(root, "1-0041", "hwmon3", {
        1: ("NC", 0, 0),
        2: ("VDDQ_VDD2_1V8AO", 1000, 500),  # 0.5 W, not part of the total
        3: ("NC", 0, 0),
    })
    clock = FakeClock(0.0)
    meter = Ina3221Meter(root, sample_interval_s=None, clock=clock).start()
    clock.t = 2.0
    r = meter.stop()
    assert r.joules == pytest.approx(26.0)
    assert set(r.total_rails) == {"VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"}
    assert r.rails["VDDQ_VDD2_1V8AO"] == pytest.approx(1.0)
    assert "NC" not in r.rails
    assert AGX_ORIN_TOTAL_NOTE in r.notes


def test_ina3221x_legacy_iio_layout(tmp_path):
    d = tmp_path / "drivers" / "ina3221x" / "6-0040" / "iio:device0"
    for ch, (name, mw) in enumerate([("VDD_IN", 4000), ("VDD_SYS_GPU", 1000), ("VDD_SYS_CPU", 800)]):
        write(d / f"rail_name_{ch}", name)
        write(d / f"in_power{ch}_input", mw)
        write(d / f"in_voltage{ch}_input", 5000)
        write(d / f"in_current{ch}_input", mw // 5)
    clock = FakeClock(0.0)
    meter = Ina3221Meter(tmp_path / "drivers", sample_interval_s=None, clock=clock).start()
    clock.t = 0.5
    write(d / "in_power0_input", 6000)
    r = meter.stop()
    assert r.joules == pytest.approx(2.5)  # (4+6)/2 W * 0.5 s
    assert r.total_rails == ("VDD_IN",)
    assert r.rails["VDD_SYS_GPU"] == pytest.approx(0.5)


def test_ina3221_sampler_thread_integrates_constant_power(tmp_path):
    root = tmp_path / "drivers"
    make_hwmon(root, "1-0040", "hwmon0", {1: ("VDD_IN", 5000, 200), 2: ("VDD_SOC", 1000, 100)})
    meter = Ina3221Meter(root, sample_interval_s=0.005)
    with meter:
        time.sleep(0.05)
    r = meter.reading
    assert len(meter._times) >= 3
    assert r.joules == pytest.approx(1.0 * (meter._times[-1] - meter._times[0]))
    assert r.joules == pytest.approx(r.duration_s * 1.0, rel=0.2)


def test_ina3221_short_window_warns(tmp_path):
    root = tmp_path / "drivers"
    make_hwmon(root, "1-0040", "hwmon0", {1: ("VDD_IN", 5000, 200)})
    clock = FakeClock(0.0)
    meter = Ina3221Meter(root, sample_interval_s=None, clock=clock).start()
    clock.t = 0.01
    r = meter.stop()
    assert r.joules == pytest.approx(0.01)
    assert any("power samples" in w for w in r.warnings)


def test_ina3221_unknown_board_asks_for_total_rails(tmp_path):
    root = tmp_path / "drivers"
    make_hwmon(root, "1-0040", "hwmon0", {1: ("GPU", 1000, 1000), 2: ("CPU", 1000, 1000)})
    meter = Ina3221Meter(root, sample_interval_s=None, clock=FakeClock())
    assert "total_rails" in meter.unavailable_reason()
    assert meter.start().stop().joules is None
    explicit = Ina3221Meter(root, total_rails=["GPU", "CPU"], sample_interval_s=None, clock=FakeClock())
    assert explicit.unavailable_reason() is None


def test_total_rails_refuses_sub_rails_and_unknown_names():
    names = ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]
    with pytest.raises(BadInputError, match="double counts"):
        resolve_total_rails(names, ["VDD_IN", "VDD_SOC"])
    with pytest.raises(BadInputError, match="not on this device"):
        resolve_total_rails(names, ["VIN"])
    assert resolve_total_rails(names, None)[0] == ("VDD_IN",)
    assert resolve_total_rails(["VDD_GPU", "VDD_CPU_SOC_MSS", "VIN"], None)[0] == ("VIN",)  # Thor


def test_no_ina3221_reason(tmp_path):
    assert "no Jetson INA3221" in Ina3221Meter(tmp_path, clock=FakeClock()).unavailable_reason()


# ------------------------------------------------------------------------------------ tegrastats


def test_parse_real_agx_orin_jp7_line():
    line = (FIXTURES / "agx_orin_jp7.log").read_text().strip()
    d = parse_tegrastats_line(line)
    assert d["timestamp"] == "07-25-2026 09:08:28"
    assert (d["ram_used_mb"], d["ram_total_mb"]) == (20642, 62817)
    assert len(d["cpu"]) == 12 and d["cpu"][0] == {"load_pct": 23, "freq_mhz": 2201}
    assert d["emc_freq"] == {"load_pct": 3, "freq_mhz": 3199}
    assert d["gr3d_freq"] == {"load_pct": 12, "freq_mhz": [1300, 1300]}
    assert d["rails"] == {
        "VDD_GPU_SOC": {"cur_mw": 5139, "avg_mw": 5139, "max_mw": 5139},
        "VDD_CPU_CV": {"cur_mw": 3268, "avg_mw": 3268, "max_mw": 3268},
        "VIN_SYS_5V0": {"cur_mw": 5500, "avg_mw": 5500, "max_mw": 5500},
    }
    assert d["temps_c"]["gpu"] == pytest.approx(47.625)


def test_parse_orin_nano_jp6_line():
    d = parse_tegrastats_line((FIXTURES / "orin_nano_jp6.log").read_text().splitlines()[0])
    assert d["rails"]["VDD_IN"] == {"cur_mw": 4000, "avg_mw": 4000}
    assert set(d["rails"]) == {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}
    assert d["cpu"][4] is None  # "off" core
    assert d["gr3d_freq"] == {"load_pct": 0, "freq_mhz": [624]}
    assert d["swap_total_mb"] == 3810


def test_parse_other_forms():
    thor = parse_tegrastats_line("RAM 4722/7844MB (lfb 1x512kB) EMC_FREQ 2%@1866 GR3D_FREQ @[1000,1000,1000]")
    assert thor["gr3d_freq"] == {"load_pct": None, "freq_mhz": [1000, 1000, 1000]}
    jp4 = parse_tegrastats_line("RAM 1180/3965MB GR3D_FREQ 0%@76 POM_5V_IN 4520/4680 POM_5V_GPU 0/0")
    assert jp4["rails"]["POM_5V_IN"] == {"cur_mw": 4520, "avg_mw": 4680}
    assert "RAM" not in jp4["rails"]
    assert parse_tegrastats_line("")["rails"] == {}


def test_tegrastats_log_orin_nano_integrates_vdd_in():
    log = TegrastatsLog(FIXTURES / "orin_nano_jp6.log", interval_ms=100)
    r = log.reading(power_mode="nvpmodel 15W (id 0), jetson_clocks off")
    # VDD_IN 4, 5, 6, 5 W at 100 ms: (4.5 + 5.5 + 5.5) * 0.1 = 1.55 J
    assert r.joules == pytest.approx(1.55)
    assert r.total_rails == ("VDD_IN",)
    assert r.duration_s == pytest.approx(0.3)
    assert r.rails["VDD_SOC"] == pytest.approx((1.55 + 1.65 + 1.65) * 0.1)
    assert r.power_mode.startswith("nvpmodel 15W")


def test_tegrastats_log_agx_orin_real_line():
    line = (FIXTURES / "agx_orin_jp7.log").read_text().strip()
    r = TegrastatsLog([line] * 5, interval_ms=100).reading()
    assert r.joules == pytest.approx((5.139 + 3.268 + 5.5) * 0.4)
    assert AGX_ORIN_TOTAL_NOTE in r.notes


def _fake_tegrastats(folder: Path) -> Path:
    """A `tegrastats` stand-in: writes the Orin Nano fixture's lines to --logfile until killed (a
    real subprocess, as the meter runs the real one)."""
    exe = folder / "tegrastats"
    exe.write_text("#!/bin/sh\n"
                   "while [ $# -gt 0 ]; do [ \"$1\" = --logfile ] && log=$2; shift; done\n"
                   f"cat {FIXTURES / 'orin_nano_jp6.log'} > \"$log\"\n"
                   "exec sleep 60\n")
    exe.chmod(0o755)
    return exe


def test_tegrastats_meter_runs_tegrastats_for_the_window(tmp_path, monkeypatch):
    meter = TegrastatsMeter(executable=str(tmp_path / "tegrastats"), power_mode="nvpmodel 15W")
    assert "not a Jetson" in meter.unavailable_reason()
    _fake_tegrastats(tmp_path)
    assert meter.unavailable_reason() is None
    with meter:
        for _ in range(100):  # until the stand-in has written its log (no timing in the result)
            if meter._log.stat().st_size:
                break
            time.sleep(0.05)
    r = meter.reading
    assert r.joules == pytest.approx(1.55) and r.total_rails == ("VDD_IN",) and r.method == "tegrastats"
    assert meter._proc is None and not meter._log.exists()  # tegrastats stopped, log removed


def test_tegrastats_log_bad_inputs(tmp_path):
    with pytest.raises(BadInputError):
        TegrastatsLog(FIXTURES / "orin_nano_jp6.log", interval_ms=0)
    with pytest.raises(BadInputError):
        TegrastatsLog(tmp_path / "missing.log", interval_ms=100)
    assert TegrastatsLog(["RAM 1/2MB"], interval_ms=100).reading().joules is None


# ------------------------------------------------------------------------------------ NVML


class FakeNvml:
    class NVMLError_NotSupported(Exception):  # noqa: N801  (pynvml's spelling)
        pass

    def __init__(self, energy_mj: list[int], count: int = 1, supported: bool = True):
        self.energy = list(energy_mj)
        self.count, self.supported = count, supported
        self.inits = self.shutdowns = 0

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("gpu", i)

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if not self.supported:
            raise self.NVMLError_NotSupported("Not Supported")
        return self.energy.pop(0) if len(self.energy) > 1 else self.energy[0]


def test_nvml_missing_module_gives_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    meter = NvmlMeter(clock=FakeClock())
    reason = meter.unavailable_reason()
    assert "pynvml" in reason and "nvidia-ml-py" in reason
    r = meter.start().stop()
    assert r.joules is None and r.unavailable_reason == reason


def test_nvml_no_gpu_and_unsupported():
    assert "no NVIDIA GPU" in NvmlMeter(nvml=FakeNvml([0], count=0)).unavailable_reason()
    assert "Volta" in NvmlMeter(nvml=FakeNvml([0], supported=False)).unavailable_reason()


def test_nvml_measures_window():
    fake = FakeNvml([1000, 1000, 26_000])  # probe, start, stop (mJ)
    clock = FakeClock()
    meter = NvmlMeter(nvml=fake, clock=clock)
    with meter:
        clock.t += 2.0
    r = meter.reading
    assert r.joules == pytest.approx(25.0)
    assert r.rails == {"gpu0": pytest.approx(25.0)}
    assert r.warnings == ()
    assert fake.inits == fake.shutdowns  # NVML is not left open


def test_nvml_short_window_reads_zero_is_not_pretended():
    clock = FakeClock()
    meter = NvmlMeter(nvml=FakeNvml([500, 500, 500]), clock=clock).start()
    clock.t += 0.03
    r = meter.stop()
    assert r.joules is None
    assert "did not advance" in r.unavailable_reason


def test_nvml_short_window_nonzero_warns():
    clock = FakeClock()
    meter = NvmlMeter(nvml=FakeNvml([500, 500, 800]), clock=clock).start()
    clock.t += 0.05
    r = meter.stop()
    assert r.joules == pytest.approx(0.3)
    assert r.warnings and "20-100 ms" in r.warnings[0]


# ------------------------------------------------------------------------------------ auto, power mode, summary


def test_auto_meter_null_with_reasons(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    meter = auto_meter(rapl_root=tmp_path / "pc", ina_root=tmp_path / "i2c", power_mode=None)
    assert isinstance(meter, NullMeter)
    reason = meter.unavailable_reason()
    assert reason.startswith("no energy counter on this host: ")
    assert "NVML" in reason and "INA3221" in reason and "RAPL" in reason
    with meter:
        pass
    assert meter.reading.joules is None and meter.reading.unavailable_reason == reason


def test_auto_meter_order(tmp_path, monkeypatch, rapl):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert isinstance(auto_meter(rapl_root=rapl, ina_root=tmp_path / "i2c", power_mode=None), RaplMeter)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    _fake_tegrastats(tmp_path)  # a Jetson whose INA3221 sysfs is not readable here: tegrastats before RAPL
    assert isinstance(auto_meter(rapl_root=rapl, ina_root=tmp_path / "i2c", power_mode=None), TegrastatsMeter)
    make_hwmon(tmp_path / "i2c", "1-0040", "hwmon0", {1: ("VDD_IN", 5000, 200)})
    assert isinstance(auto_meter(rapl_root=rapl, ina_root=tmp_path / "i2c", power_mode=None), Ina3221Meter)
    got = auto_meter(rapl_root=rapl, ina_root=tmp_path / "i2c", nvml=FakeNvml([0, 1]), power_mode="x")
    assert isinstance(got, NvmlMeter) and got.power_mode == "x"


def test_read_power_mode(tmp_path, monkeypatch):
    sysfs = tmp_path / "sys"
    for cpu in ("cpu0", "cpu1"):
        write(sysfs / "devices/system/cpu" / cpu / "cpufreq/scaling_min_freq", 1728000)
        write(sysfs / "devices/system/cpu" / cpu / "cpufreq/scaling_max_freq", 1728000)
    gpu = sysfs / "class/devfreq/17000000.ga10b"
    write(gpu / "min_freq", 1020000000)
    write(gpu / "max_freq", 1020000000)
    pm = read_power_mode(runner=lambda cmd: "NV Power Mode: MAXN_SUPER\n2\n", sys_root=sysfs)
    assert (pm.nvpmodel, pm.nvpmodel_id, pm.jetson_clocks) == ("MAXN_SUPER", 2, True)
    assert str(pm) == "nvpmodel MAXN_SUPER (id 2), jetson_clocks on"
    write(gpu / "min_freq", 306000000)
    assert read_power_mode(runner=lambda cmd: "NV Power Mode: 15W\n0\n", sys_root=sysfs).jetson_clocks is False
    nosys = read_power_mode(runner=lambda cmd: "NV Power Mode: 15W\n0\n", sys_root=tmp_path / "none")
    assert nosys.jetson_clocks is None

    def broken(cmd):
        raise OSError("nvpmodel crashed")

    assert read_power_mode(runner=broken) is None
    monkeypatch.setattr(host.shutil, "which", lambda name: None)
    assert read_power_mode() is None  # off-Jetson


def test_energy_summary():
    r = EnergyReading(12.0, "rapl", duration_s=3.0, power_mode=None)
    s = energy_summary(r, n_requests=4, n_tokens=240)
    assert s["joules_per_request"] == pytest.approx(3.0)
    assert s["joules_per_token"] == pytest.approx(0.05)
    assert s["tokens_per_joule"] == pytest.approx(20.0)
    assert s["energy_unavailable_reason"] is None and s["method"] == "rapl"

    none = energy_summary(EnergyReading(None, "none", "no energy counter on this host: x"), 4, 240)
    assert none["joules_per_request"] is None and none["tokens_per_joule"] is None
    assert none["energy_unavailable_reason"].startswith("no energy counter")

    zero_tokens = energy_summary(r, n_requests=4, n_tokens=0)
    assert zero_tokens["joules_per_token"] is None and zero_tokens["energy_unavailable_reason"]
    with pytest.raises(BadInputError):
        energy_summary(r, n_requests=-1, n_tokens=1)


def test_module_does_not_import_torch():
    for path in [*Path(energy.__file__).parent.glob("*.py"), Path(host.__file__)]:
        src = path.read_text()
        assert "import torch" not in src and "\nimport pynvml" not in src, path
