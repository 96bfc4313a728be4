"""The WebRTC avatar session: one clock, two paced tracks, bounded media, speech and mic.

A browser watching an avatar over WebRTC gets two tracks that must never drift apart. So
everything in a session is positioned on one sample clock (:class:`SessionClock`, 48 kHz,
the Opus rate): the audio track emits 20 ms of it at a time; video frame ``i`` sits at
sample ``i * 48000 // fps`` and its RTP timestamp is derived from that sample count, so
sound and picture share one timeline by construction.

Speech (from TTS) and live microphone audio are written onto that timeline ahead of the
play position (:class:`MediaTimeline`, ring buffers bounded in milliseconds). A renderer
task renders video a little ahead of the play position from the same timeline (the 16 kHz
copy the avatar models want) through the shared model runner, turns frames into YUV in a
worker thread and queues them (bounded, in ms). With nothing to say the timeline is
silent and the model draws the idle loop (blinks, breathing, closed mouth), so the
picture never freezes. Speaking or interrupting rewinds the renderer to the play position,
so the frames for new audio are rendered for it and lips follow within a frame or two.

Transport code (signalling, the data channel) lives in ``omnistream.transports.webrtc``;
this module knows nothing about HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import av
import cv2
import numpy as np
import numpy.typing as npt
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from omnistream.codecs.pcm import StreamResampler
from omnistream.engine.capacity import CapacityMeter
from omnistream.engine.runner import ModelRunner, Priority, RunnerClosed, RunnerFull, StaleWork
from omnistream.metrics import Metrics
from omnistream.models.avatar_base import ChunkRequest, ChunkResult, RGBFrame

log = logging.getLogger(__name__)

AUDIO_RATE = 48000  # the session clock and the Opus rate
AUDIO_PTIME = 0.020  # one audio frame: 20 ms
AUDIO_FRAME_SAMPLES = int(AUDIO_RATE * AUDIO_PTIME)
LIPS_RATE = 16000  # what every avatar model reads
LIPS_PER_AUDIO = AUDIO_RATE // LIPS_RATE  # 3: clock samples per lips sample
VIDEO_CLOCK_RATE = 90000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)
AUDIO_TIME_BASE = fractions.Fraction(1, AUDIO_RATE)
FIRST_FRAME_WAIT_S = 3.0  # how long the video track waits for the very first frame
MAX_LATE_FRAMES = 2  # a video track this far behind its clock skips ahead
MAX_LATE_AUDIO_FRAMES = 3  # an audio track this far behind skips silence to catch up
LIPS_KEEP_S = 1.0  # lips audio kept behind the play position (model context)
OPEN_MOUTH = 0.25  # model-reported openness that counts as an open mouth


FloatAudio = npt.NDArray[np.float32]


# -- the clock -----------------------------------------------------------------------


class SessionClock:
    """One monotonic clock per session, counted in 48 kHz samples.

    It starts when the first track asks for media (the peer connection is up), so the
    first audio packet and the first video frame both sit at sample 0.
    """

    def __init__(self, sample_rate: int = AUDIO_RATE) -> None:
        self.sample_rate = sample_rate
        self._t0: float | None = None
        self.started_event = asyncio.Event()

    @property
    def started(self) -> bool:
        """Whether media has started flowing."""
        return self._t0 is not None

    def start(self) -> None:
        """Start the clock now (idempotent)."""
        if self._t0 is None:
            self._t0 = time.monotonic()
            self.started_event.set()

    def position(self) -> int:
        """Samples elapsed since the start (0 before it)."""
        if self._t0 is None:
            return 0
        return int((time.monotonic() - self._t0) * self.sample_rate)

    def time_of(self, sample: int) -> float:
        """The ``time.monotonic()`` value at which ``sample`` is due (start: now)."""
        t0 = self._t0 if self._t0 is not None else time.monotonic()
        return t0 + sample / self.sample_rate

    async def wait_until(self, sample: int) -> None:
        """Sleep until ``sample`` is due, starting the clock if it has not started."""
        self.start()
        delay = self.time_of(sample) - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


def frame_sample(index: int, fps: int) -> int:
    """Clock sample (48 kHz) at which video frame ``index`` is shown."""
    return index * AUDIO_RATE // fps


def frame_pts(index: int, fps: int) -> int:
    """RTP timestamp (90 kHz) of frame ``index``, derived from its audio sample count."""
    return frame_sample(index, fps) * VIDEO_CLOCK_RATE // AUDIO_RATE


def frame_at(sample: int, fps: int) -> int:
    """Index of the frame on screen at clock ``sample``."""
    return sample * fps // AUDIO_RATE


# -- the timeline --------------------------------------------------------------------


@dataclass
class Mark:
    """Something to announce when the audio track sends the sample at ``position``."""

    position: int
    event: dict[str, Any]
    epoch: int


class MediaTimeline:
    """Audio positioned on the session clock: 48 kHz for the track, 16 kHz for the lips.

    Two ring buffers indexed by absolute clock position. Writers put speech (or mic audio,
    lips only) ahead of the play position; the audio track reads and clears as it plays.
    Both rings are bounded: a writer more than ``capacity_ms`` ahead of playback waits
    (:meth:`wait_for_room`), so a long text never buffers unbounded audio.

    Args:
        capacity_ms: how far ahead of playback audio may be written.
    """

    def __init__(self, capacity_ms: int) -> None:
        self.capacity = max(1, capacity_ms) * AUDIO_RATE // 1000
        keep = int(LIPS_KEEP_S * AUDIO_RATE)
        self._play = np.zeros(self.capacity + AUDIO_FRAME_SAMPLES * 4, dtype=np.int16)
        self._lips = np.zeros((self.capacity + keep * 2) // LIPS_PER_AUDIO, dtype=np.float32)
        self.played = 0  # clock position the audio track has emitted up to
        self.write_end = 0  # end of written speech (clock samples)
        self.lips_known = 0  # lips audio is final below this (clock samples); see known()
        self.streaming = False  # a speech producer is still writing
        self.mic_active = False  # lips come from the mic: known only as far as written
        self._lips_cleared = 0
        self._changed = asyncio.Event()
        self._room = asyncio.Event()

    # lips ---------------------------------------------------------------------------

    def known_until(self) -> int:
        """Clock position up to which the lips audio will not change any more.

        Silence is known forever; streaming speech and live mic audio only as far as
        written, so the renderer waits for them instead of drawing a closed mouth.
        """
        if self.streaming or self.mic_active:
            return self.lips_known
        return 1 << 62

    def write_lips(self, position: int, samples: FloatAudio) -> None:
        """Put 16 kHz audio at clock ``position`` (a multiple of 3 is not required)."""
        start = position // LIPS_PER_AUDIO
        n = len(samples)
        if n == 0:
            return
        size = len(self._lips)
        if n > size:
            samples, start, n = samples[-size:], start + n - size, size
        idx = (start + np.arange(n)) % size
        self._lips[idx] = samples
        self.lips_known = max(self.lips_known, (start + n) * LIPS_PER_AUDIO)
        self._changed.set()

    def read_lips(self, start16: int, count: int) -> FloatAudio:
        """``count`` lips samples from 16 kHz position ``start16`` (zeros before 0)."""
        out = np.zeros(count, dtype=np.float32)
        lo = max(0, -start16)
        if lo >= count:
            return out
        size = len(self._lips)
        idx = (start16 + lo + np.arange(count - lo)) % size
        out[lo:] = self._lips[idx]
        return out

    def release_lips(self, before: int) -> None:
        """Clear lips audio older than clock position ``before`` so the ring can be reused."""
        upto = max(0, before) // LIPS_PER_AUDIO
        start = self._lips_cleared
        if upto <= start:
            return
        size = len(self._lips)
        n = min(upto - start, size)
        self._lips[(upto - n + np.arange(n)) % size] = 0.0
        self._lips_cleared = upto

    # playout ------------------------------------------------------------------------

    def write_play(self, position: int, pcm: npt.NDArray[np.int16]) -> None:
        """Put 48 kHz s16 audio at clock ``position`` for the track to play."""
        n = len(pcm)
        size = len(self._play)
        if position < self.played:  # the head is already late: drop what passed
            cut = self.played - position
            pcm, position, n = pcm[cut:], self.played, n - cut
        if n <= 0:
            return
        n = min(n, size)
        idx = (position + np.arange(n)) % size
        self._play[idx] = pcm[:n]
        self.write_end = max(self.write_end, position + n)

    def is_silent(self, position: int, count: int) -> bool:
        """Whether nothing was written for ``[position, position + count)``."""
        if position >= self.write_end:
            return True
        n = min(count, len(self._play))
        idx = (position + np.arange(n)) % len(self._play)
        return not bool(np.any(self._play[idx]))

    def read_play(self, position: int, count: int) -> npt.NDArray[np.int16]:
        """Read and clear ``count`` samples at ``position`` (the audio track's job)."""
        size = len(self._play)
        idx = (position + np.arange(count)) % size
        out = self._play[idx].copy()
        self._play[idx] = 0
        self.played = position + count
        self._room.set()
        return out

    def clear_from(self, position: int) -> None:
        """Drop every written sample at or after ``position`` (interrupt)."""
        if self.write_end > position:
            n = min(self.write_end - position, len(self._play))
            self._play[(position + np.arange(n)) % len(self._play)] = 0
            self.write_end = position
        start16 = position // LIPS_PER_AUDIO
        end16 = max(start16, self.lips_known // LIPS_PER_AUDIO)
        n16 = min(end16 - start16, len(self._lips))
        if n16 > 0:
            self._lips[(start16 + np.arange(n16)) % len(self._lips)] = 0.0
        self.lips_known = min(self.lips_known, position)
        self._room.set()
        self._changed.set()

    async def wait_for_room(self, position: int, count: int) -> None:
        """Wait until writing ``count`` samples at ``position`` stays within capacity."""
        while position + count - self.played > self.capacity:
            self._room.clear()
            await self._room.wait()

    async def wait_changed(self, within_s: float) -> None:
        """Wait (at most ``within_s`` seconds) for new lips audio or a rewind."""
        if within_s <= 0:
            return
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), within_s)

    def poke(self) -> None:
        """Wake a renderer waiting in :meth:`wait_changed`."""
        self._changed.set()


