"""``WS /v1/text2audio/realtime``: text in as an LLM writes it, PCM out as it is spoken.

Client messages (JSON text frames)::

    {"type": "session.create", "model": "hibari", "voice": "heart", "sample_rate": 16000,
     "speed": 1.0, "pace_lead_ms": 200}           # pace_lead_ms optional: see below
    {"type": "text.delta", "text": "Hello the"}      # any number, any fragment size
    {"type": "text.done"}                            # end of this utterance
    {"type": "cancel"}                               # stop speaking now (barge-in)

Server messages: binary frames of s16le mono PCM at the session's rate (``chunk_ms``
each), and JSON events ``session.created``, ``audio.started``, ``segment.done``,
``metrics`` (``first_audio_ms``, ``rtf``, ``chunk_index``, ``audio_ms``), ``finish``,
``cancelled`` and ``error`` (``code``, ``message``). Speech starts as soon as the first
clause of the text has arrived, long before ``text.done``.

Audio is sent as fast as it is synthesised unless ``pace_lead_ms`` is given: then it is
sent at real time, at most that far ahead of the listener, so that ``cancel`` silences a
player that plays frames as they come within the lead plus one chunk.

An utterance is one :class:`~omnistream.sessions.tts.TtsStream`; after ``finish`` or
``cancelled`` the next ``text.delta`` starts a new one on the same socket. ``cancel``
stops the stream (no further segment runs, queued audio is dropped) and is answered with
``cancelled`` once no more audio of that utterance will be sent. Bad messages get an
``error`` event and the socket stays open; a client that goes away or stops reading has
its synthesis cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, WebSocket

from omnistream.engine.registry import ModelSpec
from omnistream.models.tts import sample_rate
from omnistream.sessions.tts import StreamClosed, SynthesisFailed, TextBufferFull, TtsStream
from omnistream.transports import ws_common
from omnistream.transports.state import AppState, get_state
from omnistream.transports.tts_http import (
    TtsRequestError,
    check_sample_rate,
    check_speed,
    close_stream,
    open_stream,
    resolve_tts_model,
    resolve_voice,
)

log = logging.getLogger(__name__)

router = APIRouter()

ROUTE = "text2audio.realtime"
MAX_PACE_LEAD_MS = 10_000


@dataclass
class _Config:
    spec: ModelSpec
    voice: str
    rate: int
    speed: float
    lead_ms: float | None = None


@dataclass
class _Session:
    """One socket's state: its config, the utterance speaking now and its sender."""

    ws: WebSocket
    state: AppState
    config: _Config | None = None
    stream: TtsStream | None = None
    sender: asyncio.Task[None] | None = None
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    chunks_sent: int = 0

    async def send_json(self, payload: dict[str, Any]) -> None:
        async with self.send_lock:
            await ws_common.send_json(self.ws, payload, self.state.settings.send_timeout_s)

    async def send_bytes(self, data: bytes) -> None:
        async with self.send_lock:
            await ws_common.send_bytes(self.ws, data, self.state.settings.send_timeout_s)

    async def error(self, code: str, message: str) -> None:
        self.state.metrics.protocol_errors.labels(ROUTE, code).inc()
        await self.send_json({"type": "error", "code": code, "message": message})


@router.websocket("/v1/text2audio/realtime")
async def text2audio_realtime(ws: WebSocket) -> None:
    """Serve one realtime TTS socket until the client leaves."""
    state = get_state(ws)
    await ws.accept()
    session = _Session(ws, state)
    try:
        while True:
            incoming = await ws_common.receive(ws)
            if incoming.data is not None:
                await session.error(
                    "binary_not_supported", "send JSON text frames; binary input is not accepted"
                )
                continue
            if incoming.size > state.settings.max_message_bytes:
                await session.error("message_too_large", "message exceeds max_message_bytes")
                continue
            message = ws_common.parse_json(incoming.text or "")
            if message is None:
                await session.error("invalid_json", "message is not valid JSON")
                continue
            await _handle(session, message)
    except ws_common.ClientGone:
        pass
    finally:
        await _stop_utterance(session, "client disconnected", announce=False)
        await ws_common.close_quietly(ws)


async def _handle(session: _Session, message: dict[str, Any]) -> None:
    kind = message.get("type")
    if kind == "session.create":
        await _create(session, message)
    elif kind == "text.delta":
        await _delta(session, message)
    elif kind == "text.done":
        stream = session.stream
        if stream is None or stream.state != "active":
            await session.error("no_text", "text.done without text.delta")
            return
        with contextlib.suppress(StreamClosed):
            stream.end_text()
    elif kind == "cancel":
        if session.stream is None:
            await session.send_json({"type": "cancelled", "audio_ms": 0.0, "chunk_index": 0})
            return
        await _stop_utterance(session, "cancel", announce=True)
    else:
        await session.error("unknown_type", f"unknown message type {kind!r}")


