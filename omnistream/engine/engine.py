"""The engine: the registry, one runner per loaded model, capacity and the JPEG pool.

Everything that serves sessions (every transport, offline jobs) goes through one Engine,
so a model is loaded once per device and shared by every route.

A request may name its own weights for models that allow it (``config.model_path``, e.g.
a user's Wav2Lip checkpoint). Such a checkpoint is loaded once as one more resident runner
that every request naming the same file shares; only files under the operator's
``checkpoint_roots`` are accepted (a client must not make the server read arbitrary
files), and at most ``max_request_checkpoints`` per model are kept, so clients cannot fill
the GPU with copies; one nobody has used for ``checkpoint_idle_s`` makes room for the next.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from omnistream.codecs.jpeg import JpegEncoderPool
from omnistream.engine.capacity import CapacityPlanner
from omnistream.engine.devices import pick_device
from omnistream.engine.registry import (
    CheckpointRefused,
    LoadContext,
    ModelRegistry,
    ModelSpec,
    ModelUnavailable,
)
from omnistream.engine.runner import ModelRunner
from omnistream.metrics import Metrics

log = logging.getLogger(__name__)


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
        checkpoint_roots: list[str] | None = None,
        max_request_checkpoints: int = 2,
        checkpoint_idle_s: float = 300.0,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.jpeg = jpeg
        self.planner = planner or CapacityPlanner()
        self.cpu_replicas = cpu_replicas or (os.cpu_count() or 1)
        self.model_options = model_options or {}
        self.checkpoint_roots = [Path(os.path.realpath(r)) for r in checkpoint_roots or []]
        self.max_request_checkpoints = max_request_checkpoints
        self.checkpoint_idle_s = checkpoint_idle_s
        # (model id, device, checkpoint or "" for the configured weights) → runner
        self._runners: dict[tuple[str, str, str], ModelRunner] = {}
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

    def checkpoint(self, model_id: str, model_path: Any) -> str | None:
        """Check a request's ``config.model_path`` for a model; the real path to load.

        Returns ``None`` when the path is the model's configured checkpoint (the default
        runner serves it).

        Raises:
            KeyError: no such model.
            CheckpointRefused: the model takes no path, the path is not a string, lies
                outside ``checkpoint_roots``, is not a file, or cannot be loaded here.
        """
        spec = self.registry.get(model_id)
        if spec is None:
            raise KeyError(model_id)
        if spec.checkpoint_check is None:
            raise CheckpointRefused(f"model '{model_id}' does not take 'model_path'")
        if not isinstance(model_path, str) or not model_path or len(model_path) > 4096:
            raise CheckpointRefused("'model_path' must be a non-empty path string")
        real = Path(os.path.realpath(model_path))
        if spec.default_checkpoint and real == Path(os.path.realpath(spec.default_checkpoint)):
            return None
        if not self.checkpoint_roots or self.max_request_checkpoints <= 0:
            raise CheckpointRefused(
                "per-request checkpoints are disabled on this server: the operator lists "
                "the directories they may come from in OMNISTREAM_CHECKPOINT_ROOTS and "
                "how many may stay resident in OMNISTREAM_MAX_REQUEST_CHECKPOINTS"
            )
        if not any(real.is_relative_to(root) for root in self.checkpoint_roots):
            raise CheckpointRefused(
                "'model_path' is outside the server's checkpoint directories "
                "(OMNISTREAM_CHECKPOINT_ROOTS)"
            )
        if not real.is_file():
            raise CheckpointRefused(f"'model_path' is not a file: {model_path}")
        reason = spec.checkpoint_check(str(real))
        if reason is not None:
            raise CheckpointRefused(f"'model_path' cannot be loaded: {reason}")
        return str(real)

    def runner(
        self, model_id: str, backend: str = "auto", *, checkpoint: str | None = None
    ) -> ModelRunner:
        """The resident runner for a model, started on first use.

        ``checkpoint`` is a path returned by :meth:`checkpoint`: that file's weights get
        their own resident runner, shared by every request naming it.

        Raises:
            KeyError: no such model.
            ModelUnavailable: it cannot load here.
            CheckpointRefused: ``max_request_checkpoints`` other checkpoints of this
                model are already resident.
        """
        # A Runtime Profile may serve a model with its fallback (unless the request brings
        # the model's own weights) and pin its backend.
        if checkpoint is None:
            model_id = self.registry.serving_id(model_id)
        backend = self.registry.backend_for(model_id, backend)
        if checkpoint is None:
            spec = self.spec(model_id)
        else:
            found = self.registry.get(model_id)
            if found is None:
                raise KeyError(model_id)
            spec = found
        device = pick_device(backend, spec.devices)
        key = (model_id, device, checkpoint or "")
        with self._lock:
            runner = self._runners.get(key)
            if runner is not None and checkpoint is not None and runner.failed:
                # A request's file may have been fixed or replaced since: try it again
                # rather than answering with the old load error for the server's lifetime.
                self._unload(key)
                runner = None
            if runner is None:
                if checkpoint is not None:
                    self._make_room(model_id, device)
                runner = self._start(spec, device, checkpoint)
                self._runners[key] = runner
            return runner

    def _make_room(self, model_id: str, device: str) -> None:
        """Free a slot for one more request checkpoint of a model, or refuse (lock held).

        A full set unloads its least recently used runner if nobody has submitted to it
        for ``checkpoint_idle_s``: at least the session idle timeout, so no live session
        still holds it (an idle session is reaped first), and a running job submits far
        more often than that.

        Raises:
            CheckpointRefused: every slot is in use.
        """
        mine = [
            (key, r) for key, r in self._runners.items()
            if key[0] == model_id and key[1] == device and key[2] and not r.failed
        ]
        if len(mine) < self.max_request_checkpoints:
            return
        key, lru = min(mine, key=lambda kr: kr[1].last_used)
        idle = time.monotonic() - lru.last_used
        if lru.pending == 0 and idle >= self.checkpoint_idle_s:
            log.info("unloading %s weights %s, idle for %.0f s, for another checkpoint",
                     model_id, key[2], idle)
            self._unload(key)
            return
        raise CheckpointRefused(
            f"{len(mine)} other checkpoints of '{model_id}' are resident and in use on this "
            "server (OMNISTREAM_MAX_REQUEST_CHECKPOINTS); the least recently used one can be "
            f"unloaded after {self.checkpoint_idle_s:.0f} s idle (it has been {idle:.0f} s): "
            "use one of them or the default, or retry later"
        )

    def _unload(self, key: tuple[str, str, str]) -> None:
        """Forget a runner and close it off the caller's thread (it joins its replicas)."""
        runner = self._runners.pop(key)
        threading.Thread(target=runner.close, name=f"unload-{key[0]}", daemon=True).start()

    def loaded(self, model_id: str) -> bool:
        """Whether some runner for the model has finished loading."""
        return any(r.ready for (mid, _, _), r in self._runners.items() if mid == model_id)

    def runtime(self, model_id: str) -> list[dict[str, Any]]:
        """Every runner of a model: device, weights, state and the model's own report."""
        with self._lock:
            runners = [(k, r) for k, r in self._runners.items() if k[0] == model_id]
        return [
            {
                "device": device,
                "checkpoint": checkpoint or "configured",
                "state": "failed" if r.failed else "ready" if r.ready else "loading",
                "replicas": r.replicas,
                **r.model_info(),
            }
            for (_, device, checkpoint), r in runners
        ]

    def _start(self, spec: ModelSpec, device: str, checkpoint: str | None = None) -> ModelRunner:
        replicas = spec.replicas if spec.replicas > 0 else self.cpu_replicas
        if device != "cpu":
            replicas = 1
        options = dict(self.model_options.get(spec.id, {}))
        if checkpoint is not None:
            options["model_path"] = checkpoint
        ctx = LoadContext(device=device, options=options)
        metrics = self.metrics

        def on_batch(size: int, cost: float, seconds: float) -> None:
            metrics.batch_size.labels(spec.id).observe(size)

        # CPU runners are priced in cores. A device runner is priced in the CPU its
        # thread burns (features, copies, launch overhead) and in the device's busy time.
        device_stage = device != "cpu"
        stages = (
            [f"{spec.id}:infer@{device}", f"{spec.id}:busy@{device}"]
            if device_stage
            else [f"{spec.id}:infer"]
        )
        runner = ModelRunner(
            spec.id,
            lambda: spec.factory(ctx),
            replicas=replicas,
            meter=self.planner.meter(stages[0]),
            device_meter=self.planner.meter(stages[1], resource=device) if device_stage else None,
            capacity_stages=stages,
            on_batch=on_batch,
            checkpoint=checkpoint or "",
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
