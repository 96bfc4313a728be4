"""Deliberately slow and broken servers for the bench harness tests (no tests here).

They are independent of omnistream on purpose: the harness must detect late chunks,
error replies, malformed VIDX and dropped connections from *any* server, so its
detection is tested against servers whose misbehaviour is exact and known.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from omnistream.codecs.framing import decode_audio, encode_video
from tests.server import free_port

SAMPLE_RATE = 16000


def tiny_jpeg(width: int, height: int) -> bytes:
    """A baseline JPEG of exactly ``width`` × ``height``."""
    out = io.BytesIO()
    Image.new("RGB", (width, height), (120, 90, 60)).save(out, "JPEG", quality=50)
    return out.getvalue()


@dataclass
class AvatarBehaviour:
    """How the fake avatar server (mis)behaves.

    Attributes:
        protocol: ``flashtalk`` or ``native``.
        chunk_samples, width, height, fps: default geometry (init keys override them).
        render_s: time spent on each chunk, serialised *per connection*.
        shared_render_s: time spent on each chunk, serialised across *all* connections
            (a server with one render thread: more sessions, more queueing).
        error_chunks: chunk indices answered with an error text frame instead of VIDX.
        malformed_chunks: chunk indices answered with a truncated VIDX.
        interleave_text: send a JSON text frame before every VIDX (FlashTalk violation).
        drop_after: close the connection after this many chunks.
        init_reply: ``ok``, ``garbage`` (a text that is not the expected reply),
            ``silent`` (never answer), ``error`` (an error event), ``missing_fields``.
        wrong_size: frames of a different size than init promised.
        ignore_close: never answer close (the harness must still finish).
    """

    protocol: str = "flashtalk"
    chunk_samples: int = 3200
    width: int = 64
    height: int = 96
    fps: int = 25
    render_s: float = 0.0
    shared_render_s: float = 0.0
    error_chunks: set[int] = field(default_factory=set)
    malformed_chunks: set[int] = field(default_factory=set)
    interleave_text: bool = False
    drop_after: int | None = None
    init_reply: str = "ok"
    wrong_size: bool = False
    ignore_close: bool = False


@dataclass
class FakeAvatarServer:
    """A websockets server in its own thread/loop; ``url`` is its ``ws://`` address."""

    behaviour: AvatarBehaviour
    port: int = 0
    connections: int = 0
    chunks_seen: int = 0
    inits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        path = "/v1/avatar/realtime" if self.behaviour.protocol == "native" else "/"
        return f"ws://127.0.0.1:{self.port}{path}"

    async def _handler(self, ws: ServerConnection) -> None:
        b = self.behaviour
        self.connections += 1
        geometry: dict[str, int] = {}
        replies: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()
        worker: asyncio.Task[None] | None = None
        chunk_index = 0

        async def render() -> None:
            jpeg_cache: dict[tuple[int, int], bytes] = {}
            while (item := await replies.get()) is not None:
                index, _pcm = item
                if b.render_s:
                    await asyncio.sleep(b.render_s)
                if b.shared_render_s:
                    async with self._render_lock:
                        await asyncio.sleep(b.shared_render_s)
                if index in b.error_chunks:
                    await ws.send(
                        json.dumps(
                            {
                                "type": "error",
                                "code": "runtime_error",
                                "message": f"Generate failed: fake failure on chunk {index}",
                            }
                        )
                    )
                    continue
                frames = geometry["chunk_samples"] * geometry["fps"] // SAMPLE_RATE
                w, h = geometry["width"], geometry["height"]
                if b.wrong_size:
                    w, h = w + 2, h + 2
                jpeg = jpeg_cache.setdefault((w, h), tiny_jpeg(w, h))
                message = encode_video([jpeg] * frames)
                if index in b.malformed_chunks:
                    message = message[:-7]
                if b.interleave_text or b.protocol == "native":
                    await ws.send(
                        json.dumps(
                            {
                                "type": "metrics",
                                "chunk_index": index,
                                "metrics": {
                                    "infer_ms": 1.0,
                                    "queue_ms": 0.5,
                                    "encode_ms": 0.2,
                                    "ttff_ms": 3.0,
                                    "first_video_chunk_ms": 3.0,
                                },
                            }
                        )
                    )
                await ws.send(message)
                if b.drop_after is not None and index + 1 >= b.drop_after:
                    await ws.close()
                    return

        try:
            async for message in ws:
                if isinstance(message, bytes):
                    pcm = decode_audio(message)
                    if len(pcm) != geometry.get("chunk_samples", -1) * 2:
                        await ws.send(json.dumps({"type": "error", "message": "bad length"}))
                        continue
                    self.chunks_seen += 1
                    replies.put_nowait((chunk_index, pcm))
                    chunk_index += 1
                    continue
                event = json.loads(message)
                kind = event.get("type")
                if kind in ("init", "session.create"):
                    self.inits.append(event)
                    image = event.get("ref_image") or event.get("inputs", {}).get("image_b64")
                    base64.b64decode(image, validate=True)
                    config = event if kind == "init" else event.get("config", {})
                    geometry = {
                        "chunk_samples": config.get("chunk_samples", b.chunk_samples),
                        "width": config.get("width", b.width),
                        "height": config.get("height", b.height),
                        "fps": config.get("fps", b.fps),
                    }
                    if b.init_reply == "silent":
                        continue
                    if b.init_reply == "garbage":
                        await ws.send(json.dumps({"hello": "I am not an avatar server"}))
                        continue
                    if b.init_reply == "error":
                        await ws.send(
                            json.dumps(
                                {
                                    "type": "error",
                                    "code": "runtime_error",
                                    "message": "Init failed: no GPU today",
                                }
                            )
                        )
                        continue
                    worker = worker or asyncio.create_task(render())
                    await ws.send(json.dumps(self._init_reply(kind, geometry)))
                elif kind in ("close", "session.close"):
                    if b.ignore_close:
                        continue
                    await ws.send(
                        json.dumps({"type": "close_ok" if kind == "close" else "session.closed"})
                    )
                elif kind == "ping":
                    await ws.send(json.dumps({"type": "pong"}))
        except ConnectionClosed:
            pass
        finally:
            if worker is not None:
                worker.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await worker

    def _init_reply(self, kind: str, g: dict[str, int]) -> dict[str, Any]:
        slice_len = g["chunk_samples"] * g["fps"] // SAMPLE_RATE
        if kind == "init":
            reply: dict[str, Any] = {
                "type": "init_ok",
                "frame_num": slice_len + 1,
                "motion_frames_num": 1,
                "slice_len": slice_len,
                "fps": g["fps"],
                "height": g["height"],
                "width": g["width"],
                "chunk_samples": g["chunk_samples"],
            }
            if self.behaviour.init_reply == "missing_fields":
                del reply["slice_len"], reply["width"]
            return reply
        return {
            "type": "session.created",
            "session_id": "avt_fake",
            "trace_id": "trace_fake",
            "model": "fake",
            "audio": {
                "format": "pcm_s16le",
                "sample_rate": SAMPLE_RATE,
                "channels": 1,
                "chunk_samples": g["chunk_samples"],
            },
            "video": {
                "encoding": "jpeg-seq",
                "wire_magic": "VIDX",
                "fps": g["fps"],
                "width": g["width"],
                "height": g["height"],
                "frame_count": slice_len,
                "motion_frames_num": 1,
            },
        }

    async def _main(self, ready: threading.Event, stop: asyncio.Event) -> None:
        self._render_lock = asyncio.Lock()
        async with serve(self._handler, "127.0.0.1", 0, max_size=2**24) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            ready.set()
            await stop.wait()


