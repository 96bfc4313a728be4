"""The demo's talk mode: the browser's microphone talks to a voice agent over WebRTC.

A WebRTC avatar session (``omnistream/sessions/webrtc.py``) with ``talk`` in its offer
gets a :class:`~omnistream.sessions.voice_agent.VoiceAgentSession` (the same session type
as ``WS /v1/realtime``) beside it:

* the microphone track feeds the agent (Silero turn detection, Whisper) instead of
  driving the lips;
* each answer's audio goes into the avatar session as one utterance, so the avatar says
  it with moving lips on the session's clock, and its transcript rides on the audio as
  subtitles;
* when the person speaks over the avatar, the agent cancels the answer and this module
  interrupts the avatar (queued audio and frames flushed, the mouth closes).

Data-channel events added by talk mode: ``talk.state`` (``listening`` / ``thinking`` /
``speaking``), ``transcript`` (``role`` ``user`` or ``assistant``, ``text``, ``final``),
``metrics`` with the turn's ``voice_to_voice_ms`` and its stages (and
``barge_in_ms`` after an interruption), and ``error`` for the agent's errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Any

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from pydantic import BaseModel, ConfigDict, Field

from omnistream.codecs.pcm import s16le_to_float32
from omnistream.sessions.voice_agent import (
    OUTPUT_RATE,
    AgentConfig,
    AgentError,
    TurnDetection,
    VoiceAgentSession,
)
from omnistream.sessions.webrtc import SpeechChunk, WebRTCAvatarSession, _mono_float
from omnistream.transports.state import AppState

log = logging.getLogger(__name__)

#: Utterance text that stands for "the agent's answer with this response id".
AGENT_UTTERANCE = "\x00agent:"
MAX_QUEUED_BLOCKS = 1200  # agent audio blocks (<=100 ms each) waiting for the avatar
_EXTRAS_KEY = "webrtc_talk"


class TalkRequest(BaseModel):
    """``talk`` in a ``POST /v1/webrtc/offer`` body: the conversation's settings."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="the LLM as provider/model (providers file)")
    instructions: str | None = Field(None, max_length=32_768)
    silence_duration_ms: int = Field(500, ge=100, le=5000)
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    max_output_tokens: int | None = Field(None, ge=1, le=4096)


