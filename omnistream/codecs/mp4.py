"""MP4 muxing: H.264 video and AAC audio from RGB frames and float32 PCM, with PyAV.

Pure and synchronous (call it from a worker thread). Frames and audio are written
incrementally, chunk by chunk, so an offline avatar render never holds the whole video in
memory. Both streams' timestamps come from sample and frame counts (house rule 3), and
:meth:`Mp4Writer.close` trims or pads the audio to exactly ``frames / fps`` seconds so the
two streams of the file have the same duration.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import numpy.typing as npt

DEFAULT_CRF = 23
DEFAULT_PRESET = "veryfast"
DEFAULT_AUDIO_BITRATE = 64_000


@dataclass(frozen=True)
class StreamInfo:
    """Facts about one stream of a probed media file."""

    kind: str
    codec: str
    duration_s: float
    frames: int
    width: int = 0
    height: int = 0
    sample_rate: int = 0


class Mp4Writer:
    """Writes an MP4 with one H.264 (yuv420p) video stream and one AAC mono audio stream.

    Args:
        path: output file.
        width: frame width (even).
        height: frame height (even).
        fps: frame rate.
        sample_rate: rate of the float32 audio given to :meth:`write_audio`.
        crf: x264 quality (lower is better).
        preset: x264 speed preset.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        width: int,
        height: int,
        fps: int,
        sample_rate: int = 16000,
        crf: int = DEFAULT_CRF,
        preset: str = DEFAULT_PRESET,
        audio_bitrate: int = DEFAULT_AUDIO_BITRATE,
        threads: int = 1,
    ) -> None:
        if width % 2 or height % 2:
            raise ValueError(f"H.264 yuv420p needs even dimensions, got {width}x{height}")
        self.width = width
        self.height = height
        self.fps = fps
        self.sample_rate = sample_rate
        self.frames_written = 0
        self.samples_written = 0
        self._closed = False
        self._container: Any = av.open(str(path), mode="w", format="mp4")
        video: Any = self._container.add_stream("libx264", rate=fps)
        video.width = width
        video.height = height
        video.pix_fmt = "yuv420p"
        video.time_base = Fraction(1, fps)
        video.codec_context.thread_count = max(1, threads)
        video.options = {"crf": str(crf), "preset": preset}
        audio: Any = self._container.add_stream("aac", rate=sample_rate)
        audio.layout = "mono"
        audio.bit_rate = audio_bitrate
        audio.time_base = Fraction(1, sample_rate)
        self._video = video
        self._audio = audio

    def write_frames(self, frames: Iterable[npt.NDArray[np.uint8]]) -> None:
        """Encode RGB uint8 frames (height×width×3), shown one after another at ``fps``."""
        for rgb in frames:
            if rgb.shape[:2] != (self.height, self.width):
                raise ValueError(
                    f"frame is {rgb.shape[1]}x{rgb.shape[0]}, expected {self.width}x{self.height}"
                )
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame = frame.reformat(format="yuv420p")
            frame.pts = self.frames_written
            frame.time_base = Fraction(1, self.fps)
            self.frames_written += 1
            for packet in self._video.encode(frame):
                self._container.mux(packet)

    def write_audio(self, samples: npt.NDArray[np.floating]) -> None:
        """Encode float mono samples in [-1, 1] at ``sample_rate``."""
        pcm = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
        if pcm.size == 0:
            return
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="fltp", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self.samples_written
        frame.time_base = Fraction(1, self.sample_rate)
        self.samples_written += pcm.size
        for packet in self._audio.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        """Pad the audio to the video duration, flush both encoders, finish the file.

        Audio already encoded cannot be trimmed: callers give at most
        ``frames_for_samples``-matching audio (see :func:`frames_for_samples`).
        """
        if self._closed:
            return
        self._closed = True
        target = round(self.frames_written * self.sample_rate / self.fps)
        if self.samples_written < target:
            self.write_audio(np.zeros(target - self.samples_written, dtype=np.float32))
        try:
            for packet in self._video.encode(None):
                self._container.mux(packet)
            for packet in self._audio.encode(None):
                self._container.mux(packet)
        finally:
            self._container.close()

    def abort(self) -> None:
        """Close the file without caring whether it is complete (the caller deletes it)."""
        if not self._closed:
            self._closed = True
            try:
                self._container.close()
            except Exception:  # pragma: no cover - best effort on an aborted file
                pass


def frames_for_samples(samples: int, sample_rate: int, fps: int) -> int:
    """How many frames cover ``samples`` of audio (rounded to the nearest frame)."""
    return max(0, round(samples * fps / sample_rate))


def probe(path: str | Path) -> list[StreamInfo]:
    """Decode every packet of a media file and report each stream's real duration.

    Durations come from the last packet's end, not from container headers, so a muxing
    bug that leaves one stream short shows up.
    """
    infos: list[StreamInfo] = []
    with av.open(str(path)) as container:
        ends: dict[int, float] = {}
        starts: dict[int, float] = {}
        counts: dict[int, int] = {}
        for packet in container.demux():
            if packet.pts is None or packet.stream.time_base is None:
                continue
            tb = float(packet.stream.time_base)
            index = packet.stream.index
            start = packet.pts * tb
            end = (packet.pts + (packet.duration or 0)) * tb
            starts[index] = min(starts.get(index, start), start)
            ends[index] = max(ends.get(index, end), end)
            counts[index] = counts.get(index, 0) + 1
        for stream in container.streams:
            kind = stream.type
            ctx: Any = stream.codec_context
            infos.append(
                StreamInfo(
                    kind=kind,
                    codec=ctx.name,
                    duration_s=max(
                        0.0, ends.get(stream.index, 0.0) - max(0.0, starts.get(stream.index, 0.0))
                    ),
                    frames=counts.get(stream.index, 0),
                    width=int(getattr(ctx, "width", 0) or 0) if kind == "video" else 0,
                    height=int(getattr(ctx, "height", 0) or 0) if kind == "video" else 0,
                    sample_rate=int(getattr(ctx, "sample_rate", 0) or 0) if kind == "audio" else 0,
                )
            )
    return infos
