"""WebRTC edge: ``POST /v1/webrtc/offer`` signalling, the control data channel, ``/demo``.

Signalling is one HTTP round trip with non-trickle ICE: the browser gathers its
candidates, posts the complete offer with the session's settings, and gets back the
complete answer (aiortc gathers every candidate before ``setLocalDescription`` returns).
STUN/TURN servers come from settings (``webrtc_ice_servers``) and the page reads them from
``GET /v1/webrtc/config``, so both ends use the same ones.

Everything a session holds (peer connection, tracks, renderer and speech tasks, its
admission slot) is freed on the first of: the page closing the connection, ICE or DTLS
failing, the connection staying in ``connecting`` past ``webrtc_connect_timeout_s``, or
the browser going silent (no RTCP receiver report for ``webrtc_peer_timeout_s``, which is
how a killed tab shows up long before ICE consent expires).

The data channel carries JSON both ways. In: ``speak``, ``interrupt``, ``mic``, ``ping``.
Out: ``speech.started``, ``subtitle``, ``speech.ended``, ``interrupted``, ``metrics``,
``error`` (``{"type":"error","code","message"}``), ``pong``. Bad messages get an error
event and the session goes on; a flood is rate limited.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import re
import time
from collections.abc import AsyncGenerator
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamTrack
from aiortc.sdp import SessionDescription
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from omnistream.auth import principal_of
from omnistream.auth.service import QuotaExceeded
from omnistream.codecs.image import ImageError
from omnistream.engine.registry import CheckpointRefused
from omnistream.models.tts.base import VoiceInfo
from omnistream.models.tts.text import normalise_text, segment_text
from omnistream.sessions.avatar import ChunkGeometry, ConfigError
from omnistream.sessions.manager import CapacityExceeded
from omnistream.sessions.tts import TtsEvent, TtsStream
from omnistream.sessions.webrtc import (
    AUDIO_RATE,
    CONVERT_STAGE,
    ENCODE_STAGE,
    EncodeMeters,
    SpeechChunk,
    WebRTCAvatarSession,
    WebRTCSessionConfig,
)
from omnistream.transports.request_schemas import WebRtcOfferBody, json_body
from omnistream.transports.state import AppState, ModelAccessError, get_state
from omnistream.transports.ws_common import off_loop

log = logging.getLogger(__name__)

router = APIRouter()

CODECS = {"vp8": "video/VP8", "h264": "video/H264"}
REQUIRED_MEDIA = ("audio", "video", "application")
SDP_LINE = re.compile(r"^[a-z]=\S?.*$")
METRICS_INTERVAL_S = 1.0
MAX_BUFFERED_EVENT_BYTES = 256 * 1024  # a page not reading events gets no more metrics
RATE_LIMIT_NOTICE_S = 1.0


class OfferRequest(BaseModel):
    """Body of ``POST /v1/webrtc/offer``: the SDP offer plus the session settings."""

    model_config = ConfigDict(extra="ignore")

    sdp: str
    type: str = "offer"
    model: str | None = None
    model_path: str | None = Field(
        None, description="the model's weights from a file under the checkpoint roots"
    )
    image_b64: str | None = Field(None, description="reference face; default avatar if absent")
    voice: str | None = None
    tts_model: str | None = None
    fps: int | None = None
    width: int | None = None
    height: int | None = None
    codec: str | None = None
    talk: dict[str, Any] | None = Field(
        None, description="talk mode: a voice agent answers the microphone "
        "({model: provider/model, instructions?, silence_duration_ms?}); see webrtc_talk"
    )


class WebRTCError(Exception):
    """A request the route refuses, with an HTTP status and a stable code."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        return JSONResponse(
            {"error": {"code": self.code, "message": self.message}},
            status_code=self.status,
            headers=headers,
        )


# -- runtime ------------------------------------------------------------------------


class WebRTCRuntime:
    """Live WebRTC sessions of one app, and the shutdown hook that closes them."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.sessions: dict[str, WebRTCAvatarSession] = {}
        self.peers: dict[str, RTCPeerConnection] = {}

    async def aclose(self) -> None:
        for session in list(self.sessions.values()):
            with contextlib.suppress(Exception):
                await session.expire("server shutting down")


def runtime(state: AppState) -> WebRTCRuntime:
    """The app's WebRTC runtime, created on first use."""
    rt = state.extras.get("webrtc")
    if rt is None:
        rt = WebRTCRuntime(state)
        state.extras["webrtc"] = rt
        state.extras.setdefault("shutdown_hooks", []).append(rt.aclose)
    assert isinstance(rt, WebRTCRuntime)
    return rt


