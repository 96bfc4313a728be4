"""Reference preparation for Wav2Lip: face box, model crop, masks (numpy/OpenCV only).

Done once per reference image and shared by every session that uses it. The reference
is fitted to the session's frame exactly as the embedded avatar does it (same face
detector, same framing), so switching models keeps the picture. Wav2Lip regenerates
a crop around the face; only its lower part (mouth and jaw) is blended back, through a
feathered mask, so the eyes and the edges of the crop never change and no seam shows.
A reference without a detectable face falls back to a centred region and says so in
``info`` instead of failing the session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from omnistream.models.avatar_base import PrepareRequest, RGBFrame
from omnistream.models.avatar_lite import detect_face, fit_to_frame

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 (exclusive)

#: How far the crop reaches past the Haar box: Haar stops at the lips, Wav2Lip wants
#: the chin (the reference pads the bottom of its detector box for the same reason).
CHIN_PAD = 0.18
SIDE_PAD = 0.06
#: Fraction of the crop height where the blend mask starts (the model's own mask
#: hides the lower half of its input, so only that half is ever regenerated).
BLEND_TOP = 0.52
FEATHER = 0.08
FALLBACK_SIDE = 0.45


@dataclass
class Wav2LipAvatar:
    """A prepared reference: the fitted frame, the face box and the model's inputs.

    Attributes:
        frame: the reference fitted to ``width``×``height`` (RGB uint8).
        box: crop box in ``frame`` (x1, y1, x2, y2).
        crop: the box resized to the variant's square input (RGB uint8).
        blend: feathered mask over the box (float32, 0..1), 1 on mouth and jaw.
        face_found: False when the box is the centred fallback.
        info: facts for logs and the session (face box, fallback reason).
        device_cache: per loaded model, the tensors it keeps on its device (encoder
            features, frame, mask); filled lazily by the model that renders it.
    """

    frame: RGBFrame
    box: Box
    crop: RGBFrame
    blend: npt.NDArray[np.float32]
    size: int
    face_found: bool
    content_hash: str
    info: dict[str, Any] = field(default_factory=dict)
    device_cache: dict[int, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def width(self) -> int:
        return int(self.frame.shape[1])

    @property
    def height(self) -> int:
        return int(self.frame.shape[0])


def _clip_box(x1: float, y1: float, x2: float, y2: float, width: int, height: int) -> Box:
    bx1 = int(np.clip(round(x1), 0, width - 2))
    by1 = int(np.clip(round(y1), 0, height - 2))
    bx2 = int(np.clip(round(x2), bx1 + 2, width))
    by2 = int(np.clip(round(y2), by1 + 2, height))
    return bx1, by1, bx2, by2


def face_box(face: tuple[int, int, int, int], width: int, height: int) -> Box:
    """The crop box for a detected face (x, y, w, h): sides and chin padded."""
    x, y, w, h = face
    return _clip_box(x - SIDE_PAD * w, y, x + w + SIDE_PAD * w, y + h * (1 + CHIN_PAD),
                     width, height)


def fallback_box(width: int, height: int) -> Box:
    """A centred square where a portrait's face usually is."""
    side = FALLBACK_SIDE * min(width, height)
    cx, cy = width / 2, height * 0.42
    return _clip_box(cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2, width, height)


def blend_mask(box_w: int, box_h: int) -> npt.NDArray[np.float32]:
    """Feathered mouth/jaw mask: 1 in the lower part of the box, 0 at its edges."""
    feather = max(2, round(FEATHER * min(box_w, box_h)))
    mask = np.zeros((box_h, box_w), dtype=np.float32)
    top = round(BLEND_TOP * box_h + feather / 2)
    if box_h - feather > top and box_w - 2 * feather > 0:
        mask[top : box_h - feather, feather : box_w - feather] = 1.0
    k = 2 * feather + 1
    blurred = cv2.GaussianBlur(mask, (k, k), sigmaX=feather / 2, borderType=cv2.BORDER_CONSTANT)
    return np.asarray(blurred, dtype=np.float32)


def prepare_avatar(request: PrepareRequest, size: int) -> Wav2LipAvatar:
    """Fit the reference, find the face, cut the model crop and build the blend mask.

    Raises:
        ValueError: the image is not an RGB uint8 array or the frame size is unusable.
    """
    image = np.asarray(request.image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError("reference image must be RGB uint8 (height × width × 3)")
    if request.width < 16 or request.height < 16:
        raise ValueError(f"frame {request.width}x{request.height} is too small for Wav2Lip")
    face = detect_face(image)
    frame, fitted_face = fit_to_frame(image, request.width, request.height, face)
    if fitted_face is not None:
        # Detect again on the fitted frame: fitting may have cropped the face away.
        refit = detect_face(frame)
        fitted_face = refit if refit is not None else fitted_face
    info: dict[str, Any]
    if fitted_face is not None and fitted_face[2] >= 8 and fitted_face[3] >= 8:
        box = face_box(fitted_face, request.width, request.height)
        info = {"face_found": True, "face_detected": True, "face_box": list(box)}
    else:
        box = fallback_box(request.width, request.height)
        info = {
            "face_found": False,
            "face_detected": False,
            "face_box": list(box),
            "fallback": "no face found in the reference image: lip-sync applied to a "
            "centred region",
        }
    x1, y1, x2, y2 = box
    region = frame[y1:y2, x1:x2]
    interp = cv2.INTER_AREA if (x2 - x1) > size else cv2.INTER_LINEAR
    crop: RGBFrame = np.ascontiguousarray(
        cv2.resize(region, (size, size), interpolation=interp), dtype=np.uint8
    )
    return Wav2LipAvatar(
        frame=frame,
        box=box,
        crop=crop,
        blend=blend_mask(x2 - x1, y2 - y1),
        size=size,
        face_found=bool(info["face_found"]),
        content_hash=request.content_hash,
        info=info,
    )


def model_face_input(crop: RGBFrame) -> npt.NDArray[np.float32]:
    """(6, S, S) float input: masked target then reference, BGR in [0, 1].

    The checkpoints were trained on OpenCV (BGR) frames, so channels are swapped here
    and swapped back on the way out.
    """
    bgr = crop[:, :, ::-1].astype(np.float32) / 255.0
    masked = bgr.copy()
    masked[crop.shape[0] // 2 :] = 0.0
    return np.ascontiguousarray(np.concatenate([masked, bgr], axis=2).transpose(2, 0, 1))
