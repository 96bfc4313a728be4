"""``WS /v1/realtime``: the OpenAI Realtime protocol over a :class:`VoiceAgentSession`.

Speaks the protocol as the official ``openai`` Python SDK's ``client.realtime.connect``
does: JSON events both ways, base64 audio (``pcm16`` at 24 kHz, or G.711 μ-law / A-law
at 8 kHz), the GA session shape (``type``, ``output_modalities``, ``audio.input`` /
``audio.output``) and, when the client sends ``OpenAI-Beta: realtime=v1`` (or the
``openai-beta.realtime-v1`` subprotocol), the beta event names and session shape
(``response.audio.delta``, ``input_audio_format``, ``turn_detection`` at the top…).

The handshake picks the session: ``?model=<provider/model>`` (a model of the gateway's
providers file) for a conversation, ``?intent=transcription`` for a transcription-only
session that needs no LLM. The session itself owns the conversation; this module only
parses and checks client events, renames and encodes server events, and sends them
through one bounded queue (a client that stops reading is dropped, not buffered for).

Errors are ``{"type": "error", "error": {"type", "code", "message", "param",
"event_id"}}`` with the offending client ``event_id``; the socket stays open.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, WebSocket
from starlette.responses import JSONResponse

from omnistream.codecs import g711
from omnistream.codecs.pcm import StreamResampler, float32_to_s16le, s16le_to_float32
from omnistream.models.tts import sample_rate
from omnistream.sessions.manager import CapacityExceeded
from omnistream.sessions.vad_process import VadProcess
from omnistream.sessions.voice_agent import (
    OUTPUT_RATE,
    VAD_RATE,
    AgentConfig,
    AgentError,
    ChatStream,
    TtsVoice,
    TurnDetection,
    VoiceAgentSession,
)
from omnistream.transports import ws_common
from omnistream.transports.state import AppState, ModelAccessError, get_state
from omnistream.transports.tts_http import TtsRequestError, resolve_tts_model, resolve_voice

log = logging.getLogger(__name__)

router = APIRouter()

AudioFormat = Literal["pcm16", "g711_ulaw", "g711_alaw"]
FORMAT_RATES: dict[str, int] = {"pcm16": OUTPUT_RATE, "g711_ulaw": 8000, "g711_alaw": 8000}
GA_FORMATS: dict[str, AudioFormat] = {
    "audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw",
}
GA_FORMAT_NAMES = {v: k for k, v in GA_FORMATS.items()}
TRANSCRIPTION_MODELS = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe",
                        "gpt-4o-transcribe-latest", "gpt-4o-mini-transcribe-latest")
MAX_INSTRUCTIONS_CHARS = 32_768
MAX_TOOLS = 128
MODEL_LOAD_TIMEOUT_S = 120.0

# GA event names the beta protocol spells differently (None: beta has no such event).
BETA_NAMES: dict[str, str | None] = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
    "conversation.item.added": "conversation.item.created",
    "conversation.item.done": None,
}
BETA_CONTENT = {"output_audio": "audio", "output_text": "text"}


@dataclass
class WireConfig:
    """The session as the client configured it: the agent's config plus wire details."""

    agent: AgentConfig
    input_format: AudioFormat = "pcm16"
    output_format: AudioFormat = "pcm16"
    voice_name: str = "alloy"  # as the client named it (OpenAI names map to our default)
    transcription: dict[str, Any] | None = None


# -- the LLM, through the gateway ------------------------------------------------------


def _gateway(state: AppState) -> Any:
    """The app's gateway, or ``None`` when it is not built in or has no providers."""
    try:
        from omnistream.gateway import gateway_of  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return None
    try:
        return gateway_of(state)
    except Exception:
        return None


def has_model(state: AppState, model: str) -> bool:
    """Whether the gateway's providers file knows ``provider/model``."""
    gateway = _gateway(state)
    return bool(gateway is not None and gateway.has_model(model))


def chat_stream(state: AppState) -> ChatStream | None:
    """The one function the voice agent calls the LLM through (the gateway's stream)."""
    gateway = _gateway(state)
    if gateway is None:
        return None

    def stream(model: str, body: dict[str, Any]) -> Any:
        return gateway.chat_stream(model, body)

    return stream


# -- the session's engines ---------------------------------------------------------------