# -- speech -------------------------------------------------------------------------


@dataclass
class SpeechChunk:
    """A piece of synthesised speech: mono float32 samples and the text they say."""

    samples: FloatAudio
    sample_rate: int
    text: str = ""


class SpeechSynth(Protocol):
    """What the session needs from TTS: stream a text as audio chunks, first one fast."""

    def stream(self, text: str, voice: str | None) -> AsyncGenerator[SpeechChunk, None]:
        """Yield speech as it is synthesised (per sentence or finer), from its onset."""


@dataclass
class Utterance:
    """One ``speak`` request and what has become of it."""

    id: str
    text: str
    voice: str | None
    requested_at: float
    start: int | None = None  # clock position of its first sample
    end: int | None = None  # clock position after its last sample (once known)
    chars_written: int = 0
    written_end: int | None = None  # clock position after the last sample written
    segments: list[tuple[int, int]] = field(default_factory=list)  # (position, chars)
    first_audio_at: float | None = None  # monotonic time its first packet was sent
    first_open_at: float | None = None  # monotonic time the first open-mouth frame went
    done: asyncio.Event = field(default_factory=asyncio.Event)


# -- media tracks ---------------------------------------------------------------------


class SessionAudioTrack(MediaStreamTrack):
    """20 ms Opus-rate frames read off the timeline, paced by the session clock."""

    kind = "audio"

    def __init__(self, session: WebRTCAvatarSession) -> None:
        super().__init__()
        self._session = session
        self._position = 0

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        session = self._session
        position = self._position
        await session.clock.wait_until(position)
        if self.readyState != "live":
            raise MediaStreamError
        behind = session.clock.position() - position
        if behind > MAX_LATE_AUDIO_FRAMES * AUDIO_FRAME_SAMPLES:
            # The loop stalled. Sending the backlog in a burst would make the browser's
            # jitter buffer grow (and its lip-sync lag) for seconds; silence can be
            # skipped instead. Speech is never skipped: it plays late but whole.
            skip = behind // AUDIO_FRAME_SAMPLES * AUDIO_FRAME_SAMPLES
            if session.timeline.is_silent(position, skip):
                session.timeline.read_play(position, skip)
                session.audio_emitted(position, skip)
                position += skip
                session.stats.audio_frames_skipped += skip // AUDIO_FRAME_SAMPLES
        pcm = session.timeline.read_play(position, AUDIO_FRAME_SAMPLES)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = position
        frame.time_base = AUDIO_TIME_BASE
        self._position = position + AUDIO_FRAME_SAMPLES
        session.audio_emitted(position, AUDIO_FRAME_SAMPLES)
        return frame


