"""The TTS stream: text in, PCM chunks out, one segment per runner work item.

A :class:`TtsStream` takes text (all at once, or in deltas as an LLM writes it), cuts it
into segments (:class:`~omnistream.models.tts.text.TextSegmenter`), and submits one
segment at a time to the voice model's runner. Audio comes back from the runner thread in
pieces, is resampled to the caller's rate (soxr, stateful across pieces so boundaries are
click-free), converted to s16le and cut into fixed 20–40 ms chunks that go into a bounded
queue the transport reads from.

Why one segment at a time: the runner serves every stream, so small items let it
interleave many streams and serve them earliest-deadline-first, where a segment's deadline
is the moment a real-time listener would run out of the audio already produced. A
cancelled stream (client gone, ``cancel`` message, interruption) is checked before each
segment is submitted, by the runner before it starts an item (``is_stale``), and by the
model between its internal steps, so synthesis stops within one chunk of audio.

The queue holds at most ``buffer_ms`` of audio: a stream whose reader is slow stops
submitting work instead of synthesising a whole book into memory.

Every step is recorded as a :class:`TtsEvent` in order (``segment.done``,
``audio.first``, ``audio.first_read``, ``finish``, ``cancelled``…), and the events that a
realtime client wants to see are also put in the output queue between the audio chunks,
so a transport forwarding the queue keeps audio and events in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from omnistream.codecs.pcm import FloatAudio, PcmChunker, StreamResampler, float32_to_s16le
from omnistream.engine.engine import Engine
from omnistream.engine.runner import ModelRunner, Priority, RunnerClosed, StaleWork
from omnistream.metrics import Metrics
from omnistream.models.tts.base import SynthRequest, SynthResult
from omnistream.models.tts.text import (
    DEFAULT_FIRST_WORDS,
    DEFAULT_MAX_CHARS,
    TextSegmenter,
    normalise_text,
)

log = logging.getLogger(__name__)

SampleFormat = Literal["s16le", "f32le"]

#: Characters per second of ordinary speech: what a realtime stream costs for admission.
SPEECH_CHARS_PER_S = 15.0
# Silence kept around each segment's speech. The voice pads every segment (Kokoro: about
# 300 ms before and more after); before the first word that is pure latency, and where
# the segmenter cut inside a sentence it would sound like a full stop.
FIRST_SEGMENT_PREROLL_S = 0.02
CLAUSE_PAUSE_S = (0.03, 0.08)  # (before, after) around a cut inside a sentence: a comma
SENTENCE_PAUSE_S = (0.15, 0.25)  # around a sentence boundary: a full stop
_ENDS_SENTENCE = re.compile(r"[.!?…][\"')\]]*\s*$")
MAX_EVENTS = 512

_BYTES_PER_SAMPLE: dict[str, int] = {"s16le": 2, "f32le": 4}


class TextBufferFull(Exception):
    """More text is waiting to be synthesised than the stream accepts."""


class StreamClosed(Exception):
    """Text arrived after the stream's text was finished or the stream was cancelled."""


class SynthesisFailed(Exception):
    """The voice model failed on a segment; the stream ends with this error."""


@dataclass
class TtsEvent:
    """Something that happened to a stream, in order.

    Attributes:
        seq: position in the stream's event order (compare these, not wall times).
        type: ``segment.queued``, ``segment.done``, ``audio.first``, ``audio.first_read``,
            ``underrun``, ``finish``, ``cancelled``, ``error``.
        at: ``time.monotonic()`` when it happened.
        data: event details (segment index, samples, timings…).
    """

    seq: int
    type: str
    at: float
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Piece:
    data: bytes  # already resampled and converted to the output format


_END = object()


