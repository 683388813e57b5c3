"""The load meter behind admission control (pure bookkeeping, on a clock the test moves)."""

from __future__ import annotations

import pytest

from jax_realtime.capacity import LoadMeter, calibrate


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_before_sessions_stream_the_calibration_decides():
    clock = Clock()
    meter = LoadMeter(prior_per_session=0.2, target=0.8, clock=clock)
    capacity = meter.capacity(0)
    assert (capacity.sessions_max, capacity.measured) == (4, False)  # 0.8 / 0.2
    assert meter.admits(3) and not meter.admits(4)


def test_once_sessions_stream_the_measured_busy_time_decides():
    clock = Clock()
    meter = LoadMeter(prior_per_session=0.01, target=0.8, horizon_s=20.0, clock=clock)
    meter.note_streaming(2)
    for _ in range(20):  # two sessions keep the engine busy 0.6 s of every second
        clock.now += 1.0
        meter.record_batch(0.6)
        meter.note_streaming(2)
    capacity = meter.capacity(2)
    assert capacity.measured
    assert capacity.busy == pytest.approx(0.6, abs=0.02)
    assert capacity.per_session == pytest.approx(0.3, abs=0.02)
    assert capacity.sessions_max == 2  # floor(0.8 / 0.3)
    assert not meter.admits(2) and capacity.headroom == 0.0


def test_old_batches_leave_the_window():
    clock = Clock()
    meter = LoadMeter(prior_per_session=0.1, horizon_s=10.0, clock=clock)
    clock.now += 10.0
    meter.record_batch(5.0)
    assert meter.busy() == pytest.approx(0.5)
    clock.now += 30.0
    assert meter.busy() == 0.0


def test_calibration_takes_the_mean_per_session_cost_per_second():
    times = {1: 0.3, 8: 1.6}  # seconds per step: 0.3 per session alone, 0.2 in a full batch
    assert calibrate(lambda batch: times[batch], (1, 4, 8), step_s=1.0) == pytest.approx(0.25)
    assert calibrate(lambda batch: times[batch], (1, 8), step_s=0.5) == pytest.approx(0.5)