# -- TTS adapter --------------------------------------------------------------------


class TtsSpeech:
    """Streams ``speak`` text through the shared TTS runner at the session clock's rate.

    Subtitles: the text is cut into the same segments the TTS stream synthesises, and each
    segment's text rides on its first audio chunk, so the session can show it exactly
    when that audio plays.
    """

    def __init__(
        self,
        state: AppState,
        model_id: str,
        voice: str,
        native_rate: int,
        voices: list[str] | None = None,
    ) -> None:
        self.state = state
        self.model_id = model_id
        self.voice = voice
        self.native_rate = native_rate
        self.voices = voices or [voice]

    async def stream(self, text: str, voice: str | None) -> AsyncGenerator[SpeechChunk, None]:
        settings = self.state.settings
        first_words = settings.tts_first_segment_words
        text = normalise_text(text)
        segments = segment_text(text, first_words=first_words)
        runner = self.state.engine.runner(self.model_id)
        await runner.wait_ready()
        stream = TtsStream(
            runner,
            model_id=self.model_id,
            voice=voice or self.voice,
            native_rate=self.native_rate,
            out_rate=AUDIO_RATE,
            chunk_ms=20,
            buffer_ms=2000,
            sample_format="f32le",
            metrics=self.state.metrics,
            max_pending_chars=settings.max_text_chars,
            first_words=first_words,
        )
        try:
            stream.say(text)
            pending = segments[0] if segments else ""
            while True:
                item = await stream.read()
                if item is None:
                    return
                if isinstance(item, TtsEvent):
                    if item.type == "segment.done":
                        index = int(item.data.get("index", 0)) + 1
                        pending = segments[index] if index < len(segments) else ""
                    continue
                samples = np.frombuffer(item, dtype="<f4").astype(np.float32)
                yield SpeechChunk(samples, AUDIO_RATE, pending)
                pending = ""
        finally:
            await stream.aclose("speech ended")


def _tts_voices(state: AppState) -> list[dict[str, Any]]:
    from omnistream.models.tts import default_voice, voice_catalog

    out = []
    for spec in state.registry.specs("text2audio"):
        if spec.unavailable_reason() is not None:
            continue
        voices: list[VoiceInfo] = voice_catalog(spec)
        out.append(
            {
                "model": spec.id,
                "default_voice": default_voice(spec),
                "voices": [v.as_dict() for v in voices],
                "default": spec.id == state.settings.tts_model,
            }
        )
    return out


def _speech_for(state: AppState, tts_model: str | None, voice: str | None) -> TtsSpeech | None:
    """The TTS adapter for an offer, ``None`` when no voice model can run here.

    Raises:
        WebRTCError: an unknown voice or TTS model was asked for.
    """
    from omnistream.models.tts import default_voice, sample_rate, voice_catalog

    model_id = tts_model or state.settings.tts_model
    try:
        spec = state.resolve_model(model_id, "text2audio")
    except ModelAccessError as exc:
        if tts_model is None and voice is None:
            return None  # speaking is an error later; video and mic still work
        raise WebRTCError(exc.status if exc.status != 404 else 400, exc.code, exc.message) from exc
    voices = [v.id for v in voice_catalog(spec)]
    chosen = voice or default_voice(spec)
    if voices and chosen not in voices:
        raise WebRTCError(
            400, "invalid_voice", f"Unknown voice '{chosen}' for {model_id}: {', '.join(voices)}"
        )
    state.engine.runner(model_id)  # start loading now, not on the first ``speak``
    return TtsSpeech(state, model_id, chosen, sample_rate(spec), voices or [chosen])


# -- offer validation ---------------------------------------------------------------


