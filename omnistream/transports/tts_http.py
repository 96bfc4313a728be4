"""HTTP edges of streaming TTS: text2audio (PROTOCOLS §4) and OpenAI ``/v1/audio/speech``.

Every route translates its request into one :class:`~omnistream.sessions.tts.TtsStream`
on the voice model's shared runner and streams the stream's chunks as the HTTP body while
they are synthesised. The first bytes leave after the first clause is synthesised, not
after the whole text.

A client that disconnects is noticed by a watcher on the ASGI ``receive`` channel (and by
a failing ``send``), which cancels the stream at once: nothing keeps synthesising for a
body nobody reads.

Errors are OpenAI-shaped (``{"error": {"message", "type", "code"}}``) on every TTS route,
with stable codes (``text_required``, ``input_too_long``, ``invalid_voice``,
``unsupported_format``, ``unsupported_sample_rate``, ``invalid_json``…).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from omnistream.codecs.audio_container import (
    CONTENT_TYPES,
    StreamingAudioEncoder,
    encode_all,
    wav_header,
)
from omnistream.engine.registry import ModelSpec
from omnistream.engine.runner import Priority
from omnistream.models.tts import TASK, default_voice, sample_rate, voice_catalog
from omnistream.sessions.manager import CapacityExceeded
from omnistream.sessions.tts import SynthesisFailed, TtsStream
from omnistream.transports.request_schemas import (
    SpeechBody,
    Text2AudioBody,
    WarmupBody,
    json_body,
)
from omnistream.transports.state import AppState, ModelAccessError, get_state

router = APIRouter()

ADAPTER_SCHEMA = "text2audio.service.v1"
SAMPLE_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)
TEXT2AUDIO_FORMATS = ("pcm_s16le", "wav")
OPENAI_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
OPENAI_STREAM_FORMATS = ("audio", "sse")
OPENAI_RATE = 24000
SPEED_RANGE = (0.25, 4.0)
#: OpenAI's voice names: drop-in clients send them; they mean the model's default voice.
OPENAI_VOICES = frozenset(
    "alloy ash ballad coral echo fable onyx nova sage shimmer verse marin cedar".split()
)
RECENT_STREAMS = 128
MODEL_LOAD_TIMEOUT_S = 120.0


class TtsRequestError(Exception):
    """A request the TTS routes refuse, with its HTTP status and stable code."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.type = type_
        self.headers = headers or {}

    def payload(self) -> dict[str, Any]:
        """The OpenAI-shaped error body."""
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}


def error_response(state: AppState, route: str, exc: TtsRequestError) -> JSONResponse:
    """JSON error reply, counted in ``omnistream_protocol_errors_total``."""
    state.metrics.protocol_errors.labels(route, exc.code).inc()
    return JSONResponse(exc.payload(), status_code=exc.status, headers=exc.headers)


# -- request parsing shared with the WebSocket route -----------------------------------


def _optional_str(value: Any, field_name: str) -> str:
    """A string field that may be absent or null (``""`` then); any other type is a 400.

    Clients and fuzzers send numbers, lists and objects where a name belongs: that is
    their mistake, answered as such, not an ``AttributeError`` and a 500.
    """
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TtsRequestError(400, "invalid_type", f"{field_name} must be a string")
    return value.strip()


def resolve_tts_model(state: AppState, model: Any) -> ModelSpec:
    """The voice model a request names (aliases and empty mean the default), tier-checked."""
    model_id = _optional_str(model, "model") or state.settings.tts_model
    if model_id in state.settings.tts_model_aliases:
        model_id = state.settings.tts_model
    try:
        return state.resolve_model(model_id, TASK)
    except ModelAccessError as exc:
        raise TtsRequestError(exc.status, exc.code, exc.message) from exc


