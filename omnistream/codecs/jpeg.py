"""Baseline JPEG encoding for VIDX chunks, in parallel worker threads.

Both backends call libjpeg-turbo and release the GIL while they compress, so the frames
of one chunk really do encode in parallel on the pool's threads. ``bench/jpeg_backends.py``
measures the candidates (simplejpeg, OpenCV, Pillow) on this machine; the default is the
one that came out fastest there, and :data:`JPEG_BACKENDS` lets an operator pick another.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt
import simplejpeg

Frame = npt.NDArray[np.uint8]
JpegBackend = Literal["simplejpeg", "opencv", "pillow"]

DEFAULT_QUALITY = 80


def _encode_simplejpeg(frame: Frame, quality: int) -> bytes:
    return bytes(
        simplejpeg.encode_jpeg(
            np.ascontiguousarray(frame),
            quality=quality,
            colorspace="RGB",
            colorsubsampling="420",
            fastdct=True,
        )
    )


def _encode_opencv(frame: Frame, quality: int) -> bytes:
    bgr = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("OpenCV JPEG encoding failed")
    return bytes(buf.tobytes())


def _encode_pillow(frame: Frame, quality: int) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(frame).save(out, "JPEG", quality=quality, subsampling=2)
    return out.getvalue()


JPEG_BACKENDS: dict[str, Callable[[Frame, int], bytes]] = {
    "simplejpeg": _encode_simplejpeg,
    "opencv": _encode_opencv,
    "pillow": _encode_pillow,
}


def encode_jpeg(frame: Frame, quality: int = DEFAULT_QUALITY, backend: str = "simplejpeg") -> bytes:
    """Encode one RGB uint8 frame (H×W×3) as a baseline 4:2:0 JPEG."""
    return JPEG_BACKENDS[backend](frame, quality)


def decode_jpeg(data: bytes) -> Frame:
    """Decode a JPEG into an RGB uint8 array (tests and the benchmark use this)."""
    return np.asarray(simplejpeg.decode_jpeg(data, colorspace="RGB"), dtype=np.uint8)


class JpegEncoderPool:
    """Encodes the frames of a chunk concurrently on a fixed pool of threads.

    One pool serves every session: its size bounds the encode CPU the process can use,
    which is what the session manager's capacity estimate is measured against.
    """

    def __init__(
        self,
        threads: int | None = None,
        quality: int = DEFAULT_QUALITY,
        backend: str = "simplejpeg",
    ) -> None:
        if backend not in JPEG_BACKENDS:
            raise ValueError(
                f"unknown JPEG backend {backend!r}; choose from {sorted(JPEG_BACKENDS)}"
            )
        self.threads = threads or max(1, os.cpu_count() or 1)
        self.quality = quality
        self.backend = backend
        self._encode = JPEG_BACKENDS[backend]
        self._executor: Executor = ThreadPoolExecutor(
            max_workers=self.threads, thread_name_prefix="jpeg"
        )

    @property
    def executor(self) -> Executor:
        """The thread pool, for callers that schedule encodes themselves."""
        return self._executor

    def encode_many(self, frames: Sequence[Frame]) -> list[bytes]:
        """Encode frames in parallel and return them in order (blocking: call off-loop)."""
        if len(frames) <= 1:
            return [self._encode(f, self.quality) for f in frames]
        return list(self._executor.map(lambda f: self._encode(f, self.quality), frames))

    def shutdown(self) -> None:
        """Stop the worker threads."""
        self._executor.shutdown(wait=False, cancel_futures=True)
