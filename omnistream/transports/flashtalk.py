"""The FlashTalk-compatible avatar WebSocket (PROTOCOLS §2), for existing clients as-is.

Routes ``WS /``, ``WS /v1/audio2video/{model}`` and the legacy ``WS /v1/avatar/{model}``.
One session per connection. Each ``AUDI`` message gets exactly one binary ``VIDX`` reply
and nothing else, because clients do one ``recv()`` per send and treat a text frame as an
error; errors are text frames whose ``message`` strings clients match on verbatim.

Messages are handled one at a time in arrival order, like the reference server: a client
that floods is slowed by TCP back-pressure (uvicorn's small inbound queue), and a client
that stops reading is dropped after ``send_timeout_s``, so memory stays flat either way.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter
from starlette.websockets import WebSocket

from omnistream.codecs.framing import AUDIO_MAGIC, encode_video
from omnistream.codecs.image import ImageError, decode_base64
from omnistream.engine.registry import CheckpointRefused, ModelUnavailable
from omnistream.engine.runner import StaleWork
from omnistream.sessions.avatar import (
    DEFAULT_PROMPT,
    DEFAULT_SEED,
    AvatarSession,
    ChunkGeometry,
    ConfigError,
    SetupAbandoned,
)
from omnistream.sessions.manager import CapacityExceeded
from omnistream.transports.state import AppState, ModelAccessError, get_state
from omnistream.transports.ws_common import (
    OFFLOAD_BYTES,
    ClientGone,
    client_gone,
    close_quietly,
    deny_unless_allowed,
    off_loop,
    parse_json,
    receive,
    send_bytes,
    send_json,
)

log = logging.getLogger(__name__)

router = APIRouter()

ROUTE = "flashtalk"
GEOMETRY_KEYS = frozenset(ChunkGeometry().as_dict())

NO_SESSION = "No active session. Send 'init' first."
BAD_MAGIC = "Binary message must start with 'AUDI' magic."


class FlashTalkConnection:
    """State and handlers of one FlashTalk connection."""

    def __init__(self, ws: WebSocket, state: AppState, model_id: str) -> None:
        self.ws = ws
        self.state = state
        self.model_id = model_id
        self.session: AvatarSession | None = None
        self.timeout = state.settings.send_timeout_s

    async def error(self, message: str, code: str) -> None:
        self.state.metrics.protocol_errors.labels(ROUTE, code).inc()
        await send_json(self.ws, {"type": "error", "message": message, "code": code}, self.timeout)

    async def run(self) -> None:
        limit = self.state.settings.max_message_bytes
        try:
            while True:
                msg = await receive(self.ws)
                if msg.size > limit:
                    await self.error(
                        f"Message too large: {msg.size} bytes (limit {limit}).", "message_too_large"
                    )
                elif msg.data is not None:
                    await self.on_audio(msg.data)
                else:
                    await self.on_text(msg.text or "")
        except ClientGone:
            pass
        finally:
            self.drop_session()
            await close_quietly(self.ws)

    def drop_session(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    async def on_text(self, text: str) -> None:
        if len(text) > OFFLOAD_BYTES and client_gone(self.ws):
            # An init with a reference image from a client that already left (a storm of
            # aborted connections): parsing and decoding it would only steal live CPU.
            raise ClientGone()
        request = await off_loop(parse_json, text, size=len(text))
        if request is None:
            await self.error("Invalid JSON", "bad_json")
            return
        kind = request.get("type")
        if kind == "init":
            await self.on_init(request)
        elif kind == "close":
            self.drop_session()
            await send_json(self.ws, {"type": "close_ok"}, self.timeout)
        elif kind == "ping":
            await send_json(self.ws, {"type": "pong"}, self.timeout)
        elif kind == "config_update":
            await self.on_config_update(request)
        else:
            await self.error(f"Unknown message type: {kind}", "unsupported_message")

    async def on_init(self, request: dict[str, Any]) -> None:
        ref = request.get("ref_image")
        if ref is None or ref == "":
            await self.error("Missing 'ref_image' field.", "missing_image")
            return
        settings = self.state.settings
        if not isinstance(ref, str):
            await self.error("Invalid base64 in 'ref_image'.", "bad_image_base64")
            return
        try:
            image = await off_loop(decode_base64, ref, settings.max_image_bytes, size=len(ref))
        except ImageError as exc:
            if exc.code == "image_too_large":
                await self.error(f"Init failed: {exc}", exc.code)
            else:
                await self.error("Invalid base64 in 'ref_image'.", "bad_image_base64")
            return
        try:
            geometry = ChunkGeometry.from_config(request, settings)
        except ConfigError as exc:
            await self.error(f"Init failed: {exc}", "bad_config")
            return
        # A second init replaces only this connection's session: free its slot first.
        self.drop_session()
        model_path = request.get("model_path")
        if model_path is None and isinstance(request.get("config"), dict):
            model_path = request["config"].get("model_path")
        try:
            _, checkpoint = self.state.resolve_checkpoint(
                self.model_id, "audio2video", model_path
            )
            session = await self.state.avatars.open(
                self.model_id,
                geometry,
                image,
                checkpoint=checkpoint,
                abandoned=lambda: client_gone(self.ws),
            )
        except SetupAbandoned as exc:
            raise ClientGone() from exc
        except CheckpointRefused as exc:
            await self.error(f"Init failed: {exc}", "bad_config")
            return
        except ImageError as exc:
            if exc.code == "image_too_large":
                await self.error(f"Init failed: {exc}", exc.code)
            else:
                await self.error("Invalid base64 in 'ref_image'.", "bad_image_base64")
            return
        except CapacityExceeded as exc:
            await self.error(f"Init failed: {exc}", "capacity_exceeded")
            return
        except ModelAccessError as exc:
            await self.error(f"Init failed: {exc.message}", exc.code)
            return
        except (ModelUnavailable, KeyError, ValueError, RuntimeError) as exc:
            log.warning("init failed: %s", exc)
            await self.error(f"Init failed: {exc}", "runtime_error")
            return
        session.prompt = str(request.get("prompt") or DEFAULT_PROMPT)
        seed = request.get("seed", DEFAULT_SEED)
        session.seed = (
            seed if isinstance(seed, int) and not isinstance(seed, bool) else DEFAULT_SEED
        )
        session.on_expire = self._expired
        self.session = session
        reply: dict[str, Any] = {"type": "init_ok", **geometry.as_dict()}
        reply.update(
            session_id=session.id,
            model=session.model_id,
            face_detected=bool(session.reference.info.get("face_detected", True)),
        )
        if session.model_id != self.model_id:  # a Runtime Profile's degrade_to served it
            reply["degraded_from"] = self.model_id
        await send_json(self.ws, reply, self.timeout)

    async def _expired(self, reason: str) -> None:
        self.session = None
        await close_quietly(self.ws, 1001)

    async def on_config_update(self, request: dict[str, Any]) -> None:
        config = request.get("config")
        if not isinstance(config, dict):
            config = {}
        updated: dict[str, Any] = {}
        ignored: list[str] = []
        for key, value in config.items():
            if key in GEOMETRY_KEYS:
                ignored.append(key)  # geometry is fixed for a session: re-init to change it
            elif key == "prompt" and isinstance(value, str) and self.session is not None:
                self.session.prompt = value
                updated[key] = value
            elif key == "seed" and isinstance(value, int) and self.session is not None:
                self.session.seed = value
                updated[key] = value
            else:
                updated[key] = value
        reply: dict[str, Any] = {"type": "config_ok", "updated": updated}
        if ignored:
            reply["ignored"] = ignored
        await send_json(self.ws, reply, self.timeout)

    async def on_audio(self, data: bytes) -> None:
        session = self.session
        if data[:4] != AUDIO_MAGIC:
            await self.error(BAD_MAGIC, "bad_audio_magic")
            return
        if session is None or not session.active:
            await self.error(NO_SESSION, "session_required")
            return
        payload = data[4:]
        g = session.geometry
        if len(payload) != g.chunk_bytes:
            await self.error(
                f"Expected {g.chunk_bytes} bytes of int16 PCM ({g.chunk_samples} samples), "
                f"got {len(payload)}.",
                "bad_audio_chunk",
            )
            return
        try:
            out = await session.render_chunk(payload)
        except StaleWork:
            await self.error(NO_SESSION, "session_required")
            return
        except Exception as exc:
            if not session.active:
                await self.error(NO_SESSION, "session_required")
                return
            log.exception("render failed for %s", session.id)
            await self.error(f"Generate failed: {exc}", "runtime_error")
            return
        await send_bytes(self.ws, encode_video(out.jpegs), self.timeout)


async def _serve(ws: WebSocket, model: str | None) -> None:
    state = get_state(ws)
    settings = state.settings
    model_id = settings.avatar_model if model in (None, *settings.avatar_model_aliases) else model
    assert model_id is not None
    if model is not None and not await deny_unless_allowed(ws, state, model_id, "audio2video"):
        return
    await ws.accept()
    await FlashTalkConnection(ws, state, model_id).run()


@router.websocket("/v1/audio2video/{model}")
async def audio2video_ws(websocket: WebSocket, model: str) -> None:
    """FlashTalk protocol for a named model."""
    await _serve(websocket, model)


@router.websocket("/v1/avatar/{model}")
async def avatar_legacy_ws(websocket: WebSocket, model: str) -> None:
    """Legacy alias of ``/v1/audio2video/{model}``."""
    await _serve(websocket, model)


@router.websocket("/")
async def root_ws(websocket: WebSocket) -> None:
    """FlashTalk protocol on the server root, with the default avatar model."""
    await _serve(websocket, None)


@router.get("/")
async def root_http() -> dict[str, Any]:
    """A plain HTTP GET on the WebSocket port answers (clients probe it)."""
    return {
        "service": "omnistream",
        "websocket": "/ (FlashTalk protocol), /v1/avatar/realtime (native)",
        "docs": "/docs",
    }
