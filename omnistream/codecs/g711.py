"""G.711 μ-law and A-law (ITU-T G.711) ⇄ 16-bit linear PCM, 8 kHz telephone audio.

The OpenAI Realtime protocol carries telephone audio as ``g711_ulaw`` / ``g711_alaw``
(``audio/pcmu`` / ``audio/pcma``): one byte per sample at 8 kHz. ``audioop`` did this in
the standard library until Python 3.13 removed it, so it lives here as table lookups:
decoding is one 256-entry table, encoding one 65536-entry table built once at import
(128 KiB each), both pure numpy and fast enough for many live streams.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

G711_RATE = 8000
Law = Literal["ulaw", "alaw"]

_BIAS = 0x84
_CLIP = 8159  # μ-law clip on the 14-bit magnitude


_ULAW_SEGMENT_ENDS = (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)


def _ulaw_encode_one(sample: int) -> int:
    """The reference (Sun/CCITT) μ-law encoder on the 14-bit magnitude, as audioop did."""
    value = sample >> 2
    if value < 0:
        value, mask = -value, 0x7F
    else:
        mask = 0xFF
    value = min(value, _CLIP) + (_BIAS >> 2)
    for segment, end in enumerate(_ULAW_SEGMENT_ENDS):
        if value <= end:
            return ((segment << 4) | ((value >> (segment + 1)) & 0x0F)) ^ mask
    return 0x7F ^ mask


def _ulaw_decode_one(code: int) -> int:
    code = ~code & 0xFF
    sign = code & 0x80
    exponent = (code >> 4) & 0x07
    mantissa = code & 0x0F
    magnitude = (((mantissa << 3) + _BIAS) << exponent) - _BIAS
    return -magnitude if sign else magnitude


def _alaw_encode_one(sample: int) -> int:
    sign = 0x80 if sample >= 0 else 0
    magnitude = min(-sample - 1 if sample < 0 else sample, 32767) >> 3
    if magnitude < 32:
        code = magnitude >> 1
    else:
        exponent = 1
        while magnitude >= 64 and exponent < 7:
            magnitude >>= 1
            exponent += 1
        code = (exponent << 4) | ((magnitude >> 1) & 0x0F)
    return (sign | code) ^ 0x55


def _alaw_decode_one(code: int) -> int:
    code ^= 0x55
    sign = code & 0x80
    exponent = (code >> 4) & 0x07
    mantissa = code & 0x0F
    if exponent == 0:
        magnitude = (mantissa << 4) + 8
    else:
        magnitude = ((mantissa << 4) + 0x108) << (exponent - 1)
    return magnitude if sign else -magnitude


_ALL = range(-32768, 32768)
_ENCODE: dict[str, npt.NDArray[np.uint8]] = {
    "ulaw": np.array([_ulaw_encode_one(s) for s in _ALL], dtype=np.uint8),
    "alaw": np.array([_alaw_encode_one(s) for s in _ALL], dtype=np.uint8),
}
_DECODE: dict[str, npt.NDArray[np.int16]] = {
    "ulaw": np.array([_ulaw_decode_one(c) for c in range(256)], dtype=np.int16),
    "alaw": np.array([_alaw_decode_one(c) for c in range(256)], dtype=np.int16),
}


def encode(pcm: bytes | bytearray | memoryview, law: Law) -> bytes:
    """s16le PCM → one G.711 byte per sample (same rate: resample to 8 kHz first)."""
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.int32) + 32768
    return _ENCODE[law][samples].tobytes()


def decode(data: bytes | bytearray | memoryview, law: Law) -> bytes:
    """G.711 bytes → s16le PCM, one sample per byte."""
    codes = np.frombuffer(data, dtype=np.uint8)
    return _DECODE[law][codes].astype("<i2").tobytes()
