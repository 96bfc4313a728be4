"""Concurrent, real-time-paced avatar sessions against a FlashTalk or native server.

Each session is one WebSocket client that initialises with a reference image, then sends
one ``AUDI`` chunk every chunk duration on an *absolute* schedule (chunk ``k`` is due at
``t0 + k·d``, so one late send never shifts the rest) while a receiver matches each
``VIDX`` to its chunk in order. What is measured, per PROTOCOLS §2/§3:

- **TTFF**: ``init`` (or ``session.create``) sent → first ``VIDX`` complete.
- **latency**: last byte of chunk ``k`` handed to the socket → its ``VIDX`` complete.
- **late**: ``VIDX k`` completes after chunk ``k+1`` is due (``t0 + (k+1)·d``): a player
  fed by this stream would have stalled.
- **jitter**: deviation of the ``VIDX`` inter-arrival time from the chunk duration, i.e.
  against the audio clock.
- **delivered fps**: frames of chunks 2…n over the time between their arrivals, the rate
  a viewer sees in steady state (the first chunk's arrival is TTFF's business).
- **client pacing**: how late the client itself woke up to send (its own scheduling
  error); a run whose client fell behind is refused by the CLI, because its figures
  would measure the client, not the server.

Every wait has a timeout; connection failures, error replies, malformed ``VIDX`` and
disconnects are counted in an :class:`ErrorLog`, never raised.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from omnistream.bench.audio import SAMPLE_RATE, ChunkSource
from omnistream.bench.errors import ErrorLog
from omnistream.bench.images import jpeg_size
from omnistream.bench.progress import Counters, Progress
from omnistream.bench.stats import client_slipped, describe
from omnistream.codecs.framing import FramingError, decode_video, encode_audio
from omnistream.codecs.pcm import FloatAudio

Protocol = Literal["flashtalk", "native"]

DEFAULT_CHUNK_SAMPLES = 17920
"""The FlashTalk reference geometry: ``slice_len 28 × 16000 / fps 25`` (1.12 s)."""
DEFAULT_PROMPT = (
    "A person is talking. Only the foreground characters are moving, the background remains static."
)
NATIVE_PATH = "/v1/avatar/realtime"
FLASHTALK_INIT_KEYS = ("frame_num", "motion_frames_num", "slice_len", "fps", "height", "width")
CLOSE_TIMEOUT_S = 5.0
LOOP_LAG_INTERVAL_S = 0.05


@dataclass
class AvatarScenario:
    """Everything that defines an avatar run (recorded verbatim in the report).

    Attributes:
        url: ``ws://host:port/…`` of the server.
        protocol: ``flashtalk`` (PROTOCOLS §2) or ``native`` (§3).
        sessions: concurrent sessions.
        duration_s: audio sent per session; rounded up to whole chunks.
        chunk_samples, width, height, fps: geometry asked of the server (None: its default).
        model: ``model`` field of ``session.create`` (native only).
        prompt, seed: sent in ``init`` / ``session.create``.
        connect_timeout_s: WebSocket opening handshake.
        init_timeout_s: ``init`` → ``init_ok`` (first init may load a model).
        response_timeout_s: longest wait for the ``VIDX`` of a sent chunk.
        stagger_s: delay between session starts; None spreads the starts over one chunk
            duration, as independent users would.
        late_tolerance: fraction of late chunks a session may have and still count as
            keeping up with real time.
        p95_bound_ms: p95 latency bound for "held"; None means one chunk duration.
        max_pacing_error_ms: send lateness of the client beyond which a send counts as
            slipped; more than 5 % slipped sends mean the client itself fell behind.
        ws_compression: offer permessage-deflate (what a default ``websockets`` client
            does) or not.
    """

    url: str
    protocol: Protocol = "flashtalk"
    sessions: int = 1
    duration_s: float = 10.0
    chunk_samples: int | None = None
    width: int | None = None
    height: int | None = None
    fps: int | None = None
    model: str = "flashtalk"
    prompt: str = DEFAULT_PROMPT
    seed: int = 9999
    connect_timeout_s: float = 10.0
    init_timeout_s: float = 60.0
    response_timeout_s: float = 30.0
    stagger_s: float | None = None
    late_tolerance: float = 0.0
    p95_bound_ms: float | None = None
    max_pacing_error_ms: float = 50.0
    ws_compression: bool = False

    def settings(self) -> dict[str, Any]:
        """The scenario as JSON-safe settings for the report."""
        return asdict(self)

    def target_url(self) -> str:
        """``url``, with the native route's path filled in when none was given."""
        if self.protocol != "native":
            return self.url
        parts = urlsplit(self.url)
        if parts.path in ("", "/"):
            return urlunsplit(parts._replace(path=NATIVE_PATH))
        return self.url

    @property
    def nominal_chunk_s(self) -> float:
        """Chunk duration before the server has confirmed the geometry."""
        return (self.chunk_samples or DEFAULT_CHUNK_SAMPLES) / SAMPLE_RATE


