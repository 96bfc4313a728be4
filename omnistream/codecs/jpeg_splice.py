"""JPEG frames that re-encode only the rows that changed, spliced into a cached encoding.

A talking head changes the face and nothing else, so most rows of 8×8 (16×16 with 4:2:0
chroma) blocks are the same in every frame of a session. Baseline JPEG lets us reuse them:
with a restart interval of one MCU row (a ``DRI`` marker in the header) every MCU row is
its own entropy-coded segment, ending in ``RSTn`` (n = row mod 8), and the DC predictors
reset at each restart, so a row's bytes depend on that row's pixels only. We encode the
static frame once, encode each new frame's changed band of rows on its own (same encoder,
quality, tables and restart interval), and join header, rows and markers. The result is an
ordinary baseline JPEG that any decoder reads (tests decode it with Pillow, PyAV/FFmpeg
and libjpeg-turbo) and is byte-identical to encoding the whole frame with restarts, which
:func:`encode_with_restarts` does and tests use as the oracle.

The encoder is OpenCV's libjpeg-turbo (``cv2.imencode``) because it sets the restart
interval and releases the GIL; Huffman optimisation stays off so every encoding uses the
standard tables and rows from different encodings can share one header.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Hashable

import cv2
import numpy as np
import numpy.typing as npt

Frame = npt.NDArray[np.uint8]

MCU_ROWS = 16  # pixel rows per MCU row with 4:2:0 chroma subsampling
_RESTART = re.compile(rb"\xff[\xd0-\xd7]")
_EOI = b"\xff\xd9"
_SOF0 = 0xC0
_SOS = 0xDA
_SAMPLING_420 = 0x221111  # cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420
SPLICE_CACHE_SIZE = 32  # static encodings kept (one per reference × size × quality)


class SpliceError(ValueError):
    """A band that cannot be spliced (misaligned rows, other width, other tables)."""


def _encode(rgb: Frame, quality: int, restart_mcus: int) -> bytes:
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    params = [
        cv2.IMWRITE_JPEG_QUALITY,
        int(quality),
        cv2.IMWRITE_JPEG_RST_INTERVAL,
        int(restart_mcus),
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
        _SAMPLING_420,
        cv2.IMWRITE_JPEG_OPTIMIZE,
        0,
    ]
    ok, buf = cv2.imencode(".jpg", bgr, params)
    if not ok:
        raise RuntimeError("OpenCV JPEG encoding failed")
    return bytes(buf.tobytes())


def mcus_per_row(width: int) -> int:
    """MCUs across a frame of this width (4:2:0: 16 pixels each)."""
    return -(-width // 16)


def encode_with_restarts(rgb: Frame, quality: int) -> bytes:
    """Encode a whole frame with a restart marker after every MCU row (the oracle)."""
    return _encode(rgb, quality, mcus_per_row(rgb.shape[1]))


def _split(data: bytes) -> tuple[bytes, bytes, list[bytes]]:
    """Header up to the scan data, the header without its SOF segment, and the rows."""
    pos = 2  # after SOI
    sof_start = sof_end = -1
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise SpliceError("malformed JPEG header")
        marker = data[pos + 1]
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        end = pos + 2 + length
        if marker == _SOF0:
            sof_start, sof_end = pos, end
        if marker == _SOS:
            if sof_start < 0:
                raise SpliceError("not a baseline JPEG")
            header = data[:end]
            tables = data[:sof_start] + data[sof_end:end]
            stop = data.rfind(_EOI)
            if stop < end:
                raise SpliceError("JPEG without EOI")
            return header, tables, _RESTART.split(data[end:stop])
        pos = end
    raise SpliceError("JPEG without a scan")


class StaticJpeg:
    """One static frame's encoding, split into MCU rows, ready to take changed bands."""

    def __init__(self, frame: Frame, quality: int) -> None:
        self.height, self.width = frame.shape[:2]
        self.quality = quality
        self.restart_mcus = mcus_per_row(self.width)
        self.header, self._tables, self.rows = _split(_encode(frame, quality, self.restart_mcus))
        self.row_count = -(-self.height // MCU_ROWS)
        if len(self.rows) != self.row_count:
            raise SpliceError(f"expected {self.row_count} MCU rows, found {len(self.rows)}")
        self._markers = [bytes([0xFF, 0xD0 + (i % 8)]) for i in range(self.row_count)]
        self._checked = False

    def splice(self, band: Frame, y0: int) -> bytes:
        """The whole frame's JPEG: ``band`` replaces rows ``y0 … y0 + len(band)``.

        ``y0`` must sit on an MCU row (a multiple of 16) and the band must end on one or
        at the bottom of the frame, so that it covers whole MCU rows.

        Raises:
            SpliceError: a misaligned or mis-sized band.
        """
        h, w = band.shape[:2]
        if w != self.width or y0 < 0 or y0 % MCU_ROWS or y0 + h > self.height or h == 0:
            raise SpliceError(f"band {w}x{h} at row {y0} does not fit {self.width}x{self.height}")
        if h % MCU_ROWS and y0 + h != self.height:
            raise SpliceError("a band must end on an MCU row or at the bottom of the frame")
        _, tables, rows = _split(_encode(band, self.quality, self.restart_mcus))
        if not self._checked:
            # Same encoder and quality give the same tables; check once, not per frame.
            if tables != self._tables:
                raise SpliceError("the band was encoded with other tables")
            self._checked = True
        first = y0 // MCU_ROWS
        if len(rows) != -(-h // MCU_ROWS):
            raise SpliceError("band row count mismatch")
        parts = [self.header]
        markers = self._markers
        last = self.row_count - 1
        for i in range(self.row_count):
            k = i - first
            parts.append(rows[k] if 0 <= k < len(rows) else self.rows[i])
            parts.append(markers[i] if i < last else _EOI)
        return b"".join(parts)


class SpliceCache:
    """Static encodings by key (LRU, thread-safe): built once, shared by every session."""

    def __init__(self, capacity: int = SPLICE_CACHE_SIZE) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._items: OrderedDict[Hashable, StaticJpeg] = OrderedDict()

    def get(self, key: Hashable, frame: Frame, quality: int) -> StaticJpeg:
        """The static encoding of ``frame`` under ``key``, encoding it on first use."""
        full_key = (key, quality)
        with self._lock:
            item = self._items.get(full_key)
            if item is not None:
                self._items.move_to_end(full_key)
                return item
        item = StaticJpeg(frame, quality)
        with self._lock:
            self._items[full_key] = item
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return item
