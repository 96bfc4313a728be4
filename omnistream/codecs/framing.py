"""Binary wire framing shared by every avatar protocol (PROTOCOLS §1).

``AUDI`` + s16le PCM carries audio in, ``VIDX`` + a counted list of length-prefixed JPEGs
carries video out, ``FRAM`` + one image carries a video-clone frame in. The decoders are
strict on purpose: a client bug (a truncated header, a length past the end, trailing
bytes) is reported precisely instead of silently producing a corrupt frame.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

AUDIO_MAGIC = b"AUDI"
VIDEO_MAGIC = b"VIDX"
FRAME_MAGIC = b"FRAM"
MAGIC_LEN = 4

_U32 = struct.Struct("<I")


class FramingError(ValueError):
    """A binary message that does not follow PROTOCOLS §1.

    Attributes:
        code: a stable machine-readable reason (``bad_magic``, ``truncated``,
            ``bad_length``, ``empty_frame``, ``trailing_bytes``, ``odd_length``).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def encode_audio(pcm_s16le: bytes) -> bytes:
    """Frame s16le mono PCM as an ``AUDI`` message."""
    return AUDIO_MAGIC + pcm_s16le


def decode_audio(message: bytes) -> bytes:
    """Return the PCM payload of an ``AUDI`` message.

    Raises:
        FramingError: wrong magic, or a payload that is not whole 16-bit samples.
    """
    if message[:MAGIC_LEN] != AUDIO_MAGIC:
        raise FramingError("bad_magic", "Binary message must start with 'AUDI' magic.")
    payload = message[MAGIC_LEN:]
    if len(payload) % 2:
        raise FramingError(
            "odd_length", f"AUDI payload has {len(payload)} bytes, not whole int16 samples."
        )
    return bytes(payload)


def encode_video(jpegs: Sequence[bytes]) -> bytes:
    """Frame a chunk of JPEG images as one ``VIDX`` message.

    ``frame_count = 0`` is legal and used for priming chunks.
    """
    parts = [VIDEO_MAGIC, _U32.pack(len(jpegs))]
    for jpeg in jpegs:
        if not jpeg:
            raise FramingError("empty_frame", "VIDX frames must not be empty.")
        parts.append(_U32.pack(len(jpeg)))
        parts.append(jpeg)
    return b"".join(parts)


def decode_video(message: bytes) -> list[bytes]:
    """Split a ``VIDX`` message into its JPEG frames, validating every length.

    Raises:
        FramingError: wrong magic, truncated header, a frame length past the end,
            a zero-length frame, or bytes after the last frame.
    """
    view = memoryview(message)
    if bytes(view[:MAGIC_LEN]) != VIDEO_MAGIC:
        raise FramingError("bad_magic", "Binary message must start with 'VIDX' magic.")
    if len(view) < MAGIC_LEN + 4:
        raise FramingError("truncated", "VIDX header truncated: missing frame_count.")
    (count,) = _U32.unpack_from(view, MAGIC_LEN)
    offset = MAGIC_LEN + 4
    frames: list[bytes] = []
    for index in range(count):
        if offset + 4 > len(view):
            raise FramingError(
                "truncated", f"VIDX truncated: frame {index} of {count} has no length."
            )
        (length,) = _U32.unpack_from(view, offset)
        offset += 4
        if length == 0:
            raise FramingError("empty_frame", f"VIDX frame {index} has zero length.")
        if offset + length > len(view):
            raise FramingError(
                "bad_length",
                f"VIDX frame {index} length {length} runs past the end of the message "
                f"({len(view) - offset} bytes left).",
            )
        frames.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != len(view):
        raise FramingError(
            "trailing_bytes", f"VIDX has {len(view) - offset} trailing bytes after frame {count}."
        )
    return frames


def encode_frame(image: bytes) -> bytes:
    """Frame one JPEG/PNG image as a ``FRAM`` message."""
    return FRAME_MAGIC + image


def decode_frame(message: bytes) -> bytes:
    """Return the image bytes of a ``FRAM`` message."""
    if message[:MAGIC_LEN] != FRAME_MAGIC:
        raise FramingError("bad_magic", "Binary message must start with 'FRAM' magic.")
    if len(message) == MAGIC_LEN:
        raise FramingError("empty_frame", "FRAM message carries no image.")
    return bytes(message[MAGIC_LEN:])