@dataclass
class ChunkRecord:
    """One AUDI chunk and its reply. Times are seconds since the run started."""

    index: int
    due_s: float
    sent_s: float | None = None
    pacing_ms: float | None = None
    behind_ms: float | None = None
    arrival_s: float | None = None
    latency_ms: float | None = None
    late: bool = False
    frames: int | None = None
    payload_bytes: int | None = None
    error: str | None = None
    server: dict[str, Any] | None = None


@dataclass
class SessionResult:
    """One session's series and its own summary."""

    session: int
    geometry: dict[str, Any] = field(default_factory=dict)
    init_ms: float | None = None
    ttff_ms: float | None = None
    chunks: list[ChunkRecord] = field(default_factory=list)
    errors: ErrorLog = field(default_factory=ErrorLog)
    disconnects: int = 0
    initialised: bool = False
    closed_cleanly: bool = False
    planned_chunks: int = 0

    # -- derived figures ---------------------------------------------------------------

    @property
    def chunk_s(self) -> float | None:
        """Chunk duration the server confirmed (None before init)."""
        samples = self.geometry.get("chunk_samples")
        return samples / SAMPLE_RATE if samples else None

    def answered(self) -> list[ChunkRecord]:
        """Chunks whose VIDX arrived intact."""
        return [c for c in self.chunks if c.latency_ms is not None]

    def keeps_up(self, late_tolerance: float) -> bool:
        """True when every planned chunk came back, without errors, and few enough late."""
        answered = self.answered()
        if not self.initialised or self.errors.total or len(answered) < self.planned_chunks:
            return False
        late = sum(c.late for c in answered)
        return late <= late_tolerance * max(1, len(answered))

    def summary(self) -> dict[str, Any]:
        """Per-session figures (see the module docstring for definitions)."""
        answered = self.answered()
        latencies = [c.latency_ms for c in answered if c.latency_ms is not None]
        frames = [c.frames or 0 for c in answered]
        arrivals = [c.arrival_s for c in answered if c.arrival_s is not None]
        chunk_s = self.chunk_s
        jitter: list[float] = []
        fps: float | None = None
        if chunk_s and len(arrivals) >= 2:
            gaps = np.diff(np.asarray(arrivals))
            jitter = [abs(g - chunk_s) * 1000 for g in gaps]
            span = arrivals[-1] - arrivals[0]
            if span > 0:
                fps = sum(frames[1:]) / span
        elif chunk_s and frames:
            fps = frames[0] / chunk_s
        expected_per_chunk = self.geometry.get("frames_per_chunk")
        return {
            "session": self.session,
            "initialised": self.initialised,
            "init_ms": self.init_ms,
            "ttff_ms": self.ttff_ms,
            "chunks_planned": self.planned_chunks,
            "chunks_sent": sum(c.sent_s is not None for c in self.chunks),
            "chunks_answered": len(answered),
            "late_chunks": sum(c.late for c in answered),
            "latency_ms": describe(latencies),
            "jitter_ms": describe(jitter),
            "delivered_fps": None if fps is None else round(fps, 2),
            "frames_received": sum(frames),
            "frames_expected": (
                None if expected_per_chunk is None else expected_per_chunk * len(answered)
            ),
            "frames_per_chunk": describe(frames),
            "payload_bytes": sum(c.payload_bytes or 0 for c in answered),
            "pacing_ms": describe(c.pacing_ms for c in self.chunks if c.pacing_ms is not None),
            "send_behind_chunks": sum(c.behind_ms is not None for c in self.chunks),
            "disconnects": self.disconnects,
            "closed_cleanly": self.closed_cleanly,
            "errors": self.errors.to_dict(),
        }

    def to_dict(self) -> dict[str, Any]:
        """The session's summary plus its per-chunk series."""
        out = self.summary()
        out["geometry"] = self.geometry
        out["series"] = [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(c).items()}
            for c in self.chunks
        ]
        return out


