"""The FastAPI application: builds the runtime in its lifespan and mounts every route."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI

from omnistream import __version__
from omnistream.codecs.jpeg import JpegEncoderPool
from omnistream.engine.capacity import CapacityPlanner
from omnistream.engine.engine import Engine
from omnistream.metrics import Metrics
from omnistream.models.catalog import build_registry
from omnistream.sessions.avatar import AvatarService
from omnistream.sessions.manager import SessionManager
from omnistream.settings import Settings
from omnistream.transports.state import AppState

log = logging.getLogger(__name__)

LOOP_LAG_INTERVAL_S = 0.25


def build_state(settings: Settings) -> AppState:
    """Create the runtime (registry, engine, sessions) without starting any task."""
    metrics = Metrics()
    registry = build_registry(settings)
    planner = CapacityPlanner(target_utilisation=settings.capacity_target)
    jpeg = JpegEncoderPool(
        threads=settings.jpeg_threads or None,
        quality=settings.jpeg_quality,
        backend=settings.jpeg_backend,
    )
    engine = Engine(
        registry,
        metrics,
        jpeg=jpeg,
        planner=planner,
        cpu_replicas=settings.avatar_replicas,
        checkpoint_roots=settings.checkpoint_roots,
        max_request_checkpoints=settings.max_request_checkpoints,
        # Never shorter than the session idle timeout: a live session's model stays.
        checkpoint_idle_s=max(settings.request_checkpoint_idle_s, settings.idle_timeout_s),
    )
    sessions = SessionManager(
        planner, metrics, max_sessions=settings.max_sessions, idle_timeout_s=settings.idle_timeout_s
    )
    avatars = AvatarService(engine, sessions, metrics, settings)
    return AppState(settings, metrics, registry, engine, sessions, avatars)


async def _watch_loop_lag(state: AppState) -> None:
    """Export how late the event loop runs a timer: the symptom of a blocked loop."""
    loop = asyncio.get_running_loop()
    while True:
        expected = loop.time() + LOOP_LAG_INTERVAL_S
        await asyncio.sleep(LOOP_LAG_INTERVAL_S)
        state.metrics.event_loop_lag.observe(max(0.0, loop.time() - expected))


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. Models load on first use, or at start-up with warmup routes."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = build_state(settings)
        app.state.omni = state
        app.state.started_at = time.time()
        state.sessions.start()
        lag = asyncio.create_task(_watch_loop_lag(state), name="loop-lag")
        try:
            yield
        finally:
            lag.cancel()
            for hook in list(state.extras.get("shutdown_hooks", [])):
                with contextlib.suppress(Exception):
                    await hook()
            await state.sessions.aclose()
            await asyncio.to_thread(state.engine.close)

    app = FastAPI(title="omnistream", version=__version__, lifespan=lifespan)

    from omnistream.transports import avatar_native, flashtalk, http_common

    app.include_router(http_common.router)
    app.include_router(avatar_native.router)
    # Before generate_http: its `/v1/models/{model_id}` would shadow `/v1/models/tts`.
    from omnistream.transports import tts_http, tts_ws

    app.include_router(tts_http.router)
    app.include_router(tts_ws.router)
    from omnistream.transports import generate_http

    app.include_router(generate_http.router)
    from omnistream.transports import webrtc as webrtc_routes

    app.include_router(webrtc_routes.router)
    app.include_router(flashtalk.router)  # last: it owns the catch-all `WS /`
    return app
