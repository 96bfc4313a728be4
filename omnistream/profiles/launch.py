"""``omnistream serve --profile``: start the composition a Runtime Profile describes.

One process, one engine. At start-up the profile's plan is applied to the shared runtime
(a degraded model's requests go to its fallback, each model's backend and concurrency
are set), every model port opens as an extra uvicorn listener in the same event loop
that serves only that model's service adapter, and a background task preloads and warms
the models; ``/readyz`` answers 503 ``warming`` until it is done, then lists each model's
state and warmup time.

The extra listeners forward to the main application, so they share its ``AppState``,
its middleware (API keys) and its routes: a session opened on the avatar port and a TTS
stream on the text2audio port run on the same runners as everything on the main port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import uvicorn
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from omnistream.profiles.schema import ModelPlan, ProfileModel, RuntimeProfile, plan_model
from omnistream.transports.avatar_native import PORT_MODEL_SCOPE_KEY

if TYPE_CHECKING:
    from omnistream.engine.registry import ModelRegistry
    from omnistream.settings import Settings
    from omnistream.transports.state import AppState

log = logging.getLogger(__name__)

EXTRAS_KEY = "profile.runtime"
DEFAULT_WARMUP_TEXT = "Warm up."
LOAD_TIMEOUT_S = 300.0

#: Paths every listener answers (probes), whatever its adapter.
PROBE_PATHS: frozenset[str] = frozenset({"/healthz", "/health", "/readyz", "/metrics"})

#: Path prefixes each service adapter serves on its own port (exact paths end without /).
ADAPTER_PATHS: dict[str, tuple[str, ...]] = {
    "realtime-avatar.ws.v1": ("/", "/v1/audio2video/", "/v1/avatar/"),
    "text2audio.service.v1": ("/v1/text2audio/",),
    "batch-generate.v1": ("/v1/generate", "/v1/jobs/", "/v1/files/"),
}

#: ``on_demand``: neither preloaded nor warmed; it loads on first use like any model.
ModelState = Literal[
    "pending", "loading", "warming", "ready", "on_demand", "degraded", "unavailable", "failed"
]


def adapter_serves(adapter: str, path: str) -> bool:
    """Whether a listener for ``adapter`` answers ``path``."""
    if path in PROBE_PATHS:
        return True
    for prefix in ADAPTER_PATHS.get(adapter, ()):
        if prefix == "/" and path == "/":
            return True
        if prefix != "/" and (path == prefix.rstrip("/") or path.startswith(prefix)):
            return True
    return False


@dataclass
class ModelStatus:
    """The live state of one profile model, for ``/readyz``."""

    entry: ProfileModel
    plan: ModelPlan
    state: ModelState = "pending"
    load_ms: float | None = None
    warmup_ms: float | None = None
    error: str = ""
    warmup_done: dict[str, Any] = field(default_factory=dict)


class AdapterListener:
    """ASGI app of one extra port: the main app, narrowed to one service adapter.

    On a ``realtime-avatar.ws.v1`` port the FlashTalk root socket (``WS /``), the
    default-model aliases and a native ``session.create`` without a model mean that port's
    model, so a client pointed at ``ws://host:PORT/`` talks to the model the profile put
    there.
    """

    def __init__(
        self, app: ASGIApp, adapter: str, model_id: str | None, aliases: tuple[str, ...] = ()
    ) -> None:
        self.app = app
        self.adapter = adapter
        self.model_id = model_id
        self.aliases = aliases

    def _rewrite(self, path: str) -> str:
        if self.adapter != "realtime-avatar.ws.v1" or self.model_id is None:
            return path
        if path == "/":
            return f"/v1/audio2video/{self.model_id}"
        for prefix in ("/v1/audio2video/", "/v1/avatar/"):
            if path.startswith(prefix) and path[len(prefix) :] in self.aliases:
                return f"{prefix}{self.model_id}"
        return path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        if not adapter_serves(self.adapter, path):
            message = f"{path} is not served on this port (it serves {self.adapter})"
            body = {"detail": message, "code": "not_found", "service": self.adapter}
            if scope["type"] == "http":
                await JSONResponse(body, status_code=404)(scope, receive, send)
            else:
                ws = WebSocket(scope, receive, send)
                try:
                    await ws.send_denial_response(JSONResponse(body, status_code=404))
                except RuntimeError:  # no denial extension: close before accepting (403)
                    await ws.close(code=1008)
            return
        if scope["type"] == "websocket":
            rewritten = self._rewrite(path)
            if rewritten != path:
                scope = dict(scope, path=rewritten, raw_path=rewritten.encode())
            if self.adapter == "realtime-avatar.ws.v1" and self.model_id is not None:
                scope = dict(scope)
                scope[PORT_MODEL_SCOPE_KEY] = self.model_id  # native session.create default
        await self.app(scope, receive, send)


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server inside another's event loop: the main server owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket, so a busy port fails start-up with a clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"Runtime Profile port {port} on {host} cannot be bound: {exc}") from exc
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class ProfileRuntime:
    """A Runtime Profile being served: its plan, listeners, warmup and readiness."""

    def __init__(self, profile: RuntimeProfile, path: str = "") -> None:
        self.profile = profile
        self.path = path
        self.models: list[ModelStatus] = []
        self.listeners: dict[int, tuple[str, str | None]] = {}
        self._servers: list[tuple[_EmbeddedServer, asyncio.Task[None]]] = []
        self._warm: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self.started_at = time.monotonic()
        self.ready_after_ms: float | None = None

    # -- environment (before Settings are read) -----------------------------------------

    def apply_environment(self) -> list[str]:
        """Export the profile's ``environment``; returns the names it set."""
        env = self.profile.env()
        os.environ.update(env)
        return sorted(env)

    # -- plan ------------------------------------------------------------------------

    def plan(self, registry: ModelRegistry) -> None:
        """Work out each model's plan against this server's registry."""
        self.models = [
            ModelStatus(entry, plan_model(entry, registry, self.profile))
            for entry in self.profile.models
        ]

    def _apply_plan(self, state: AppState, status: ModelStatus) -> None:
        plan, entry = status.plan, status.entry
        registry = state.registry
        if plan.state == "unavailable" or plan.served_by is None:
            status.state = "unavailable"
            return
        if plan.served_by != entry.id:
            registry.degrade(entry.id, plan.served_by, plan.reason)
            status.state = "degraded"
        elif plan.state == "degraded" and entry.degrade_to:
            registry.set_backend(entry.id, entry.degrade_to)
            status.state = "degraded"
        elif entry.backend != "auto":
            registry.set_backend(entry.id, entry.backend)
        limit = self.profile.concurrency_of(entry)
        limits = state.sessions.model_limits
        if limit is not None:
            if plan.served_by == entry.id:
                limits[entry.id] = limit
            else:
                limits.setdefault(plan.served_by, limit)  # its own entry's limit wins

    def _degrade_after_failure(self, state: AppState, status: ModelStatus, error: str) -> bool:
        """Re-plan a model that failed to load; True when its fallback now serves it."""
        failure = f"model '{status.entry.id}' failed to load: {error}"
        plan = plan_model(status.entry, state.registry, self.profile, failure=failure)
        status.plan = plan
        if plan.state == "degraded" and plan.served_by is not None:
            self._apply_plan(state, status)  # its fallback model, or another backend
            return True
        status.state = "failed"
        status.error = error
        return False

    # -- start / stop --------------------------------------------------------------------

    async def start(self, state: AppState, app: ASGIApp) -> None:
        """Apply the plan, open the model ports and start warming in the background.

        Raises:
            OSError: a model port cannot be bound.
        """
        if not self.models:
            self.plan(state.registry)
        # A model's own entry decides its limit before entries that degrade onto it.
        for status in sorted(self.models, key=lambda s: s.plan.served_by != s.entry.id):
            self._apply_plan(state, status)
        for status in self.models:
            plan = status.plan
            if plan.state == "serve":
                log.info(
                    "profile %s: model %s served on %s", self.profile.name, plan.id, plan.device
                )
            else:
                log.warning(
                    "profile %s: model %s %s: %s",
                    self.profile.name,
                    plan.id,
                    plan.state,
                    plan.reason,
                )
        state.extras[EXTRAS_KEY] = self
        state.extras.setdefault("shutdown_hooks", []).append(self.aclose)
        await self._open_listeners(state, app)
        self._warm = asyncio.create_task(self._warm_all(state), name="profile-warmup")

    async def _open_listeners(self, state: AppState, app: ASGIApp) -> None:
        from omnistream.cli import uvicorn_options

        settings: Settings = state.settings
        for status in self.models:
            plan = status.plan
            port, adapter = plan.port, plan.service
            if port is None or adapter is None:
                continue
            if status.state == "unavailable":
                log.warning("profile: not opening port %d: %s", port, plan.reason)
                continue
            if adapter not in ADAPTER_PATHS:
                log.warning("profile: port %d: unknown service adapter '%s'", port, adapter)
                continue
            if port == settings.port or port in self.listeners:
                continue  # the main port serves everything; a shared port opens once
            sock = _bind(settings.host, port)
            options = uvicorn_options(settings) | {"port": port, "lifespan": "off"}
            options.pop("host", None)
            listener = AdapterListener(
                app, adapter, status.entry.id, tuple(settings.avatar_model_aliases)
            )
            server = _EmbeddedServer(uvicorn.Config(listener, host=settings.host, **options))
            task = asyncio.create_task(server.serve(sockets=[sock]), name=f"profile-port-{port}")
            self._servers.append((server, task))
            self.listeners[port] = (adapter, status.entry.id)
            log.info("profile: %s for model %s on port %d", adapter, status.entry.id, port)
        for server, task in self._servers:
            # uvicorn.Server has no "started" event to await, only the flag.
            while not server.started and not task.done():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            if task.done() and task.exception() is not None:
                raise RuntimeError(f"profile listener failed: {task.exception()}")

    async def aclose(self) -> None:
        """Stop warming and close the extra listeners (server shutdown)."""
        if self._warm is not None:
            self._warm.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._warm
        for server, _ in self._servers:
            server.should_exit = True
        for _, task in self._servers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 10.0)
        self._servers.clear()

    # -- warmup ----------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once every model's preload and warmup has finished (or failed)."""
        return self._ready.is_set()

    async def wait_ready(self) -> None:
        """Wait until warmup is over."""
        await self._ready.wait()

    async def _warm_all(self, state: AppState) -> None:
        try:
            for status in self.models:
                if status.state in ("unavailable", "failed"):
                    continue
                await self._warm_one(state, status)
        finally:
            self.ready_after_ms = round((time.monotonic() - self.started_at) * 1000.0, 1)
            self._ready.set()
            log.info("profile %s ready after %.0f ms", self.profile.name, self.ready_after_ms)

    async def _warm_one(self, state: AppState, status: ModelStatus) -> None:
        steps = status.plan.warmup
        if not (status.plan.preload or steps):
            if status.state == "pending":
                status.state = "on_demand"
            return
        degraded = status.state == "degraded"
        status.state = "loading"
        started = time.monotonic()
        try:
            runner = state.engine.runner(status.entry.id)
            await runner.wait_ready(timeout=LOAD_TIMEOUT_S)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.warning("profile: model %s failed to load: %s", status.entry.id, error)
            if not self._degrade_after_failure(state, status, error):
                return
            degraded = True
            started = time.monotonic()
            try:
                runner = state.engine.runner(status.entry.id)
                await runner.wait_ready(timeout=LOAD_TIMEOUT_S)
            except Exception as exc2:
                status.state, status.error = "failed", f"fallback: {type(exc2).__name__}: {exc2}"
                return
        status.load_ms = round((time.monotonic() - started) * 1000.0, 1)
        status.state = "warming"
        started = time.monotonic()
        try:
            status.warmup_done = await self._run_warmup(state, status, runner)
        except Exception as exc:
            status.state, status.error = "failed", f"warmup: {type(exc).__name__}: {exc}"
            log.warning("profile: warmup of %s failed: %s", status.entry.id, status.error)
            return
        status.warmup_ms = round((time.monotonic() - started) * 1000.0, 1)
        status.state = "degraded" if degraded else "ready"

    async def _run_warmup(
        self, state: AppState, status: ModelStatus, runner: Any
    ) -> dict[str, Any]:
        """The model's warmup steps by task; returns what was done."""
        steps = status.plan.warmup
        served = state.registry.serving_id(status.entry.id)
        spec = state.registry.get(served)
        task = status.plan.task
        done: dict[str, Any] = {"resident_worker": runner.ready}
        if spec is None:
            return done
        if task == "text2audio" and (steps.get("text") or steps.get("max_chunks")):
            done.update(await self._warm_tts(state, spec, steps))
        if task == "audio2video" and steps.get("preload_reference"):
            from omnistream.sessions.avatar import default_avatar_bytes

            width = int(steps.get("width", 416))
            height = int(steps.get("height", 704))
            ref = await state.avatars.reference(
                served, runner, default_avatar_bytes(), width=width, height=height
            )
            done["preload_reference"] = {
                "width": width,
                "height": height,
                "face_detected": bool(ref.info.get("face_detected", True)),
            }
        return done

    async def _warm_tts(self, state: AppState, spec: Any, steps: dict[str, Any]) -> dict[str, Any]:
        from omnistream.models.tts import default_voice, sample_rate
        from omnistream.transports.tts_http import close_stream, open_stream

        text = str(steps.get("text") or DEFAULT_WARMUP_TEXT)
        max_chunks = int(steps.get("max_chunks") or 0)
        voice = str(steps.get("voice") or default_voice(spec))
        stream = await open_stream(state, spec, voice=voice, out_rate=sample_rate(spec))
        chunks = 0
        try:
            stream.say(text)
            async for _ in stream.audio():
                chunks += 1
                if max_chunks and chunks >= max_chunks:
                    break
        finally:
            await close_stream(state, stream, "warmup")
        return {"text": text, "chunks": chunks, "first_audio_ms": stream.first_audio_ms}

    # -- reporting ---------------------------------------------------------------------

    def report(self, state: AppState | None = None) -> dict[str, Any]:
        """The profile section of ``/readyz``."""
        models = []
        for status in self.models:
            plan = status.plan
            served = plan.served_by
            live = state.sessions.live_for_model(served) if state is not None and served else 0
            models.append(
                {
                    "id": status.entry.id,
                    "task": plan.task,
                    "service": plan.service,
                    "port": plan.port,
                    "backend": plan.backend,
                    "state": status.state,
                    "served_by": served,
                    "degraded": served is not None and plan.state == "degraded",
                    "degrade_to": plan.degrade_to,
                    "device": plan.device,
                    "reason": plan.reason,
                    "error": status.error,
                    "concurrency": plan.concurrency,
                    "live": live,
                    "preload": plan.preload,
                    "load_ms": status.load_ms,
                    "warmup_ms": status.warmup_ms,
                    "warmup": status.warmup_done,
                    "config": plan.config,
                    "resources": dict(status.entry.resources),
                    "extra": dict(status.entry.model_extra or {}),  # unknown fields, kept
                }
            )
        return {
            "name": self.profile.name,
            "version": self.profile.version,
            "description": self.profile.description,
            "path": self.path,
            "ready": self.ready,
            "ready_after_ms": self.ready_after_ms,
            "environment": sorted(self.profile.env()),
            "defaults": self.profile.defaults.model_dump(),
            "extra": dict(self.profile.model_extra or {}),  # unknown fields, kept
            "listeners": {
                str(port): {"service": adapter, "model": model}
                for port, (adapter, model) in sorted(self.listeners.items())
            },
            "models": models,
        }