def resolve_voice(
    spec: ModelSpec,
    voice: Any,
    *,
    openai_names: bool = False,
    aliases: Mapping[str, str] | None = None,
) -> str:
    """A voice id the model declared; empty means its default.

    ``aliases`` (``settings.voice_aliases``, ``serve --voice-alias NAME=VOICE``) maps
    names existing clients send, which no model declares, to a voice: OpenTalking's
    OmniRT TTS client asks for ``local-default``.
    """
    voices = [v.id for v in voice_catalog(spec)]
    wanted = _optional_str(voice, "voice")
    if aliases and wanted:
        target = aliases.get(wanted, aliases.get(wanted.lower()))
        if target is not None:
            target = target.strip()
            if target in ("", "default"):
                return default_voice(spec)
            wanted = target
    if not wanted or (openai_names and wanted.lower() in OPENAI_VOICES):
        return default_voice(spec)
    if wanted in voices:
        return wanted
    if wanted.lower() in voices:
        return wanted.lower()
    shown = ", ".join(voices[:20]) + (" …" if len(voices) > 20 else "")
    raise TtsRequestError(
        400, "invalid_voice", f"Voice '{wanted}' is not available for model '{spec.id}'. "
        f"Available: {shown}"
    )


def check_text(state: AppState, text: Any, field_name: str) -> str:
    """Non-empty text within ``settings.max_text_chars``."""
    if text is None or (isinstance(text, str) and not text.strip()):
        raise TtsRequestError(400, "text_required", f"{field_name} is required")
    if not isinstance(text, str):
        raise TtsRequestError(400, "invalid_type", f"{field_name} must be a string")
    limit = state.settings.max_text_chars
    if len(text) > limit:
        raise TtsRequestError(
            400,
            "input_too_long",
            f"{field_name} is {len(text)} characters; the limit is {limit}.",
        )
    return text


def check_sample_rate(value: Any, default: int) -> int:
    """A supported output rate (``None`` means ``default``)."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value not in SAMPLE_RATES:
        allowed = ", ".join(str(r) for r in SAMPLE_RATES)
        raise TtsRequestError(
            400,
            "unsupported_sample_rate",
            f"sample_rate {value!r} is not supported; use one of {allowed}",
        )
    return value


def check_speed(value: Any) -> float:
    """A speaking rate in the OpenAI range 0.25–4.0 (``None`` means 1.0)."""
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TtsRequestError(400, "invalid_speed", "speed must be a number")
    low, high = SPEED_RANGE
    if not low <= float(value) <= high:
        raise TtsRequestError(400, "invalid_speed", f"speed must be between {low} and {high}")
    return float(value)


def check_choice(value: Any, allowed: tuple[str, ...], name: str, code: str) -> str:
    """One of a fixed set of strings."""
    if value not in allowed:
        raise TtsRequestError(
            400, code, f"{name} {value!r} is not supported; use one of {', '.join(allowed)}"
        )
    return str(value)


#: How every voice here streams: one clause or sentence segment per model call.
STREAMING_MODE = "sentence"
STREAMING_MODES = ("token_window", "sentence")


def ignored_config(config: dict[str, Any]) -> list[str]:
    """OmniRT ``config`` keys a request may send that these voices accept but ignore.

    ``streaming_mode`` ``token_window`` asks for audio per window of tokens: these voices
    cut text into clauses and sentences instead (the first clause is kept short so audio
    still starts early). ``temperature`` samples an autoregressive model; these voices
    are deterministic. Both are accepted so OmniRT clients work, and reported back.

    Raises:
        TtsRequestError: ``streaming_mode`` is not one OmniRT defines, or ``temperature``
            is not a number.
    """
    ignored: list[str] = []
    mode = config.get("streaming_mode")
    if mode is not None:
        check_choice(mode, STREAMING_MODES, "config.streaming_mode", "unsupported_streaming_mode")
        if mode != STREAMING_MODE:
            ignored.append("streaming_mode")
    temperature = config.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise TtsRequestError(400, "invalid_type", "config.temperature must be a number")
        ignored.append("temperature")
    return ignored


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 ``invalid_json``."""
    body = await request.body()
    try:
        value = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise TtsRequestError(
            400, "invalid_json", f"request body is not valid JSON: {exc}"
        ) from exc
    if not isinstance(value, dict):
        raise TtsRequestError(400, "invalid_json", "request body must be a JSON object")
    return value


# -- streams ---------------------------------------------------------------------------


