"""Prometheus metrics of the gateway, registered on the app's own registry.

Kept beside the gateway rather than in :mod:`omnistream.metrics` so the gateway's
labels (provider, route, outcome) live with the code that sets them.
"""

from __future__ import annotations

import weakref

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

GATEWAY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

BREAKER_VALUE = {"closed": 0, "half_open": 1, "open": 2}

_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, GatewayMetrics] = (
    weakref.WeakKeyDictionary())


def gateway_metrics(registry: CollectorRegistry) -> GatewayMetrics:
    """The gateway metrics on ``registry``, created once (a second gateway on the same
    registry, e.g. rebuilt after a failed start, shares them instead of colliding)."""
    found = _BY_REGISTRY.get(registry)
    if found is None:
        found = _BY_REGISTRY[registry] = GatewayMetrics(registry)
    return found


class GatewayMetrics:
    """Requests, latency, time to first token, tokens, fallbacks and breaker state."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.requests = Counter(
            "omnistream_gateway_requests_total",
            "Upstream calls by provider, operation and outcome",
            ["provider", "operation", "outcome"], registry=r,
        )
        self.latency = Histogram(
            "omnistream_gateway_latency_seconds",
            "Upstream call time (whole answer, or the whole stream)",
            ["provider", "operation"], buckets=GATEWAY_BUCKETS_S, registry=r,
        )
        self.ttft = Histogram(
            "omnistream_gateway_time_to_first_token_seconds",
            "Time from sending a streaming request upstream to its first chunk",
            ["provider"], buckets=GATEWAY_BUCKETS_S, registry=r,
        )
        self.tokens = Counter(
            "omnistream_gateway_tokens_total",
            "Tokens reported by upstreams", ["provider", "direction"], registry=r,
        )
        self.fallbacks = Counter(
            "omnistream_gateway_fallbacks_total",
            "Requests that moved on from a target to the next", ["provider", "reason"],
            registry=r,
        )
        self.breaker = Gauge(
            "omnistream_gateway_breaker_state",
            "Circuit state per provider: 0 closed, 1 half-open, 2 open", ["provider"],
            registry=r,
        )