def agent_voice(state: AppState) -> TtsVoice | None:
    """The default TTS voice's runner (started now), or ``None`` when unavailable."""
    try:
        spec = resolve_tts_model(state, None)
        runner = state.engine.runner(spec.id)
    except (TtsRequestError, KeyError, Exception) as exc:
        log.warning("voice agent without a voice: %s", exc)
        return None
    settings = state.settings
    return TtsVoice(
        runner=runner,
        model_id=spec.id,
        native_rate=sample_rate(spec),
        chunk_ms=settings.tts_chunk_ms,
        buffer_ms=settings.tts_buffer_ms,
        max_pending_chars=settings.max_text_chars,
        first_words=settings.tts_first_segment_words,
    )


def agent_stt(state: AppState) -> Any:
    """The Whisper runner (started now), or ``None`` when STT cannot load here."""
    try:
        spec = state.resolve_model(state.settings.stt_model, "audio2text")
        return state.engine.runner(spec.id)
    except (ModelAccessError, KeyError, Exception) as exc:
        log.warning("voice agent without transcription: %s", exc)
        return None


def default_voice_id(voice: TtsVoice | None, state: AppState) -> str:
    """The TTS model's default voice id."""
    if voice is None:
        return ""
    try:
        return resolve_voice(state.registry.get(voice.model_id), None)  # type: ignore[arg-type]
    except Exception:
        return ""


def vad_process(state: AppState) -> VadProcess:
    """The server's one Silero worker process (started on first use, stopped at shutdown)."""
    existing = state.extras.get("vad_process")
    if isinstance(existing, VadProcess):
        return existing
    process = VadProcess()
    state.extras["vad_process"] = process
    state.extras.setdefault("shutdown_hooks", []).append(process.aclose)
    return process


def new_session(
    state: AppState, config: AgentConfig, *, with_llm: bool = True
) -> VoiceAgentSession:
    """A voice agent on this server's runners (not yet admitted or started)."""
    settings = state.settings
    voice = agent_voice(state) if config.kind == "realtime" else None  # transcription: no voice
    if not config.voice:
        config.voice = default_voice_id(voice, state)
    return VoiceAgentSession(
        config,
        llm=chat_stream(state) if with_llm else None,
        tts=voice,
        stt=agent_stt(state),
        metrics=state.metrics,
        output_lead_ms=settings.realtime_output_lead_ms,
        llm_timeout_s=settings.realtime_llm_timeout_s,
        tool_timeout_s=settings.realtime_tool_timeout_s,
        max_buffer_s=settings.realtime_max_buffer_s,
        vad=vad_process(state),
    )


# -- the route ---------------------------------------------------------------------------


def _wants_beta(ws: WebSocket) -> bool:
    header = ws.headers.get("openai-beta", "")
    offered = _offered_subprotocols(ws)
    return "realtime=v1" in header.replace(" ", "") or "openai-beta.realtime-v1" in offered


def _offered_subprotocols(ws: WebSocket) -> list[str]:
    raw = ws.headers.get("sec-websocket-protocol", "")
    return [p.strip() for p in raw.split(",") if p.strip()]


async def _deny(ws: WebSocket, status: int, code: str, message: str,
                headers: dict[str, str] | None = None) -> None:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": code,
                      "param": None}}
    try:
        await ws.send_denial_response(JSONResponse(body, status_code=status, headers=headers))
    except RuntimeError:  # a server without the denial extension
        await ws.close(code=1008)


@router.websocket("/v1/realtime")
async def realtime(ws: WebSocket) -> None:
    """One Realtime conversation (or transcription session) per socket."""
    state = get_state(ws)
    params = ws.query_params
    transcription = params.get("intent") == "transcription"
    model = params.get("model") or None
    if transcription:
        model = None
    elif model is not None and not has_model(state, model):
        await _deny(
            ws, 404, "invalid_model",
            f"Model '{model}' is not served here: the LLM of a realtime session is a "
            "provider/model of the server's providers file (omnistream serve --providers); "
            "use ?intent=transcription for transcription only",
        )
        return
    agent = AgentConfig(kind="transcription" if transcription else "realtime", model=model)
    if transcription:
        agent.turn_detection = TurnDetection(create_response=False, interrupt_response=False)
    session = new_session(state, agent, with_llm=not transcription)
    try:
        state.sessions.admit(session)
    except CapacityExceeded as exc:
        await _deny(ws, 429, "capacity_exceeded", str(exc),
                    {"Retry-After": str(exc.retry_after_s)})
        return
    subprotocol = "realtime" if "realtime" in _offered_subprotocols(ws) else None
    try:
        await ws.accept(subprotocol=subprotocol)
    except Exception:
        state.sessions.release(session)
        raise
    conn = RealtimeConnection(ws, state, session, WireConfig(agent), beta=_wants_beta(ws))
    try:
        await conn.serve()
    finally:
        state.sessions.release(session)