def check_offer_sdp(sdp: str, max_bytes: int) -> None:
    """Reject SDP that is malformed or lacks the media the avatar needs.

    Raises:
        WebRTCError: ``bad_sdp`` or ``missing_media``.
    """
    if not sdp.strip():
        raise WebRTCError(400, "bad_sdp", "The offer has no SDP.")
    if len(sdp.encode()) > max_bytes:
        raise WebRTCError(400, "bad_sdp", f"The SDP offer is larger than {max_bytes} bytes.")
    if not sdp.lstrip().startswith("v=0"):
        raise WebRTCError(400, "bad_sdp", "Malformed SDP: it must start with 'v=0'.")
    for number, line in enumerate(sdp.strip().splitlines(), start=1):
        if not SDP_LINE.match(line.strip()):
            raise WebRTCError(400, "bad_sdp", f"Malformed SDP line {number}: {line[:60]!r}")
    try:
        parsed = SessionDescription.parse(sdp)
    except Exception as exc:
        raise WebRTCError(400, "bad_sdp", f"Malformed SDP: {exc}") from exc
    kinds = {m.kind: m for m in parsed.media}
    missing = [k for k in REQUIRED_MEDIA if k not in kinds]
    if missing:
        names = {"audio": "audio", "video": "video", "application": "data channel"}
        raise WebRTCError(
            400,
            "missing_media",
            "The offer needs audio, video and data channel sections; missing: "
            + ", ".join(names[k] for k in missing),
        )
    for kind in ("audio", "video"):
        direction = kinds[kind].direction or "sendrecv"
        if direction not in ("recvonly", "sendrecv"):
            raise WebRTCError(
                400, "missing_media", f"The offer's {kind} section must be able to receive."
            )
    for media in parsed.media:
        if not (media.ice and media.ice.usernameFragment and media.ice.password):
            raise WebRTCError(
                400, "bad_sdp", f"The offer's {media.kind} section carries no ICE credentials."
            )


def negotiated_codec(answer_sdp: str) -> str | None:
    """The video codec an answer settled on (its first video payload type)."""
    with contextlib.suppress(Exception):
        for media in SessionDescription.parse(answer_sdp).media:
            if media.kind == "video" and media.rtp.codecs:
                mime = media.rtp.codecs[0].mimeType.lower()
                for name, wanted in CODECS.items():
                    if mime == wanted.lower():
                        return name
                return mime.split("/", 1)[-1]
    return None


def _ice_servers(state: AppState) -> list[RTCIceServer]:
    servers = []
    for entry in state.settings.webrtc_ice_servers:
        urls = entry.get("urls")
        if not urls:
            continue
        servers.append(
            RTCIceServer(
                urls=urls, username=entry.get("username"), credential=entry.get("credential")
            )
        )
    return servers


def _codec_preferences(codec: str) -> list[Any]:
    """The codec first, then the others (and RTX), from what aiortc can send."""
    capabilities = RTCRtpSender.getCapabilities("video").codecs
    wanted = CODECS[codec]
    first = [c for c in capabilities if c.mimeType == wanted]
    rest = [c for c in capabilities if c.mimeType != wanted]
    return first + rest


def decode_base64_strict(data: str) -> bytes:
    """Base64 that must be valid (a thread-friendly, one-argument form)."""
    return base64.b64decode(data, validate=True)


async def _read_body(request: Request, limit: int) -> dict[str, Any]:
    size = 0
    parts = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise WebRTCError(413, "request_too_large", f"The request is over {limit} bytes.")
        parts.append(chunk)
    try:
        raw = b"".join(parts)
        body = await off_loop(json.loads, raw or b"null", size=len(raw))
    except ValueError as exc:
        raise WebRTCError(400, "bad_json", "The request body is not JSON.") from exc
    if not isinstance(body, dict):
        raise WebRTCError(400, "bad_json", "The request body must be a JSON object.")
    return body


# -- routes ---------------------------------------------------------------------------


@router.get("/v1/webrtc/config")
async def webrtc_config(request: Request) -> dict[str, Any]:
    """What the page needs before it makes an offer: ICE servers, defaults, voices."""
    state = get_state(request)
    s = state.settings
    return {
        "iceServers": s.webrtc_ice_servers,
        "codecs": sorted(CODECS),
        "defaults": {
            "model": s.avatar_model,
            "codec": s.webrtc_codec,
            "fps": s.webrtc_fps,
            "width": s.webrtc_width,
            "height": s.webrtc_height,
            "tts_model": s.tts_model,
        },
        "tts": _tts_voices(state),
        "max_text_chars": s.max_text_chars,
    }


