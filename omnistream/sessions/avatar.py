"""Realtime avatar sessions: audio in, rendered and JPEG-encoded frames out.

An :class:`AvatarSession` owns one client's geometry, its prepared reference image, a
short audio history (context for the model's analysis window), its clock and its epoch.
Its clock counts samples: the number of frames owed after ``n`` samples is
``floor(n * fps / sample_rate)``, so frame timestamps come from sample counts and never
drift, whatever chunk sizes a client sends.

:class:`AvatarService` opens sessions: admission first (cheap, before any work), then
the reference image, decoded and prepared once per content hash and shared by every
session that uses it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from importlib import resources
from typing import Any

import numpy as np

from omnistream.codecs.image import decode_image
from omnistream.codecs.jpeg import JPEG_BACKENDS, JpegEncoderPool
from omnistream.codecs.jpeg_splice import SpliceCache, SpliceError
from omnistream.codecs.pcm import s16le_to_float32
from omnistream.engine.capacity import CapacityPlanner
from omnistream.engine.engine import Engine
from omnistream.engine.runner import ModelRunner, Priority, StaleWork
from omnistream.metrics import Metrics
from omnistream.models.avatar_base import (
    ChunkRequest,
    ChunkResult,
    PartialFrame,
    PrepareRequest,
    RGBFrame,
)
from omnistream.sessions.manager import SessionManager
from omnistream.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_PROMPT = (
    "A person is talking. Only the foreground characters are moving, the background remains static."
)
DEFAULT_SEED = 9999
REFERENCE_CACHE_SIZE = 32
JPEG_STAGE = "jpeg:encode"
AUDIO_CONTEXT_S = 0.25  # audio history kept for the models' analysis windows


class ConfigError(ValueError):
    """A geometry or config value a client sent cannot be used."""


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"'{name}' must be an integer, got {type(value).__name__}")
    if isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"'{name}' must be an integer, got {value}")
    return int(value)


@dataclass(frozen=True)
class ChunkGeometry:
    """Audio chunking and video geometry of one session (PROTOCOLS §2 defaults)."""

    sample_rate: int = 16000
    fps: int = 25
    width: int = 416
    height: int = 704
    frame_num: int = 29
    motion_frames_num: int = 1
    slice_len: int = 28
    chunk_samples: int = 17920

    @classmethod
    def from_config(cls, config: Mapping[str, Any], settings: Settings) -> ChunkGeometry:
        """Geometry from client keys, deriving what the client left out.

        ``chunk_samples`` and ``slice_len`` determine each other through the frame rate
        when only one is given; unknown keys are ignored.

        Raises:
            ConfigError: a value of the wrong type or outside the server's limits.
        """
        keys = (
            "sample_rate",
            "fps",
            "width",
            "height",
            "frame_num",
            "motion_frames_num",
            "slice_len",
            "chunk_samples",
        )
        given = {k: _as_int(k, config[k]) for k in keys if config.get(k) is not None}
        base = cls()
        sr = given.get("sample_rate", base.sample_rate)
        fps = given.get("fps", base.fps)
        if sr != 16000:
            raise ConfigError("'sample_rate' must be 16000 (AUDI carries 16 kHz PCM)")
        if not 1 <= fps <= settings.max_fps:
            raise ConfigError(f"'fps' must be between 1 and {settings.max_fps}")
        width = given.get("width", base.width)
        height = given.get("height", base.height)
        for name, v in (("width", width), ("height", height)):
            if not 16 <= v <= settings.max_dimension or v % 2:
                raise ConfigError(
                    f"'{name}' must be an even number between 16 and {settings.max_dimension}"
                )
        if "chunk_samples" in given:
            chunk = given["chunk_samples"]
            slice_len = given.get("slice_len", max(1, round(chunk * fps / sr)))
        elif "slice_len" in given:
            slice_len = given["slice_len"]
            chunk = slice_len * sr // fps
        else:
            slice_len = (
                base.slice_len if fps == base.fps else max(1, round(base.chunk_samples * fps / sr))
            )
            chunk = slice_len * sr // fps
        if not 1 <= slice_len <= settings.max_fps * 10:
            raise ConfigError("'slice_len' must be between 1 and 10 seconds of frames")
        if not 160 <= chunk <= settings.max_chunk_samples:
            raise ConfigError(
                f"'chunk_samples' must be between 160 and {settings.max_chunk_samples}"
            )
        motion = given.get("motion_frames_num", base.motion_frames_num)
        if not 0 <= motion <= 64:
            raise ConfigError("'motion_frames_num' must be between 0 and 64")
        frame_num = given.get("frame_num", slice_len + motion)
        if frame_num < 1:
            raise ConfigError("'frame_num' must be positive")
        return cls(sr, fps, width, height, frame_num, motion, slice_len, chunk)

    @property
    def chunk_bytes(self) -> int:
        """Bytes of s16le PCM in one AUDI payload."""
        return self.chunk_samples * 2

    def as_dict(self) -> dict[str, int]:
        """All fields, for ``init_ok`` and ``session.created``."""
        return asdict(self)


class SessionState(StrEnum):
    """Lifecycle: created → active → cancelled / closed."""

    CREATED = "created"
    ACTIVE = "active"
    CANCELLED = "cancelled"
    CLOSED = "closed"


class SetupAbandoned(Exception):
    """The client left while its session waited to be prepared: nothing was prepared."""


class SessionInactive(Exception):
    """Audio for a session that was cancelled or closed."""

    def __init__(self, state: SessionState) -> None:
        super().__init__(f"session is {state}")
        self.state = state


@dataclass
class ChunkOutput:
    """One rendered chunk: JPEG frames plus the timings a ``metrics`` event reports."""

    jpegs: list[bytes]
    chunk_index: int
    queue_ms: float
    infer_ms: float
    encode_ms: float
    total_ms: float
    batch_size: int
    late: bool
    #: Frames in the model call this chunk shared, where the model batches frames from
    #: several sessions into one call (Wav2Lip); None where it does not say.
    batch_frames: int | None = None


@dataclass
class Reference:
    """A prepared reference image, shared by every session using the same image."""

    key: tuple[str, str, int, int]
    prepared: Any
    info: dict[str, Any]


class ReferenceCache:
    """LRU of prepared references with in-flight de-duplication.

    Clients re-``init`` on every interruption, so preparing (face detection, masks) must
    happen once per image, not once per session; two sessions opening with the same new
    image at the same moment share one preparation.
    """

    def __init__(self, capacity: int = REFERENCE_CACHE_SIZE) -> None:
        self.capacity = capacity
        self._done: OrderedDict[tuple[str, str, int, int], Reference] = OrderedDict()
        self._pending: dict[tuple[str, str, int, int], asyncio.Future[Reference]] = {}
        self.hits = 0
        self.misses = 0

    async def get(
        self,
        key: tuple[str, str, int, int],
        build: Callable[[], Awaitable[Reference]],
    ) -> Reference:
        """The cached reference for ``key``, building it (once) if needed."""
        ref = self._done.get(key)
        if ref is not None:
            self._done.move_to_end(key)
            self.hits += 1
            return ref
        pending = self._pending.get(key)
        if pending is not None:
            self.hits += 1
            try:
                return await asyncio.shield(pending)
            except SetupAbandoned:
                # The client that was building it left: build it (or wait on whoever
                # took over) instead.
                return await self.get(key, build)
        self.misses += 1
        return await self._build(key, build)

    async def _build(
        self,
        key: tuple[str, str, int, int],
        build: Callable[[], Awaitable[Reference]],
    ) -> Reference:
        future: asyncio.Future[Reference] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            ref = await build()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs it twice
            raise
        finally:
            self._pending.pop(key, None)
        future.set_result(ref)
        self._done[key] = ref
        while len(self._done) > self.capacity:
            self._done.popitem(last=False)
        return ref


def default_avatar_bytes() -> bytes:
    """The bundled default face (public-domain NASA portrait of Eileen Collins)."""
    return resources.files("omnistream.assets").joinpath("default_avatar.jpg").read_bytes()


@dataclass
class AvatarSession:
    """One live avatar stream. Not thread-safe: used from its connection's task only."""

    service: AvatarService
    model_id: str
    runner: ModelRunner
    geometry: ChunkGeometry
    reference: Reference
    kind: str = "avatar"
    id: str = field(default_factory=lambda: "avt_" + secrets.token_hex(8))
    trace_id: str = field(default_factory=lambda: "trace_" + secrets.token_hex(8))
    prompt: str = DEFAULT_PROMPT
    seed: int = DEFAULT_SEED
    state: SessionState = SessionState.CREATED
    epoch: int = 0
    created_at: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    samples_in: int = 0
    frames_out: int = 0
    chunks_out: int = 0
    first_chunk_ms: float | None = None
    first_audio_at: float | None = None
    on_expire: Callable[[str], Awaitable[None]] | None = None
    _history: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    _model_state: Any = None

    # -- ManagedSession ---------------------------------------------------------------

    @property
    def units_per_second(self) -> float:
        return float(self.geometry.fps)

    @property
    def capacity_stages(self) -> list[str]:
        return [*self.runner.capacity_stages, JPEG_STAGE]

    async def expire(self, reason: str) -> None:
        """Close because the server decided (idle, shutdown); tells the transport."""
        self.close()
        if self.on_expire is not None:
            await self.on_expire(reason)

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.state in (SessionState.CREATED, SessionState.ACTIVE)

    def interrupt(self) -> None:
        """Drop queued work (epoch bump) but keep the session usable."""
        self.epoch += 1

    def cancel(self) -> None:
        """Stop the session's work now; further audio is refused."""
        if self.active:
            self.epoch += 1
            self.state = SessionState.CANCELLED
        self.service.release(self)

    def close(self) -> None:
        """End the session and free its slot; idempotent."""
        self.epoch += 1
        self.state = SessionState.CLOSED
        self.service.release(self)

    # -- media ------------------------------------------------------------------------

    def frames_for(self, samples: int) -> int:
        """Frames owed for the next ``samples`` samples, from the sample clock."""
        g = self.geometry
        total = (self.samples_in + samples) * g.fps // g.sample_rate
        return int(total - self.frames_out)

    async def render_chunk(self, pcm: bytes, priority: Priority = Priority.REALTIME) -> ChunkOutput:
        """Render and encode the frames for one chunk of s16le PCM.

        Raises:
            SessionInactive: the session was cancelled or closed.
            StaleWork: the session was interrupted while this chunk waited.
        """
        if not self.active:
            raise SessionInactive(self.state)
        received = time.monotonic()
        self.last_activity = received
        if self.first_audio_at is None:
            self.first_audio_at = received
        self.state = SessionState.ACTIVE
        g = self.geometry
        audio = s16le_to_float32(pcm)
        frame_count = self.frames_for(len(audio))
        context = self._history
        epoch = self.epoch
        request = ChunkRequest(
            avatar=self.reference.prepared,
            audio=np.concatenate([context, audio]) if len(context) else audio,
            audio_offset=len(context),
            start_sample=self.samples_in,
            first_frame_index=self.frames_out,
            frame_count=frame_count,
            fps=g.fps,
            sample_rate=g.sample_rate,
            state=self._model_state,
            session_id=self.id,
        )
        # Frames drawn one at a time go to the JPEG pool at once, from the runner thread,
        # so encoding overlaps the rest of the chunk's rendering.
        early: dict[int, concurrent.futures.Future[bytes]] = {}

        def queue_encode(index: int, frame: RGBFrame | PartialFrame) -> None:
            early[index] = self.service.submit_encode(frame)

        request.on_frame = queue_encode
        # A model whose frames change in one band hands that band over, and only its
        # JPEG rows are encoded (spliced into the reference's cached encoding).
        request.partial_ok = self.service.splice_jpeg
        request.on_partial = queue_encode
        chunk_s = len(audio) / g.sample_rate
        result = await self.runner.submit(
            request,
            priority=priority,
            deadline=received + chunk_s,
            is_stale=lambda: self.epoch != epoch,
            cost=float(max(1, frame_count)),
        )
        rendered: ChunkResult = result.value
        encode_started = time.monotonic()
        frames = rendered.partial if rendered.partial is not None else rendered.frames
        jpegs = await self.service.encode(frames, early)
        done = time.monotonic()
        if self.epoch != epoch:
            raise StaleWork("interrupted while encoding")
        # Advance the clock only for work that was delivered.
        self._model_state = rendered.state
        self.samples_in += len(audio)
        self.frames_out += frame_count
        keep = int(AUDIO_CONTEXT_S * g.sample_rate)
        self._history = np.ascontiguousarray(request.audio[-keep:], dtype=np.float32)
        index = self.chunks_out
        self.chunks_out += 1
        total_ms = (done - received) * 1000.0
        if self.first_chunk_ms is None:
            self.first_chunk_ms = (done - self.created_at) * 1000.0
        self.last_activity = done
        late = total_ms > chunk_s * 1000.0
        self.service.observe_chunk(self, total_ms, result.queue_ms, late)
        return ChunkOutput(
            jpegs=jpegs,
            chunk_index=index,
            queue_ms=result.queue_ms,
            infer_ms=result.infer_ms,
            encode_ms=(done - encode_started) * 1000.0,
            total_ms=total_ms,
            batch_size=result.batch_size,
            late=late,
            batch_frames=_int_or_none((rendered.info or {}).get("batch_frames")),
        )


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class AvatarService:
    """Opens avatar sessions and owns what they share: reference cache and JPEG pool."""

    def __init__(
        self,
        engine: Engine,
        sessions: SessionManager,
        metrics: Metrics,
        settings: Settings,
    ) -> None:
        self.engine = engine
        self.sessions = sessions
        self.metrics = metrics
        self.settings = settings
        self.references = ReferenceCache()
        # New images are decoded and prepared a few at a time: a storm of connections
        # each bringing a new image queues here instead of crowding out live sessions.
        self._setup_slots = asyncio.Semaphore(settings.max_concurrent_setups)
        self.setups_abandoned = 0  # preparations skipped because the client had left
        self.jpeg: JpegEncoderPool = engine.jpeg
        self.planner: CapacityPlanner = engine.planner
        self._encode_meter = self.planner.meter(JPEG_STAGE)
        self._encode_fn = JPEG_BACKENDS[self.jpeg.backend]
        self.splice_jpeg = settings.jpeg_splice
        self._splices = SpliceCache()

    async def open(
        self,
        model_id: str,
        geometry: ChunkGeometry,
        image_bytes: bytes | None,
        *,
        backend: str = "auto",
        admit: bool = True,
        checkpoint: str | None = None,
        abandoned: Callable[[], bool] | None = None,
    ) -> AvatarSession:
        """Admit, prepare the reference and return an active session.

        ``checkpoint`` is a request's own weights, already checked by
        :meth:`~omnistream.engine.engine.Engine.checkpoint`. ``abandoned`` says whether
        the client has left; it is asked before a new image is prepared, so a connection
        dropped while it waited costs nothing more.

        Raises:
            SetupAbandoned: ``abandoned()`` turned true before preparation.
            CheckpointRefused: too many request checkpoints of this model are resident.
            CapacityExceeded: admission refused (nothing was prepared).
            ImageError: the image cannot be decoded or is over the limits.
            RuntimeError: the model failed to load or to prepare the image.
        """
        if checkpoint is None:  # a profile's degraded model: its fallback's session
            model_id = self.engine.registry.serving_id(model_id)
        runner = self.engine.runner(model_id, backend, checkpoint=checkpoint)
        data = image_bytes if image_bytes is not None else default_avatar_bytes()
        placeholder = _Pending(model_id, float(geometry.fps), runner.capacity_stages)
        if admit:
            self.sessions.admit(placeholder)  # raises CapacityExceeded
        try:
            await runner.wait_ready()
            reference = await self.reference(
                model_id,
                runner,
                data,
                width=geometry.width,
                height=geometry.height,
                abandoned=abandoned,
            )
        except BaseException:
            self.sessions.release(placeholder)
            raise
        session = AvatarSession(
            service=self, model_id=model_id, runner=runner, geometry=geometry, reference=reference
        )
        if admit:
            # Swap the placeholder for the real session under the same slot.
            self.sessions.release(placeholder)
            self.sessions.admit_unchecked(session)
        return session

    async def reference(
        self,
        model_id: str,
        runner: ModelRunner,
        data: bytes,
        *,
        width: int,
        height: int,
        image: RGBFrame | None = None,
        priority: Priority = Priority.REALTIME,
        abandoned: Callable[[], bool] | None = None,
    ) -> Reference:
        """The prepared reference for an image, prepared once and shared by every user.

        Live sessions and offline jobs share this cache: the key is the model, the image
        bytes' SHA-256 and the output size. ``image`` skips decoding when the caller has
        already decoded ``data``; ``priority`` lets an offline job prepare without
        overtaking live work. A live session's new image is prepared at
        :attr:`Priority.SETUP`, behind the chunks of sessions already running, at most
        ``max_concurrent_setups`` at a time (cache hits skip the queue).

        Raises:
            SetupAbandoned: ``abandoned()`` was true once a preparation slot was free.
        """
        digest = hashlib.sha256(data).hexdigest()
        # A request-chosen checkpoint is another model as far as preparation goes.
        owner = f"{model_id}@{runner.checkpoint}" if runner.checkpoint else model_id
        key = (owner, digest, width, height)

        prepare_priority = Priority.SETUP if priority == Priority.REALTIME else priority

        async def build() -> Reference:
            if priority != Priority.REALTIME:
                return await prepare()  # offline jobs: bounded by the job queue instead
            async with self._setup_slots:
                if abandoned is not None and abandoned():
                    self.setups_abandoned += 1
                    raise SetupAbandoned()
                return await prepare()

        async def prepare() -> Reference:
            settings = self.settings
            decoded = image
            if decoded is None:
                decoded = await asyncio.to_thread(
                    decode_image, data, settings.max_image_bytes, settings.max_image_pixels
                )
            result = await runner.submit(
                PrepareRequest(image=decoded, width=width, height=height, content_hash=digest),
                priority=prepare_priority,
            )
            prepared = result.value
            info = dict(getattr(prepared, "info", {}) or {})
            return Reference(key=key, prepared=prepared, info=info)

        return await self.references.get(key, build)

    def release(self, session: AvatarSession) -> None:
        """Free the session's slot (idempotent)."""
        self.sessions.release(session)

    def submit_encode(self, frame: RGBFrame | PartialFrame) -> concurrent.futures.Future[bytes]:
        """Queue one frame on the shared JPEG pool (thread-safe), metering its CPU."""
        return self.jpeg.executor.submit(self._encode_job, frame)

    def _encode_job(self, frame: RGBFrame | PartialFrame) -> bytes:
        started = time.thread_time()
        if isinstance(frame, PartialFrame):
            data = self._encode_partial(frame)
        else:
            data = self._encode_fn(frame, self.jpeg.quality)
        self._encode_meter.record(time.thread_time() - started, 1.0)
        return data

    def _encode_partial(self, frame: PartialFrame) -> bytes:
        """Encode the changed rows only, spliced between the static frame's cached rows."""
        quality = self.jpeg.quality
        try:
            static = self._splices.get(frame.static.key, frame.static.image, quality)
            return static.splice(frame.rows, frame.y0, frame.x0, frame.x1)
        except SpliceError:
            log.warning("JPEG splice refused; encoding the whole frame", exc_info=True)
            return self._encode_fn(frame.full(), quality)

    async def encode(
        self,
        frames: Sequence[RGBFrame | PartialFrame],
        started: Mapping[int, concurrent.futures.Future[bytes]] | None = None,
    ) -> list[bytes]:
        """JPEG-encode a chunk's frames in parallel on the shared pool, in order.

        ``started`` holds encodes already queued while the chunk rendered; the rest are
        queued now. The event loop only awaits the results.
        """
        started = started or {}
        futures = [
            asyncio.wrap_future(started[i] if i in started else self.submit_encode(frame))
            for i, frame in enumerate(frames)
        ]
        jpegs = await asyncio.gather(*futures)
        self.metrics.frames_encoded.inc(len(jpegs))
        return list(jpegs)

    def observe_chunk(
        self, session: AvatarSession, total_ms: float, queue_ms: float, late: bool
    ) -> None:
        """Export one chunk's figures to Prometheus."""
        self.metrics.chunk_latency.labels(session.model_id).observe(total_ms / 1000.0)
        self.metrics.queue_wait.labels(session.model_id).observe(queue_ms / 1000.0)
        if late:
            self.metrics.late_chunks.labels(session.model_id).inc()


@dataclass
class _Pending:
    """Holds a session slot while the reference is prepared (ManagedSession)."""

    model_id: str
    fps: float
    stages: list[str]
    kind: str = "avatar"
    id: str = field(default_factory=lambda: "pending_" + secrets.token_hex(6))
    last_activity: float = field(default_factory=time.monotonic)

    @property
    def units_per_second(self) -> float:
        return self.fps

    @property
    def capacity_stages(self) -> list[str]:
        return [*self.stages, JPEG_STAGE]

    async def expire(self, reason: str) -> None:
        return None