@dataclass
class AvatarRun:
    """All sessions of one run against one server, and the client's own health."""

    url: str
    label: str
    sessions: list[SessionResult]
    pacing_ms: list[float]
    loop_lag_ms: list[float]
    wall_s: float
    scenario: AvatarScenario

    def client_ok(self) -> tuple[bool, str]:
        """Whether the client kept its own send schedule.

        It did not when more than 5 % of its sends (and at least two) woke up later than
        ``max_pacing_error_ms`` after they were due (see :func:`client_slipped`).
        """
        bound = self.scenario.max_pacing_error_ms
        behind, over, total = client_slipped(self.pacing_ms, bound)
        if behind:
            stats = describe(self.pacing_ms)
            return False, (
                f"the benchmark client fell behind its own send schedule: {over} of {total} "
                f"sends were more than {bound:g} ms late (p99 {stats['p99']:.1f} ms, max "
                f"{stats['max']:.1f} ms); the machine running the client is overloaded, so "
                f"these figures would measure the client, not the server"
            )
        return True, "ok"

    def summary(self) -> dict[str, Any]:
        """Figures over every session of the run, and whether it held real time."""
        answered = [c for s in self.sessions for c in s.answered()]
        latencies = [c.latency_ms for c in answered if c.latency_ms is not None]
        per_session = [s.summary() for s in self.sessions]
        jitter = [
            abs(g - s.chunk_s) * 1000
            for s in self.sessions
            if s.chunk_s
            for g in np.diff([c.arrival_s for c in s.answered() if c.arrival_s is not None])
        ]
        fps = [p["delivered_fps"] for p in per_session if p["delivered_fps"] is not None]
        frames = [c.frames or 0 for c in answered]
        expected = [p["frames_expected"] for p in per_session if p["frames_expected"] is not None]
        chunk_s = next((s.chunk_s for s in self.sessions if s.chunk_s), None)
        bound = self.scenario.p95_bound_ms
        if bound is None and chunk_s:
            bound = chunk_s * 1000
        lat = describe(latencies)
        behind = [s.session for s in self.sessions if not s.keeps_up(self.scenario.late_tolerance)]
        client_ok, client_reason = self.client_ok()
        if not client_ok:
            held, reason = False, "client fell behind"
        elif behind:
            held, reason = False, _behind_reason(self.sessions, behind)
        elif lat["p95"] is not None and bound is not None and lat["p95"] > bound:
            held, reason = False, f"p95 {lat['p95']:.0f} ms > bound {bound:.0f} ms"
        else:
            held, reason = True, "all sessions kept real time"
        planned = sum(s.planned_chunks for s in self.sessions)
        return {
            "url": self.url,
            "label": self.label,
            "sessions": len(self.sessions),
            "sessions_initialised": sum(s.initialised for s in self.sessions),
            "sessions_behind": behind,
            "chunk_ms": None if chunk_s is None else round(chunk_s * 1000, 3),
            "chunks_planned": planned,
            "chunks_sent": sum(p["chunks_sent"] for p in per_session),
            "chunks_answered": len(answered),
            "late_chunks": sum(c.late for c in answered),
            "late_fraction": round(sum(c.late for c in answered) / max(1, len(answered)), 4),
            "ttff_ms": describe(s.ttff_ms for s in self.sessions if s.ttff_ms is not None),
            "init_ms": describe(s.init_ms for s in self.sessions if s.init_ms is not None),
            "latency_ms": lat,
            "jitter_ms": describe(jitter),
            "delivered_fps": describe(fps),
            "frames_received": sum(frames),
            "frames_expected": sum(expected) if expected else None,
            "frames_per_chunk": describe(frames),
            "payload_bytes": sum(c.payload_bytes or 0 for c in answered),
            "payload_bytes_per_chunk": describe(
                [float(c.payload_bytes or 0) for c in answered], digits=0
            ),
            "errors": ErrorLog.merged(s.errors for s in self.sessions).to_dict(),
            "disconnects": sum(s.disconnects for s in self.sessions),
            "p95_bound_ms": None if bound is None else round(bound, 1),
            "held": held,
            "held_reason": reason,
            "client": {
                "ok": client_ok,
                "reason": client_reason,
                "pacing_ms": describe(self.pacing_ms),
                "loop_lag_ms": describe(self.loop_lag_ms),
                "max_pacing_error_ms": self.scenario.max_pacing_error_ms,
            },
            "wall_s": round(self.wall_s, 3),
        }

    def to_dict(self) -> dict[str, Any]:
        """Summary plus every session's series."""
        return {"summary": self.summary(), "sessions": [s.to_dict() for s in self.sessions]}


