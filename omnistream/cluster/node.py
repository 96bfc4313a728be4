"""One cluster node: wiring at start-up, the session gate, drain on SIGTERM, cluster routes.

:func:`install` (called by ``create_app`` only when ``redis_url`` is set) adds the routes and
the :class:`SessionGate` middleware; :meth:`ClusterNode.start` (from the app's lifespan)
connects to Redis, swaps the job service's backend for :class:`RedisJobBackend`, starts
the registry, the agent port and the SIGTERM handler.

Drain (SIGTERM): the node stops taking sessions and jobs at once (``/readyz`` 503, agent
``drain``, the gate refuses new realtime handshakes with 503 so HAProxy re-dispatches
them, no more claims), hands claimed-but-unstarted jobs back to the queue, and waits up to
``drain_grace_s`` for live sessions and running jobs to end. Jobs still running then are
handed back for another node; then the server shuts down as uvicorn does on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from fastapi import APIRouter, FastAPI, Request
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from omnistream import __version__
from omnistream.cluster.agent import AgentServer
from omnistream.cluster.files import RemoteFiles
from omnistream.cluster.files import router as files_router
from omnistream.cluster.jobs import ClusterUnavailable, RedisJobBackend
from omnistream.cluster.registry import NodeRegistry
from omnistream.jobs.service import JobService
from omnistream.settings import Settings
from omnistream.transports.state import AppState, get_state

log = logging.getLogger(__name__)

EXTRAS_KEY = "cluster.node"
PREFLIGHT_TIMEOUT_S = 3.0
DRAIN_POLL_S = 0.1
#: WebSocket paths that are not realtime sessions (job event streams): never gated.
UNGATED_WS_PREFIXES: tuple[str, ...] = ("/v1/jobs/",)
#: HTTP routes that open a realtime session (its media then bypasses HAProxy): refused
#: while the node drains (when full, the node's own admission answers 429 as always).
SESSION_HTTP_PATHS: frozenset[str] = frozenset({"/v1/webrtc/offer"})

router = APIRouter()


def default_node_id(settings: Settings) -> str:
    """host:port, with the machine's name for a wildcard bind address."""
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else socket.gethostname()
    return f"{host}:{settings.port}"


def default_advertise_url(settings: Settings) -> str:
    """How other nodes reach this one when ``advertise_url`` is not set."""
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else socket.gethostname()
    return f"http://{host}:{settings.port}"


def preflight(url: str) -> str | None:
    """``None`` when Redis at ``url`` answers PING, else why not (for ``serve``'s exit)."""
    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=PREFLIGHT_TIMEOUT_S, socket_timeout=PREFLIGHT_TIMEOUT_S
        )
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError) as exc:
        return f"Redis at {url} is not reachable ({exc}); the cluster needs it to start."
    return None