@router.post("/v1/webrtc/offer", openapi_extra=json_body(WebRtcOfferBody))
async def webrtc_offer(request: Request) -> Response:
    """Answer an SDP offer with a live avatar session (non-trickle ICE)."""
    state = get_state(request)
    try:
        return JSONResponse(await _answer(state, request))
    except WebRTCError as exc:
        state.metrics.protocol_errors.labels("webrtc", exc.code).inc()
        return exc.response()


async def _answer(state: AppState, request: Request) -> dict[str, Any]:
    s = state.settings
    limit = s.webrtc_max_sdp_bytes + s.max_image_bytes * 4 // 3 + 8192
    body = await _read_body(request, limit)
    try:
        offer = OfferRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise WebRTCError(400, "bad_config", f"{where}: {first.get('msg')}") from exc
    if offer.type != "offer":
        raise WebRTCError(400, "bad_sdp", "The description must be of type 'offer'.")
    check_offer_sdp(offer.sdp, s.webrtc_max_sdp_bytes)
    codec = (offer.codec or s.webrtc_codec).lower()
    if codec not in CODECS:
        raise WebRTCError(400, "bad_config", f"codec must be one of {', '.join(sorted(CODECS))}")
    model_id = offer.model or s.avatar_model
    if model_id in s.avatar_model_aliases:
        model_id = s.avatar_model
    try:
        spec, checkpoint = state.resolve_checkpoint(model_id, "audio2video", offer.model_path)
    except ModelAccessError as exc:
        raise WebRTCError(exc.status, exc.code, exc.message) from exc
    except CheckpointRefused as exc:
        raise WebRTCError(400, "bad_config", str(exc)) from exc
    caps = spec.capabilities
    windows = (
        float(caps.get("context_ms", 200)) / 1000.0,
        float(caps.get("lookahead_ms", 40)) / 1000.0,
    )
    try:
        geometry = ChunkGeometry.from_config(
            {
                "fps": offer.fps or s.webrtc_fps,
                "width": offer.width or s.webrtc_width,
                "height": offer.height or s.webrtc_height,
            },
            s,
        )
    except ConfigError as exc:
        raise WebRTCError(400, "bad_config", str(exc)) from exc
    image: bytes | None = None
    if offer.image_b64:
        data = offer.image_b64.split(",", 1)[1] if offer.image_b64.startswith("data:") else (
            offer.image_b64
        )
        try:
            image = await off_loop(decode_base64_strict, data, size=len(data))
        except (binascii.Error, ValueError) as exc:
            raise WebRTCError(400, "bad_image_base64", "image_b64 is not valid base64.") from exc
    speech = _speech_for(state, offer.tts_model, offer.voice)

    config = WebRTCSessionConfig(
        model=model_id,
        fps=geometry.fps,
        width=geometry.width,
        height=geometry.height,
        codec=codec,
        voice=speech.voice if speech else None,
        speech_buffer_ms=s.webrtc_speech_buffer_ms,
        render_ahead_ms=s.webrtc_render_ahead_ms,
        speech_lead_ms=s.webrtc_speech_lead_ms,
        mic_delay_ms=s.webrtc_mic_delay_ms,
    )
    try:
        runner = state.engine.runner(model_id, checkpoint=checkpoint)
    except CheckpointRefused as exc:
        raise WebRTCError(400, "bad_config", str(exc)) from exc
    session = WebRTCAvatarSession(
        config,
        runner,
        None,
        synth=speech,
        metrics=state.metrics,
        capacity_stages=[*runner.capacity_stages, ENCODE_STAGE, CONVERT_STAGE],
        model_windows=windows,
        meters=EncodeMeters(
            encode=state.engine.planner.meter(ENCODE_STAGE),
            convert=state.engine.planner.meter(CONVERT_STAGE),
        ),
    )
    # The caller's per-key session slot, then admission (nothing is prepared for a
    # refused client), then the reference, prepared once per image by the avatar cache.
    caller = principal_of(request)
    try:
        state.auth.acquire_session(caller)
    except QuotaExceeded as exc:
        raise WebRTCError(
            429, "rate_limited", exc.message, retry_after=math.ceil(exc.retry_after)
        ) from exc
    key_slot = [True]

    def release_key_slot() -> None:
        if key_slot:
            key_slot.clear()
            state.auth.release_session(caller)

    async def on_close(_: WebRTCAvatarSession) -> None:
        release_key_slot()

    session.on_close.append(on_close)
    try:
        state.sessions.admit(session)
    except CapacityExceeded as exc:
        release_key_slot()
        raise WebRTCError(
            429, "capacity_exceeded", str(exc), retry_after=exc.retry_after_s
        ) from exc
    try:
        avatar_session = await state.avatars.open(
            model_id, geometry, image, admit=False, checkpoint=checkpoint
        )
    except ImageError as exc:
        state.sessions.release(session)
        release_key_slot()
        raise WebRTCError(400, "bad_image", f"Invalid image: {exc}") from exc
    except Exception as exc:
        state.sessions.release(session)
        release_key_slot()
        log.exception("preparing the avatar failed")
        raise WebRTCError(500, "runtime_error", f"Init failed: {exc}") from exc
    reference = avatar_session.reference
    avatar_session.close()
    session.avatar = reference.prepared
    session.runner = avatar_session.runner
    talk = None
    if offer.talk is not None:
        from omnistream.transports import webrtc_talk

        try:
            if speech is None:
                raise webrtc_talk.TalkError(503, "tts_unavailable",
                                            "talk mode needs a text-to-speech model")
            webrtc_talk.wrap_speech(speech, state, session.id)
            talk = webrtc_talk.enable(state, session, offer.talk)
        except webrtc_talk.TalkError as exc:
            state.sessions.release(session)
            release_key_slot()
            await session.aclose("offer failed")
            raise WebRTCError(exc.status, exc.code, exc.message) from exc
    try:
        pc = await _connect(state, session, offer.sdp, codec)
    except BaseException:
        state.sessions.release(session)
        await session.aclose("offer failed")
        raise
    negotiated = negotiated_codec(pc.localDescription.sdp) or codec
    session.metrics_sink.codec = negotiated
    return {
        "type": "answer",
        "sdp": pc.localDescription.sdp,
        "session_id": session.id,
        "model": model_id,
        "codec": negotiated,
        "video": {"fps": config.fps, "width": config.width, "height": config.height},
        "audio": {"sample_rate": AUDIO_RATE, "codec": "opus"},
        "avatar": reference.info,
        "speech": {"tts_model": speech.model_id, "voice": speech.voice} if speech else None,
        "talk": {"model": talk.agent.config.model, "agent_session_id": talk.agent.id}
        if talk else None,
    }