# ------------------------------------------------------------------------------------------
# one session


class _Session:
    """Drives one WebSocket session; all state lives here so tasks can share it."""

    def __init__(
        self,
        index: int,
        scenario: AvatarScenario,
        audio: FloatAudio,
        ref_image_b64: str,
        run_t0: float,
        counters: Counters,
        pacing: list[float],
    ) -> None:
        self.sc = scenario
        self.audio = audio
        self.ref_image_b64 = ref_image_b64
        self.run_t0 = run_t0
        self.counters = counters
        self.pacing = pacing
        self.result = SessionResult(session=index)
        self.ws: ClientConnection | None = None
        self._progress = asyncio.Event()
        self._stop = False
        self._pending_server: dict[str, Any] | None = None

    def _now(self) -> float:
        return time.monotonic() - self.run_t0

    def _error(self, kind: str, message: str) -> None:
        self.result.errors.add(kind, message)
        self.counters.errors += 1

    async def run(self, start_delay: float) -> SessionResult:
        await asyncio.sleep(start_delay)
        self.counters.active += 1
        self.counters.started += 1
        try:
            await self._run()
        finally:
            self.counters.active -= 1
        return self.result

    async def _run(self) -> None:
        url = self.sc.target_url()
        try:
            ws = await connect(
                url,
                open_timeout=self.sc.connect_timeout_s,
                close_timeout=2.0,
                ping_interval=None,
                max_size=2**28,
                compression="deflate" if self.sc.ws_compression else None,
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI, ValueError) as exc:
            self._error("connect", f"{url}: {type(exc).__name__}: {exc}")
            return
        self.ws = ws
        try:
            if not await self._init():
                return
            await self._stream()
            if not self._stop:
                await self._close()
        except ConnectionClosed as exc:
            self.result.disconnects += 1
            self._error("disconnect", f"connection closed: {exc}")
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), CLOSE_TIMEOUT_S)

    # -- init --------------------------------------------------------------------------

    def _init_message(self) -> dict[str, Any]:
        geometry = {
            k: v
            for k, v in {
                "chunk_samples": self.sc.chunk_samples,
                "width": self.sc.width,
                "height": self.sc.height,
                "fps": self.sc.fps,
            }.items()
            if v is not None
        }
        if self.sc.protocol == "flashtalk":
            return {
                "type": "init",
                "ref_image": self.ref_image_b64,
                "prompt": self.sc.prompt,
                "seed": self.sc.seed,
                **geometry,
            }
        return {
            "type": "session.create",
            "model": self.sc.model,
            "backend": "auto",
            "inputs": {"image_b64": self.ref_image_b64, "prompt": self.sc.prompt},
            "config": geometry,
        }

    async def _init(self) -> bool:
        assert self.ws is not None
        ws = self.ws
        sent = time.monotonic()
        self._init_sent = sent
        await ws.send(json.dumps(self._init_message()))
        want = "init_ok" if self.sc.protocol == "flashtalk" else "session.created"
        deadline = sent + self.sc.init_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._error("init_timeout", f"no '{want}' within {self.sc.init_timeout_s:g} s")
                return False
            try:
                message = await asyncio.wait_for(ws.recv(), remaining)
            except TimeoutError:
                continue
            if isinstance(message, bytes):
                self._error("protocol", f"binary message ({len(message)} bytes) before '{want}'")
                return False
            try:
                event = json.loads(message)
            except ValueError:
                self._error("protocol", f"non-JSON reply to init: {message[:120]!r}")
                return False
            if not isinstance(event, dict):
                self._error("protocol", f"reply to init is not an object: {message[:120]!r}")
                return False
            kind = event.get("type")
            if kind == want:
                break
            if kind == "error":
                self._error("init_error", _error_text(event))
                return False
            if self.sc.protocol == "native" and kind in ("pong", "metrics"):
                continue
            self._error("protocol", f"expected '{want}', got {message[:160]!r}")
            return False
        self.result.init_ms = round((time.monotonic() - sent) * 1000, 3)
        geometry = _geometry(self.sc.protocol, event)
        if isinstance(geometry, str):
            self._error("protocol", geometry)
            return False
        self.result.geometry = geometry
        self.result.initialised = True
        return True

    # -- streaming ---------------------------------------------------------------------

    async def _stream(self) -> None:
        geometry = self.result.geometry
        chunk_samples = int(geometry["chunk_samples"])
        chunk_s = chunk_samples / SAMPLE_RATE
        n_chunks = max(1, math.ceil(self.sc.duration_s / chunk_s - 1e-9))
        self.result.planned_chunks = n_chunks
        self.counters.planned += n_chunks
        t0 = self._now()
        self.result.chunks = [
            ChunkRecord(index=k, due_s=round(t0 + k * chunk_s, 6)) for k in range(n_chunks)
        ]
        source = ChunkSource(self.audio, chunk_samples, offset=self.result.session * 7919)
        sender = asyncio.create_task(self._send_loop(source, t0, chunk_s))
        try:
            await self._receive_loop(t0, chunk_s)
        finally:
            if not sender.done():
                self._stop = True
                sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        if self._send_closed is not None:
            raise self._send_closed

    async def _send_loop(self, source: ChunkSource, t0: float, chunk_s: float) -> None:
        assert self.ws is not None
        previous_sent = -math.inf
        for record in self.result.chunks:
            if self._stop:
                return
            message = encode_audio(source.chunk(record.index))  # built before the deadline
            due = t0 + record.index * chunk_s
            # A few tries: uvloop's timers have whole-millisecond resolution, may wake a
            # little early, and return at once for a sub-millisecond sleep.
            for _ in range(5):
                delay = due - self._now()
                if delay <= 0:
                    break
                await asyncio.sleep(max(delay, 0.001))
            if previous_sent > due:
                # The previous send was still blocked when this chunk fell due: the
                # server (or the network) is not reading fast enough, not a client lag.
                record.behind_ms = round((self._now() - due) * 1000, 3)
            else:
                record.pacing_ms = round((self._now() - due) * 1000, 3)
                self.pacing.append(record.pacing_ms)
            if self._stop:
                return
            try:
                await self.ws.send(message)
            except ConnectionClosed as exc:
                self._send_closed = exc
                self._stop = True
                self._progress.set()
                return
            record.sent_s = previous_sent = self._now()
            self.counters.sent += 1
            self._progress.set()

    async def _receive_loop(self, t0: float, chunk_s: float) -> None:
        assert self.ws is not None
        ws = self.ws
        chunks = self.result.chunks
        timeout = self.sc.response_timeout_s
        nxt = 0
        while nxt < len(chunks) and not self._stop:
            record = chunks[nxt]
            if record.sent_s is None:
                # Nothing outstanding: wait for the sender (bounded: it sends on schedule).
                self._progress.clear()
                if chunks[nxt].sent_s is None:
                    wait = max(0.0, record.due_s - self._now()) + timeout
                    try:
                        await asyncio.wait_for(self._progress.wait(), wait)
                    except TimeoutError:
                        self._error("timeout", f"chunk {nxt} was never sent (sender stalled)")
                        return
                continue
            remaining = record.sent_s + timeout - self._now()
            if remaining <= 0:
                missing = len(chunks) - nxt
                self._error(
                    "timeout",
                    f"no reply to chunk {nxt} within {timeout:g} s ({missing} chunk(s) unanswered)",
                )
                self._stop = True
                return
            try:
                message = await asyncio.wait_for(ws.recv(), remaining)
            except TimeoutError:
                continue
            arrival = self._now()
            if isinstance(message, str):
                if self._on_text(message, record):
                    nxt += 1
                continue
            self._on_video(message, record, arrival, t0, chunk_s)
            nxt += 1

    def _on_text(self, message: str, record: ChunkRecord) -> bool:
        """Handle a text frame mid-stream; True when it answers (fails) ``record``."""
        try:
            event = json.loads(message)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            self._error("protocol", f"non-JSON text frame: {message[:120]!r}")
            return False
        kind = event.get("type")
        if kind == "error":
            text = _error_text(event)
            record.error = text
            self._error("server_error", f"chunk {record.index}: {text}")
            return True
        if self.sc.protocol == "native":
            if kind == "metrics" and isinstance(event.get("metrics"), dict):
                self._pending_server = event["metrics"]
            return False
        # PROTOCOLS §2: no JSON may be interleaved on the FlashTalk route.
        self._error("protocol", f"text frame interleaved on the FlashTalk route: {message[:120]!r}")
        return False

    def _on_video(
        self, message: bytes, record: ChunkRecord, arrival: float, t0: float, chunk_s: float
    ) -> None:
        try:
            frames = decode_video(message)
        except FramingError as exc:
            record.error = f"{exc.code}: {exc}"
            self._error("malformed_vidx", f"chunk {record.index}: {exc.code}: {exc}")
            return
        sent = record.sent_s if record.sent_s is not None else arrival
        record.arrival_s = round(arrival, 6)
        record.latency_ms = round(max(0.0, arrival - sent) * 1000, 3)
        record.late = arrival > t0 + (record.index + 1) * chunk_s
        record.frames = len(frames)
        record.payload_bytes = len(message)
        record.server, self._pending_server = self._pending_server, None
        if self.result.ttff_ms is None and self._init_sent is not None:
            self.result.ttff_ms = round((arrival + self.run_t0 - self._init_sent) * 1000, 3)
        self.counters.received += 1
        self.counters.late += record.late
        self.counters.last_latency_ms = record.latency_ms
        want = (self.result.geometry.get("width"), self.result.geometry.get("height"))
        if frames and None not in want:
            size = jpeg_size(frames[0])
            if size != want:
                self._error(
                    "frame_size",
                    f"chunk {record.index}: frame is {size} (not a JPEG if None), "
                    f"init promised {want}",
                )

    async def _close(self) -> None:
        assert self.ws is not None
        ws = self.ws
        if self.sc.protocol == "flashtalk":
            request, want = {"type": "close"}, "close_ok"
        else:
            request, want = {"type": "session.close"}, "session.closed"
        await ws.send(json.dumps(request))
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                message = await asyncio.wait_for(ws.recv(), remaining)
            except TimeoutError:
                break
            if isinstance(message, str):
                with contextlib.suppress(ValueError, AttributeError):
                    if json.loads(message).get("type") == want:
                        self.result.closed_cleanly = True
                        return
        self._error("close", f"no '{want}' within {CLOSE_TIMEOUT_S:g} s of '{request['type']}'")

    _init_sent: float | None = None
    _send_closed: ConnectionClosed | None = None