class SessionVideoTrack(MediaStreamTrack):
    """Rendered frames at their clock positions; RTP time derives from sample counts."""

    kind = "video"

    def __init__(self, session: WebRTCAvatarSession) -> None:
        super().__init__()
        self._session = session
        self._index = 0

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        session = self._session
        fps = session.fps
        index = self._index
        await session.clock.wait_until(frame_sample(index, fps))
        if self.readyState != "live":
            raise MediaStreamError
        due = frame_at(session.clock.position(), fps)
        if due - index > MAX_LATE_FRAMES:  # the loop stalled: skip, never burst
            session.stats.frames_skipped += due - index
            session.metrics_sink.frames_dropped(due - index)
            index = due
        frame = await session.take_frame(index)
        frame.pts = frame_pts(index, fps)
        frame.time_base = VIDEO_TIME_BASE
        self._index = index + 1
        return frame


# -- the session ----------------------------------------------------------------------


@dataclass
class SessionStats:
    """Counters and latest figures for ``metrics`` events and benchmarks."""

    frames_delivered: int = 0
    frames_repeated: int = 0  # a frame was not rendered in time: the last one went again
    frames_skipped: int = 0  # the track fell behind its clock and skipped indices
    frames_dropped_render: int = 0  # rendered frames that were already past due
    audio_frames_skipped: int = 0  # 20 ms of silence skipped after a stall
    render_ms: float = 0.0
    convert_ms: float = 0.0
    queue_ms: float = 0.0
    encode_ms_video: float = 0.0
    encode_cpu_ms_video: float = 0.0
    encode_ms_audio: float = 0.0
    av_skew_ms: float = 0.0
    ttfa_ms: float | None = None
    ttfv_ms: float | None = None
    utterances: int = 0
    _fps_window: deque[float] = field(default_factory=lambda: deque(maxlen=256))

    def delivered_fps(self, now: float) -> float:
        """Frames delivered during the last second."""
        window = self._fps_window
        while window and now - window[0] > 1.0:
            window.popleft()
        return float(len(window))


class MetricsSink:
    """Where a session reports Prometheus figures; a no-op without a registry (benches)."""

    def __init__(self, metrics: Metrics | None, codec: str) -> None:
        self._m = metrics
        self.codec = codec

    def frames_dropped(self, n: int) -> None:
        if self._m is not None:
            self._m.webrtc_frames_dropped.inc(n)

    def frame_delivered(self) -> None:
        if self._m is not None:
            self._m.webrtc_frames_delivered.inc()

    def av_skew(self, seconds: float) -> None:
        if self._m is not None:
            self._m.webrtc_av_skew.observe(abs(seconds))

    def encode(self, kind: str, seconds: float) -> None:
        if self._m is not None:
            codec = self.codec if kind == "video" else "opus"
            self._m.webrtc_encode_seconds.labels(kind, codec).observe(seconds)

    def delivered_fps(self, fps: float) -> None:
        if self._m is not None:
            self._m.webrtc_delivered_fps.observe(fps)

    def first_audio(self, seconds: float) -> None:
        if self._m is not None:
            self._m.webrtc_time_to_first_audio.observe(seconds)


ENCODE_STAGE = "webrtc:encode"  # capacity meter: video encode CPU per frame
CONVERT_STAGE = "webrtc:yuv"  # capacity meter: RGB → I420 CPU per frame


@dataclass
class EncodeMeters:
    """Capacity meters a session feeds, so admission prices encoding, not just rendering."""

    encode: CapacityMeter
    convert: CapacityMeter


