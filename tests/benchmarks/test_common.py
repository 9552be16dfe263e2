"""The benchmarks' shared pieces: timers against a fake clock, the photos they read, the machine they name."""

import os
from pathlib import Path

import numpy as np
import pytest

from simsearch.benchmarks import common

from .clocks import TickClock

X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni amx_tile amx_int8 amx_bf16

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni amx_tile amx_int8 amx_bf16
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimddp
CPU implementer\t: 0x41
"""


def test_throughput_counts_calls_over_the_clocked_time():
    calls = []
    # Readings 0.25 apart from t0: calls at 0.25, 0.5, 0.75 elapsed; at 1.0 the minimum is reached: 3 timed calls
    # of 8 items in 1.0 s, after one untimed warm-up.
    rate = common.throughput(lambda: calls.append(1), 8, 1.0, TickClock(0.25))
    assert rate == 24.0 and len(calls) == 4


def test_throughput_times_at_least_two_calls():
    calls = []
    rate = common.throughput(lambda: calls.append(1), 5, 0.0, TickClock(1.0))
    assert len(calls) == 1 + 2 and rate == pytest.approx(2 * 5 / 3.0)  # 2 calls, 3 ticks (the last check included)


def test_timed_returns_the_value_and_one_tick():
    assert common.timed(lambda: "done", TickClock(0.125)) == ("done", 0.125)


def test_cpu_model_and_speed_flags_from_cpuinfo():
    assert common.cpu_model_and_flags(X86) == (
        "Intel(R) Xeon(R) Platinum 8480+", ["avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16"])
    assert common.cpu_model_and_flags(ARM) == ("", ["asimddp"])
    m = common.machine(X86)
    assert m["cpu"] == "Intel(R) Xeon(R) Platinum 8480+" and m["cpu_flags"][:3] == ["avx2", "avx512f", "avx512_vnni"]


def test_machine_names_this_cpu():
    m = common.machine()
    text = Path("/proc/cpuinfo").read_text()
    model = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
    flags = set(next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")))
    assert m["cpu"] == model
    assert m["cpu_flags"] == [f for f in common.SPEED_FLAGS if f in flags]
    assert m["cores"] == len(os.sched_getaffinity(0))
    assert m["ram_gib"] > 0 and m["versions"]["numpy"] == np.__version__


def test_photos_are_the_jpegs_in_name_order(tmp_path):
    for name in ("c.JPEG", "a.JPEG", "b.png", "b.JPEG"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in common.photos(tmp_path)] == ["a.JPEG", "b.JPEG", "c.JPEG"]
    assert [p.name for p in common.photos(tmp_path, 2)] == ["a.JPEG", "b.JPEG"]


def test_config_and_numpy_values_as_json():
    from simsearch.benchmarks.load import LoadConfig

    doc = common.config_json(LoadConfig(images=Path("/p"), concurrency=(1, 2)))
    assert doc["images"] == "/p" and doc["concurrency"] == (1, 2) and doc["db"] is None
    assert [common.json_default(x) for x in (np.int64(3), np.float32(0.5), np.arange(2), Path("/q"))] == [
        3, 0.5, [0, 1], "/q"]