def _behind_reason(sessions: list[SessionResult], behind: list[int]) -> str:
    """Say why sessions did not keep real time: late chunks, unanswered chunks, errors."""
    picked = [s for s in sessions if s.session in behind]
    failed = sum(1 for s in picked if not s.initialised)
    errors = sum(1 for s in picked if s.initialised and s.errors.total)
    missing = sum(1 for s in picked if s.initialised and len(s.answered()) < s.planned_chunks)
    late = sum(1 for s in picked if any(c.late for c in s.answered()))
    parts = [
        f"{n} {what}"
        for n, what in (
            (late, "with late chunks"),
            (missing, "with unanswered chunks"),
            (errors, "with errors"),
            (failed, "that never started"),
        )
        if n
    ]
    return f"{len(behind)} of {len(sessions)} session(s) fell behind: " + ", ".join(parts)


def _error_text(event: dict[str, Any]) -> str:
    code = event.get("code")
    message = event.get("message")
    return f"[{code}] {message}" if code else str(message)


def _geometry(protocol: Protocol, event: dict[str, Any]) -> dict[str, Any] | str:
    """Geometry from ``init_ok`` / ``session.created``, or a description of what is wrong."""
    if protocol == "flashtalk":
        missing = [k for k in FLASHTALK_INIT_KEYS if not isinstance(event.get(k), int)]
        if missing:
            return f"init_ok lacks integer field(s) {missing} that FlashTalk clients read"
        fps, slice_len = event["fps"], event["slice_len"]
        chunk_samples = event.get("chunk_samples")
        if not isinstance(chunk_samples, int) or chunk_samples <= 0:
            chunk_samples = slice_len * SAMPLE_RATE // fps if fps else 0
        if chunk_samples <= 0:
            return f"init_ok gives no usable chunk size (fps={fps}, slice_len={slice_len})"
        return {
            "chunk_samples": chunk_samples,
            "fps": fps,
            "width": event["width"],
            "height": event["height"],
            "slice_len": slice_len,
            "frame_num": event["frame_num"],
            "motion_frames_num": event["motion_frames_num"],
            "frames_per_chunk": round(chunk_samples * fps / SAMPLE_RATE),
        }
    audio, video = event.get("audio"), event.get("video")
    if not isinstance(audio, dict) or not isinstance(video, dict):
        return "session.created lacks the 'audio' and 'video' objects"
    chunk_samples = audio.get("chunk_samples")
    fps = video.get("fps")
    if not isinstance(chunk_samples, int) or chunk_samples <= 0 or not isinstance(fps, int):
        return f"session.created has no usable chunk_samples/fps: {audio} {video}"
    frame_count = video.get("frame_count")
    return {
        "chunk_samples": chunk_samples,
        "fps": fps,
        "width": video.get("width"),
        "height": video.get("height"),
        "session_id": event.get("session_id"),
        "model": event.get("model"),
        "frames_per_chunk": (
            frame_count
            if isinstance(frame_count, int)
            else round(chunk_samples * fps / SAMPLE_RATE)
        ),
    }