def profile_runtime(state: AppState) -> ProfileRuntime | None:
    """The profile this server runs, if any."""
    runtime = state.extras.get(EXTRAS_KEY)
    return runtime if isinstance(runtime, ProfileRuntime) else None


def degraded_from(state: AppState, requested: str | None, served: str) -> str | None:
    """The requested model id when a profile's ``degrade_to`` served it with ``served``."""
    if requested and requested != served and state.registry.serving_id(requested) == served:
        return requested
    return None


class ProfileRefused(Exception):
    """A profile file that cannot be served: unreadable, or with errors (listed)."""


def read_runtime(path: str) -> ProfileRuntime:
    """Read a profile for ``serve --profile``; warnings are logged, errors refuse it.

    Raises:
        ProfileRefused: the file cannot be read or has errors (the message lists them).
    """
    from omnistream.profiles.schema import load_profile

    try:
        profile, findings, _ = load_profile(path)
    except OSError as exc:
        raise ProfileRefused(f"{path}: {exc}") from exc
    errors = [f for f in findings if f.level == "error"]
    if errors or profile is None:
        raise ProfileRefused(
            "the Runtime Profile has errors:\n" + "\n".join(str(f) for f in errors)
        )
    for finding in findings:
        if not finding.serving:  # serving problems are logged from the plan at start-up
            log.warning("%s", finding)
    return ProfileRuntime(profile, path)