class RealtimeConnection:
    """One socket: parses client events into session calls and encodes what comes back."""

    def __init__(
        self,
        ws: WebSocket,
        state: AppState,
        session: VoiceAgentSession,
        wire: WireConfig,
        *,
        beta: bool,
    ) -> None:
        self.ws = ws
        self.state = state
        self.session = session
        self.wire = wire
        self.beta = beta
        self._out: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(
            state.settings.realtime_max_queued_events
        )
        self._overflow = False
        self._model_refused: AgentError | None = None
        self._out_resampler: StreamResampler | None = None
        self._out_response: str | None = None
        session.on_event = self._enqueue

        async def expire(reason: str) -> None:
            with contextlib.suppress(asyncio.QueueFull):
                self._out.put_nowait(None)  # the sender ends the socket after the error

        session.on_expire = expire

    # -- sending ----------------------------------------------------------------------

    def _enqueue(self, event: dict[str, Any]) -> None:
        if self._overflow:
            return
        wire = self._to_wire(event)
        if wire is None:
            return
        try:
            self._out.put_nowait(wire)
        except asyncio.QueueFull:
            # A client that does not read its events: the session cannot go on.
            self._overflow = True
            log.info("realtime client %s stopped reading; closing", self.session.id)
            with contextlib.suppress(asyncio.QueueEmpty):
                self._out.get_nowait()
            self._out.put_nowait(None)

    async def _sender(self) -> None:
        timeout = self.state.settings.send_timeout_s
        while True:
            event = await self._out.get()
            if event is None:
                raise ws_common.ClientGone()
            await ws_common.send_json(self.ws, event, timeout)

    def _to_wire(self, event: dict[str, Any]) -> dict[str, Any] | None:
        kind = event["type"]
        if kind == "response.output_audio.delta":
            event["delta"] = self._encode_audio(event["response_id"], event["delta"])
        if not self.beta:
            return event
        name = BETA_NAMES.get(kind, kind)
        if name is None:
            return None
        event["type"] = name
        return _beta_payload(event, self)

    def _encode_audio(self, response_id: str, pcm: bytes) -> str:
        fmt = self.wire.output_format
        if fmt == "pcm16":
            return base64.b64encode(pcm).decode()
        if self._out_resampler is None or self._out_response != response_id:
            self._out_resampler = StreamResampler(OUTPUT_RATE, FORMAT_RATES[fmt])
            self._out_response = response_id
        samples = self._out_resampler.process(s16le_to_float32(pcm))
        law: g711.Law = "ulaw" if fmt == "g711_ulaw" else "alaw"
        return base64.b64encode(g711.encode(float32_to_s16le(samples), law)).decode()

    # -- the loop -----------------------------------------------------------------------

    async def serve(self) -> None:
        """Send ``session.created``, then handle client events until the socket closes."""
        self.session.emit({"type": "session.created", "session": self.session_object()})
        sender = asyncio.create_task(self._sender(), name=f"{self.session.id}-send")
        receiver = asyncio.create_task(self._receive(), name=f"{self.session.id}-recv")
        try:
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, receiver):
                task.cancel()
            for task in (sender, receiver):
                with contextlib.suppress(BaseException):
                    await task
            await self.session.aclose("client disconnected")
            await ws_common.close_quietly(self.ws)

    async def _receive(self) -> None:
        settings = self.state.settings
        with contextlib.suppress(ws_common.ClientGone):
            while True:
                incoming = await ws_common.receive(self.ws)
                if incoming.data is not None:
                    self._error("invalid_event", "send JSON text frames; binary frames are "
                                "not part of the Realtime protocol")
                    continue
                if incoming.size > settings.max_message_bytes:
                    self._error("message_too_large", "event exceeds the server's "
                                f"max_message_bytes ({settings.max_message_bytes})")
                    continue
                message = await ws_common.off_loop(
                    ws_common.parse_json, incoming.text or "", size=incoming.size
                )
                if message is None:
                    self._error("invalid_json", "event is not valid JSON")
                    continue
                event_id = message.get("event_id")
                event_id = event_id if isinstance(event_id, str) else None
                try:
                    await self._handle(message, event_id)
                except AgentError as exc:
                    self.session.report(exc, event_id)

    def _error(self, code: str, message: str, event_id: str | None = None,
               param: str | None = None) -> None:
        self.session.report(AgentError(code, message, param=param), event_id)

    async def _handle(self, message: dict[str, Any], event_id: str | None) -> None:
        kind = message.get("type")
        session = self.session
        if kind == "input_audio_buffer.append":
            await self._append(message)
        elif kind in ("session.update", "transcription_session.update"):
            data = message.get("session")
            if not isinstance(data, dict):
                raise AgentError("missing_required_parameter",
                                 "session.update needs a 'session' object", param="session")
            self.wire = self._updated(data)
            session.update(self.wire.agent)
            updated = ("transcription_session.updated" if kind == "transcription_session.update"
                       else "session.updated")
            session.emit({"type": updated, "session": self.session_object()})
            if self._model_refused is not None:
                session.report(self._model_refused, event_id)
        elif kind == "input_audio_buffer.commit":
            session.commit_input()
        elif kind == "input_audio_buffer.clear":
            session.clear_input()
        elif kind == "conversation.item.create":
            previous = message.get("previous_item_id")
            if previous is not None and not isinstance(previous, str):
                raise AgentError("invalid_value", "previous_item_id must be a string",
                                 param="previous_item_id")
            item = _from_beta_item(message.get("item"))
            session.create_item(item, previous, await self._item_audio(item))
        elif kind == "conversation.item.delete":
            session.delete_item(_string(message, "item_id"))
        elif kind == "conversation.item.retrieve":
            session.retrieve_item(_string(message, "item_id"))
        elif kind == "conversation.item.truncate":
            audio_end_ms = message.get("audio_end_ms")
            content_index = message.get("content_index", 0)
            if isinstance(audio_end_ms, bool) or not isinstance(audio_end_ms, int):
                raise AgentError("invalid_value", "audio_end_ms must be an integer",
                                 param="audio_end_ms")
            if isinstance(content_index, bool) or not isinstance(content_index, int):
                raise AgentError("invalid_value", "content_index must be an integer",
                                 param="content_index")
            session.truncate_item(_string(message, "item_id"), content_index, audio_end_ms)
        elif kind == "response.create":
            data = message.get("response") or {}
            if not isinstance(data, dict):
                raise AgentError("invalid_value", "response must be an object",
                                 param="response")
            session.create_response(self._response_params(data))
        elif kind in ("response.cancel", "output_audio_buffer.clear"):
            running = session.response
            wanted = message.get("response_id")
            if running is None or (isinstance(wanted, str) and wanted != running.id):
                raise AgentError("response_cancel_not_active",
                                 "Cancellation failed: no active response found")
            session.cancel_response("client_cancelled")
        else:
            raise AgentError("invalid_event" if isinstance(kind, str) else
                             "missing_required_parameter",
                             f"unknown event type {kind!r}" if isinstance(kind, str)
                             else "event needs a string 'type'", param="type")

    async def _item_audio(self, item: Any) -> tuple[Any, int] | None:
        """The decoded ``audio`` of a user item's ``input_audio`` part (then dropped from it).

        The conversation keeps the transcript, not the audio: items stay small.
        """
        if not isinstance(item, dict) or not isinstance(item.get("content"), list):
            return None
        for part in item["content"]:
            if isinstance(part, dict) and part.get("type") == "input_audio" and "audio" in part:
                data = part.pop("audio")
                if not isinstance(data, str):
                    raise AgentError("invalid_value", "input_audio 'audio' must be base64",
                                     param="item.content.audio")
                fmt = self.wire.input_format
                try:
                    # Decoded and resampled to 16 kHz here, off the loop when large: a
                    # whole item of audio resamples in tens of milliseconds.
                    samples = await ws_common.off_loop(_decode_item_audio, data, fmt,
                                                       size=len(data))
                except ValueError as exc:
                    raise AgentError("invalid_audio", str(exc),
                                     param="item.content.audio") from exc
                return (samples, VAD_RATE) if samples.size else None
        return None

    async def _append(self, message: dict[str, Any]) -> None:
        audio = message.get("audio")
        if not isinstance(audio, str):
            raise AgentError("missing_required_parameter",
                             "input_audio_buffer.append needs base64 'audio'", param="audio")
        fmt = self.wire.input_format
        try:
            samples = await ws_common.off_loop(_decode_audio, audio, fmt, size=len(audio))
        except ValueError as exc:
            raise AgentError("invalid_audio", str(exc), param="audio") from exc
        if samples.size:
            self.session.append_audio(samples, FORMAT_RATES[fmt])

    # -- session config ----------------------------------------------------------------

    def _updated(self, data: dict[str, Any]) -> WireConfig:
        """A copy of the wire config with a (GA or beta) ``session`` object applied."""
        wire = dataclasses.replace(self.wire, agent=dataclasses.replace(self.wire.agent))
        agent = wire.agent
        kind = data.get("type")
        if kind is not None and kind != agent.kind:
            raise AgentError("invalid_value", f"session.type is '{agent.kind}' for this "
                             f"connection and cannot become {kind!r}", param="session.type")
        audio = _obj(data.get("audio"))
        audio_in, audio_out = _obj(audio.get("input")), _obj(audio.get("output"))
        self._model_refused = None
        if "model" in data and agent.kind == "realtime" and data["model"] != agent.model:
            model = data["model"]
            if isinstance(model, str) and has_model(self.state, model):
                agent.model = model
                if self.session.llm is None:
                    self.session.llm = chat_stream(self.state)
            else:
                # Clients written for OpenAI often name their model in every update; the
                # rest of the update still applies, and the model gets its own error.
                self._model_refused = AgentError(
                    "invalid_model",
                    f"Model {model!r} is not served here (the session keeps "
                    f"{agent.model!r}): use a provider/model of the server's providers file",
                    param="session.model")
        if "instructions" in data:
            text = data["instructions"]
            if not isinstance(text, str) or len(text) > MAX_INSTRUCTIONS_CHARS:
                raise AgentError("invalid_value", "instructions must be a string of at most "
                                 f"{MAX_INSTRUCTIONS_CHARS} characters",
                                 param="session.instructions")
            agent.instructions = text
        modalities = data.get("output_modalities", data.get("modalities"))
        if modalities is not None:
            agent.output_modalities = _modalities(modalities, "session.output_modalities")
        voice = audio_out.get("voice", data.get("voice"))
        if voice is not None:
            wire.voice_name, agent.voice = self._voice(voice)
        speed = audio_out.get("speed", data.get("speed"))
        if speed is not None:
            if isinstance(speed, bool) or not isinstance(speed, int | float) or not (
                0.25 <= speed <= 1.5
            ):
                raise AgentError("invalid_value", "speed must be between 0.25 and 1.5",
                                 param="session.audio.output.speed")
            agent.speed = float(speed)
        if "temperature" in data:
            agent.temperature = _temperature(data["temperature"], "session.temperature")
        for key in ("max_output_tokens", "max_response_output_tokens"):
            if key in data:
                agent.max_output_tokens = _max_tokens(data[key], f"session.{key}")
        if "tools" in data:
            agent.tools = _tools(data["tools"], "session.tools")
        if "tool_choice" in data:
            agent.tool_choice = data["tool_choice"]
        fmt_in = audio_in.get("format", data.get("input_audio_format"))
        if fmt_in is not None:
            wire.input_format = _format(fmt_in, "session.audio.input.format")
        fmt_out = audio_out.get("format", data.get("output_audio_format"))
        if fmt_out is not None:
            wire.output_format = _format(fmt_out, "session.audio.output.format")
        for key, where in (("transcription", audio_in), ("input_audio_transcription", data)):
            if key in where:
                wire.transcription = _transcription(where[key], agent, f"session.{key}")
        for key, where in (("turn_detection", audio_in), ("turn_detection", data)):
            if key in where:
                agent.turn_detection = _turn_detection(where[key], agent.kind)
        return wire

    def _voice(self, voice: Any) -> tuple[str, str]:
        if isinstance(voice, dict):
            voice = voice.get("id")
        if not isinstance(voice, str) or not voice:
            raise AgentError("invalid_value", "voice must be a voice name",
                             param="session.audio.output.voice")
        tts = self.session.tts
        spec = self.state.registry.get(tts.model_id) if tts is not None else None
        if spec is None:
            return voice, ""
        try:
            aliases = self.state.settings.voice_aliases
            return voice, resolve_voice(spec, voice, openai_names=True, aliases=aliases)
        except TtsRequestError as exc:
            raise AgentError("invalid_value", exc.message,
                             param="session.audio.output.voice") from exc

    def _response_params(self, data: dict[str, Any]) -> dict[str, Any]:
        """``response.create`` overrides, checked (GA or beta names)."""
        out: dict[str, Any] = {}
        modalities = data.get("output_modalities", data.get("modalities"))
        if modalities is not None:
            out["output_modalities"] = _modalities(modalities, "response.output_modalities")
        if "instructions" in data:
            if not isinstance(data["instructions"], str):
                raise AgentError("invalid_value", "instructions must be a string",
                                 param="response.instructions")
            out["instructions"] = data["instructions"]
        output = _obj(_obj(data.get("audio")).get("output"))
        voice = output.get("voice", data.get("voice"))
        if voice is not None:
            out["voice"] = self._voice(voice)[1]
        if "temperature" in data:
            out["temperature"] = _temperature(data["temperature"], "response.temperature")
        for key in ("max_output_tokens", "max_response_output_tokens"):
            if key in data:
                out["max_output_tokens"] = _max_tokens(data[key], f"response.{key}")
        if "tools" in data:
            out["tools"] = _tools(data["tools"], "response.tools")
        if "tool_choice" in data:
            out["tool_choice"] = data["tool_choice"]
        conversation = data.get("conversation", "auto")
        if conversation not in ("auto", "none"):
            raise AgentError("invalid_value", "conversation must be 'auto' or 'none'",
                             param="response.conversation")
        out["conversation"] = conversation
        if "input" in data:
            items = data["input"]
            if not isinstance(items, list):
                raise AgentError("invalid_value", "input must be a list of items",
                                 param="response.input")
            out["input"] = [self._input_item(i) for i in items]
        if isinstance(data.get("metadata"), dict):
            out["metadata"] = data["metadata"]
        return out

    def _input_item(self, item: Any) -> dict[str, Any]:
        if isinstance(item, dict) and item.get("type") == "item_reference":
            found = self.session.items.get(str(item.get("id")))
            if found is None:
                raise AgentError("item_not_found", f"item {item.get('id')!r} not found",
                                 param="response.input")
            return found
        from omnistream.sessions.voice_agent import _check_item

        return _check_item(_from_beta_item(item))

    def session_object(self) -> dict[str, Any]:
        """The ``session`` of ``session.created`` / ``session.updated`` (GA or beta)."""
        wire, agent = self.wire, self.wire.agent
        detection = _detection_object(agent.turn_detection)
        if self.beta:
            beta: dict[str, Any] = {
                "id": self.session.id,
                "object": "realtime.session" if agent.kind == "realtime"
                else "realtime.transcription_session",
                "model": agent.model,
                "modalities": ["text", "audio"] if "audio" in agent.output_modalities
                else ["text"],
                "instructions": agent.instructions,
                "voice": wire.voice_name,
                "input_audio_format": wire.input_format,
                "output_audio_format": wire.output_format,
                "input_audio_transcription": wire.transcription,
                "turn_detection": detection,
                "tools": agent.tools,
                "tool_choice": agent.tool_choice,
                "temperature": agent.temperature if agent.temperature is not None else 0.8,
                "max_response_output_tokens": agent.max_output_tokens or "inf",
                "speed": agent.speed,
            }
            return beta
        audio_input: dict[str, Any] = {
            "format": _format_object(wire.input_format),
            "transcription": wire.transcription,
            "noise_reduction": None,
            "turn_detection": detection,
        }
        if agent.kind == "transcription":
            return {"type": "transcription", "object": "realtime.transcription_session",
                    "id": self.session.id, "audio": {"input": audio_input}, "include": None}
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": self.session.id,
            "model": agent.model,
            "output_modalities": list(agent.output_modalities),
            "instructions": agent.instructions,
            "tools": agent.tools,
            "tool_choice": agent.tool_choice,
            "max_output_tokens": agent.max_output_tokens or "inf",
            "tracing": None,
            "truncation": "auto",
            "prompt": None,
            "include": None,
            "audio": {
                "input": audio_input,
                "output": {"format": _format_object(wire.output_format),
                           "voice": wire.voice_name, "speed": agent.speed},
            },
        }