def recent_streams(state: AppState) -> deque[TtsStream]:
    """The last streams this server ran (newest last): what tests and debugging inspect."""
    recent: deque[TtsStream] = state.extras.setdefault(
        "tts_streams", deque(maxlen=RECENT_STREAMS)
    )
    return recent


def find_stream(state: AppState, stream_id: str) -> TtsStream | None:
    """A recent stream by id."""
    return next((s for s in recent_streams(state) if s.id == stream_id), None)


async def open_stream(
    state: AppState,
    spec: ModelSpec,
    *,
    voice: str,
    out_rate: int,
    speed: float = 1.0,
    priority: Priority = Priority.REALTIME,
) -> TtsStream:
    """Start the model's runner if needed, admit a stream and return it (not yet fed).

    Raises:
        TtsRequestError: 503 when the model fails to load, 429 when the server is full.
    """
    try:
        runner = state.engine.runner(spec.id)
        if not runner.ready:  # skip the thread hop once loaded: it is on every request's path
            await runner.wait_ready(timeout=MODEL_LOAD_TIMEOUT_S)
    except Exception as exc:
        raise TtsRequestError(
            503, "model_unavailable", f"Model '{spec.id}' could not be loaded: {exc}",
            type_="server_error",
        ) from exc
    settings = state.settings
    stream = TtsStream(
        runner,
        model_id=spec.id,
        voice=voice,
        native_rate=sample_rate(spec),
        out_rate=out_rate,
        speed=speed,
        priority=priority,
        chunk_ms=settings.tts_chunk_ms,
        buffer_ms=settings.tts_buffer_ms,
        metrics=state.metrics,
        max_pending_chars=settings.max_text_chars,
        first_words=settings.tts_first_segment_words,
    )
    try:
        state.sessions.admit(stream)
    except CapacityExceeded as exc:
        raise TtsRequestError(
            429,
            "capacity_exceeded",
            str(exc),
            type_="server_error",
            headers={"Retry-After": str(exc.retry_after_s)},
        ) from exc
    recent_streams(state).append(stream)
    return stream


async def close_stream(state: AppState, stream: TtsStream, reason: str) -> None:
    """Stop a stream (no-op when it finished) and release its admission."""
    await stream.aclose(reason)
    state.sessions.release(stream)


class _AudioStreamResponse(StreamingResponse):
    """A streamed body that cancels its TTS stream the moment the client leaves.

    Starlette notices a lost client only when a ``send`` fails; a watcher on ``receive``
    for ``http.disconnect`` also catches it while the body waits for audio, and the
    ``on_close`` hook runs however the response ends (finished, disconnected, error).
    """

    def __init__(
        self,
        content: AsyncIterator[bytes],
        *,
        on_close: Callable[[bool], Awaitable[None]],
        headers: dict[str, str],
        media_type: str,
    ) -> None:
        super().__init__(content, headers=headers, media_type=media_type)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        completed = False

        async def watch_disconnect() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return

        sender = asyncio.create_task(self.stream_response(send))
        watcher = asyncio.create_task(watch_disconnect())
        try:
            done, _ = await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if sender in done:
                exc = sender.exception()
                if exc is None:
                    completed = True
                elif not isinstance(exc, OSError):
                    raise exc
        finally:
            for task in (sender, watcher):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
            await self._on_close(completed)


def _stream_headers(stream: TtsStream, spec: ModelSpec, rate: int) -> dict[str, str]:
    return {
        "x-audio-sample-rate": str(rate),
        "x-omnirt-adapter-schema": ADAPTER_SCHEMA,
        "x-omnirt-model": spec.id,
        "x-omnistream-stream-id": stream.id,
        "x-omnistream-voice": stream.voice,
        "cache-control": "no-store",
    }


def _audio_response(
    state: AppState,
    stream: TtsStream,
    body: AsyncIterator[bytes],
    headers: dict[str, str],
    media_type: str,
) -> _AudioStreamResponse:
    async def on_close(completed: bool) -> None:
        await close_stream(state, stream, "completed" if completed else "client disconnected")

    return _AudioStreamResponse(body, on_close=on_close, headers=headers, media_type=media_type)