# ------------------------------------------------------------------------------------------
# runs


async def _watch_loop_lag(samples: list[float]) -> None:
    """Record how late the client's own event loop runs a timer."""
    loop = asyncio.get_running_loop()
    while True:
        expected = loop.time() + LOOP_LAG_INTERVAL_S
        await asyncio.sleep(LOOP_LAG_INTERVAL_S)
        samples.append(round(max(0.0, loop.time() - expected) * 1000, 3))


async def run_avatar(
    scenario: AvatarScenario,
    audio: FloatAudio,
    ref_image: bytes,
    label: str = "A",
    progress: bool = False,
) -> AvatarRun:
    """Run ``scenario.sessions`` concurrent sessions and collect their results.

    Never raises for server misbehaviour: it ends up in the sessions' error logs.
    """
    ref_b64 = base64.b64encode(ref_image).decode("ascii")
    n = scenario.sessions
    counters = Counters(sessions=n)
    pacing: list[float] = []
    lag: list[float] = []
    stagger = scenario.stagger_s
    if stagger is None:
        stagger = scenario.nominal_chunk_s / n if n > 1 else 0.0
    run_t0 = time.monotonic()
    sessions = [_Session(i, scenario, audio, ref_b64, run_t0, counters, pacing) for i in range(n)]
    # Hard ceiling on the whole run: every wait inside is bounded already, this only
    # guards against a bug turning into a hang.
    budget = (
        stagger * n
        + scenario.connect_timeout_s
        + scenario.init_timeout_s
        + scenario.duration_s * 2
        + scenario.response_timeout_s
        + CLOSE_TIMEOUT_S * 2
        + 30
    )
    display = Progress(
        f"avatar {scenario.protocol} N={n} [{label}]",
        counters,
        total_s=scenario.duration_s + stagger * n,
        enabled=progress,
    )
    lag_task = asyncio.create_task(_watch_loop_lag(lag))
    try:
        async with display.running():
            tasks = [asyncio.create_task(s.run(i * stagger)) for i, s in enumerate(sessions)]
            _done, pending = await asyncio.wait(tasks, timeout=budget)
            for task in pending:
                task.cancel()
            for session, task in zip(sessions, tasks, strict=True):
                if task in pending:
                    session.result.errors.add(
                        "timeout", f"session exceeded the {budget:.0f} s budget"
                    )
                elif task.exception() is not None:
                    exc = task.exception()
                    session.result.errors.add("client", f"{type(exc).__name__}: {exc}")
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
    finally:
        lag_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await lag_task
    return AvatarRun(
        url=scenario.target_url(),
        label=label,
        sessions=[s.result for s in sessions],
        pacing_ms=pacing,
        loop_lag_ms=lag,
        wall_s=time.monotonic() - run_t0,
        scenario=scenario,
    )