async def _create(session: _Session, message: dict[str, Any]) -> None:
    state = session.state
    if session.config is not None:
        await session.error("session_exists", "session.create was already sent")
        return
    try:
        spec = resolve_tts_model(state, message.get("model"))
        voice = resolve_voice(spec, message.get("voice"), aliases=state.settings.voice_aliases)
        rate = check_sample_rate(message.get("sample_rate"), sample_rate(spec))
        speed = check_speed(message.get("speed"))
        lead_ms = _check_lead(message.get("pace_lead_ms"))
    except TtsRequestError as exc:
        await session.error(exc.code, exc.message)
        return
    session.config = _Config(spec, voice, rate, speed, lead_ms)
    await session.send_json(
        {
            "type": "session.created",
            "model": spec.id,
            "voice": voice,
            "sample_rate": rate,
            "chunk_ms": state.settings.tts_chunk_ms,
            "format": "pcm_s16le",
            "pace_lead_ms": lead_ms,
        }
    )


def _check_lead(value: Any) -> float | None:
    """``pace_lead_ms``: send audio at real time, at most this far ahead (None: unpaced)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
        0 <= value <= MAX_PACE_LEAD_MS
    ):
        raise TtsRequestError(
            400, "invalid_pace", f"pace_lead_ms must be a number from 0 to {MAX_PACE_LEAD_MS}"
        )
    return float(value)


async def _delta(session: _Session, message: dict[str, Any]) -> None:
    config = session.config
    if config is None:
        await session.error("no_session", "send session.create first")
        return
    text = message.get("text")
    if not isinstance(text, str):
        await session.error("invalid_type", "text.delta needs a string 'text'")
        return
    stream = session.stream
    if stream is None or stream.state != "active" or session.sender is None or (
        session.sender.done()
    ):
        if not text.strip():
            return
        await _stop_utterance(session, "replaced", announce=False)
        try:
            stream = await open_stream(
                session.state, config.spec, voice=config.voice, out_rate=config.rate,
                speed=config.speed,
            )
        except TtsRequestError as exc:
            await session.error(exc.code, exc.message)
            return
        session.stream = stream
        session.chunks_sent = 0
        session.sender = asyncio.create_task(_send_audio(session, stream))
    try:
        stream.push_text(text)
    except TextBufferFull as exc:
        await session.error("text_buffer_full", str(exc))
    except StreamClosed:
        await session.error(
            "stream_closed", "this utterance is finished; text.delta starts a new one"
        )


async def _send_audio(session: _Session, stream: TtsStream) -> None:
    """Forward one utterance's audio and events to the socket, in order."""
    loop = asyncio.get_running_loop()
    config = session.config
    lead_s = None if config is None or config.lead_ms is None else config.lead_ms / 1000.0
    started = loop.time()
    sent_s = 0.0
    try:
        while True:
            try:
                item = await stream.read()
            except SynthesisFailed as exc:
                await session.error("synthesis_failed", str(exc))
                return
            if item is None:
                return
            if isinstance(item, bytes):
                if session.chunks_sent == 0:
                    started = loop.time()
                    await session.send_json(
                        {"type": "audio.started", "first_audio_ms": stream.first_audio_ms}
                    )
                elif lead_s is not None:
                    # Real-time pacing: a player without a deep buffer (or a cancel) never
                    # has more than the lead of unplayed audio on its side.
                    due = started + sent_s - lead_s
                    delay = due - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await session.send_bytes(item)
                sent_s += len(item) / 2 / stream.out_rate
                session.chunks_sent += 1
                continue
            if item.type == "segment.done":
                await session.send_json({"type": "segment.done", **item.data})
                await session.send_json(
                    {
                        "type": "metrics",
                        "first_audio_ms": stream.first_audio_ms,
                        "rtf": round(stream.rtf, 4),
                        "chunk_index": session.chunks_sent,
                        "audio_ms": round(stream.audio_s * 1000.0, 1),
                        "queue_ms": item.data.get("queue_ms"),
                        "underruns": stream.underruns,
                    }
                )
            elif item.type == "finish":
                await session.send_json({"type": "finish", **item.data})
    except ws_common.ClientGone:
        stream.cancel("client disconnected")
    finally:
        if stream.state != "active":
            session.state.sessions.release(stream)


async def _stop_utterance(session: _Session, reason: str, *, announce: bool) -> None:
    """Cancel the current utterance, wait until its sender stopped, optionally answer."""
    stream, sender = session.stream, session.sender
    if stream is None:
        return
    was_active = stream.state == "active"
    stream.cancel(reason)
    if sender is not None and not sender.done():
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender
    await close_stream(session.state, stream, reason)
    session.stream = None
    session.sender = None
    if announce:
        with contextlib.suppress(ws_common.ClientGone):
            await session.send_json(
                {
                    "type": "cancelled",
                    "was_speaking": was_active,
                    "audio_ms": round(stream.audio_s * 1000.0, 1),
                    "chunk_index": session.chunks_sent,
                }
            )