# -- text2audio (PROTOCOLS §4) ---------------------------------------------------------


@router.post("/v1/text2audio/stream", openapi_extra=json_body(Text2AudioBody))
async def text2audio_stream(request: Request) -> Response:
    """Stream speech for ``text`` as raw s16le (or a streamed WAV)."""
    return await _text2audio(request, None)


@router.post("/v1/text2audio/warmup", openapi_extra=json_body(WarmupBody, required=False))
async def text2audio_warmup(request: Request) -> Response:
    """Load voice models and synthesise a short phrase so the first client pays nothing.

    Body (optional): ``{"model": id}`` or ``{"models": [ids]}``; default: the default model.
    """
    state = get_state(request)
    try:
        body = await read_json(request) if await request.body() else {}
        wanted = body.get("models") or [body.get("model")]
        if not isinstance(wanted, list):
            raise TtsRequestError(400, "invalid_type", "models must be a list of model ids")
        results = []
        for model in wanted:
            spec = resolve_tts_model(state, model)
            started = time.monotonic()
            stream = await open_stream(
                state, spec, voice=default_voice(spec), out_rate=sample_rate(spec)
            )
            load_ms = (time.monotonic() - started) * 1000.0
            try:
                stream.say("Warm up.")
                async for _ in stream.audio():
                    pass
            finally:
                await close_stream(state, stream, "warmup")
            results.append(
                {
                    "model": spec.id,
                    "ready": True,
                    "load_ms": round(load_ms, 1),
                    "first_audio_ms": stream.first_audio_ms,
                    "replicas": state.engine.runner(spec.id).replicas,
                }
            )
    except TtsRequestError as exc:
        return error_response(state, "text2audio.warmup", exc)
    return JSONResponse({"status": "ok", "models": results})


@router.get("/v1/text2audio/models")
async def text2audio_models(request: Request) -> dict[str, Any]:
    """Every voice model with its status, voices, rate and streaming granularity."""
    state = get_state(request)
    statuses = []
    usable = []
    for spec in state.registry.specs(TASK, include_disallowed=True):
        reason = spec.unavailable_reason()
        allowed = state.registry.allowed(spec)
        if not allowed:
            reason = reason or f"tier '{spec.tier}' is not allowed on this server"
        ok = reason is None
        if ok:
            usable.append(spec.id)
        caps = spec.capabilities
        statuses.append(
            {
                "id": spec.id,
                "connected": ok,
                "available": ok,
                "reason": reason or "",
                "tier": str(spec.tier),
                "loaded": state.engine.loaded(spec.id),
                "summary": spec.summary,
                "sample_rate": caps.get("sample_rate"),
                "default_voice": caps.get("default_voice"),
                "voices": caps.get("voices", []),
                "languages": caps.get("languages", []),
                "streaming": caps.get("streaming"),
                "streaming_granularity": caps.get("streaming_granularity"),
                "license": caps.get("license"),
            }
        )
    return {
        "models": usable,
        "default": state.settings.tts_model,
        "audio_formats": list(TEXT2AUDIO_FORMATS),
        "sample_rates": list(SAMPLE_RATES),
        "statuses": statuses,
    }


@router.post("/v1/text2audio/{model}", openapi_extra=json_body(Text2AudioBody))
async def text2audio_model(request: Request, model: str) -> Response:
    """Like ``/v1/text2audio/stream`` with the model named in the path."""
    return await _text2audio(request, model)


