"""The native realtime avatar WebSocket, ``WS /v1/avatar/realtime`` (PROTOCOLS §3).

JSON control plane with structured errors, media in the same ``AUDI``/``VIDX`` framing,
and a ``metrics`` event before every ``VIDX``. A reader task handles control messages the
moment they arrive, so ``session.cancel`` drops work that is still queued on the runner;
audio goes through a small bounded queue to a processor task that renders in order.

Unlike the FlashTalk route, ``AUDI`` chunks may have any whole number of samples up to
``max_chunk_samples``: the session's sample clock decides how many frames each carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from fastapi import APIRouter
from starlette.websockets import WebSocket

from omnistream.codecs.framing import AUDIO_MAGIC, encode_video
from omnistream.codecs.image import ImageError, decode_base64
from omnistream.engine.registry import CheckpointRefused, ModelUnavailable
from omnistream.engine.runner import StaleWork
from omnistream.sessions.avatar import (
    AvatarSession,
    ChunkGeometry,
    ConfigError,
    SessionInactive,
    SetupAbandoned,
)
from omnistream.sessions.manager import CapacityExceeded
from omnistream.transports.state import AppState, ModelAccessError, get_state
from omnistream.transports.ws_common import (
    OFFLOAD_BYTES,
    ClientGone,
    client_gone,
    close_quietly,
    off_loop,
    parse_json,
    receive,
    send_bytes,
    send_json,
)

log = logging.getLogger(__name__)

router = APIRouter()

ROUTE = "native"
#: ASGI scope key a Runtime Profile's avatar listener sets to the model of its port.
PORT_MODEL_SCOPE_KEY = "omnistream.port_model"
AUDIO_QUEUE_CHUNKS = 2  # chunks waiting behind the one rendering: back-pressure past this


class NativeConnection:
    """One native-protocol connection: at most one session at a time."""

    def __init__(self, ws: WebSocket, state: AppState) -> None:
        self.ws = ws
        self.state = state
        self.session: AvatarSession | None = None
        self.timeout = state.settings.send_timeout_s
        self.audio: asyncio.Queue[tuple[AvatarSession, bytes]] = asyncio.Queue(AUDIO_QUEUE_CHUNKS)
        self._send_lock = asyncio.Lock()

    # -- events --------------------------------------------------------------------

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """The common envelope every server event carries."""
        s = self.session
        body: dict[str, Any] = {
            "type": kind,
            "session_id": s.id if s else None,
            "trace_id": s.trace_id if s else None,
            "model": s.model_id if s else None,
            "chunk_index": None,
            "metrics": None,
            "code": None,
            "message": None,
        }
        body.update(fields)
        return body

    async def emit(self, payload: dict[str, Any]) -> None:
        async with self._send_lock:
            await send_json(self.ws, payload, self.timeout)

    async def error(self, code: str, message: str, **fields: Any) -> None:
        self.state.metrics.protocol_errors.labels(ROUTE, code).inc()
        await self.emit(self.event("error", code=code, message=message, **fields))

    # -- main loops ----------------------------------------------------------------

    async def run(self) -> None:
        processor = asyncio.create_task(self.process_audio(), name="native-audio")
        try:
            await self.read()
        except ClientGone:
            pass
        finally:
            processor.cancel()
            with contextlib.suppress(asyncio.CancelledError, ClientGone):
                await processor
            if self.session is not None:
                self.session.close()
                self.session = None
            await close_quietly(self.ws)

    async def read(self) -> None:
        limit = self.state.settings.max_message_bytes
        while True:
            msg = await receive(self.ws)
            if msg.size > limit:
                await self.error(
                    "message_too_large", f"Message too large: {msg.size} bytes (limit {limit})."
                )
            elif msg.data is not None:
                await self.on_audio(msg.data)
            else:
                await self.on_text(msg.text or "")

    async def process_audio(self) -> None:
        while True:
            session, payload = await self.audio.get()
            if not session.active:
                await self.error("session_cancelled", f"Session {session.id} is {session.state}.")
                continue
            try:
                out = await session.render_chunk(payload)
            except (StaleWork, SessionInactive):
                if session is self.session:
                    await self.error(
                        "session_cancelled", "Chunk dropped: the session was cancelled."
                    )
                continue
            except Exception as exc:
                log.exception("render failed for %s", session.id)
                await self.error("runtime_error", f"Generate failed: {exc}")
                continue
            metrics = {
                "ttff_ms": round(session.first_chunk_ms or 0.0, 2),
                "first_video_chunk_ms": round(session.first_chunk_ms or 0.0, 2),
                "queue_ms": round(out.queue_ms, 2),
                "infer_ms": round(out.infer_ms, 2),
                "encode_ms": round(out.encode_ms, 2),
                "total_ms": round(out.total_ms, 2),
                "frames": len(out.jpegs),
                "batch_size": out.batch_size,
                "late": out.late,
            }
            if out.batch_frames is not None:
                metrics["batch_frames"] = out.batch_frames
            async with self._send_lock:
                await send_json(
                    self.ws,
                    self.event("metrics", chunk_index=out.chunk_index, metrics=metrics),
                    self.timeout,
                )
                await send_bytes(self.ws, encode_video(out.jpegs), self.timeout)

    # -- handlers ------------------------------------------------------------------

    async def on_text(self, text: str) -> None:
        if len(text) > OFFLOAD_BYTES and client_gone(self.ws):
            # An init with a reference image from a client that already left (a storm of
            # aborted connections): parsing and decoding it would only steal live CPU.
            raise ClientGone()
        request = await off_loop(parse_json, text, size=len(text))
        if request is None:
            await self.error("bad_json", "Invalid JSON")
            return
        kind = request.get("type")
        if kind == "session.create":
            await self.on_create(request)
        elif kind == "session.cancel":
            await self.on_cancel()
        elif kind == "session.close":
            await self.on_close()
        elif kind == "ping":
            await self.emit(self.event("pong"))
        else:
            await self.error("unsupported_message", f"Unknown message type: {kind}")

    async def on_create(self, request: dict[str, Any]) -> None:
        settings = self.state.settings
        # A Runtime Profile's avatar port names its own model (the server default elsewhere).
        default_model = self.ws.scope.get(PORT_MODEL_SCOPE_KEY) or settings.avatar_model
        model_id = request.get("model") or default_model
        backend = request.get("backend") or "auto"
        inputs = request.get("inputs")
        config = request.get("config")
        inputs = {} if inputs is None else inputs
        config = {} if config is None else config
        if not isinstance(model_id, str) or not isinstance(backend, str):
            await self.error("bad_config", "'model' and 'backend' must be strings.")
            return
        if not isinstance(inputs, dict) or not isinstance(config, dict):
            await self.error("bad_config", "'inputs' and 'config' must be objects.")
            return
        if model_id in settings.avatar_model_aliases:
            model_id = default_model
        image: bytes | None = None
        if "image_b64" in inputs and inputs["image_b64"] is not None:
            raw = inputs["image_b64"]
            if raw == "":
                await self.error("missing_image", "'inputs.image_b64' is empty.")
                return
            if not isinstance(raw, str):
                await self.error("bad_image_base64", "'inputs.image_b64' must be a base64 string.")
                return
            try:
                image = await off_loop(decode_base64, raw, settings.max_image_bytes, size=len(raw))
            except ImageError as exc:
                await self.error(exc.code, str(exc))
                return
        try:
            geometry = ChunkGeometry.from_config(config, settings)
        except ConfigError as exc:
            await self.error("bad_config", str(exc))
            return
        if self.session is not None:
            await self.on_close()
        model_path = config.get("model_path")
        try:
            _, checkpoint = self.state.resolve_checkpoint(model_id, "audio2video", model_path)
            session = await self.state.avatars.open(
                model_id,
                geometry,
                image,
                backend=backend,
                checkpoint=checkpoint,
                abandoned=lambda: client_gone(self.ws),
            )
        except SetupAbandoned as exc:
            raise ClientGone() from exc
        except ModelAccessError as exc:
            await self.error(exc.code, exc.message)
            return
        except CheckpointRefused as exc:
            await self.error("bad_config", str(exc))
            return
        except CapacityExceeded as exc:
            await self.error("capacity_exceeded", str(exc), retry_after_s=exc.retry_after_s)
            return
        except ImageError as exc:
            await self.error("bad_image_base64" if exc.code == "bad_image" else exc.code, str(exc))
            return
        except (ModelUnavailable, KeyError, ValueError, RuntimeError) as exc:
            await self.error("runtime_error", f"Init failed: {exc}")
            return
        prompt = inputs.get("prompt")
        if isinstance(prompt, str) and prompt:
            session.prompt = prompt
        session.on_expire = self._expired
        self.session = session
        g = geometry
        await self.emit(
            self.event(
                "session.created",
                audio={
                    "format": "pcm_s16le",
                    "sample_rate": g.sample_rate,
                    "channels": 1,
                    "chunk_samples": g.chunk_samples,
                },
                video={
                    "encoding": "jpeg-seq",
                    "wire_magic": "VIDX",
                    "fps": g.fps,
                    "width": g.width,
                    "height": g.height,
                    "frame_count": g.slice_len,
                    "motion_frames_num": g.motion_frames_num,
                },
                reference=session.reference.info,
                # A Runtime Profile's degrade_to served the model the client asked for.
                **({"degraded_from": model_id} if session.model_id != model_id else {}),
            )
        )

    async def _expired(self, reason: str) -> None:
        with contextlib.suppress(ClientGone):
            await self.emit(self.event("finish", message=reason, metrics=self._summary()))
        self.session = None
        await close_quietly(self.ws, 1001)

    def _summary(self) -> dict[str, Any]:
        s = self.session
        if s is None:
            return {}
        return {
            "chunks": s.chunks_out,
            "frames": s.frames_out,
            "audio_s": round(s.samples_in / s.geometry.sample_rate, 3),
            "ttff_ms": round(s.first_chunk_ms or 0.0, 2),
        }

    async def on_cancel(self) -> None:
        session = self.session
        if session is None:
            await self.error("session_required", "No active session. Send 'session.create' first.")
            return
        session.cancel()
        # Report what was delivered before the cancel: the client's played position.
        await self.emit(self.event("session.cancelled", metrics=self._summary()))
        await self.emit(self.event("finish", metrics=self._summary(), message="cancelled"))

    async def on_close(self) -> None:
        session = self.session
        if session is None:
            await self.error("session_required", "No active session. Send 'session.create' first.")
            return
        was_active = session.active
        session.close()
        if was_active:
            await self.emit(self.event("finish", metrics=self._summary(), message="closed"))
        await self.emit(self.event("session.closed"))
        self.session = None

    async def on_audio(self, data: bytes) -> None:
        if data[:4] != AUDIO_MAGIC:
            await self.error("bad_audio_magic", "Binary message must start with 'AUDI' magic.")
            return
        session = self.session
        if session is None:
            await self.error("session_required", "No active session. Send 'session.create' first.")
            return
        if not session.active:
            await self.error("session_cancelled", f"Session {session.id} is {session.state}.")
            return
        payload = data[4:]
        limit = self.state.settings.max_chunk_samples * 2
        if not payload or len(payload) % 2 or len(payload) > limit:
            await self.error(
                "bad_audio_chunk",
                f"AUDI payload must be 2 to {limit} bytes of int16 PCM, got {len(payload)}.",
            )
            return
        await self.audio.put((session, payload))


@router.websocket("/v1/avatar/realtime")
async def realtime_ws(websocket: WebSocket) -> None:
    """Native realtime avatar protocol."""
    state = get_state(websocket)
    await websocket.accept()
    await NativeConnection(websocket, state).run()