class TalkError(Exception):
    """A ``talk`` request that cannot be served (``status`` and ``code`` for the offer)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Talk:
    """Joins one avatar session and one voice agent for the life of the connection."""

    def __init__(self, rtc: WebRTCAvatarSession, agent: VoiceAgentSession) -> None:
        self.rtc = rtc
        self.agent = agent
        self.state = "listening"
        self._queues: dict[str, asyncio.Queue[SpeechChunk | None]] = {}
        self._text: dict[str, str] = {}
        self._assistant: dict[str, str] = {}
        self._waiters: set[asyncio.Task[None]] = set()
        agent.on_event = self._on_agent_event

    # -- the microphone ---------------------------------------------------------------

    async def consume_mic(self, track: MediaStreamTrack) -> None:
        """Feed the browser's microphone to the agent until the track ends."""
        self.rtc.mic_attached = True
        try:
            while True:
                frame = await track.recv()
                if not isinstance(frame, av.AudioFrame):
                    continue
                try:
                    self.agent.append_audio(_mono_float(frame), frame.sample_rate)
                except AgentError as exc:  # turn detection behind: drop this frame
                    log.debug("talk %s: %s", self.rtc.id, exc.message)
                self.rtc.last_activity = self.agent.last_activity
        except MediaStreamError:
            pass
        finally:
            self.rtc.mic_attached = False

    # -- agent speech into the avatar -------------------------------------------------

    async def speech(self, response_id: str) -> AsyncGenerator[SpeechChunk, None]:
        """The agent's audio for one answer, as the avatar session's speech chunks."""
        queue = self._queues.get(response_id)
        if queue is None:
            return
        try:
            while True:
                chunk = await queue.get()
                if chunk is None:
                    return
                yield chunk
        finally:
            self._queues.pop(response_id, None)

    def interrupt(self) -> None:
        """The page asked to interrupt: stop the agent's answer too."""
        self.agent.cancel_response("client_cancelled")

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.rtc.emit({"type": "talk.state", "state": state})

    def _on_agent_event(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "response.output_audio.delta":
            self._audio(event["response_id"], event["delta"])
        elif kind == "response.output_audio_transcript.delta":
            rid = event["response_id"]
            self._text[rid] = self._text.get(rid, "") + event["delta"]
            self._assistant[rid] = self._assistant.get(rid, "") + event["delta"]
        elif kind == "input_audio_buffer.speech_started":
            self._set_state("listening")
        elif kind == "input_audio_buffer.speech_stopped":
            self._set_state("thinking")
        elif kind == "conversation.item.input_audio_transcription.completed":
            self.rtc.emit({"type": "transcript", "role": "user", "final": True,
                           "item_id": event["item_id"], "text": event["transcript"]})
        elif kind == "conversation.item.truncated":
            self.rtc.emit({"type": "transcript.truncated", "item_id": event["item_id"],
                           "audio_end_ms": event["audio_end_ms"]})
        elif kind == "response.output_audio_transcript.done":
            self.rtc.emit({"type": "transcript", "role": "assistant", "final": True,
                           "item_id": event["item_id"], "text": event["transcript"]})
        elif kind == "response.done":
            self._response_done(event["response"])
        elif kind == "error":
            error = event["error"]
            self.rtc.emit({"type": "error", "code": error.get("code") or "agent_error",
                           "message": error.get("message", "")})

    def _audio(self, response_id: str, pcm: bytes) -> None:
        queue = self._queues.get(response_id)
        if queue is None:
            queue = asyncio.Queue(MAX_QUEUED_BLOCKS)
            self._queues[response_id] = queue
            try:
                utt = self.rtc.speak(AGENT_UTTERANCE + response_id)
            except asyncio.QueueFull:
                self._queues.pop(response_id, None)
                return
            self._set_state("speaking")
            waiter = asyncio.ensure_future(self._listen_after(utt.done))
            self._waiters.add(waiter)
            waiter.add_done_callback(self._waiters.discard)
        text = self._text.pop(response_id, "")
        chunk = SpeechChunk(s16le_to_float32(pcm), OUTPUT_RATE, text)
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(chunk)

    async def _listen_after(self, done: asyncio.Event) -> None:
        await done.wait()
        if self.agent.response is None and not self._queues:
            self._set_state("listening")

    def _response_done(self, response: dict[str, Any]) -> None:
        rid = response["id"]
        queue = self._queues.get(rid)
        if queue is not None:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        self._text.pop(rid, None)
        self._assistant.pop(rid, None)
        if response["status"] == "cancelled":
            self._queues.pop(rid, None)
            self.rtc.interrupt()  # flush the avatar's queued audio and frames now
            self._set_state("listening")
        elif queue is None:  # nothing to say (a function call, a failure)
            self._set_state("listening")
        latency = (response.get("usage") or {}).get("latency_ms") or {}
        if latency:
            self.rtc.emit({"type": "metrics", "session_id": self.rtc.id,
                           "metrics": {f"talk_{k}": v for k, v in latency.items()}})

    async def aclose(self) -> None:
        for waiter in list(self._waiters):
            waiter.cancel()
        await self.agent.aclose("connection closed")


def talk_of(state: AppState, rtc: WebRTCAvatarSession) -> Talk | None:
    """The talk mode of an avatar session, if its offer asked for one."""
    talks: dict[str, Talk] = state.extras.get(_EXTRAS_KEY, {})
    return talks.get(rtc.id)


def enable(state: AppState, rtc: WebRTCAvatarSession, request: Any) -> Talk:
    """Give an avatar session a voice agent (``talk`` in its offer).

    Raises:
        TalkError: the request is malformed or names a model the gateway lacks, or the
            server is at capacity.
    """
    from omnistream.sessions.manager import CapacityExceeded
    from omnistream.transports.realtime_ws import has_model, new_session

    try:
        talk = TalkRequest.model_validate(request)
    except Exception as exc:
        raise TalkError(400, "bad_config", f"talk: {exc}") from exc
    if not has_model(state, talk.model):
        raise TalkError(400, "invalid_model",
                        f"talk.model '{talk.model}' is not served here: use a provider/model "
                        "of the server's providers file")
    config = AgentConfig(
        model=talk.model,
        temperature=talk.temperature,
        max_output_tokens=talk.max_output_tokens,
        turn_detection=TurnDetection(threshold=talk.threshold,
                                     silence_duration_ms=talk.silence_duration_ms),
    )
    if talk.instructions:
        config.instructions = talk.instructions
    if rtc.config.voice:
        config.voice = rtc.config.voice
    agent = new_session(state, config)
    try:
        state.sessions.admit(agent)
    except CapacityExceeded as exc:
        raise TalkError(429, "capacity_exceeded", str(exc)) from exc
    joined = Talk(rtc, agent)
    talks: dict[str, Talk] = state.extras.setdefault(_EXTRAS_KEY, {})
    talks[rtc.id] = joined

    async def on_close(_: WebRTCAvatarSession) -> None:
        talks.pop(rtc.id, None)
        state.sessions.release(agent)
        await joined.aclose()

    rtc.on_close.append(on_close)
    agent.start()
    return joined


def wrap_speech(speech: Any, state: AppState, rtc_id: str) -> Any:
    """A speech adapter that plays agent answers and still speaks typed text."""
    original = speech.stream

    async def stream(text: str, voice: str | None) -> AsyncGenerator[SpeechChunk, None]:
        if text.startswith(AGENT_UTTERANCE):
            talk = state.extras.get(_EXTRAS_KEY, {}).get(rtc_id)
            if talk is None:
                return
            async for chunk in talk.speech(text[len(AGENT_UTTERANCE):]):
                yield chunk
            return
        async for chunk in original(text, voice):
            yield chunk

    speech.stream = stream
    return speech


__all__ = ["AGENT_UTTERANCE", "Talk", "TalkError", "TalkRequest", "enable", "talk_of",
           "wrap_speech"]