async def _connect(
    state: AppState, session: WebRTCAvatarSession, sdp: str, codec: str
) -> RTCPeerConnection:
    """Create the peer connection, wire tracks and the channel, and answer."""
    rt = runtime(state)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=_ice_servers(state)))
    rt.sessions[session.id] = session
    rt.peers[session.id] = pc
    state.metrics.webrtc_sessions.inc()
    closing: list[asyncio.Task[None]] = []

    async def on_close(_: WebRTCAvatarSession) -> None:
        rt.sessions.pop(session.id, None)
        rt.peers.pop(session.id, None)
        state.sessions.release(session)
        state.metrics.webrtc_sessions.dec()
        state.metrics.webrtc_sessions_closed.labels(_reason_label(session.close_reason)).inc()
        with contextlib.suppress(Exception):
            await pc.close()

    session.on_close.append(on_close)

    def close_soon(reason: str) -> None:
        if not session.closed and not closing:
            closing.append(asyncio.ensure_future(session.aclose(reason)))

    @pc.on("connectionstatechange")
    def _state_changed() -> None:
        if pc.connectionState in ("failed", "closed"):
            close_soon(f"connection {pc.connectionState}")

    @pc.on("datachannel")
    def _channel(channel: RTCDataChannel) -> None:
        Control(state, session, channel).attach()

    @pc.on("track")
    def _track(track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            from omnistream.transports.webrtc_talk import talk_of

            talk = talk_of(state, session)  # talk mode: the mic goes to the voice agent
            reader = talk.consume_mic(track) if talk else session.consume_mic(track)
            session.add_task(reader, "mic")

    # Transceivers made before the offer is applied take its m-lines, so the codec
    # preference is in place when aiortc negotiates codecs (in setRemoteDescription).
    video = pc.addTransceiver(session.video_track, direction="sendonly")
    video.setCodecPreferences(_codec_preferences(codec))
    pc.addTransceiver(session.audio_track, direction="sendrecv")
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
    except Exception as exc:
        raise WebRTCError(400, "bad_sdp", f"The offer was refused: {exc}") from exc
    try:
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)
    except Exception as exc:
        raise WebRTCError(400, "bad_sdp", f"No answer can be made for the offer: {exc}") from exc
    session.start()
    session.add_task(_watchdog(state, session, pc), "watchdog")
    return pc