@dataclass
class RampResult:
    """The steps of a ramp and the largest session count that held real time."""

    steps: list[AvatarRun]
    max_sessions_held: int
    stop_reason: str

    def summary(self) -> dict[str, Any]:
        """One row per step plus the verdict."""
        return {
            "max_sessions_held": self.max_sessions_held,
            "stop_reason": self.stop_reason,
            "steps": [
                {
                    "sessions": run.scenario.sessions,
                    "held": s["held"],
                    "held_reason": s["held_reason"],
                    "ttff_p50_ms": s["ttff_ms"]["p50"],
                    "latency_ms": s["latency_ms"],
                    "late_chunks": s["late_chunks"],
                    "chunks_answered": s["chunks_answered"],
                    "chunks_planned": s["chunks_planned"],
                    "delivered_fps_min": s["delivered_fps"]["min"],
                    "errors": s["errors"]["total"],
                    "client_ok": s["client"]["ok"],
                }
                for run in self.steps
                for s in [run.summary()]
            ],
        }


def ramp_sequence(start: int, limit: int, factor: float, step: int) -> list[int]:
    """Session counts a ramp tries before refining: geometric by ``factor`` or by ``step``."""
    out: list[int] = []
    n = max(1, start)
    while n <= limit:
        out.append(n)
        n = n + step if step > 0 else max(n + 1, math.ceil(n * factor))
    if not out or out[-1] < limit:
        out.append(limit)
    return out


