"""The scoring benchmark's measuring helpers (no timings are asserted: these machines are
shared and noisy; only what the bench computes from its clock readings)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench_scoring  # noqa: E402


class FakeClock:
    """A clock that advances only when the timed functions say so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds


def test_paired_times_best_and_median_ratio(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(bench_scoring, "CLOCK", clock)
    engine = iter([3.0, 1.0, 5.0])
    floors = iter([2.0, 2.0, 4.0])

    def floor():
        seconds = next(floors)
        clock.spend(seconds)
        return seconds

    best, ratio = bench_scoring.paired_times(lambda: clock.spend(next(engine)), 3, floor)
    # ratios 1.5, 0.5, 1.25: the best engine time and the MEDIAN ratio (not the best one)
    assert best == 1.0 and ratio == 1.25


def test_floor_time_scales_to_the_requested_flops(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(bench_scoring, "CLOCK", clock)
    rate = bench_scoring.GemmRate(k=2, d=4, n_img=2, n_cap=2, n_words=2)
    monkeypatch.setattr(rate, "a", _Timed(clock, 0.5))  # each product "takes" 0.5 s
    monkeypatch.setattr(rate, "b", _Transposable())
    monkeypatch.setattr(bench_scoring.torch, "mm", lambda a, b, out: a.run())
    # 2.4 products' worth of flops: 2 products run (1 s), scaled to 2.4 / 2 -> 1.2 s
    assert rate.floor_time(2.4 * rate.flops) == pytest.approx(1.2)
    # less than one product: one runs and the time is scaled down
    assert rate.floor_time(0.1 * rate.flops) == pytest.approx(0.05)


class _Timed:
    def __init__(self, clock: FakeClock, seconds: float) -> None:
        self.clock, self.seconds = clock, seconds

    def run(self) -> None:
        self.clock.spend(self.seconds)


class _Transposable:
    T = None


def test_quick_bench_prints_every_row():
    """``bench_scoring.py --quick`` (small shapes) runs end to end and prints the table."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_scoring.py"), "--quick", "--no-train"]
        + ["--no-rss", "--threads", "1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    assert "x paired" in out and "IMRAM bound" in out
    for head in ("scan_t2i", "scan_i2t", "bfan", "chan", "imram"):
        row = next(line for line in out.splitlines() if line.startswith(head + " "))
        x_floor, x_paired = (float(v.rstrip("x")) for v in row.split()[5:7])
        assert x_floor > 0 and x_paired > 0


def test_quick_train_bench_prints_every_row():
    """``bench_train.py --quick``: the VSRN / SAEM training-step rows against their baselines
    run end to end (small shapes) and print a ratio each."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_train.py"), "--quick", "--threads", "1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    for row in ("vsrn", "vsrn_nocap", "saem"):
        line = next(line for line in out.splitlines() if line.startswith(row + " "))
        step, base, ratio = (float(v.rstrip("x")) for v in line.split()[1:4])
        assert step > 0 and base > 0 and ratio > 0