class ClusterNode:
    """This process as a member of the cluster (see the module docstring)."""

    def __init__(self, state: AppState) -> None:
        settings = state.settings
        assert settings.redis_url, "cluster mode needs redis_url"
        self.state = state
        self.settings = settings
        self.node_id = settings.node_id or default_node_id(settings)
        self.url = settings.advertise_url or default_advertise_url(settings)
        self.service = JobService.of(state)
        self.backend = RedisJobBackend(self.service, settings.redis_url, self.node_id)
        self.registry = NodeRegistry(
            self.backend.r, self.node_id, self.describe, ttl_s=settings.cluster_node_ttl_s
        )
        self.files = RemoteFiles(
            self.node_id, settings.cluster_secret, self.backend.file_node, self._node_url
        )
        self.agent = (
            AgentServer(settings.host, settings.agent_port, self.agent_status)
            if settings.agent_port
            else None
        )
        self.open_sessions = 0
        self.draining = False
        self.started_at = time.time()
        self.drained_at: float | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._previous_sigterm: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -------------------------------------------------------------------

    @classmethod
    async def start(cls, state: AppState) -> ClusterNode:
        """Join the cluster (raises :class:`ClusterUnavailable` when Redis is down)."""
        node = cls(state)
        service = node.service
        service.worker_id = node.node_id
        service.backend = node.backend
        node.backend.file_fetcher = node.files
        await asyncio.to_thread(service.artifacts.ensure_dir)  # jobs from any node land here
        await node.backend.open()
        try:
            holder = await node.registry.node(node.node_id)
            if (
                holder is not None
                and holder.get("url") != node.url
                and time.time() - float(holder.get("updated_at", 0)) < node.registry.ttl_ms / 1000
            ):
                raise ClusterUnavailable(
                    f"Node id {node.node_id!r} is in use by {holder.get('url')}: give every "
                    "node its own --node-id."
                )
            await node.registry.publish()
        except ClusterUnavailable:
            await node.backend.aclose()
            raise
        except Exception as exc:
            await node.backend.aclose()
            raise ClusterUnavailable(f"Redis refused the node registry: {exc}") from exc
        node.registry.start()
        if node.agent is not None:
            await node.agent.start()
        state.extras[EXTRAS_KEY] = node
        state.extras.setdefault("readiness_checks", []).append(node.refuse_reason)
        with contextlib.suppress(ValueError):  # registered once per registry
            state.metrics.registry.register(ClusterCollector(node))
        node._install_sigterm()
        log.info(
            "cluster node %s (%s) joined via %s; job slots %d, session slots %d%s",
            node.node_id,
            node.url,
            _without_password(state.settings.redis_url),
            state.settings.max_running_jobs,
            state.settings.max_sessions,
            f", agent port {state.settings.agent_port}" if node.agent else "",
        )
        if not state.settings.cluster_secret and not state.settings.cluster_shared_artifacts:
            log.warning(
                "OMNISTREAM_CLUSTER_SECRET is not set: files written on other nodes cannot "
                "be fetched from this one (set it on every node, or share artifacts_dir)"
            )
        return node

    async def aclose(self) -> None:
        """Leave the cluster: jobs still here go back to the queue, the entry goes."""
        if self._drain_task is not None and not self._drain_task.done():
            self._drain_task.cancel()
        if self.agent is not None:
            await self.agent.aclose()
        await self.backend.release_all(running_too=True)
        await self.registry.aclose()
        await self.files.aclose()
        await self.backend.aclose()

    # -- capacity --------------------------------------------------------------------

    @property
    def session_slots(self) -> int:
        """Realtime sessions this node holds at most (``max_sessions``)."""
        return self.settings.max_sessions

    @property
    def sessions_in_use(self) -> int:
        """Realtime sessions open here: handshakes through the gate, or admitted ones."""
        return max(self.open_sessions, len(self.state.sessions.live()))

    def at_measured_capacity(self) -> bool:
        """Whether live sessions already use a resource's whole budget."""
        sessions = self.state.sessions
        planner = sessions.planner
        return any(
            used >= planner.budget(resource) for resource, used in sessions.load().items()
        )

    def refuse_reason(self) -> str | None:
        """Why a new session would be refused now (``None``: there is room)."""
        if self.draining:
            return "node is draining"
        used = self.sessions_in_use
        if used >= self.session_slots:
            return f"node is full ({used} of {self.session_slots} sessions)"
        if self.at_measured_capacity():
            return "node is at measured capacity"
        return None

    def agent_status(self) -> str:
        """The agent-check answer: ``drain`` or ``ready maxconn:<sessions it would hold>``."""
        if self.draining:
            return "drain"
        ceiling = self.session_slots
        if self.at_measured_capacity():
            ceiling = max(1, self.sessions_in_use)  # HAProxy: "maxconn:0" means no limit
        return f"ready maxconn:{ceiling}"

    def describe(self) -> dict[str, Any]:
        """This node's registry entry."""
        state = self.state
        planner = state.sessions.planner
        used = self.sessions_in_use
        return {
            "url": self.url,
            "version": __version__,
            "started_at": self.started_at,
            "draining": self.draining,
            "ready": self.refuse_reason() is None,
            "live_sessions": len(state.sessions.live()),
            "open_sessions": self.open_sessions,
            "session_slots": self.session_slots,
            "free_session_slots": 0 if self.draining else max(0, self.session_slots - used),
            "running_jobs": self.backend.running,
            "job_slots": self.backend.slots,
            "free_job_slots": self.backend.free_slots,
            "cores_in_use": round(state.sessions.load_cores(), 3),
            "cpu_budget": round(planner.budget_cores, 3),
            "loaded_models": [s.id for s in state.registry.specs() if state.engine.loaded(s.id)],
            "agent_port": self.settings.agent_port,
        }

    async def _node_url(self, node_id: str) -> str | None:
        entry = await self.registry.node(node_id)
        return None if entry is None else str(entry.get("url") or "") or None

    # -- drain -----------------------------------------------------------------------

    def _install_sigterm(self) -> None:
        """SIGTERM drains first (uvicorn's own handler runs once the drain is done)."""
        if threading.current_thread() is not threading.main_thread():
            return  # a server run inside a test thread: no signals
        self._loop = asyncio.get_running_loop()
        self._previous_sigterm = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self.draining or self._loop is None:  # a second SIGTERM: stop now
            self._shutdown()
            return
        self._loop.call_soon_threadsafe(self.begin_drain)

    def begin_drain(self) -> None:
        """Start draining (idempotent)."""
        if self._drain_task is None:
            self._drain_task = asyncio.create_task(self.drain(), name="cluster-drain")

    async def drain(self, *, exit_after: bool = True) -> None:
        """Stop taking work, let live work finish within the grace period, then exit."""
        started = time.monotonic()
        self.draining = True
        self.backend.draining = True
        log.info("node %s draining (grace %.0fs)", self.node_id, self.settings.drain_grace_s)
        with contextlib.suppress(Exception):
            await self.registry.publish()
        await self.backend.release_all(running_too=False)
        deadline = started + self.settings.drain_grace_s
        while time.monotonic() < deadline:
            if self.sessions_in_use == 0 and self.backend.running == 0:
                break
            await asyncio.sleep(DRAIN_POLL_S)
        if self.backend.running:
            log.info("node %s: grace period over, handing running jobs back", self.node_id)
            await self.backend.release_all(running_too=True)
        self.drained_at = time.monotonic()
        log.info("node %s drained in %.2fs", self.node_id, self.drained_at - started)
        with contextlib.suppress(Exception):
            await self.registry.aclose()
        if exit_after:
            self._shutdown()

    def _shutdown(self) -> None:
        previous = self._previous_sigterm
        if callable(previous):
            previous(signal.SIGTERM, None)  # uvicorn: graceful shutdown, exit as on SIGTERM
        else:
            signal.raise_signal(signal.SIGINT)