async def _text2audio(request: Request, path_model: str | None) -> Response:
    state = get_state(request)
    route = "text2audio"
    try:
        body = await read_json(request)
        spec = resolve_tts_model(state, path_model or body.get("model"))
        text = check_text(state, body.get("text"), "text")
        voice = resolve_voice(
            spec,
            body.get("voice") or body.get("speaker_profile"),
            aliases=state.settings.voice_aliases,
        )
        if body.get("prompt_audio") or body.get("reference_text"):
            names = [v.id for v in voice_catalog(spec)]
            shown = ", ".join(names[:20]) + (" …" if len(names) > 20 else "")
            raise TtsRequestError(
                400,
                "voice_cloning_unsupported",
                f"Model '{spec.id}' cannot clone a voice from prompt_audio/reference_text; "
                f"name one of its voices in 'voice' or 'speaker_profile': {shown}",
            )
        audio_format = check_choice(
            body.get("audio_format") or "pcm_s16le", TEXT2AUDIO_FORMATS, "audio_format",
            "unsupported_format",
        )
        config = body.get("config") or {}
        if not isinstance(config, dict):
            raise TtsRequestError(400, "invalid_type", "config must be an object")
        rate = check_sample_rate(
            body.get("sample_rate", config.get("sample_rate")), sample_rate(spec)
        )
        ignored = ignored_config(config)
        speed = check_speed(config.get("speed", body.get("speed")))
        streaming = body.get("stream", True) is not False
        stream = await open_stream(state, spec, voice=voice, out_rate=rate, speed=speed)
    except TtsRequestError as exc:
        return error_response(state, route, exc)

    headers = _stream_headers(stream, spec, rate)
    headers["x-omnistream-streaming-mode"] = STREAMING_MODE
    if ignored:
        headers["x-omnistream-config-ignored"] = ",".join(ignored)
    requested = path_model or body.get("model")
    if isinstance(requested, str) and state.registry.serving_id(requested) != requested:
        headers["x-omnistream-degraded-from"] = requested
    media_type = f"audio/L16; rate={rate}; channels=1" if audio_format == "pcm_s16le" else (
        "audio/wav"
    )
    stream.say(text)
    if not streaming:
        try:
            pcm = b"".join([chunk async for chunk in stream.audio()])
        except SynthesisFailed as exc:
            failure = TtsRequestError(500, "synthesis_failed", str(exc), type_="server_error")
            return error_response(state, route, failure)
        finally:
            await close_stream(state, stream, "completed")
        content = encode_all(pcm, "wav", rate) if audio_format == "wav" else pcm
        return Response(content, headers=headers, media_type=media_type)

    async def body_iter() -> AsyncIterator[bytes]:
        if audio_format == "wav":
            yield wav_header(rate)
        async for chunk in stream.audio_batches():
            yield chunk

    return _audio_response(state, stream, body_iter(), headers, media_type)


# -- OpenAI ----------------------------------------------------------------------------


class _OffLoopEncoder:
    """Runs a PyAV encoder in a worker thread, one call at a time (house rule 1).

    An mp3 encode of a second of speech takes ~10 ms: too long for the event loop with
    many streams live. Calls are shielded, so a client that disconnects mid-encode does
    not close the codec under a thread still using it; :meth:`close` waits for it.
    """

    def __init__(self, encoder: StreamingAudioEncoder) -> None:
        self._encoder = encoder
        self._inline = encoder.format in ("pcm", "wav")  # byte copies: no thread hop
        self._last: asyncio.Future[bytes] | None = None
        self.output_rate = encoder.output_rate

    async def _call(self, fn: Callable[..., bytes], *args: Any) -> bytes:
        if self._inline:
            return fn(*args)
        self._last = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        return await asyncio.shield(self._last)

    async def encode(self, pcm: bytes) -> bytes:
        """Encode a piece of s16le PCM; returns the bytes produced so far."""
        return await self._call(self._encoder.encode, pcm)

    async def flush(self) -> bytes:
        """Encode what the codec holds and close the container."""
        return await self._call(self._encoder.flush)

    def close(self) -> None:
        """Release the codec once no thread uses it."""
        last = self._last
        if last is not None and not last.done():
            last.add_done_callback(lambda _f: self._encoder.close())
        else:
            self._encoder.close()



@router.get("/v1/models/tts")
async def tts_voices(request: Request) -> dict[str, Any]:
    """Voice discovery: every usable TTS model with its voices and native rate."""
    state = get_state(request)
    data = []
    for spec in state.registry.specs(TASK):
        if spec.unavailable_reason() is not None:
            continue
        data.append(
            {
                "id": spec.id,
                "object": "model",
                "owned_by": spec.owned_by,
                "voices": [v.id for v in voice_catalog(spec)],
                "default_voice": default_voice(spec),
                "sample_rate": sample_rate(spec),
            }
        )
    return {"object": "list", "data": data}