async def run_ramp(
    scenario: AvatarScenario,
    audio: FloatAudio,
    ref_image: bytes,
    start: int = 1,
    limit: int = 64,
    factor: float = 2.0,
    step: int = 0,
    refine: int = 3,
    label: str = "A",
    progress: bool = False,
    on_step: Callable[[AvatarRun], Awaitable[None] | None] | None = None,
) -> RampResult:
    """Raise the session count until a step fails, then bisect towards the limit.

    A step *holds* when every session kept real time (all chunks answered, no errors,
    late chunks within tolerance) and p95 latency stayed under the bound. When the client
    itself fell behind, the ramp stops without refining: that step says nothing about
    the server.
    """
    steps: list[AvatarRun] = []
    best = 0
    failed: int | None = None
    reason = f"reached the limit of {limit} sessions"

    async def attempt(n: int) -> bool:
        nonlocal reason
        sc = AvatarScenario(**{**scenario.settings(), "sessions": n})
        run = await run_avatar(sc, audio, ref_image, label=label, progress=progress)
        steps.append(run)
        if on_step is not None:
            maybe = on_step(run)
            if maybe is not None:
                await maybe
        summary = run.summary()
        if not summary["client"]["ok"]:
            late = summary["late_chunks"]
            server = f"; the server also had {late} late chunk(s) at that step" if late else ""
            reason = f"N={n}: {summary['client']['reason']}{server}"
            raise _ClientBehind
        if not summary["held"]:
            reason = f"N={n}: {summary['held_reason']}"
        return bool(summary["held"])

    try:
        for n in ramp_sequence(start, limit, factor, step):
            if await attempt(n):
                best = n
            else:
                failed = n
                break
        while failed is not None and refine > 0 and failed - best > 1:
            refine -= 1
            mid = (best + failed) // 2
            if await attempt(mid):
                best = mid
            else:
                failed = mid
        if failed is not None:
            reason = f"N={failed} did not hold ({reason.split(': ', 1)[-1]})"
    except _ClientBehind:
        pass
    return RampResult(steps=steps, max_sessions_held=best, stop_reason=reason)


class _ClientBehind(Exception):
    """Raised inside a ramp when the client's own pacing made a step meaningless."""