def _without_password(url: str | None) -> str:
    """A Redis URL fit for a log line: its password (``redis://:secret@host``) masked."""
    parts = urlsplit(url or "")
    if parts.password is None:
        return url or ""
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


# -- the session gate --------------------------------------------------------------------


class SessionGate:
    """Refuses realtime WebSocket handshakes with HTTP 503 when the node has no room.

    A refusal before the handshake completes is what lets HAProxy re-dispatch the
    session to another node (``retry-on 503``); a session already accepted is never cut.
    Job event streams are not sessions and pass untouched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") in SESSION_HTTP_PATHS:
            node = _node_of(scope)
            if node is not None and node.draining:
                await _refuse_http(send, "node is draining")
                return
        if scope["type"] != "websocket" or str(scope.get("path", "")).startswith(
            UNGATED_WS_PREFIXES
        ):
            await self.app(scope, receive, send)
            return
        node = _node_of(scope)
        if node is None:
            await self.app(scope, receive, send)
            return
        reason = node.refuse_reason()
        if reason is not None:
            node.state.metrics.sessions_refused.labels("websocket", "cluster_gate").inc()
            await _deny(scope, receive, send, reason)
            return
        node.open_sessions += 1
        try:
            await self.app(scope, receive, send)
        finally:
            node.open_sessions -= 1


def _node_of(scope: Scope) -> ClusterNode | None:
    app = scope.get("app")
    state = getattr(getattr(app, "state", None), "omni", None)
    if state is None:
        return None
    node = state.extras.get(EXTRAS_KEY)
    return node if isinstance(node, ClusterNode) else None


def _refusal(reason: str) -> bytes:
    return json.dumps(
        {
            "error": {
                "code": "capacity_exceeded",
                "message": f"No room on this node: {reason}. Retry (another node may have room).",
                "type": "service_unavailable",
            }
        }
    ).encode()


async def _refuse_http(send: Send, reason: str) -> None:
    body = _refusal(reason)
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"retry-after", b"5"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _deny(scope: Scope, receive: Receive, send: Send, reason: str) -> None:
    message = await receive()
    if message.get("type") != "websocket.connect":
        return
    body = _refusal(reason)
    if "websocket.http.response" in scope.get("extensions", {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"retry-after", b"5"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1013, "reason": "capacity_exceeded"})


# -- routes and metrics ------------------------------------------------------------------


@router.get("/v1/cluster/nodes")
async def cluster_nodes(request: Request) -> Response:
    """Every live node: sessions and slots, capacity, loaded models, drain state."""
    node = get_state(request).extras.get(EXTRAS_KEY)
    assert isinstance(node, ClusterNode)
    try:
        nodes = await node.registry.nodes()
    except (redis.RedisError, OSError) as exc:
        return JSONResponse(
            {"error": {"code": "cluster_unavailable", "message": str(exc),
                       "type": "service_unavailable"}},
            status_code=503,
        )
    return JSONResponse({"object": "list", "node_id": node.node_id, "data": nodes})


def install(app: FastAPI) -> None:
    """Add the cluster routes and the session gate (before the app starts)."""
    app.include_router(router)
    app.include_router(files_router)
    app.add_middleware(SessionGate)


class ClusterCollector(Collector):
    """Prometheus view of the queue and this node's capacity (read at scrape time)."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node

    def collect(self) -> Iterator[Any]:
        node = self.node
        counters = node.backend.counters
        depth = GaugeMetricFamily(
            "omnistream_cluster_queue_depth",
            "Jobs in the cluster queue not yet claimed by any node",
            labels=["class"],
        )
        pending = GaugeMetricFamily(
            "omnistream_cluster_queue_pending",
            "Jobs claimed by a node and not yet acknowledged (running or about to)",
            labels=["class"],
        )
        for cls, figures in sorted(counters.queue.items()):
            depth.add_metric([cls], figures.get("lag", 0))
            pending.add_metric([cls], figures.get("pending", 0))
        yield depth
        yield pending
        yield CounterMetricFamily(
            "omnistream_cluster_reclaims",
            "Jobs this node took over after their node stopped renewing its claim",
            value=counters.reclaims,
        )
        yield CounterMetricFamily(
            "omnistream_cluster_jobs_released",
            "Jobs this node handed back to the queue (drain)",
            value=counters.released,
        )
        yield CounterMetricFamily(
            "omnistream_cluster_failed_deliveries",
            "Jobs failed after cluster_max_deliveries starts",
            value=counters.failed_deliveries,
        )
        yield CounterMetricFamily(
            "omnistream_cluster_redis_errors",
            "Redis calls that failed",
            value=counters.redis_errors,
        )
        slots = GaugeMetricFamily(
            "omnistream_cluster_slots", "This node's slots", labels=["kind", "state"]
        )
        used_sessions = node.sessions_in_use
        slots.add_metric(["session", "used"], used_sessions)
        slots.add_metric(["session", "free"], max(0, node.session_slots - used_sessions))
        slots.add_metric(["job", "used"], node.backend.running)
        slots.add_metric(["job", "free"], node.backend.free_slots)
        yield slots
        yield GaugeMetricFamily(
            "omnistream_cluster_draining", "1 while this node drains", value=int(node.draining)
        )