@contextlib.contextmanager
def fake_avatar_server(behaviour: AvatarBehaviour | None = None) -> Iterator[FakeAvatarServer]:
    """Run a :class:`FakeAvatarServer` for the duration of the block."""
    fake = FakeAvatarServer(behaviour or AvatarBehaviour())
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def run() -> None:
        loop.run_until_complete(fake._main(ready, stop))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("fake avatar server did not start")
    try:
        yield fake
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


# ------------------------------------------------------------------------------------------
# TTS


@dataclass
class TtsBehaviour:
    """How the fake TTS server (mis)behaves.

    Attributes:
        sample_rate: rate of the audio (and of the header).
        chunk_ms: audio per body chunk.
        rtf: time spent per chunk relative to its duration (>1: slower than real time).
        audio_ms: total audio per request.
        first_delay_s: extra delay before the first chunk.
        status: HTTP status to answer with instead of audio.
        send_header: send ``x-audio-sample-rate``.
        cut_after: chunks after which the body is cut (connection closed mid-stream).
        json_body: answer 200 with a JSON body instead of audio.
    """

    sample_rate: int = 24000
    chunk_ms: float = 40.0
    rtf: float = 0.0
    audio_ms: float = 400.0
    first_delay_s: float = 0.0
    status: int = 200
    send_header: bool = True
    cut_after: int | None = None
    json_body: bool = False
    requests: list[dict[str, Any]] = field(default_factory=list)