class TtsStream:
    """One caller's text-to-speech stream on a shared voice runner.

    Args:
        runner: the voice model's runner (``engine.runner(model_id)``).
        model_id: registry id, for metrics and events.
        voice: voice id the model declared.
        native_rate: the model's output rate in Hz.
        out_rate: the rate the caller asked for; audio is resampled when they differ.
        speed: speaking-rate multiplier passed to the model.
        priority: ``Priority.REALTIME`` for live callers, ``Priority.OFFLINE`` for jobs
            (offline items yield to realtime ones at every segment).
        chunk_ms: output chunk length (20–40 ms for players and wire protocols).
        buffer_ms: audio the stream may produce ahead of its reader.
        sample_format: ``s16le`` for clients, ``f32le`` for in-process consumers.
        metrics: the app's metrics (optional, so offline tools can run without them).
        max_pending_chars: text accepted but not yet synthesised; more raises
            :class:`TextBufferFull`.
        first_words: see :class:`TextSegmenter`.
        max_segment_chars: see :class:`TextSegmenter`.
    """

    kind = "tts"

    def __init__(
        self,
        runner: ModelRunner,
        *,
        model_id: str,
        voice: str,
        native_rate: int,
        out_rate: int | None = None,
        speed: float = 1.0,
        priority: Priority = Priority.REALTIME,
        chunk_ms: int = 20,
        buffer_ms: int = 2000,
        sample_format: SampleFormat = "s16le",
        metrics: Metrics | None = None,
        max_pending_chars: int = 4096,
        first_words: int = DEFAULT_FIRST_WORDS,
        max_segment_chars: int = DEFAULT_MAX_CHARS,
        stream_id: str | None = None,
    ) -> None:
        self.id = stream_id or f"tts-{uuid.uuid4().hex[:12]}"
        self.runner = runner
        self.model_id = model_id
        self.voice = voice
        self.native_rate = native_rate
        self.out_rate = out_rate or native_rate
        self.speed = speed
        self.priority = priority
        self.chunk_ms = chunk_ms
        self.sample_format = sample_format
        self.metrics = metrics
        self.max_pending_chars = max_pending_chars
        self.last_activity = time.monotonic()
        self.created_at = time.monotonic()
        self.events: deque[TtsEvent] = deque(maxlen=MAX_EVENTS)
        self.segments_queued = 0
        self.segments_done = 0
        self.samples_out = 0
        self.underruns = 0
        self.infer_s = 0.0
        self.first_audio_at: float | None = None
        self.first_read_at: float | None = None
        self.state: Literal["active", "finished", "cancelled", "failed"] = "active"
        self.cancel_reason = ""
        self.error: BaseException | None = None

        self._bytes_per_sample = _BYTES_PER_SAMPLE[sample_format]
        chunk_samples = max(1, self.out_rate * chunk_ms // 1000)
        self.chunk_bytes = chunk_samples * self._bytes_per_sample
        self._segmenter = TextSegmenter(first_words=first_words, max_chars=max_segment_chars)
        self._segments: asyncio.Queue[tuple[int, str, float] | None] = asyncio.Queue()
        self._pending_chars = 0
        self._text_done = False
        self._out: asyncio.Queue[bytes | TtsEvent | object] = asyncio.Queue(
            maxsize=max(2, buffer_ms // max(1, chunk_ms))
        )
        self._resampler = StreamResampler(native_rate, self.out_rate)
        self._chunker = PcmChunker(self.chunk_bytes)
        self._seq = itertools.count()
        self._segment_index = itertools.count()
        self._previous_segment = ""
        self._mid_sentence: set[int] = set()
        self._emitted_s = 0.0
        self._producer: asyncio.Task[None] | None = None
        self._live_counted = False
        self._text_started_at: float | None = None

    # -- ManagedSession --------------------------------------------------------------

    @property
    def units_per_second(self) -> float:
        """Characters per second a real-time listener consumes (capacity is metered per char)."""
        return SPEECH_CHARS_PER_S * max(0.25, self.speed)

    @property
    def capacity_stages(self) -> list[str]:
        """The runner's capacity meter, which prices this stream."""
        return list(self.runner.capacity_stages) if self.priority == Priority.REALTIME else []

    async def expire(self, reason: str) -> None:
        """Stop the stream because the server decided so (idle, shutdown)."""
        self.cancel(reason)

    # -- text in ---------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """Whether the stream was stopped before the end of its text."""
        return self.state == "cancelled"

    @property
    def pending_chars(self) -> int:
        """Text accepted but not yet synthesised."""
        return self._pending_chars + self._segmenter.pending_chars

    def push_text(self, text: str) -> int:
        """Add text; returns how many segments became ready for synthesis.

        Raises:
            StreamClosed: the text was already finished or the stream stopped.
            TextBufferFull: accepting it would exceed ``max_pending_chars``.
        """
        if self._text_done or self.state != "active":
            raise StreamClosed("the stream takes no more text")
        if self.pending_chars + len(text) > self.max_pending_chars:
            raise TextBufferFull(
                f"more than {self.max_pending_chars} characters waiting to be spoken"
            )
        self.last_activity = time.monotonic()
        if self._text_started_at is None and text.strip():
            self._text_started_at = time.monotonic()
        segments = self._segmenter.push(text)
        self._queue_segments(segments)
        self._ensure_started()
        return len(segments)

    def end_text(self) -> int:
        """No more text will come: synthesise the rest and then finish."""
        if self._text_done:
            return 0
        self._text_done = True
        segments = self._segmenter.flush() if self.state == "active" else []
        self._queue_segments(segments)
        self._segments.put_nowait(None)
        self._ensure_started()
        return len(segments)

    def say(self, text: str) -> None:
        """The whole text at once (HTTP): normalise it as a whole, push it and finish."""
        self.push_text(normalise_text(text))
        self.end_text()

    def _leading_silence(self, index: int) -> float:
        """How much of the voice's pause before segment ``index`` to keep."""
        if index == 0:
            return FIRST_SEGMENT_PREROLL_S
        return CLAUSE_PAUSE_S[0] if index in self._mid_sentence else SENTENCE_PAUSE_S[0]

    def _queue_segments(self, segments: list[str]) -> None:
        now = time.monotonic()
        for segment in segments:
            index = next(self._segment_index)
            if self._previous_segment and not _ENDS_SENTENCE.search(self._previous_segment):
                self._mid_sentence.add(index)
            self._previous_segment = segment
            self._pending_chars += len(segment)
            self.segments_queued += 1
            self._segments.put_nowait((index, segment, now))
            self._event("segment.queued", index=index, chars=len(segment))

    def _ensure_started(self) -> None:
        if self._producer is None and self.state == "active":
            if self.metrics is not None and self.priority == Priority.REALTIME:
                self.metrics.tts_streams_live.labels(self.model_id).inc()
                self._live_counted = True
            self._producer = asyncio.create_task(self._produce(), name=f"{self.id}-producer")

    # -- audio out -------------------------------------------------------------------

    async def read(self) -> bytes | TtsEvent | None:
        """The next chunk of audio or event, or ``None`` when the stream has ended.

        Raises:
            SynthesisFailed: the model failed; the stream is over.
        """
        item = await self._out.get()
        if item is _END:
            self._out.put_nowait(_END)  # later reads also see the end
            if self.state == "failed" and self.error is not None:
                raise SynthesisFailed(str(self.error)) from self.error
            return None
        if isinstance(item, bytes):
            self.last_activity = time.monotonic()
            if self.first_read_at is None:
                self.first_read_at = time.monotonic()
                self._event("audio.first_read", ms=self.first_audio_ms)
            return item
        assert isinstance(item, TtsEvent)
        return item

    async def audio(self) -> AsyncIterator[bytes]:
        """Audio chunks only (events skipped), until the stream ends."""
        while True:
            item = await self.read()
            if item is None:
                return
            if isinstance(item, bytes):
                yield item

    async def audio_batches(self, max_bytes: int = 64 * 1024) -> AsyncIterator[bytes]:
        """Audio as soon as it exists, with the chunks already waiting joined into one.

        For byte streams (HTTP bodies): it never waits for more audio than the first chunk,
        so latency is the same as :meth:`audio`, but when synthesis is ahead of the reader
        (the usual case) a whole segment goes out in one write instead of fifty 20 ms
        ones, which is what keeps the event loop and the clients' HTTP parsers cheap with
        many streams live.
        """
        while True:
            item = await self.read()
            if item is None:
                return
            if not isinstance(item, bytes):
                continue
            parts = [item]
            size = len(item)
            while size < max_bytes:
                try:
                    extra = self._out.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if extra is _END:
                    self._out.put_nowait(_END)
                    break
                if isinstance(extra, bytes):
                    parts.append(extra)
                    size += len(extra)
            self.last_activity = time.monotonic()
            yield b"".join(parts)

    # -- stopping --------------------------------------------------------------------

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop now: no further segment runs; queued audio is dropped; readers see the end."""
        if self.state != "active":
            return
        self.state = "cancelled"
        self.cancel_reason = reason
        self._event("cancelled", reason=reason, segments_done=self.segments_done)
        if self.metrics is not None:
            self.metrics.tts_cancelled.labels(self.model_id, reason).inc()
        if self._producer is not None:
            self._producer.cancel()
        self._drop_queued_audio()
        self._close_out()
        self._count_down()

    async def aclose(self, reason: str = "closed") -> None:
        """Cancel unless finished, and wait for the producer task to exit."""
        self.cancel(reason)
        if self._producer is not None:
            self._producer.cancel()  # also when finished but its reader left early
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._producer

    def _drop_queued_audio(self) -> None:
        while True:
            try:
                self._out.get_nowait()
            except asyncio.QueueEmpty:
                return

    def _close_out(self) -> None:
        try:
            self._out.put_nowait(_END)
        except asyncio.QueueFull:
            self._drop_queued_audio()
            self._out.put_nowait(_END)

    def _count_down(self) -> None:
        if self._live_counted and self.metrics is not None:
            self.metrics.tts_streams_live.labels(self.model_id).dec()
            self._live_counted = False

    # -- figures ---------------------------------------------------------------------

    @property
    def first_audio_ms(self) -> float | None:
        """Text received -> first chunk ready, in milliseconds."""
        if self.first_audio_at is None:
            return None
        start = self._text_started_at or self.created_at
        return (self.first_audio_at - start) * 1000.0

    @property
    def audio_s(self) -> float:
        """Seconds of audio produced so far."""
        return self.samples_out / self.out_rate

    @property
    def rtf(self) -> float:
        """Model seconds spent per second of audio produced (lower is faster)."""
        return self.infer_s / self.audio_s if self.samples_out else 0.0

    def summary(self) -> dict[str, Any]:
        """Figures for a ``finish`` event, a log line or a test."""
        return {
            "stream_id": self.id,
            "model": self.model_id,
            "voice": self.voice,
            "state": self.state,
            "sample_rate": self.out_rate,
            "segments": self.segments_done,
            "audio_ms": round(self.audio_s * 1000.0, 1),
            "first_audio_ms": (
                None if self.first_audio_ms is None else round(self.first_audio_ms, 1)
            ),
            "rtf": round(self.rtf, 4),
            "underruns": self.underruns,
        }

    def _event(self, type_: str, **data: Any) -> TtsEvent:
        event = TtsEvent(next(self._seq), type_, time.monotonic(), data)
        self.events.append(event)
        return event

    def event_seq(self, type_: str, **match: Any) -> int | None:
        """Order position of the first event of a type (with matching data), if any."""
        for event in self.events:
            if event.type == type_ and all(event.data.get(k) == v for k, v in match.items()):
                return event.seq
        return None

    # -- the producer ----------------------------------------------------------------

    async def _produce(self) -> None:
        try:
            while True:
                item = await self._segments.get()
                if item is None:
                    break
                index, text, queued_at = item
                await self._synthesize(index, text, queued_at)
                self._pending_chars -= len(text)
            await self._emit(np.zeros(0, np.float32), last=True)
            await self._finish()
        except asyncio.CancelledError:
            raise
        except (StaleWork, RunnerClosed) as exc:
            self.cancel("stale" if isinstance(exc, StaleWork) else "server closing")
        except Exception as exc:
            log.exception("TTS stream %s failed", self.id)
            self._fail(exc)

    async def _synthesize(self, index: int, text: str, queued_at: float) -> None:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[_Piece | object] = asyncio.Queue()

        def on_piece(audio: FloatAudio) -> None:  # runner thread
            loop.call_soon_threadsafe(pieces.put_nowait, _Piece(self._convert(audio)))

        request = SynthRequest(
            text=text,
            voice=self.voice,
            speed=self.speed,
            cancelled=lambda: self.state != "active",
            on_piece=on_piece,
            max_leading_silence_s=self._leading_silence(index),
            max_trailing_silence_s=(
                SENTENCE_PAUSE_S[1] if _ENDS_SENTENCE.search(text) else CLAUSE_PAUSE_S[1]
            ),
        )
        deadline: float | None = None
        if self.priority == Priority.REALTIME:
            # When a listener who started at the first chunk runs out of audio.
            start = self.first_audio_at if self.first_audio_at is not None else time.monotonic()
            deadline = start + self._emitted_s
        future = self.runner.submit(
            request,
            priority=self.priority,
            deadline=deadline,
            is_stale=lambda: self.state != "active",
            cost=float(max(1, len(text))),
            key=self.voice,
        )
        future.add_done_callback(lambda _f: pieces.put_nowait(_END))
        horizon = None
        if self.first_audio_at is not None:
            horizon = self.first_audio_at + self._emitted_s
        first_piece = True
        try:
            while True:
                piece = await pieces.get()
                if piece is _END:
                    break
                assert isinstance(piece, _Piece)
                if first_piece:
                    first_piece = False
                    self._check_underrun(horizon, queued_at, index)
                await self._emit_bytes(piece.data)
        except asyncio.CancelledError:
            future.cancel()  # a runner that has not started it skips it
            raise
        result = future.result()
        value = result.value
        if isinstance(value, BaseException):
            raise value
        assert isinstance(value, SynthResult)
        if value.audio.size:  # a model that returned audio instead of pieces
            if first_piece:
                self._check_underrun(horizon, queued_at, index)
            await self._emit(value.audio)
        self.infer_s += result.infer_ms / 1000.0
        self.segments_done += 1
        event = self._event(
            "segment.done",
            index=index,
            chars=len(text),
            samples=value.samples,
            audio_ms=round(value.samples / value.sample_rate * 1000.0, 1),
            queue_ms=round(result.queue_ms, 2),
            infer_ms=round(result.infer_ms, 2),
        )
        await self._out.put(event)
        if self.metrics is not None:
            self.metrics.queue_wait.labels(self.model_id).observe(result.queue_ms / 1000.0)
            self.metrics.tts_audio_seconds.labels(self.model_id).inc(
                value.samples / value.sample_rate
            )

    def _check_underrun(self, horizon: float | None, queued_at: float, index: int) -> None:
        """A segment whose text was in time but whose audio came after the listener ran dry."""
        if horizon is None or self.priority != Priority.REALTIME:
            return
        now = time.monotonic()
        if now > horizon and queued_at < horizon and self._out.empty():
            self.underruns += 1
            self._event("underrun", index=index, late_ms=round((now - horizon) * 1000.0, 1))
            if self.metrics is not None:
                self.metrics.tts_underruns.labels(self.model_id).inc()

    def _convert(self, audio: FloatAudio, *, last: bool = False) -> bytes:
        """Resample and encode model audio (the runner thread calls this for each piece).

        Resampling a sentence costs milliseconds; doing it in the runner thread keeps the
        event loop free. The resampler's state is safe there: a stream has one segment in
        flight at a time, and the final flush runs after the last segment.
        """
        resampled = self._resampler.process(audio, last=last)
        if self.sample_format == "s16le":
            return float32_to_s16le(resampled)
        return np.ascontiguousarray(resampled, dtype="<f4").tobytes()

    async def _emit(self, audio: FloatAudio, *, last: bool = False) -> None:
        await self._emit_bytes(self._convert(audio, last=last), last=last)

    async def _emit_bytes(self, data: bytes, *, last: bool = False) -> None:
        chunks = self._chunker.push(data)
        if last:
            tail = self._chunker.flush()
            if tail:
                chunks.append(tail)
        for chunk in chunks:
            if self.first_audio_at is None:
                self.first_audio_at = time.monotonic()
                event = self._event("audio.first", ms=self.first_audio_ms)
                if self.metrics is not None and self.first_audio_ms is not None:
                    self.metrics.tts_first_audio.labels(self.model_id).observe(
                        self.first_audio_ms / 1000.0
                    )
                await self._out.put(event)
            self.samples_out += len(chunk) // self._bytes_per_sample
            self._emitted_s = self.samples_out / self.out_rate
            await self._out.put(chunk)

    async def _finish(self) -> None:
        if self.state != "active":
            return
        self.state = "finished"
        self._count_down()
        if self.metrics is not None and self.samples_out:
            self.metrics.tts_rtf.labels(self.model_id).observe(self.rtf)
        event = self._event("finish", **self.summary())
        await self._out.put(event)
        await self._out.put(_END)

    def _fail(self, exc: BaseException) -> None:
        if self.state != "active":
            return
        self.state = "failed"
        self.error = exc
        self._event("error", message=str(exc))
        self._drop_queued_audio()
        self._close_out()
        self._count_down()


async def synthesize_text(
    runner: ModelRunner,
    text: str,
    *,
    model_id: str,
    voice: str,
    native_rate: int,
    sample_rate: int | None = None,
    speed: float = 1.0,
    priority: Priority = Priority.OFFLINE,
    metrics: Metrics | None = None,
    max_chars: int = 1_000_000,
) -> tuple[FloatAudio, int]:
    """Synthesise a whole text to float32 mono at ``sample_rate`` (default: the model's).

    The entry point for offline generation: the same segments and runner as live streams,
    at offline priority by default, so it fills spare capacity and yields to realtime
    streams at every segment. Never blocks the event loop.

    Returns:
        ``(samples, sample_rate)``.

    Raises:
        SynthesisFailed: the model failed on a segment.
    """
    stream = TtsStream(
        runner,
        model_id=model_id,
        voice=voice,
        native_rate=native_rate,
        out_rate=sample_rate,
        speed=speed,
        priority=priority,
        chunk_ms=100,
        buffer_ms=60_000,
        sample_format="f32le",
        metrics=metrics,
        max_pending_chars=max_chars,
    )
    parts: list[bytes] = []
    try:
        stream.say(text)
        async for chunk in stream.audio():
            parts.append(chunk)
    finally:
        await stream.aclose("caller gone")
    audio = np.frombuffer(b"".join(parts), dtype="<f4").astype(np.float32)
    return audio, stream.out_rate


async def synthesize_with_engine(
    engine: Engine,
    text: str,
    *,
    model_id: str = "hibari",
    voice: str | None = None,
    sample_rate: int | None = None,
    speed: float = 1.0,
    priority: Priority = Priority.OFFLINE,
) -> tuple[FloatAudio, int]:
    """Synthesise a whole text on the server's shared voice runner (offline jobs).

    Looks the model up, starts (or reuses) its runner, and runs :func:`synthesize_text`
    at ``priority`` (offline by default: it yields to live streams at every segment).
    Convert with :func:`omnistream.codecs.pcm.float32_to_s16le` or
    :func:`omnistream.codecs.audio_container.encode_all` for a file.

    Args:
        engine: the app's engine (``state.engine``).
        text: the text; it is normalised and segmented like a live stream's.
        model_id: a ``text2audio`` model id (``hibari``, ``espeak-ng``).
        voice: one of the model's voices; ``None`` means its default.
        sample_rate: output rate; ``None`` means the model's native rate.
        speed: speaking-rate multiplier.
        priority: ``Priority.OFFLINE`` or ``Priority.REALTIME``.

    Returns:
        ``(float32 mono samples, sample rate)``.

    Raises:
        KeyError: unknown model. ``ModelUnavailable``: it cannot load here.
        ValueError: unknown voice. SynthesisFailed: the model failed.
    """
    spec = engine.spec(model_id)
    voices = [v["id"] for v in spec.capabilities.get("voices", [])]
    chosen = voice or str(spec.capabilities.get("default_voice", ""))
    if chosen not in voices:
        raise ValueError(f"voice {chosen!r} is not available for {model_id}: {voices}")
    runner = engine.runner(model_id)
    if not runner.ready:
        await runner.wait_ready()
    return await synthesize_text(
        runner,
        text,
        model_id=model_id,
        voice=chosen,
        native_rate=int(spec.capabilities.get("sample_rate", 24000)),
        sample_rate=sample_rate,
        speed=speed,
        priority=priority,
        metrics=engine.metrics,
    )