@dataclass
class WebRTCSessionConfig:
    """Per-session media settings, validated by the transport before a session exists."""

    model: str
    fps: int = 25
    width: int = 416
    height: int = 704
    codec: str = "vp8"
    voice: str | None = None
    speech_buffer_ms: int = 10000
    render_ahead_ms: int = 200
    speech_lead_ms: int = 100
    mic_delay_ms: int = 160
    chunk_frames: int = 4
    max_pending_utterances: int = 8


EventSink = Callable[[dict[str, Any]], None]


class WebRTCAvatarSession:
    """A live avatar for one browser: clock, timeline, tracks, renderer, speech and mic.

    It implements the session manager's ``ManagedSession`` protocol so WebRTC sessions
    share admission with every other realtime session.

    Args:
        config: media settings.
        runner: the avatar model's resident runner (shared with every other session).
        avatar: the prepared reference (``PrepareRequest`` result) for this session.
        synth: streaming TTS for ``speak``; ``None`` makes ``speak`` an error.
        metrics: the server's Prometheus metrics (optional: benchmarks run without).
        capacity_stages: capacity meters that price this session's frames.
        model_windows: seconds of audio context before and lookahead after a chunk
            that the avatar model reads (its ``context_s`` and ``lookahead_s``).
        meters: capacity meters for encode and colour conversion (``None``: not metered).
    """

    kind = "webrtc"

    def __init__(
        self,
        config: WebRTCSessionConfig,
        runner: ModelRunner,
        avatar: Any,
        *,
        synth: SpeechSynth | None = None,
        metrics: Metrics | None = None,
        capacity_stages: list[str] | None = None,
        model_windows: tuple[float, float] = (0.2, 0.04),
        meters: EncodeMeters | None = None,
        session_id: str | None = None,
    ) -> None:
        self.id = session_id or f"rtc_{uuid.uuid4().hex[:16]}"
        self.config = config
        self.fps = config.fps
        self.runner = runner
        self.avatar = avatar
        self.synth = synth
        self.model_windows = model_windows
        self.meters = meters
        self.mic_attached = False
        self.metrics_sink = MetricsSink(metrics, config.codec)
        self._capacity_stages = capacity_stages or []
        self.last_activity = time.monotonic()
        self.created_at = time.monotonic()
        self.clock = SessionClock()
        self.timeline = MediaTimeline(config.speech_buffer_ms)
        self.stats = SessionStats()
        self.audio_track = SessionAudioTrack(self)
        self.video_track = SessionVideoTrack(self)
        self.closed = False
        self.close_reason = ""
        self.on_event: EventSink = lambda event: None
        self.on_close: list[Callable[[WebRTCAvatarSession], Awaitable[None]]] = []

        self._ahead_frames = max(1, config.render_ahead_ms * config.fps // 1000)
        self._frames: deque[tuple[int, av.VideoFrame, float]] = deque()
        self._frame_ready = asyncio.Event()
        self._last_frame: av.VideoFrame | None = None
        self._last_index = -1
        self._next_render = 0
        self._render_epoch = 0
        self._model_state: Any = None
        self._render_budget_s = 0.03
        self._render_error_at = 0.0
        self._mark_epoch = 0
        self._marks: list[Mark] = []
        self._utterances: asyncio.Queue[Utterance] = asyncio.Queue(config.max_pending_utterances)
        self._current: Utterance | None = None
        self._mic_enabled = False
        self._mic_pos = 0
        self._tasks: list[asyncio.Task[Any]] = []
        self._audio_send_offset = 0.0  # seconds the latest audio frame left after its time
        self._closing: asyncio.Task[None] | None = None

    # -- ManagedSession -------------------------------------------------------------

    @property
    def model_id(self) -> str:
        """The avatar model rendering this session (a profile's per-model limit counts it)."""
        return self.runner.name

    @property
    def units_per_second(self) -> float:
        """Frames per second this session renders (and encodes)."""
        return float(self.fps)

    @property
    def capacity_stages(self) -> list[str]:
        """Capacity meters that price one frame of this session."""
        return self._capacity_stages

    async def expire(self, reason: str) -> None:
        """The server closes the session (idle, shutdown): tell the page, then close."""
        self.emit({"type": "error", "code": "session_expired", "message": reason})
        await self.aclose(reason)

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start the renderer and the speech worker (call from the running loop)."""
        self._tasks.append(asyncio.create_task(self._render_loop(), name=f"{self.id}-render"))
        self._tasks.append(asyncio.create_task(self._speech_loop(), name=f"{self.id}-speech"))

    def add_task(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        """Run a helper task that :meth:`aclose` cancels (mic reader, watchdog)."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(f"{self.id}-{name}")
        self._tasks.append(task)
        return task

    async def aclose(self, reason: str = "closed") -> None:
        """Stop everything this session started; idempotent and safe from any path."""
        if self._closing is None:
            self.close_reason = reason
            self._closing = asyncio.ensure_future(self._aclose())
        await asyncio.shield(self._closing)

    async def _aclose(self) -> None:
        self.closed = True
        self._render_epoch += 1
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        self.audio_track.stop()
        self.video_track.stop()
        self._frames.clear()
        self._frame_ready.set()
        for callback in list(self.on_close):
            try:
                await callback(self)
            except Exception:
                log.exception("close callback of %s failed", self.id)
        self.on_close.clear()

    def emit(self, event: dict[str, Any]) -> None:
        """Send an event to the page (through the transport's data channel)."""
        try:
            self.on_event(event)
        except Exception:  # a closed channel must not break media
            log.debug("event for %s not delivered", self.id, exc_info=True)

    # -- video frames -----------------------------------------------------------------

    async def take_frame(self, index: int) -> av.VideoFrame:
        """The frame to show at ``index``: rendered for it, else the last one again."""
        frames = self._frames
        if self._last_frame is None:
            deadline = time.monotonic() + FIRST_FRAME_WAIT_S
            while not frames and not self.closed and time.monotonic() < deadline:
                self._frame_ready.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._frame_ready.wait(), 0.05)
        while frames and frames[0][0] < index:  # rendered, but their slot has passed
            frames.popleft()
            self.stats.frames_dropped_render += 1
        now = time.monotonic()
        content = self._last_index
        if frames and frames[0][0] == index:
            _, frame, openness = frames.popleft()
            self._last_frame = frame
            self._last_index = content = index
            self._note_openness(openness, now)
        elif self._last_frame is None:
            self._last_frame = self._blank_frame()
        else:
            self.stats.frames_repeated += 1
            self.metrics_sink.frames_dropped(1)
        # The picture only lags the sound when the content is older than its slot.
        lag_s = (index - content) / self.fps if content >= 0 else 0.0
        self._record_video_timing(index, lag_s)
        self.stats.frames_delivered += 1
        self.stats._fps_window.append(now)
        self.metrics_sink.frame_delivered()
        self.timeline.poke()  # the renderer may have been waiting for room
        return self._last_frame

    def _blank_frame(self) -> av.VideoFrame:
        frame = av.VideoFrame(width=self.config.width, height=self.config.height, format="yuv420p")
        for plane, value in zip(frame.planes, (16, 128, 128), strict=True):
            plane.update(bytes([value]) * plane.buffer_size)
        return frame

    def _note_openness(self, openness: float, now: float) -> None:
        utt = self._current
        if (
            utt is not None
            and utt.first_open_at is None
            and utt.first_audio_at is not None
            and openness >= OPEN_MOUTH
        ):
            utt.first_open_at = now
            self.stats.ttfv_ms = (now - utt.requested_at) * 1000.0

    def _record_video_timing(self, index: int, content_lag_s: float) -> None:
        # Timestamps cannot drift (both derive from sample counts); what a viewer can
        # see is the video leaving later after its time than the audio does, plus any
        # frame shown in a later slot than the one it was rendered for.
        video_offset = time.monotonic() - self.clock.time_of(frame_sample(index, self.fps))
        skew = video_offset - self._audio_send_offset + content_lag_s
        self.stats.av_skew_ms = skew * 1000.0
        self.metrics_sink.av_skew(skew)

    def encoder_finished(self, kind: str, pts_seconds: float, wall_s: float, cpu_s: float) -> None:
        """Called by the transport's encoder wrapper after each encoded frame."""
        if kind == "audio":
            self.stats.encode_ms_audio = wall_s * 1000.0
            self._audio_send_offset = time.monotonic() - self.clock.time_of(
                int(pts_seconds * AUDIO_RATE)
            )
        else:
            self.stats.encode_ms_video = wall_s * 1000.0
            self.stats.encode_cpu_ms_video = cpu_s * 1000.0
            if self.meters is not None:
                self.meters.encode.record(cpu_s, 1.0)
        self.metrics_sink.encode(kind, wall_s)

    # -- audio marks (events aligned with what is played) ----------------------------

    def audio_emitted(self, position: int, count: int) -> None:
        """The audio track sent ``[position, position+count)``: fire due marks."""
        end = position + count
        now = time.monotonic()
        fired: list[Mark] = []
        while self._marks and self._marks[0].position < end:
            fired.append(self._marks.pop(0))
        for mark in fired:
            if mark.epoch != self._mark_epoch:
                continue
            event = mark.event
            utt = self._current
            if event["type"] == "speech.started" and utt is not None and utt.id == event["id"]:
                utt.first_audio_at = now
                self.stats.ttfa_ms = (now - utt.requested_at) * 1000.0
                self.metrics_sink.first_audio(now - utt.requested_at)
                event = {**event, "ttfa_ms": round(self.stats.ttfa_ms, 1)}
            if event["type"] == "subtitle" and utt is not None and utt.id == event["id"]:
                event = {**event, "end_ms": self._subtitle_end_ms(utt, mark.position)}
            if event["type"] == "speech.ended" and utt is not None and utt.id == event["id"]:
                event = {**event, **self._played(utt), "played_chars": len(utt.text)}
                utt.done.set()
            self.emit(event)

    def _add_mark(self, position: int, event: dict[str, Any]) -> None:
        mark = Mark(position, event, self._mark_epoch)
        marks = self._marks
        i = len(marks)
        while i > 0 and marks[i - 1].position > position:
            i -= 1
        marks.insert(i, mark)

    def _played(self, utt: Utterance) -> dict[str, Any]:
        """How much of an utterance the audio track has actually sent (ms and characters).

        Characters are counted per synthesised segment: whole segments already played,
        plus the played fraction of the one playing now.
        """
        if utt.start is None:
            return {"played_ms": 0.0, "played_chars": 0}
        played_to = self.timeline.played
        if utt.end is not None:
            played_to = min(played_to, utt.end)
        played = max(0, played_to - utt.start)
        written_end = utt.written_end if utt.written_end is not None else played_to
        chars = 0.0
        for k, (seg_start, seg_chars) in enumerate(utt.segments):
            seg_end = utt.segments[k + 1][0] if k + 1 < len(utt.segments) else written_end
            if played_to >= seg_end:
                chars += seg_chars
            elif played_to > seg_start and seg_end > seg_start:
                chars += seg_chars * (played_to - seg_start) / (seg_end - seg_start)
        return {
            "played_ms": round(played * 1000 / AUDIO_RATE, 1),
            "played_chars": min(len(utt.text), round(chars)),
        }

    def _subtitle_end_ms(self, utt: Utterance, position: int) -> float | None:
        """End of the segment starting at ``position``, once it is known."""
        for k, (seg_start, _) in enumerate(utt.segments):
            if seg_start == position and utt.start is not None:
                if k + 1 < len(utt.segments):
                    end = utt.segments[k + 1][0]
                elif utt.end is not None:
                    end = utt.end
                else:
                    return None
                return round((end - utt.start) * 1000 / AUDIO_RATE, 1)
        return None

    # -- speak / interrupt ----------------------------------------------------------

    def speak(self, text: str, voice: str | None = None) -> Utterance:
        """Queue an utterance. Raises ``asyncio.QueueFull`` when too many are waiting."""
        self.last_activity = time.monotonic()
        utt = Utterance(
            id=f"utt_{uuid.uuid4().hex[:10]}",
            text=text,
            voice=voice or self.config.voice,
            requested_at=time.monotonic(),
        )
        self._utterances.put_nowait(utt)
        return utt

    def interrupt(self) -> dict[str, Any]:
        """Stop speech now: drop queued text, queued audio and frames rendered for it.

        Returns what the page needs to know: which utterance stopped and how much of it
        was actually played.
        """
        self.last_activity = time.monotonic()
        dropped = 0
        while not self._utterances.empty():
            self._utterances.get_nowait()
            dropped += 1
        utt = self._current
        # Everything after the next audio frame is unsent: clear it and re-render video.
        cut = max(self.timeline.played, self.clock.position())
        report: dict[str, Any] = {"type": "interrupted", "dropped_utterances": dropped}
        self._mark_epoch += 1
        self._marks.clear()
        self.timeline.streaming = False
        self.timeline.clear_from(cut)
        # Start the model afresh (its state is opaque; None is always valid) so the
        # mouth closes on the next frame instead of easing shut over a third of a second.
        self._model_state = None
        self._rewind(frame_at(cut, self.fps) + 1)
        if utt is not None and not utt.done.is_set():
            sent = self.timeline.played
            utt.end = sent if utt.end is None else min(utt.end, sent)
            played = self._played(utt)
            report.update(id=utt.id, **played)
            self.emit({"type": "speech.ended", "id": utt.id, "reason": "interrupted", **played})
            utt.done.set()
            self._current = None
        for task in self._tasks:
            if task.get_name() == f"{self.id}-speech":
                task.cancel()
        self._tasks = [t for t in self._tasks if not t.done() and not t.cancelled()]
        if not self.closed:
            self._tasks.append(
                asyncio.create_task(self._speech_loop(), name=f"{self.id}-speech")
            )
        return report

    async def _speech_loop(self) -> None:
        while True:
            utt = await self._utterances.get()
            self._current = utt
            try:
                await self._play(utt)
                await utt.done.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("speech failed in %s", self.id)
                self.timeline.streaming = False
                self.emit(
                    {
                        "type": "error",
                        "code": "tts_failed",
                        "message": f"Speech synthesis failed: {exc}",
                        "id": utt.id,
                    }
                )
                if not utt.done.is_set():
                    self.emit({"type": "speech.ended", "id": utt.id, "reason": "error",
                               **self._played(utt)})
                    utt.done.set()
            finally:
                if self._current is utt:
                    self._current = None

    async def _play(self, utt: Utterance) -> None:
        if self.synth is None:
            raise RuntimeError("no TTS model is available on this server")
        to_play: StreamResampler | None = None
        to_lips: StreamResampler | None = None
        position = 0
        self.stats.utterances += 1
        # The TTS stream already starts at the onset of speech (its first segment's
        # leading silence is trimmed at the model), so nothing is held back here.
        stream = self.synth.stream(utt.text, utt.voice)
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                samples = np.asarray(chunk.samples, dtype=np.float32).reshape(-1)
                if to_play is None or to_lips is None:
                    to_play = StreamResampler(chunk.sample_rate, AUDIO_RATE)
                    to_lips = StreamResampler(chunk.sample_rate, LIPS_RATE)
                    # Start a little ahead of the play position (never before queued
                    # speech): the renderer needs that long to draw the first open mouth.
                    lead = self.config.speech_lead_ms * AUDIO_RATE // 1000
                    now = max(self.clock.position(), self.timeline.played)
                    position = max(now + lead, self.timeline.write_end)
                    position -= position % LIPS_PER_AUDIO
                    utt.start = position
                    self.timeline.streaming = True
                    self.timeline.lips_known = position
                    self._add_mark(position, {"type": "speech.started", "id": utt.id,
                                              "text": utt.text})
                    self._rewind(frame_at(position, self.fps))
                play = to_play.process(samples)
                lips = to_lips.process(samples)
                if chunk.text:
                    utt.segments.append((position, len(chunk.text)))
                    self._add_mark(position, {
                        "type": "subtitle",
                        "id": utt.id,
                        "text": chunk.text,
                        "start_ms": round((position - (utt.start or 0)) * 1000 / AUDIO_RATE, 1),
                    })
                await self._write_speech(position, play, lips)
                position += len(play)
                utt.written_end = position
                utt.chars_written += len(chunk.text)
        if to_play is not None and to_lips is not None:
            tail = to_play.process(np.zeros(0, np.float32), last=True)
            tail_lips = to_lips.process(np.zeros(0, np.float32), last=True)
            await self._write_speech(position, tail, tail_lips)
            position += len(tail)
            utt.written_end = position
        if utt.start is None:  # the text produced no audio at all
            utt.start = utt.end = max(self.clock.position(), self.timeline.played)
            self.emit({"type": "speech.started", "id": utt.id, "text": utt.text})
            self.emit({"type": "speech.ended", "id": utt.id, "reason": "finished",
                       **self._played(utt)})
            utt.done.set()
            return
        utt.end = position
        self.timeline.streaming = False
        self.timeline.poke()
        self._add_mark(position, {"type": "speech.ended", "id": utt.id, "reason": "finished"})

    async def _write_speech(self, position: int, play: FloatAudio, lips: FloatAudio) -> None:
        """Write in slices so the bounded timeline applies back-pressure to TTS."""
        step = AUDIO_RATE // 2
        for offset in range(0, len(play), step):
            part = play[offset : offset + step]
            await self.timeline.wait_for_room(position + offset, len(part))
            pcm = np.clip(np.rint(part * 32767.0), -32768, 32767).astype(np.int16)
            self.timeline.write_play(position + offset, pcm)
        # Lips go in whole: the ring keeps capacity_ms plus context, matching the play
        # ring, so anything the play ring accepted fits here too.
        self.timeline.write_lips(position, lips)

    # -- microphone -------------------------------------------------------------------

    def set_mic(self, enabled: bool) -> None:
        """Let the remote microphone drive the lips (while no speech is playing)."""
        self._mic_enabled = enabled
        self.timeline.mic_active = enabled and self.mic_attached
        if enabled:
            self._mic_pos = 0
            self.timeline.lips_known = max(self.clock.position(), self.timeline.played)
        self.timeline.poke()

    async def consume_mic(self, track: MediaStreamTrack) -> None:
        """Read the browser's microphone and put it on the lips timeline, slightly delayed.

        Mic audio is never played back (that would echo); it lands ``mic_delay_ms``
        after the moment it arrived so the renderer can draw it just in time. Late or
        early arrivals re-anchor the write position instead of drifting.
        """
        self.mic_attached = True
        self.timeline.mic_active = self._mic_enabled
        resampler: StreamResampler | None = None
        delay = self.config.mic_delay_ms * AUDIO_RATE // 1000
        try:
            while True:
                frame = await track.recv()
                if not isinstance(frame, av.AudioFrame):
                    continue
                if not self._mic_enabled or self.timeline.streaming or self._current is not None:
                    continue
                samples = _mono_float(frame)
                if resampler is None or resampler.from_rate != frame.sample_rate:
                    resampler = StreamResampler(frame.sample_rate, LIPS_RATE)
                lips = resampler.process(samples.astype(np.float32))
                self.last_activity = time.monotonic()
                target = self.clock.position() + delay
                # Re-anchor when the write head drifted more than one delay away.
                if abs(self._mic_pos - target) > delay:
                    self._mic_pos = target
                self.timeline.write_lips(self._mic_pos, lips)
                self._mic_pos += len(lips) * LIPS_PER_AUDIO
        except MediaStreamError:
            pass
        finally:
            self.mic_attached = False
            self.timeline.mic_active = False
            self.timeline.poke()

    # -- the renderer -----------------------------------------------------------------

    def _rewind(self, frame_index: int) -> None:
        """Forget frames from ``frame_index`` on and render them again from the timeline."""
        frame_index = max(frame_index, self._last_index + 1)
        self._render_epoch += 1
        while self._frames and self._frames[-1][0] >= frame_index:
            self._frames.pop()
        self._next_render = min(self._next_render, frame_index)
        self.timeline.poke()

    async def _render_loop(self) -> None:
        fps = self.fps
        model_context_s, lookahead_s = self.model_windows
        context = int(model_context_s * LIPS_RATE)
        look = int(lookahead_s * LIPS_RATE)
        look_clock = look * LIPS_PER_AUDIO
        while not self.closed:
            clock = self.clock
            n = self._next_render
            due = frame_at(clock.position(), fps) if clock.started else 0
            if clock.started and n <= due:  # already late: render from the next slot
                n = self._next_render = max(n, due + 1, self._last_index + 1)
            limit = due + self._ahead_frames
            if n >= limit:
                if clock.started:
                    room_at = clock.time_of(frame_sample(n - self._ahead_frames, fps))
                    await self.timeline.wait_changed(max(0.002, room_at - time.monotonic()))
                else:
                    await self.timeline.wait_changed(0.05)
                continue
            known = self.timeline.known_until()
            count = 0
            while (
                count < self.config.chunk_frames
                and n + count < limit
                and frame_sample(n + count + 1, fps) + look_clock <= known
            ):
                count += 1
            if count == 0:
                slack = (
                    clock.time_of(frame_sample(n, fps)) - time.monotonic() - self._render_budget_s
                    if clock.started
                    else 0.05
                )
                if slack > 0.001:
                    await self.timeline.wait_changed(slack)
                    continue
                count = 1  # out of time: draw with what has arrived
            try:
                await self._render_chunk(n, count, context, look)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # One failed chunk must not end the picture: report it (at most once a
                # second), show the last frame again and carry on with the next chunk.
                log.exception("rendering for %s failed", self.id)
                now = time.monotonic()
                if now - self._render_error_at > 1.0:
                    self._render_error_at = now
                    self.emit({"type": "error", "code": "render_failed",
                               "message": f"Generate failed: {exc}"})
                self._next_render = n + count
                await asyncio.sleep(count / fps)
            if clock.started:
                self.timeline.release_lips(
                    min(self.timeline.played, clock.position()) - int(LIPS_KEEP_S * AUDIO_RATE)
                )

    async def _render_chunk(self, n: int, count: int, context: int, look: int) -> None:
        fps = self.fps
        epoch = self._render_epoch
        start16 = frame_sample(n, fps) // LIPS_PER_AUDIO
        end16 = frame_sample(n + count, fps) // LIPS_PER_AUDIO
        audio = self.timeline.read_lips(start16 - context, context + (end16 - start16) + look)
        request = ChunkRequest(
            avatar=self.avatar,
            audio=audio,
            audio_offset=context,
            start_sample=start16,
            first_frame_index=n,
            frame_count=count,
            fps=fps,
            sample_rate=LIPS_RATE,
            state=self._model_state,
            session_id=self.id,
        )
        deadline = (
            self.clock.time_of(frame_sample(n, fps)) if self.clock.started else time.monotonic()
        )
        started = time.monotonic()
        try:
            future = self.runner.submit(
                request,
                priority=Priority.REALTIME,
                deadline=deadline,
                is_stale=lambda: self.closed or self._render_epoch != epoch,
                cost=float(count),
            )
            result = await future
        except StaleWork:
            return
        except (RunnerFull, RunnerClosed) as exc:
            self.emit({"type": "error", "code": "overloaded", "message": str(exc)})
            await asyncio.sleep(count / fps)
            return
        if epoch != self._render_epoch or self.closed:
            return
        value: ChunkResult = result.value
        converted = time.monotonic()
        frames, cpu_s = await asyncio.to_thread(_to_video_frames, value.frames)
        if self.meters is not None and frames:
            self.meters.convert.record(cpu_s, float(len(frames)))
        done = time.monotonic()
        if epoch != self._render_epoch or self.closed:
            return
        self.stats.render_ms = result.infer_ms
        self.stats.queue_ms = result.queue_ms
        self.stats.convert_ms = (done - converted) * 1000.0
        spent = done - started
        self._render_budget_s = 0.8 * self._render_budget_s + 0.2 * (spent + 0.01)
        self._model_state = value.state
        openness = _openness(value, len(frames))
        for i, frame in enumerate(frames):
            self._frames.append((n + i, frame, openness[i]))
        self._next_render = n + len(frames)
        self._frame_ready.set()

    # -- reporting -------------------------------------------------------------------

    def metrics_event(self) -> dict[str, Any]:
        """The ``metrics`` event body: what the page shows live."""
        s = self.stats
        now = time.monotonic()
        fps = s.delivered_fps(now)
        self.metrics_sink.delivered_fps(fps)
        return {
            "type": "metrics",
            "session_id": self.id,
            "metrics": {
                "ttfa_ms": None if s.ttfa_ms is None else round(s.ttfa_ms, 1),
                "ttfv_ms": None if s.ttfv_ms is None else round(s.ttfv_ms, 1),
                "av_skew_ms": round(s.av_skew_ms, 1),
                "delivered_fps": fps,
                "frames_delivered": s.frames_delivered,
                # Slots that did not show a frame rendered for them.
                "dropped_frames": s.frames_repeated + s.frames_skipped,
                "audio_frames_skipped": s.audio_frames_skipped,
                "render_ms": round(s.render_ms, 2),
                "queue_ms": round(s.queue_ms, 2),
                "convert_ms": round(s.convert_ms, 2),
                "encode_ms": round(s.encode_ms_video, 2),
                "audio_encode_ms": round(s.encode_ms_audio, 2),
                "speaking": self._current is not None,
                "mic": self._mic_enabled and self.mic_attached,
            },
        }