async def _complete_wav(
    state: AppState, route: str, stream: TtsStream, spec: ModelSpec, text: str
) -> Response:
    """The whole utterance as one WAV with its real sizes (``wave`` reads it right)."""
    headers = _stream_headers(stream, spec, OPENAI_RATE)
    stream.say(text)
    try:
        pcm = b"".join([chunk async for chunk in stream.audio()])
    except SynthesisFailed as exc:
        failure = TtsRequestError(500, "synthesis_failed", str(exc), type_="server_error")
        return error_response(state, route, failure)
    finally:
        await close_stream(state, stream, "completed")
    content = encode_all(pcm, "wav", OPENAI_RATE)
    return Response(content, headers=headers, media_type=CONTENT_TYPES["wav"])


@router.post("/v1/audio/speech", openapi_extra=json_body(SpeechBody))
async def openai_speech(request: Request) -> Response:
    """OpenAI-compatible speech: every ``response_format``, ``speed``, SSE streaming."""
    state = get_state(request)
    route = "audio.speech"
    try:
        body = await read_json(request)
        spec = resolve_tts_model(state, body.get("model"))
        text = check_text(state, body.get("input"), "input")
        voice = resolve_voice(
            spec, body.get("voice"), openai_names=True, aliases=state.settings.voice_aliases
        )
        fmt = check_choice(
            body.get("response_format") or "mp3", OPENAI_FORMATS, "response_format",
            "unsupported_format",
        )
        stream_format = check_choice(
            body.get("stream_format") or "audio", OPENAI_STREAM_FORMATS, "stream_format",
            "unsupported_format",
        )
        speed = check_speed(body.get("speed"))
        streamed = body.get("stream", False)
        if not isinstance(streamed, bool):
            raise TtsRequestError(400, "invalid_type", "stream must be true or false")
        stream = await open_stream(state, spec, voice=voice, out_rate=OPENAI_RATE, speed=speed)
    except TtsRequestError as exc:
        return error_response(state, route, exc)

    if fmt == "wav" and stream_format == "audio" and not streamed:
        # A WAV file states its sizes up front, so a real one waits for the last sample;
        # `"stream": true` gets it while it is synthesised, with 0xFFFFFFFF sizes.
        return await _complete_wav(state, route, stream, spec, text)

    encoder = _OffLoopEncoder(StreamingAudioEncoder(fmt, OPENAI_RATE))
    headers = _stream_headers(stream, spec, encoder.output_rate)
    stream.say(text)

    # SSE events stay small (200 ms of audio at most) for clients that decode per event.
    batch_bytes = OPENAI_RATE * 2 // 5 if stream_format == "sse" else 64 * 1024

    async def encoded() -> AsyncIterator[bytes]:
        try:
            async for chunk in stream.audio_batches(batch_bytes):
                data = await encoder.encode(chunk)
                if data:
                    yield data
            tail = await encoder.flush()
            if tail:
                yield tail
        finally:
            encoder.close()

    if stream_format == "audio":
        return _audio_response(state, stream, encoded(), headers, CONTENT_TYPES[fmt])

    async def sse() -> AsyncIterator[bytes]:
        try:
            async for data in encoded():
                delta = {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}
                yield f"data: {json.dumps(delta)}\n\n".encode()
        except SynthesisFailed as exc:
            payload: dict[str, Any] = {
                "type": "error",
                "error": {"message": str(exc), "code": "synthesis_failed"},
            }
            yield f"data: {json.dumps(payload)}\n\n".encode()
            return
        tokens = max(1, len(text) // 4)
        done = {
            "type": "speech.audio.done",
            "usage": {
                "input_tokens": tokens,
                "output_tokens": 0,
                "total_tokens": tokens,
                "audio_seconds": round(stream.audio_s, 3),
            },
        }
        yield f"data: {json.dumps(done)}\n\n".encode()

    return _audio_response(state, stream, sse(), headers, "text/event-stream")
