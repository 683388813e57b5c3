"""Prometheus metrics (``GET /metrics``), with prometheus-client on a registry of the app's own.

Instruments updated as things happen (sessions, utterances, audio in, REST requests, engine steps,
latencies) plus values read at scrape time from the service (live sessions, queue depth, the
batcher's counters, the process's XLA compilations).  Every name starts with ``jax_realtime_``:

=============================================  =========  ==============================================
metric                                          type       what
=============================================  =========  ==============================================
``sessions``                                    gauge      live ``/v1/realtime`` sessions
``sessions_opened_total``                       counter    sessions accepted
``sessions_refused_total{reason}``              counter    connections refused: busy (no capacity: ``server_busy``,
                                                           1013) or shutdown (``server_shutdown``, 1001)
``slow_readers_total``                          counter    sessions closed (1008) because the client did not read
                                                           its events
``capacity_sessions``                           gauge      streaming sessions the engine keeps up with (measured)
``capacity_headroom``                           gauge      share of that capacity still free (0: full)
``engine_busy_fraction``                        gauge      share of the last 20 s the engine was busy
``streaming_sessions``                          gauge      sessions with an utterance running
``utterances_total{outcome}``                   counter    realtime utterances: done / failed / cancelled
``audio_seconds_total{source}``                 counter    audio received: realtime / rest
``http_requests_total{endpoint,status}``        counter    REST audio requests by answer status
``http_request_duration_seconds{endpoint}``     histogram  REST audio requests, arrival to answer (to the
                                                           start of the stream for ``stream=true``)
``queue_depth``                                 gauge      requests waiting in the batcher
``batches_total``                               counter    engine steps (batches decoded)
``batch_rows_total{kind}``                      counter    rows of the compiled batches: request / padding
``batch_occupancy``                             gauge      request rows / all rows since start
``batch_requests``                              histogram  requests per engine step
``engine_step_seconds``                         histogram  wall time of one engine step
``cancelled_requests_total``                    counter    waiting requests dropped (disconnects, timeouts)
``first_delta_latency_seconds``                 histogram  utterance start to its first non-empty delta
``delta_latency_seconds``                       histogram  newest audio in a decoded window arriving to
                                                           its ``transcription.delta``
``final_latency_seconds``                       histogram  ``final: true`` to ``transcription.done``
``untranscribed_audio_seconds_total{reason}``   counter    realtime audio that left a window without text:
                                                           silence (heard as silence with and without the
                                                           prompt), empty (decoded, no words), forced (a
                                                           full window Whisper did not segment)
``compilations_total``                          counter    XLA compilations in the process (warm-up included;
                                                           must not move while serving)
``compile_seconds_total``                       counter    time spent compiling
``compilation_cache_hits_total``                counter    compilations served by the persistent cache
``model_info{model}``                           gauge      1, labelled with the served checkpoint
=============================================  =========  ==============================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from jax_realtime.engine import compile_stats

if TYPE_CHECKING:
    from .service import Service

PREFIX = "jax_realtime"
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]


class _ServiceCollector(Collector):
    """Values read from the service when scraped."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def collect(self):
        service = self._metrics.service
        if service is None:  # not warm yet
            return
        yield GaugeMetricFamily(f"{PREFIX}_sessions", "Live /v1/realtime sessions", value=len(service.sessions))
        yield GaugeMetricFamily(f"{PREFIX}_queue_depth", "Requests waiting in the batcher",
                                value=service.batcher.queue_depth)
        s = service.batcher.stats
        yield CounterMetricFamily(f"{PREFIX}_batches", "Engine steps (batches decoded)", value=s.batches)
        rows = CounterMetricFamily(f"{PREFIX}_batch_rows", "Rows of the compiled batches, by kind", labels=["kind"])
        rows.add_metric(["request"], s.requests)
        rows.add_metric(["padding"], s.padded_rows)
        yield rows
        total = s.requests + s.padded_rows
        yield GaugeMetricFamily(f"{PREFIX}_batch_occupancy", "Request rows over all rows of the compiled batches "
                                "since start (1: no padding)", value=s.requests / total if total else 0.0)
        yield CounterMetricFamily(f"{PREFIX}_cancelled_requests", "Waiting requests dropped (disconnects, timeouts)",
                                  value=s.cancelled)
        c = compile_stats()
        yield CounterMetricFamily(f"{PREFIX}_compilations", "XLA compilations in this process (warm-up included)",
                                  value=c["compilations"])
        yield CounterMetricFamily(f"{PREFIX}_compile_seconds", "Seconds spent compiling", value=c["compile_seconds"])
        yield CounterMetricFamily(f"{PREFIX}_compilation_cache_hits", "Compilations served by the persistent cache",
                                  value=c["cache_hits"])
        capacity = service.capacity()
        yield GaugeMetricFamily(f"{PREFIX}_capacity_sessions", "Streaming sessions the engine keeps up with",
                                value=capacity.sessions_max)
        yield GaugeMetricFamily(f"{PREFIX}_capacity_headroom", "Share of the streaming capacity still free",
                                value=capacity.headroom)
        yield GaugeMetricFamily(f"{PREFIX}_engine_busy_fraction", "Share of the last seconds the engine was busy",
                                value=capacity.busy)
        yield GaugeMetricFamily(f"{PREFIX}_streaming_sessions", "Sessions with an utterance running",
                                value=service.streaming_sessions())
        info = GaugeMetricFamily(f"{PREFIX}_model_info", "The served checkpoint", labels=["model"])
        info.add_metric([service.engine.name], 1)
        yield info


