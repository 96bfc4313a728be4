"""Reference images for avatar sessions, and a cheap JPEG size check for frames.

The harness sends the package's default avatar when no ``--ref-image`` is given, so a
bare ``omnistream bench avatar --url …`` works against any server. Frames coming back
are not decoded (that would make the client the bottleneck at high session counts):
reading the JPEG's SOF header is enough to check the geometry the server promised.
"""

from __future__ import annotations

import io
import struct
from importlib import resources
from pathlib import Path

DEFAULT_AVATAR = "default_avatar.jpg"


def synth_face_png(width: int = 416, height: int = 704) -> bytes:
    """A simple face-like portrait (head, eyes, mouth on a plain background) as PNG.

    Only used when the package's default avatar is missing; face detectors in some
    servers need a face-ish layout, not a photo.
    """
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (190, 205, 220))
    draw = ImageDraw.Draw(img)
    cx, cy = width // 2, int(height * 0.4)
    rw, rh = int(width * 0.28), int(height * 0.2)
    draw.rectangle((cx - rw, cy + rh, cx + rw, height), fill=(60, 70, 110))  # shoulders
    draw.ellipse((cx - rw, cy - rh, cx + rw, cy + rh), fill=(226, 188, 160))  # head
    ex, ey, er = int(rw * 0.4), cy - rh // 5, max(3, rw // 10)
    for x in (cx - ex, cx + ex):
        draw.ellipse((x - er * 2, ey - er, x + er * 2, ey + er), fill=(250, 250, 250))
        draw.ellipse((x - er, ey - er, x + er, ey + er), fill=(50, 40, 30))
    my = cy + rh // 2
    draw.ellipse((cx - rw // 3, my - rh // 12, cx + rw // 3, my + rh // 12), fill=(150, 60, 60))
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def default_ref_image() -> bytes:
    """The package's default avatar, or a synthesised face when it is not installed."""
    try:
        return resources.files("omnistream.assets").joinpath(DEFAULT_AVATAR).read_bytes()
    except (FileNotFoundError, ModuleNotFoundError, OSError):
        return synth_face_png()


def load_ref_image(path: str | Path | None) -> bytes:
    """Bytes of ``path``, or :func:`default_ref_image` when ``path`` is None."""
    if path is None:
        return default_ref_image()
    return Path(path).read_bytes()


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's SOF segment, or None when it is not a JPEG."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in _SOF_MARKERS:
            if pos + 9 > len(data):
                return None
            height, width = struct.unpack_from(">HH", data, pos + 5)
            return int(width), int(height)
        if marker == 0xDA:  # start of scan before any SOF
            return None
        pos += 2 + length
    return None
