"""The engine: the registry, one runner per loaded model, capacity and the JPEG pool.

Everything that serves sessions (every transport, offline jobs) goes through one Engine,
so a model is loaded once per device and shared by every route.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from omnistream.codecs.jpeg import JpegEncoderPool
from omnistream.engine.capacity import CapacityPlanner
from omnistream.engine.devices import pick_device
from omnistream.engine.registry import LoadContext, ModelRegistry, ModelSpec, ModelUnavailable
from omnistream.engine.runner import ModelRunner
from omnistream.metrics import Metrics


class Engine:
    """Lazily starts a runner per (model, device) and keeps it resident until shutdown."""

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: Metrics,
        *,
        jpeg: JpegEncoderPool,
        planner: CapacityPlanner | None = None,
        cpu_replicas: int = 0,
        model_options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.jpeg = jpeg
        self.planner = planner or CapacityPlanner()
        self.cpu_replicas = cpu_replicas or (os.cpu_count() or 1)
        self.model_options = model_options or {}
        self._runners: dict[tuple[str, str], ModelRunner] = {}
        self._lock = threading.Lock()

    def spec(self, model_id: str) -> ModelSpec:
        """The spec for a model id.

        Raises:
            KeyError: no such model.
            ModelUnavailable: it cannot load on this machine (the reason says why).
        """
        spec = self.registry.get(model_id)
        if spec is None:
            raise KeyError(model_id)
        reason = spec.unavailable_reason()
        if reason is not None:
            raise ModelUnavailable(reason)
        return spec

    def runner(self, model_id: str, backend: str = "auto") -> ModelRunner:
        """The resident runner for a model, started on first use."""
        spec = self.spec(model_id)
        device = pick_device(backend, spec.devices)
        with self._lock:
            runner = self._runners.get((model_id, device))
            if runner is None:
                runner = self._start(spec, device)
                self._runners[(model_id, device)] = runner
            return runner

    def loaded(self, model_id: str) -> bool:
        """Whether some runner for the model has finished loading."""
        return any(r.ready for (mid, _), r in self._runners.items() if mid == model_id)

    def _start(self, spec: ModelSpec, device: str) -> ModelRunner:
        replicas = spec.replicas if spec.replicas > 0 else self.cpu_replicas
        if device != "cpu":
            replicas = 1
        ctx = LoadContext(device=device, options=self.model_options.get(spec.id, {}))
        metrics = self.metrics

        def on_batch(size: int, cost: float, seconds: float) -> None:
            metrics.batch_size.labels(spec.id).observe(size)

        runner = ModelRunner(
            spec.id,
            lambda: spec.factory(ctx),
            replicas=replicas,
            meter=self.planner.meter(f"{spec.id}:infer") if device == "cpu" else None,
            on_batch=on_batch,
        )
        runner.start()
        return runner

    def close(self) -> None:
        """Stop every runner and the JPEG pool."""
        with self._lock:
            runners = list(self._runners.values())
            self._runners.clear()
        for runner in runners:
            runner.close()
        self.jpeg.shutdown()