# -- parsing helpers ----------------------------------------------------------------------


def _decode_audio(data: str, fmt: AudioFormat) -> Any:
    """Base64 audio of the session's input format → float32 mono at its rate."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("audio is not valid base64") from exc
    if fmt == "pcm16":
        if len(raw) % 2:
            raise ValueError("pcm16 audio must have an even number of bytes "
                             "(16-bit little-endian mono samples at 24 kHz)")
        return s16le_to_float32(raw)
    law: g711.Law = "ulaw" if fmt == "g711_ulaw" else "alaw"
    return s16le_to_float32(g711.decode(raw, law))


def _decode_item_audio(data: str, fmt: AudioFormat) -> Any:
    """A whole item's base64 audio → float32 mono at 16 kHz (what the session reads)."""
    samples = _decode_audio(data, fmt)
    return StreamResampler(FORMAT_RATES[fmt], VAD_RATE).process(samples, last=True)


def _obj(value: Any) -> dict[str, Any]:
    """``value`` when it is a JSON object, else an empty one (absent sections)."""
    return value if isinstance(value, dict) else {}


def _string(message: dict[str, Any], key: str) -> str:
    value = message.get(key)
    if not isinstance(value, str) or not value:
        raise AgentError("missing_required_parameter", f"'{key}' is required", param=key)
    return value


