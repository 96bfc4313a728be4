"""Reference-image decoding with explicit limits, before any pixel is allocated."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
    """An image that cannot be used; ``code`` is ``bad_image_base64`` or ``image_too_large``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def decode_base64(text: str, max_bytes: int) -> bytes:
    """Decode base64 (a ``data:`` URL prefix is accepted) with a size limit."""
    if "," in text[:100] and text.startswith("data:"):
        text = text.split(",", 1)[1]
    if len(text) * 3 // 4 > max_bytes:
        raise ImageError("image_too_large", f"Image is larger than {max_bytes} bytes.")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError("bad_image_base64", "Invalid base64.") from exc


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> npt.NDArray[np.uint8]:
    """Decode PNG/JPEG/WebP bytes into RGB uint8, refusing oversized images cheaply.

    The header is read first, so a small file that claims a huge canvas (a
    decompression bomb) is refused before its pixels are decoded.
    """
    if len(data) > max_bytes:
        raise ImageError("image_too_large", f"Image is larger than {max_bytes} bytes.")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(
                    "image_too_large",
                    f"Image is {width}x{height}; the limit is {max_pixels} pixels.",
                )
            rgb = img.convert("RGB")
            rgb.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError("bad_image", f"Not a decodable image: {exc}") from exc
    return np.asarray(rgb, dtype=np.uint8).copy()