class Metrics:
    """The app's instruments; ``attach(service)`` once the engine is warm."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.service: Service | None = None
        r = self.registry
        self.sessions_opened = Counter(f"{PREFIX}_sessions_opened", "Realtime sessions accepted", registry=r)
        self.sessions_refused = Counter(f"{PREFIX}_sessions_refused", "Realtime connections refused, by reason",
                                        ["reason"], registry=r)
        for reason in ("busy", "shutdown"):
            self.sessions_refused.labels(reason)
        self.slow_readers = Counter(f"{PREFIX}_slow_readers", "Sessions closed because the client did not read",
                                    registry=r)
        self.utterances = Counter(f"{PREFIX}_utterances", "Realtime utterances by outcome", ["outcome"], registry=r)
        for outcome in ("done", "failed", "cancelled"):
            self.utterances.labels(outcome)
        self.audio_seconds = Counter(f"{PREFIX}_audio_seconds", "Audio received, in seconds", ["source"], registry=r)
        for source in ("realtime", "rest"):
            self.audio_seconds.labels(source)
        self.http_requests = Counter(f"{PREFIX}_http_requests", "REST audio requests by endpoint and status",
                                     ["endpoint", "status"], registry=r)
        self.http_duration = Histogram(f"{PREFIX}_http_request_duration_seconds",
                                       "REST audio requests, arrival to answer", ["endpoint"],
                                       buckets=REQUEST_BUCKETS, registry=r)
        self.step_seconds = Histogram(f"{PREFIX}_engine_step_seconds", "Wall time of one engine step (a batch)",
                                      buckets=STEP_BUCKETS, registry=r)
        self.batch_requests = Histogram(f"{PREFIX}_batch_requests", "Requests per engine step",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.first_delta = Histogram(f"{PREFIX}_first_delta_latency_seconds",
                                     "Utterance start to its first non-empty transcription.delta",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.delta_latency = Histogram(f"{PREFIX}_delta_latency_seconds",
                                       "Arrival of the newest audio in a decoded window to its transcription.delta",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.final_latency = Histogram(f"{PREFIX}_final_latency_seconds",
                                       "commit final:true to transcription.done", buckets=LATENCY_BUCKETS, registry=r)
        self.untranscribed_seconds = Counter(f"{PREFIX}_untranscribed_audio_seconds",
                                             "Realtime audio that left a decoding window without text, by reason",
                                             ["reason"], registry=r)
        for reason in ("silence", "empty", "forced"):
            self.untranscribed_seconds.labels(reason)
        r.register(_ServiceCollector(self))

    def attach(self, service: Service) -> None:
        self.service = service

    def observe_batch(self, requests: int, rows: int, seconds: float) -> None:
        """The batcher's ``on_batch`` hook (runs on the event loop)."""
        self.step_seconds.observe(seconds)
        self.batch_requests.observe(requests)

    def render(self) -> bytes:
        return generate_latest(self.registry)