def _modalities(value: Any, param: str) -> tuple[Any, ...]:
    if not isinstance(value, list) or not value or any(m not in ("text", "audio")
                                                       for m in value):
        raise AgentError("invalid_value", "output_modalities must be ['audio'] or ['text']",
                         param=param)
    return ("audio",) if "audio" in value else ("text",)


def _temperature(value: Any, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 2:
        raise AgentError("invalid_value", "temperature must be a number from 0 to 2",
                         param=param)
    return float(value)


def _max_tokens(value: Any, param: str) -> int | None:
    if value == "inf" or value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        raise AgentError("invalid_value", "max_output_tokens must be 1-4096 or 'inf'",
                         param=param)
    return value


def _tools(value: Any, param: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise AgentError("invalid_value", f"tools must be a list of at most {MAX_TOOLS}",
                         param=param)
    tools = []
    for tool in value:
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not (
            isinstance(tool.get("name"), str) and tool["name"]
        ):
            raise AgentError("invalid_value", "each tool must be {type: 'function', name, "
                             "description, parameters}", param=param)
        params = tool.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise AgentError("invalid_value", "tool parameters must be a JSON schema object",
                             param=param)
        tools.append({"type": "function", "name": tool["name"],
                      "description": str(tool.get("description") or ""),
                      "parameters": params or {"type": "object", "properties": {}}})
    return tools


def _format(value: Any, param: str) -> AudioFormat:
    if isinstance(value, str) and value in FORMAT_RATES:
        return value  # type: ignore[return-value]
    if isinstance(value, dict) and value.get("type") in GA_FORMATS:
        fmt = GA_FORMATS[value["type"]]
        rate = value.get("rate")
        if fmt == "pcm16" and rate not in (None, OUTPUT_RATE):
            raise AgentError("invalid_value", f"audio/pcm is supported at {OUTPUT_RATE} Hz "
                             f"only, not {rate!r}", param=f"{param}.rate")
        return fmt
    raise AgentError(
        "invalid_value",
        "audio format must be {type: 'audio/pcm', rate: 24000}, {type: 'audio/pcmu'} or "
        "{type: 'audio/pcma'} (beta: 'pcm16', 'g711_ulaw', 'g711_alaw')", param=param)


def _format_object(fmt: AudioFormat) -> dict[str, Any]:
    name = GA_FORMAT_NAMES[fmt]
    return {"type": name, "rate": OUTPUT_RATE} if fmt == "pcm16" else {"type": name}


def _transcription(value: Any, agent: AgentConfig, param: str) -> dict[str, Any] | None:
    if value is None:
        agent.transcribe = False
        return None
    if not isinstance(value, dict):
        raise AgentError("invalid_value", "transcription must be an object or null",
                         param=param)
    model = value.get("model", "whisper-1")
    if model not in TRANSCRIPTION_MODELS and not (
        isinstance(model, str) and model.startswith("whisper")
    ):
        raise AgentError("invalid_value", f"transcription model {model!r} is not available; "
                         "whisper-1 (the server's Whisper) is", param=f"{param}.model")
    language = value.get("language")
    if language not in (None, "", "en"):
        raise AgentError("invalid_value", "the server's Whisper transcribes English ('en') "
                         "only", param=f"{param}.language")
    prompt = value.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise AgentError("invalid_value", "prompt must be a string", param=f"{param}.prompt")
    agent.transcribe = True
    agent.transcription_model = str(model)
    agent.language = language or None
    agent.prompt = prompt or None
    return {"model": model, "language": language, "prompt": prompt}


def _turn_detection(value: Any, kind: str) -> TurnDetection | None:
    param = "session.audio.input.turn_detection"
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("server_vad", "semantic_vad"):
        raise AgentError("invalid_value", "turn_detection type must be server_vad or "
                         "semantic_vad (or null for manual commits)", param=f"{param}.type")
    out = TurnDetection(type=value["type"])
    if value["type"] == "semantic_vad":  # our VAD is acoustic: eagerness sets the pause
        eagerness = value.get("eagerness", "auto")
        out.silence_duration_ms = {"low": 800, "medium": 500, "high": 300}.get(str(eagerness), 500)
    threshold = value.get("threshold")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not (
            0.0 <= threshold <= 1.0
        ):
            raise AgentError("invalid_value", "threshold must be between 0 and 1",
                             param=f"{param}.threshold")
        out.threshold = float(threshold)
    for key, low, high in (("prefix_padding_ms", 0, 5000), ("silence_duration_ms", 32, 10000)):
        number = value.get(key)
        if number is None:
            continue
        if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
            raise AgentError("invalid_value", f"{key} must be an integer from {low} to {high}",
                             param=f"{param}.{key}")
        setattr(out, key, number)
    for key in ("create_response", "interrupt_response"):
        flag = value.get(key)
        if flag is None:
            continue
        if not isinstance(flag, bool):
            raise AgentError("invalid_value", f"{key} must be a boolean", param=f"{param}.{key}")
        setattr(out, key, flag)
    if kind == "transcription":
        out.create_response = out.interrupt_response = False
    return out


def _detection_object(detection: TurnDetection | None) -> dict[str, Any] | None:
    if detection is None:
        return None
    return {
        "type": detection.type,
        "threshold": detection.threshold,
        "prefix_padding_ms": detection.prefix_padding_ms,
        "silence_duration_ms": detection.silence_duration_ms,
        "create_response": detection.create_response,
        "interrupt_response": detection.interrupt_response,
        "idle_timeout_ms": None,
    }


def _from_beta_item(item: Any) -> Any:
    """Beta content types (``text``/``audio`` for the assistant) are accepted as GA ones."""
    if isinstance(item, dict) and isinstance(item.get("content"), list):
        item = {**item, "content": [
            {**p, "type": {"text": "output_text", "audio": "output_audio"}.get(
                str(p.get("type")), p.get("type"))}
            if isinstance(p, dict) and item.get("role") == "assistant" else p
            for p in item["content"]
        ]}
    return item


def _beta_item(item: Any) -> Any:
    if not isinstance(item, dict):
        return item
    out = dict(item)
    if isinstance(out.get("content"), list):
        out["content"] = [
            {**p, "type": BETA_CONTENT.get(str(p.get("type")), p.get("type"))}
            if isinstance(p, dict) else p for p in out["content"]
        ]
    return out


def _beta_payload(event: dict[str, Any], conn: RealtimeConnection) -> dict[str, Any]:
    """Beta shapes for items and responses inside an event."""
    if "item" in event:
        event["item"] = _beta_item(event["item"])
    response = event.get("response")
    if isinstance(response, dict):
        response = dict(response)
        response["output"] = [_beta_item(i) for i in response.get("output") or []]
        response["modalities"] = (["text", "audio"] if "audio" in
                                  (response.pop("output_modalities", None) or []) else ["text"])
        response["voice"] = conn.wire.voice_name
        response["output_audio_format"] = conn.wire.output_format
        response["temperature"] = conn.wire.agent.temperature or 0.8
        response.pop("audio", None)
        event["response"] = response
    return event


__all__ = ["RealtimeConnection", "WireConfig", "chat_stream", "has_model", "new_session",
           "router"]

