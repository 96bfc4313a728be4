"""The contract between avatar sessions and avatar models (embedded or neural).

Two kinds of work go to an avatar model's runner:

* :class:`PrepareRequest` — once per reference image (cached by the session layer by
  content hash, size and model): find the face, crop, build masks. It runs on the model's
  own runner so that a GPU model can keep the prepared tensors on its device.
* :class:`ChunkRequest` — render ``frame_count`` frames for one chunk of a session's audio.
  Requests from every live session share a batch; each carries the per-session state the
  model handed back last time (smoothing filters, blink timers), so models stay stateless
  and any replica can serve any session.

Frame ``i`` of a chunk is shown at ``(first_frame_index + i) / fps`` seconds of the
session's clock; ``audio[audio_offset]`` is the sample at ``start_sample`` of that clock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from omnistream.models.base import BatchModel

log = logging.getLogger(__name__)

RGBFrame = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class StaticFrame:
    """A frame that many output frames share (a fitted reference), named for caches.

    ``key`` identifies the pixels (model, image hash, size): an encoder may keep work
    done on ``image`` (its JPEG rows) under that key for as long as it likes.
    """

    image: RGBFrame
    key: str


@dataclass(frozen=True)
class PartialFrame:
    """A frame equal to ``static`` except rows ``y0 … y0 + len(rows)``, given in full width.

    Models whose frames change only in one region (a face on a still photo) return these
    when the request allows it, so the encoder compresses only that region. Within the
    rows, only columns ``x0 … x1`` differ from ``static`` (``x1`` None: to the right edge).
    """

    static: StaticFrame
    y0: int
    rows: RGBFrame
    x0: int = 0
    x1: int | None = None

    def full(self) -> RGBFrame:
        """The whole frame (a copy of the static frame with the band written in)."""
        frame = self.static.image.copy()
        frame[self.y0 : self.y0 + self.rows.shape[0]] = self.rows
        return frame


@dataclass(frozen=True)
class PrepareRequest:
    """Prepare one reference image (RGB uint8, any size) for ``width``×``height`` output."""

    image: RGBFrame
    width: int
    height: int
    content_hash: str


@dataclass
class ChunkRequest:
    """Render the frames of one chunk of one session.

    Attributes:
        avatar: what :class:`PrepareRequest` returned for this session's reference.
        audio: float32 mono at ``sample_rate``: past context, the chunk, then any
            lookahead the session already has.
        audio_offset: index in ``audio`` of the chunk's first sample.
        start_sample: that sample's position on the session clock.
        first_frame_index: session-clock index of the first frame to render.
        frame_count: frames to render (0 is legal: a priming chunk).
        fps: output frame rate.
        sample_rate: audio rate (16 kHz on every avatar protocol).
        state: the model's per-session state from the previous chunk (None at first).
        session_id: for logs and batch statistics only.
        on_frame: optional; a model that draws frames one at a time calls it from the
            runner thread with ``(index, frame)`` as each is done, so the session can
            start encoding while the rest of the chunk renders. Models that render a
            whole batch at once may ignore it: the frames still come in the result.
        partial_ok: the caller takes :class:`PartialFrame` results (in
            ``ChunkResult.partial``, announced through ``on_partial``); a model may
            still answer with full frames, so callers must handle both.
        on_partial: like ``on_frame``, for partial frames.
    """

    avatar: Any
    audio: npt.NDArray[np.float32]
    audio_offset: int
    start_sample: int
    first_frame_index: int
    frame_count: int
    fps: int
    sample_rate: int = 16000
    state: Any = None
    session_id: str = ""
    on_frame: Callable[[int, RGBFrame], None] | None = None
    partial_ok: bool = False
    on_partial: Callable[[int, PartialFrame], None] | None = None


@dataclass
class ChunkResult:
    """Rendered frames (RGB uint8, height×width×3) and the state for the next chunk.

    When the request set ``partial_ok`` a model may return ``partial`` (one per frame)
    instead, with ``frames`` empty; :meth:`full_frames` gives whole frames either way.
    """

    frames: list[RGBFrame]
    state: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    partial: list[PartialFrame] | None = None

    def full_frames(self) -> list[RGBFrame]:
        """Every frame in full, expanding partial frames where the model gave those."""
        if self.partial is not None:
            return [p.full() for p in self.partial]
        return self.frames


AvatarPayload = PrepareRequest | ChunkRequest
AvatarOutput = Any  # prepared avatar for PrepareRequest, ChunkResult for ChunkRequest


class AvatarModel(BatchModel[AvatarPayload, AvatarOutput]):
    """Base class for avatar models: dispatches prepare and render work.

    Subclasses implement :meth:`prepare` and :meth:`render`; ``max_batch_cost`` counts
    frames. ``context_s`` and ``lookahead_s`` tell sessions how much audio around a chunk
    the model wants to see.
    """

    max_batch_cost: float = 256.0
    context_s: float = 0.2
    lookahead_s: float = 0.04

    def cost(self, payload: AvatarPayload) -> float:
        # Preparation is one-off work: it must not skew the per-frame capacity estimate.
        if isinstance(payload, PrepareRequest):
            return 0.0
        return float(max(1, payload.frame_count))

    def batch_key(self, payload: AvatarPayload) -> Hashable:
        # Preparations run alone; every chunk of every session may share a batch.
        if isinstance(payload, PrepareRequest):
            return ("prepare", id(payload))
        return "render"

    def run_batch(self, payloads: list[AvatarPayload]) -> list[AvatarOutput]:  # type: ignore[override]
        chunks = [p for p in payloads if isinstance(p, ChunkRequest)]
        rendered = iter(self.render(chunks) if chunks else [])
        out: list[AvatarOutput] = []
        for payload in payloads:
            if isinstance(payload, PrepareRequest):
                try:
                    out.append(self.prepare(payload))
                except Exception as exc:  # one bad image must not fail other items
                    out.append(exc)
            else:
                out.append(next(rendered))
        return out

    def prepare(self, request: PrepareRequest) -> Any:
        """Analyse a reference image once; the result is shared by every session using it."""
        raise NotImplementedError

    def render(self, chunks: list[ChunkRequest]) -> list[ChunkResult | BaseException]:
        """Render a batch of chunks, possibly from many sessions, in one call."""
        raise NotImplementedError


def render_each(
    chunks: list[ChunkRequest], render_one: Callable[[ChunkRequest], ChunkResult]
) -> list[ChunkResult | BaseException]:
    """Render chunks one by one; a chunk that fails fails alone.

    For renderers with no batched kernel: one session's bad chunk becomes its own error
    result and the other sessions of the batch still get their frames.
    """
    results: list[ChunkResult | BaseException] = []
    for chunk in chunks:
        try:
            results.append(render_one(chunk))
        except Exception as exc:  # keep the other sessions of the batch alive
            log.exception("rendering chunk for %s failed", chunk.session_id)
            results.append(exc)
    return results