def _reason_label(reason: str) -> str:
    for label in ("connect timeout", "peer silent", "failed", "closed", "shutting down", "idle"):
        if label in reason:
            return label.replace(" ", "_")
    return "other"


async def _watchdog(state: AppState, session: WebRTCAvatarSession, pc: RTCPeerConnection) -> None:
    """Timeouts, liveness, encoder timing and the once-a-second ``metrics`` event."""
    s = state.settings
    started = time.monotonic()
    last_heard = time.monotonic()
    wrapped: set[int] = set()
    next_metrics = time.monotonic() + METRICS_INTERVAL_S
    while True:
        await asyncio.sleep(0.25)
        now = time.monotonic()
        connection = pc.connectionState
        if connection in ("new", "connecting") and now - started > s.webrtc_connect_timeout_s:
            await session.aclose("connect timeout")
            return
        if connection in ("failed", "closed"):
            await session.aclose(f"connection {connection}")
            return
        if connection != "connected":
            continue
        for sender in pc.getSenders():
            if id(sender) not in wrapped and _wrap_encoder(sender, session):
                wrapped.add(id(sender))
        heard = await _last_report(pc)
        if heard is not None:
            last_heard = max(last_heard, heard)
        if now - last_heard > s.webrtc_peer_timeout_s:
            await session.aclose("peer silent")
            return
        session.last_activity = now
        if now >= next_metrics:
            next_metrics = now + METRICS_INTERVAL_S
            session.emit(session.metrics_event())


async def _last_report(pc: RTCPeerConnection) -> float | None:
    """Monotonic time of the newest RTCP receiver report from the browser, if any."""
    newest: float | None = None
    for sender in pc.getSenders():
        with contextlib.suppress(Exception):
            report = await sender.getStats()
            for stats in report.values():
                if stats.type == "remote-inbound-rtp":
                    age = time.time() - stats.timestamp.timestamp()
                    heard = time.monotonic() - max(0.0, age)
                    newest = heard if newest is None else max(newest, heard)
    return newest


def _wrap_encoder(sender: RTCRtpSender, session: WebRTCAvatarSession) -> bool:
    """Time each encode call of the sender's encoder (created lazily by aiortc).

    aiortc keeps the encoder private and runs it in the default executor; wrapping the
    instance's ``encode`` is the least intrusive way to see encode time per frame.
    """
    encoder = getattr(sender, "_RTCRtpSender__encoder", None)
    track = sender.track
    if encoder is None or track is None:
        return False
    kind = track.kind
    original = encoder.encode
    loop = asyncio.get_running_loop()

    def encode(frame: Any, force_keyframe: bool = False) -> Any:
        wall0 = time.perf_counter()
        cpu0 = time.thread_time()
        result = original(frame, force_keyframe)
        wall = time.perf_counter() - wall0
        cpu = time.thread_time() - cpu0
        pts = float(frame.pts * frame.time_base) if frame.pts is not None else 0.0
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(session.encoder_finished, kind, pts, wall, cpu)
        return result

    encoder.encode = encode
    return True


# -- the data channel -----------------------------------------------------------------