def _mono_float(frame: av.AudioFrame) -> FloatAudio:
    """Any PyAV audio frame (packed or planar, integer or float) as mono float32."""
    pcm = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if frame.format.is_planar:
        mixed = pcm.reshape(channels, -1).astype(np.float32).mean(axis=0)
    else:
        mixed = pcm.reshape(-1, channels).astype(np.float32).mean(axis=1)
    if np.issubdtype(pcm.dtype, np.integer):
        mixed /= float(2 ** (8 * pcm.dtype.itemsize - 1))
    return np.asarray(mixed, dtype=np.float32)


def _openness(result: ChunkResult, count: int) -> list[float]:
    """Per-frame mouth openness when the model reports it (for time-to-open-mouth)."""
    info = result.info or {}
    per_frame = info.get("openness_per_frame")
    if isinstance(per_frame, list | tuple) and len(per_frame) == count:
        return [float(v) for v in per_frame]
    last = info.get("openness")
    value = float(last) if isinstance(last, int | float) and math.isfinite(last) else 0.0
    return [value] * count


def _to_video_frames(frames: list[RGBFrame]) -> tuple[list[av.VideoFrame], float]:
    """RGB → I420 with OpenCV (fast, releases the GIL), wrapped as PyAV frames.

    Returns the frames and the thread CPU seconds spent (for admission control).
    """
    started = time.thread_time()
    out = []
    for rgb in frames:
        h, w = rgb.shape[:2]
        if h % 2 or w % 2:
            rgb = rgb[: h - h % 2, : w - w % 2]
        i420 = np.asarray(
            cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2YUV_I420), dtype=np.uint8
        )
        out.append(av.VideoFrame.from_ndarray(i420, format="yuv420p"))
    return out, time.thread_time() - started
