"""How many live streams the engine can carry, measured while it runs.

Realtime sessions are admitted only while the engine has room for one more (``server_busy``
otherwise), so that admitted sessions never fall behind their audio.  Room is measured, not
configured: :class:`LoadMeter` keeps the engine's busy time over a sliding window (every batch
the batcher runs reports its wall time), and the estimate of what one streaming session costs
comes from that measurement once sessions stream, and from a calibration at start-up
(:func:`calibrate`, one typical streaming step decoded at the smallest and the largest batch)
before they do.

Pure bookkeeping (no asyncio, no JAX): the service feeds it and asks it.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Capacity:
    """What the engine can take now (``/health``'s ``capacity``, ``/metrics``)."""

    sessions_max: int  # sessions the engine keeps up with, all streaming at once, at the target load
    sessions: int  # sessions connected now (each may stream at any moment)
    busy: float  # fraction of the last ``horizon_s`` the engine was busy
    per_session: float  # engine seconds per second that one streaming session costs (measured or calibrated)
    measured: bool  # per_session comes from sessions streaming now, not from the start-up calibration

    @property
    def headroom(self) -> float:
        """Fraction of the engine still free below the target load (0: full)."""
        return max(0.0, 1.0 - self.sessions / self.sessions_max) if self.sessions_max else 0.0

    def as_dict(self) -> dict:
        return {"sessions_max": self.sessions_max, "sessions": self.sessions, "headroom": round(self.headroom, 3),
                "busy": round(self.busy, 3), "per_session_s": round(self.per_session, 4), "measured": self.measured}


class LoadMeter:
    """The engine's busy time over the last ``horizon_s`` seconds, and the capacity it implies.

    ``target`` is the busy fraction the admitted sessions may reach together (below 1: the clock
    ticks, fresh decodes and final commits need slack).  ``prior_per_session`` is the calibrated
    cost of one streaming session (engine seconds per second of audio); a measurement replaces it
    once at least ``min_measured_s`` of the horizon had sessions streaming.
    """

    def __init__(self, prior_per_session: float, target: float = 0.8, horizon_s: float = 20.0,
                 min_measured_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        if not 0 < target <= 1:
            raise ValueError(f"target load must be in (0, 1], not {target}")
        self.prior = max(prior_per_session, 1e-6)
        self.target = target
        self.horizon_s = horizon_s
        self.min_measured_s = min_measured_s
        self._clock = clock
        self._batches: collections.deque = collections.deque()  # (end time, seconds)
        self._streaming: collections.deque = collections.deque()  # (time, sessions streaming) samples
        self._started = clock()

    def record_batch(self, seconds: float) -> None:
        """A batch just finished after ``seconds`` of engine time."""
        self._batches.append((self._clock(), seconds))
        self._expire()

    def note_streaming(self, sessions: int) -> None:
        """How many sessions stream now (sampled whenever it changes and at every batch)."""
        self._streaming.append((self._clock(), sessions))
        self._expire()

    def _expire(self) -> None:
        oldest = self._clock() - self.horizon_s
        while self._batches and self._batches[0][0] < oldest:
            self._batches.popleft()
        while len(self._streaming) > 1 and self._streaming[1][0] < oldest:
            self._streaming.popleft()

    def busy(self) -> float:
        """Fraction of the horizon (or of the time since start, if shorter) the engine was busy."""
        self._expire()
        span = min(self.horizon_s, max(1e-3, self._clock() - self._started))
        now = self._clock()
        busy = sum(min(seconds, max(0.0, span - (now - end))) for end, seconds in self._batches)
        return min(1.0, busy / span)

    def _streaming_average(self) -> tuple[float, float]:
        """(time-weighted mean of sessions streaming over the horizon, seconds with any streaming)."""
        now = self._clock()
        start = max(self._started, now - self.horizon_s)
        total = active = 0.0
        samples = list(self._streaming)
        for (t, n), following in zip(samples, samples[1:] + [(now, None)]):
            a, b = max(t, start), following[0]
            if b > a:
                total += n * (b - a)
                active += (b - a) if n else 0.0
        span = max(1e-3, now - start)
        return total / span, active

    def capacity(self, sessions: int) -> Capacity:
        mean, active = self._streaming_average()
        busy = self.busy()
        measured = active >= self.min_measured_s and mean > 0 and busy > 0
        per_session = busy / mean if measured else self.prior
        sessions_max = max(1, math.floor(self.target / per_session)) if per_session > 0 else 1
        return Capacity(sessions_max, sessions, busy, per_session, measured)

    def admits(self, sessions: int) -> bool:
        """Whether one more session keeps the engine within its target load, all ``sessions + 1``
        streaming at once."""
        return sessions + 1 <= self.capacity(sessions).sessions_max


def calibrate(run_step: Callable[[int], float], batch_sizes: tuple[int, ...], step_s: float,
              repeats: int = 2) -> float:
    """Engine seconds per second that one streaming session costs, from timing ``run_step(batch)``
    (one typical streaming step for ``batch`` sessions at once) at each batch size: the cheapest
    per-session cost of a full batch bounds what batching achieves, the single-row cost what one
    session pays alone; the estimate is the mean of the two, per second of audio (one step every
    ``step_s``).  The fastest of ``repeats`` runs is taken (the first may warm caches)."""
    costs = []
    for batch in (min(batch_sizes), max(batch_sizes)):
        seconds = min(run_step(batch) for _ in range(repeats))
        costs.append(seconds / batch)
    return (sum(costs) / len(costs)) / step_s