class Control:
    """The control channel of one session: commands in, events out, with limits."""

    def __init__(
        self, state: AppState, session: WebRTCAvatarSession, channel: RTCDataChannel
    ) -> None:
        self.state = state
        self.session = session
        self.channel = channel
        self.rate = state.settings.webrtc_messages_per_s
        self.tokens = self.rate * 2
        self.refilled = time.monotonic()
        self.last_notice = 0.0
        self.dropped = 0

    def attach(self) -> None:
        self.session.on_event = self.send

        @self.channel.on("message")
        def _message(message: str | bytes) -> None:
            self.handle(message)

    def send(self, event: dict[str, Any]) -> None:
        channel = self.channel
        if channel.readyState != "open":
            return
        if event.get("type") == "metrics" and channel.bufferedAmount > MAX_BUFFERED_EVENT_BYTES:
            return
        channel.send(json.dumps(event, separators=(",", ":")))

    def error(self, code: str, message: str, **fields: Any) -> None:
        self.state.metrics.protocol_errors.labels("webrtc", code).inc()
        self.send({"type": "error", "code": code, "message": message, **fields})

    def _allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate * 2, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.dropped += 1
        if now - self.last_notice >= RATE_LIMIT_NOTICE_S:
            self.last_notice = now
            self.error(
                "rate_limited",
                f"Too many messages: over {self.rate:g}/s; {self.dropped} dropped so far.",
            )
        return False

    def handle(self, message: str | bytes) -> None:
        if self.session.closed or not self._allow():
            return
        limit = self.state.settings.webrtc_max_message_bytes
        if isinstance(message, bytes):
            self.error("unsupported_message", "Binary messages are not accepted.")
            return
        if len(message) > limit:
            self.error("message_too_large", f"Messages are limited to {limit} bytes.")
            return
        try:
            data = json.loads(message)
        except ValueError:
            self.error("bad_json", "Invalid JSON")
            return
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            self.error("unsupported_message", "A message must be an object with a 'type'.")
            return
        kind = data["type"]
        self.session.last_activity = time.monotonic()
        if kind == "speak":
            self.speak(data)
        elif kind == "interrupt":
            from omnistream.transports.webrtc_talk import talk_of

            talk = talk_of(self.state, self.session)
            if talk is not None:
                talk.interrupt()  # the agent's answer stops too
            self.send(self.session.interrupt())
        elif kind == "mic":
            self.session.set_mic(bool(data.get("enabled", True)))
            self.send({"type": "mic", "enabled": bool(data.get("enabled", True)),
                       "attached": self.session.mic_attached})
        elif kind == "ping":
            self.send({"type": "pong"})
        else:
            self.error("unsupported_message", f"Unknown message type: {kind}")

    def speak(self, data: dict[str, Any]) -> None:
        text = data.get("text")
        if not isinstance(text, str) or not text.strip():
            self.error("empty_text", "'speak' needs non-empty 'text'.")
            return
        limit = self.state.settings.max_text_chars
        if len(text) > limit:
            self.error("text_too_long", f"'text' is limited to {limit} characters.")
            return
        if self.session.synth is None:
            self.error("tts_unavailable", "No text-to-speech model is available on this server.")
            return
        voice = data.get("voice")
        synth = self.session.synth
        voices = getattr(synth, "voices", None) or []
        if voice is not None and (not isinstance(voice, str) or (voices and voice not in voices)):
            self.error("invalid_voice", f"Unknown voice {voice!r}; available: {', '.join(voices)}")
            return
        try:
            utt = self.session.speak(text, voice)
        except asyncio.QueueFull:
            self.error("busy", "Too many utterances are waiting; interrupt or wait.")
            return
        self.send({"type": "speech.queued", "id": utt.id, "text": text})


# -- the page -------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _asset(name: str) -> bytes:
    return resources.files("omnistream.assets").joinpath("demo").joinpath(name).read_bytes()


@router.get("/demo", response_class=HTMLResponse)
@router.get("/demo/", response_class=HTMLResponse, include_in_schema=False)
async def demo_page(request: Request) -> HTMLResponse:
    """The browser demo: one self-contained page, no build step.

    With keys on, the page carries a short-lived client secret minted for the caller (who
    opened it with a key, e.g. ``/demo?api_key=…``), so the page never holds the key.
    """
    page = await asyncio.to_thread(_asset, "index.html")
    state = get_state(request)
    if state.auth.enabled:
        secret, _ = state.auth.secrets.mint(
            principal_of(request), state.settings.client_secret_ttl_s
        )
        page = page.replace(
            b'name="omnistream-client-secret" content=""',
            b'name="omnistream-client-secret" content="' + secret.encode() + b'"',
            1,
        )
    return HTMLResponse(page, headers={"Cache-Control": "no-store"})


__all__ = ["router", "runtime"]
