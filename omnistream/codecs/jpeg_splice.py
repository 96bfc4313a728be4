"""JPEG frames that re-encode only the rows that changed, spliced into a cached encoding.

A talking head changes the face and nothing else, so most rows of 8×8 (16×16 with 4:2:0
chroma) blocks are the same in every frame of a session. Baseline JPEG lets us reuse them:
with a restart interval (a ``DRI`` marker in the header) every run of a few MCUs is its
own entropy-coded segment, ending in ``RSTn`` (n = segment number mod 8), and the DC
predictors reset at each restart, so a segment's bytes depend on its own pixels only.
With an interval that divides an MCU row, segments form a grid over the frame. We encode
the static frame once, encode each new frame's changed region (whole segments of the
changed rows) on its own with the same encoder, quality, tables and interval, and join
header, segments and markers. The result is an
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


def restart_interval(width: int) -> int:
    """MCUs per restart segment for frames of this width.

    Two MCUs (32 pixels) when a row holds an even number of them, so a changed region
    is re-encoded only over its own columns at the cost of one marker per 32 pixels
    (about 5 % of a frame's bytes); otherwise one segment per row.
    """
    mcus = mcus_per_row(width)
    return 2 if mcus % 2 == 0 and mcus >= 4 else mcus


def encode_with_restarts(rgb: Frame, quality: int, restart: int | None = None) -> bytes:
    """Encode a whole frame with restart markers as spliced frames have them (the oracle)."""
    return _encode(rgb, quality, restart or restart_interval(rgb.shape[1]))


def _split(data: bytes) -> tuple[bytes, bytes, list[bytes]]:
    """Header up to the scan data, the header without its SOF segment, and the segments."""
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
    """One static frame's encoding, split into restart segments, ready to take changes.

    The frame is a grid of segments: ``row_count`` MCU rows of ``segments_per_row``
    segments, each ``restart`` MCUs (``restart * 16`` pixels) wide.
    """

    def __init__(self, frame: Frame, quality: int, restart: int | None = None) -> None:
        self.height, self.width = frame.shape[:2]
        self.quality = quality
        mcus = mcus_per_row(self.width)
        self.restart = restart or restart_interval(self.width)
        if mcus % self.restart:
            raise SpliceError("the restart interval must divide an MCU row")
        self.segments_per_row = mcus // self.restart
        self.segment_px = self.restart * 16
        self.header, self._tables, segments = _split(_encode(frame, quality, self.restart))
        self.row_count = -(-self.height // MCU_ROWS)
        if len(segments) != self.row_count * self.segments_per_row:
            raise SpliceError(f"expected {self.row_count} MCU rows, found another layout")
        self._segments = segments
        total = len(segments)
        self._markers = [
            bytes([0xFF, 0xD0 + (k % 8)]) if k < total - 1 else _EOI for k in range(total)
        ]
        # Each MCU row with its markers, joined once: unchanged rows cost one reference.
        spr = self.segments_per_row
        self._rows = [
            b"".join(
                x for k in range(i * spr, (i + 1) * spr) for x in (segments[k], self._markers[k])
            )
            for i in range(self.row_count)
        ]
        self._sides: dict[tuple[int, int], tuple[list[bytes], list[bytes]]] = {}
        self._checked = False

    def _row_sides(self, s0: int, s1: int) -> tuple[list[bytes], list[bytes]]:
        """Per MCU row, the joined static segments left of ``s0`` and from ``s1`` on."""
        sides = self._sides.get((s0, s1))
        if sides is None:
            spr, seg, mk = self.segments_per_row, self._segments, self._markers

            def joined(i: int, a: int, b: int) -> bytes:
                return b"".join(x for k in range(i * spr + a, i * spr + b) for x in (seg[k], mk[k]))

            sides = (
                [joined(i, 0, s0) for i in range(self.row_count)],
                [joined(i, s1, spr) for i in range(self.row_count)],
            )
            self._sides[(s0, s1)] = sides
        return sides

    def splice(self, band: Frame, y0: int, x0: int = 0, x1: int | None = None) -> bytes:
        """The whole frame's JPEG where ``band`` replaces rows ``y0 … y0 + len(band)``.

        ``band`` is given in full width; only its columns ``x0 … x1`` (widened to whole
        restart segments) differ from the static frame and are encoded. ``y0`` must sit
        on an MCU row (a multiple of 16) and the band end on one or at the bottom.

        Raises:
            SpliceError: a misaligned or mis-sized band.
        """
        h, w = band.shape[:2]
        if w != self.width or y0 < 0 or y0 % MCU_ROWS or y0 + h > self.height or h == 0:
            raise SpliceError(f"band {w}x{h} at row {y0} does not fit {self.width}x{self.height}")
        if h % MCU_ROWS and y0 + h != self.height:
            raise SpliceError("a band must end on an MCU row or at the bottom of the frame")
        right = self.width if x1 is None else x1
        if not 0 <= x0 < right <= self.width:
            raise SpliceError(f"columns {x0}..{right} outside the frame")
        s0 = x0 // self.segment_px
        s1 = min(self.segments_per_row, -(-right // self.segment_px))
        region = band[:, s0 * self.segment_px : min(self.width, s1 * self.segment_px)]
        _, tables, segments = _split(_encode(region, self.quality, self.restart))
        if not self._checked:
            # Same encoder and quality give the same tables; check once, not per frame.
            if tables != self._tables:
                raise SpliceError("the band was encoded with other tables")
            self._checked = True
        first, rows = y0 // MCU_ROWS, -(-h // MCU_ROWS)
        across = s1 - s0
        if len(segments) != rows * across:
            raise SpliceError("band segment count mismatch")
        left, right_side = self._row_sides(s0, s1)
        spr, mk = self.segments_per_row, self._markers
        parts = [self.header, *self._rows[:first]]
        for r in range(rows):
            i = first + r
            parts.append(left[i])
            base = i * spr + s0
            for j in range(across):
                parts.append(segments[r * across + j])
                parts.append(mk[base + j])
            parts.append(right_side[i])
        parts.extend(self._rows[first + rows :])
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