def fake_tts_app(b: TtsBehaviour) -> Starlette:
    """A Starlette app serving both TTS routes with behaviour ``b``."""

    async def handle(request: Request) -> Response:
        body = await request.json()
        b.requests.append({"path": request.url.path, "body": body})
        if b.status != 200:
            return JSONResponse(
                {"error": {"message": "fake overload", "type": "server_error", "code": "busy"}},
                status_code=b.status,
            )
        if b.json_body:
            return JSONResponse({"detail": "not audio"})
        rate = 24000 if request.url.path == "/v1/audio/speech" else b.sample_rate
        samples = int(rate * b.chunk_ms / 1000)
        chunk = b"\x01\x00" * samples
        n = max(1, round(b.audio_ms / b.chunk_ms))

        async def body_iter() -> AsyncIterator[bytes]:
            if b.first_delay_s:
                await asyncio.sleep(b.first_delay_s)
            for i in range(n):
                if b.cut_after is not None and i >= b.cut_after:
                    raise RuntimeError("fake: cut the body")
                if b.rtf:
                    await asyncio.sleep(b.chunk_ms / 1000 * b.rtf)
                yield chunk

        headers = {"x-audio-sample-rate": str(rate)} if b.send_header else {}
        return StreamingResponse(body_iter(), media_type="audio/L16; channels=1", headers=headers)

    return Starlette(
        routes=[
            Route("/v1/text2audio/stream", handle, methods=["POST"]),
            Route("/v1/audio/speech", handle, methods=["POST"]),
        ]
    )


@contextlib.contextmanager
def fake_tts_server(behaviour: TtsBehaviour | None = None) -> Iterator[str]:
    """Serve :func:`fake_tts_app` with uvicorn on a free port; yields the base URL."""
    b = behaviour or TtsBehaviour()
    port = free_port()
    config = uvicorn.Config(
        fake_tts_app(b), host="127.0.0.1", port=port, log_level="critical", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("fake TTS server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


# ------------------------------------------------------------------------------------------
# running the CLI and checking reports


def run_bench(args: list[str], out: Path) -> tuple[int, dict[str, Any] | None, str | None]:
    """Run ``omnistream bench …`` in-process; returns (exit status, report, markdown).

    Unless a test sets them, the client's own timing bounds are relaxed: a loaded CI box
    must not turn a test of server behaviour into a refusal (the refusal has its own test).
    """
    from omnistream.cli import main

    extra = []
    if args[0] == "avatar" and "--max-pacing-error-ms" not in args:
        extra = ["--max-pacing-error-ms", "1000"]
    if args[0] == "tts" and "--max-loop-lag-ms" not in args:
        extra = ["--max-loop-lag-ms", "1000"]
    if "--warmup" not in args:
        extra += ["--warmup", "0"]
    rc = main(["bench", *args, *extra, "--out", str(out), "--quiet"])
    report_path = out / "report.json"
    if not report_path.exists():
        return rc, None, None
    report = json.loads(report_path.read_text())
    return rc, report, (out / "summary.md").read_text()


def assert_ordered(stats: dict[str, Any]) -> None:
    """min ≤ p50 ≤ p95 ≤ p99 ≤ max, mean within [min, max] (when there is data)."""
    if not stats["count"]:
        assert stats["p50"] is None and stats["max"] is None
        return
    assert stats["min"] <= stats["p50"] <= stats["p95"] <= stats["p99"] <= stats["max"]
    assert stats["min"] <= stats["mean"] <= stats["max"]


def assert_avatar_run_consistent(run: dict[str, Any]) -> None:
    """A run's summary agrees with its own per-session series."""
    summary = run["summary"]
    chunk_s = (summary["chunk_ms"] or 0) / 1000
    answered = 0
    frames = 0
    for session in run["sessions"]:
        series = session["series"]
        ok = [c for c in series if c["latency_ms"] is not None]
        assert session["chunks_answered"] == len(ok)
        assert len(series) == session["chunks_planned"]
        assert session["frames_received"] == sum(c["frames"] for c in ok)
        assert session["late_chunks"] == sum(c["late"] for c in ok)
        for c in ok:
            # late means: complete after the next chunk was due (series are rounded to 0.1 ms)
            margin = c["arrival_s"] - (c["due_s"] + chunk_s)
            if abs(margin) > 1e-3:
                assert c["late"] == (margin > 0)
            assert c["arrival_s"] >= c["sent_s"] >= c["due_s"] - 1e-4
        if ok and session["ttff_ms"] is not None:
            assert session["ttff_ms"] >= ok[0]["latency_ms"] - 0.01
        for key in ("latency_ms", "jitter_ms", "frames_per_chunk", "pacing_ms"):
            assert_ordered(session[key])
        answered += len(ok)
        frames += session["frames_received"]
    assert summary["chunks_answered"] == answered
    assert summary["frames_received"] == frames
    assert summary["latency_ms"]["count"] == answered
    for key in ("latency_ms", "jitter_ms", "ttff_ms", "frames_per_chunk", "delivered_fps"):
        assert_ordered(summary[key])


def assert_report_complete(report: dict[str, Any], kind: str) -> None:
    """Versioned, with settings, machine, runs and a summary."""
    assert report["schema_version"] == "1.0.0"
    assert report["kind"] == kind
    for key in ("created_at", "tool", "machine", "settings", "summary", "runs"):
        assert report[key], key
    assert report["machine"]["cpu_count"] >= 1
    assert report["machine"]["python"]


def assert_png(path: Path) -> None:
    """The file is a PNG that PIL opens, of a plausible size."""
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG"
        assert img.size[0] > 200 and img.size[1] > 150
