"""Prometheus metrics for the service, one registry per app instance.

A registry per app (instead of the global default) keeps several servers in one process,
as tests run them, from colliding, and lets ``/metrics`` show exactly this server.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)


class Metrics:
    """Every metric the service exports, created against this app's own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.live_sessions = Gauge(
            "omnistream_live_sessions", "Live realtime sessions", ["kind"], registry=r
        )
        self.sessions_total = Counter(
            "omnistream_sessions_total", "Sessions opened", ["kind"], registry=r
        )
        self.sessions_refused = Counter(
            "omnistream_sessions_refused_total",
            "Sessions refused by admission control",
            ["kind", "reason"],
            registry=r,
        )
        self.chunk_latency = Histogram(
            "omnistream_chunk_latency_seconds",
            "Server time from a chunk's last byte received to its reply sent",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_wait = Histogram(
            "omnistream_queue_wait_seconds",
            "Time work items wait in a runner queue",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_size = Histogram(
            "omnistream_batch_size",
            "Work items per model call",
            ["model"],
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128),
            registry=r,
        )
        self.late_chunks = Counter(
            "omnistream_late_chunks_total",
            "Chunks whose reply took longer than the audio they carried",
            ["model"],
            registry=r,
        )
        self.protocol_errors = Counter(
            "omnistream_protocol_errors_total",
            "Error replies sent to clients",
            ["route", "code"],
            registry=r,
        )
        self.event_loop_lag = Histogram(
            "omnistream_event_loop_lag_seconds",
            "How late a periodic event-loop timer fires",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.frames_encoded = Counter(
            "omnistream_frames_encoded_total", "JPEG frames encoded", registry=r
        )
