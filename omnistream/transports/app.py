"""The FastAPI application: builds the runtime in its lifespan and mounts every route."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import FastAPI

from omnistream import __version__
from omnistream.auth.service import AuthService
from omnistream.codecs.jpeg import JpegEncoderPool
from omnistream.engine.capacity import CapacityPlanner
from omnistream.engine.engine import Engine
from omnistream.metrics import Metrics
from omnistream.models.catalog import build_registry
from omnistream.sessions.avatar import AvatarService
from omnistream.sessions.manager import SessionManager
from omnistream.settings import Settings
from omnistream.transports.edge import install_edge
from omnistream.transports.state import AppState

if TYPE_CHECKING:
    from omnistream.profiles.launch import ProfileRuntime

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
    auth = AuthService(settings, metrics.registry)
    return AppState(settings, metrics, registry, engine, sessions, avatars, auth)


async def _watch_loop_lag(state: AppState) -> None:
    """Export how late the event loop runs a timer: the symptom of a blocked loop."""
    loop = asyncio.get_running_loop()
    while True:
        expected = loop.time() + LOOP_LAG_INTERVAL_S
        await asyncio.sleep(LOOP_LAG_INTERVAL_S)
        state.metrics.event_loop_lag.observe(max(0.0, loop.time() - expected))


def _reload_keys_on_sighup(state: AppState) -> None:
    """SIGHUP re-reads the key file; live sessions and in-flight requests carry on."""
    if state.auth.keys is None:
        return
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        # Only the main thread may own signals (a server run inside a test thread skips).
        loop.add_signal_handler(signal.SIGHUP, state.auth.reload)


def create_app(
    settings: Settings | None = None, profile: ProfileRuntime | None = None
) -> FastAPI:
    """Build the app. Models load on first use, or at start-up with warmup routes.

    With a Runtime Profile the app also opens the profile's model ports and warms its
    models at start-up (``/readyz`` answers 503 until that is done).
    """
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = build_state(settings)
        app.state.omni = state
        app.state.started_at = time.time()
        state.sessions.start()
        from omnistream.gateway import start_gateway

        await start_gateway(state)  # providers file checked, HTTP clients built off the loop
        _reload_keys_on_sighup(state)
        lag = asyncio.create_task(_watch_loop_lag(state), name="loop-lag")
        if profile is not None:
            await profile.start(state, app)
        cluster = None
        if settings.redis_url:  # cluster mode: jobs on Redis, node registry, drain
            from omnistream.cluster.node import ClusterNode

            cluster = await ClusterNode.start(state)
        try:
            yield
        finally:
            lag.cancel()
            if cluster is not None:  # running jobs go back to the queue first
                with contextlib.suppress(Exception):
                    await cluster.aclose()
            for hook in list(state.extras.get("shutdown_hooks", [])):
                with contextlib.suppress(Exception):
                    await hook()
            await state.sessions.aclose()
            await asyncio.to_thread(state.engine.close)

    app = FastAPI(title="omnistream", version=__version__, lifespan=lifespan)
    if settings.redis_url:  # cluster routes and the session gate (inside the edge)
        from omnistream.cluster.node import install as install_cluster

        install_cluster(app)
    install_edge(app, settings)

    from omnistream.transports import avatar_native, flashtalk, http_common

    app.include_router(http_common.router)
    app.include_router(avatar_native.router)
    # Before generate_http: its `/v1/models/{model_id}` would shadow `/v1/models/tts`.
    from omnistream.transports import tts_http, tts_ws

    app.include_router(tts_http.router)
    app.include_router(tts_ws.router)
    from omnistream.transports import text2audio_service

    app.include_router(text2audio_service.router)
    from omnistream.transports import images_http

    app.include_router(images_http.router)  # OpenAI image and video routes
    from omnistream.transports import gateway_http

    # Before generate_http: its `/v1/models/{model_id}` would shadow `/v1/models/web`.
    app.include_router(gateway_http.router)
    from omnistream.transports import generate_http

    app.include_router(generate_http.router)
    from omnistream.transports import webrtc as webrtc_routes

    app.include_router(webrtc_routes.router)
    from omnistream.transports import realtime_ws

    app.include_router(realtime_ws.router)
    from omnistream.omni_api import routes as omni_routes

    app.include_router(omni_routes.router)  # the hosted task API, /api/omni
    app.include_router(flashtalk.router)  # last: it owns the catch-all `WS /`
    return app
