"""``omni-avatar-lite``: the embedded, download-free talking-head renderer.

It animates the reference photo itself, so the output looks like that person talking.

**Once per reference image** (the session layer caches the result by content hash):

* find the face's 468-point mesh (:mod:`omnistream.models.face_mesh`; OpenCV's Haar
  cascade and face proportions when the mesh is missing or finds nothing; a centred
  face-sized region when there is no face at all) and fit the photo to the output size;
* from the mesh, take the contours that matter: upper and lower lips (outer and inner),
  the jaw line, and for each eye the brow, upper lid and lower lid;
* decide the region that will move (the head, aligned to 16-pixel JPEG block rows) and
  precompute its sampling grid, the head's feathered weight and the mouth's colours.

**Per frame**, from the audio around the frame's time (energy for how far the jaw drops,
spectral balance for spread or rounded lips, smoothed with an attack/release filter and
gated so the mouth closes on silence):

* the lower face is warped column by column, piecewise-linearly between knots that sit
  on the mesh's contours: above the lips nothing moves but a slight lift of the upper lip;
  the lower lip and chin drop with the jaw, the skin between follows, the cheeks beyond
  the mouth corners stretch and the neck takes up the rest. Because each column's map is
  monotone and piecewise linear it inverts exactly (one ``np.interp``), and the inverse
  is tabulated per reference over jaw opening × lip shape, so a frame blends four tables
  instead of rasterising triangles;
* the lips part along the seam under whatever the reference shows between them: visible
  upper teeth stay with the upper jaw (they are above the seam); the gap the jaw opens
  below is a dark, soft-edged cavity shading to a tongue tone, with a hint of upper
  teeth where the photo shows none. Nothing is drawn outside the lips: the gap only
  exists between the two lip edges;
* eyelids close by the same column-wise warp (the lid skin above the eye slides down
  over it), on a per-session schedule; the head sways and breathes by a pixel or two;
* only the head region is rendered: a frame is the reference with one band of rows
  replaced (:class:`~omnistream.models.avatar_base.PartialFrame`), which the JPEG stage
  splices into a cached encoding of the reference, and which WebRTC and offline jobs
  expand into full frames.

On silence the mouth is exactly the reference's (moved only by the head's sway).
"""

from __future__ import annotations

import logging
import math
import threading
import zlib
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from omnistream.engine.registry import LoadContext, ModelSpec, Tier
from omnistream.models.avatar_base import (
    AvatarModel,
    ChunkRequest,
    ChunkResult,
    PartialFrame,
    PrepareRequest,
    RGBFrame,
    StaticFrame,
    render_each,
)
from omnistream.models.face_mesh import MESH_CACHE, FaceMesh

log = logging.getLogger(__name__)

MODEL_ID = "omni-avatar-lite"

F32 = npt.NDArray[np.float32]
MCU = 16  # JPEG block-row height the moving band is aligned to

# Audio analysis around each frame.
FEATURE_WINDOW_S = 0.064  # analysed span centred on the frame's time
SILENCE_DBFS = -50.0  # below this the mouth is closed whatever the history
DYNAMIC_RANGE_DB = 28.0  # speech this far under the running peak counts as closed
PEAK_DECAY_DB_PER_S = 6.0  # how fast the automatic gain forgets a loud passage
ATTACK = 0.65  # fraction of the gap closed per frame while opening
RELEASE = 0.45  # …while closing: slower, as real jaws are
CLOSED_BELOW = 0.012  # openness under this renders the reference mouth exactly
OPEN_LEVELS = 12  # jaw poses tabulated per reference (openness 0 … 1)
SHAPE_LEVELS = 3  # lip shapes tabulated: rounded, neutral, spread

# Geometry, as fractions of the face height (brow line to chin on the mesh).
MAX_JAW_DROP = 0.115  # lower lip drop at full openness
CHIN_FOLLOW = 0.9  # the chin drops this fraction of the lower lip's drop
UPPER_LIP_LIFT = 0.2  # a closed upper lip rises this fraction of the jaw drop
NECK_FADE = 0.22  # below the chin the drop fades out over this much neck
LIP_SHAPE = 0.07  # lips spread (or round) by up to this fraction of their width
BLINK_INTERVAL_S = (2.2, 5.5)
BLINK_FRAMES_S = 0.18
SWAY_PX = 1.4  # head sway amplitude at a 140-pixel face, scaled with the face
BREATH_PX = 0.45
BREATH_HZ = 0.24

# MediaPipe face-mesh landmark indices, each contour from the image's left to right.
LIP_UPPER_OUTER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291)
LIP_UPPER_INNER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LIP_LOWER_INNER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
LIP_LOWER_OUTER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291)
JAW_LINE: tuple[int, ...] = (234, 93, 132, 58, 172, 136, 150, 149, 176, 148, 152)
JAW_LINE += (377, 400, 378, 379, 365, 397, 288, 361, 323, 454)
FACE_OVAL: tuple[int, ...] = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288)
FACE_OVAL += (397, 365, 379, 378, 400, 377, 152, 148, 176, 149, 150, 136, 172, 58, 132)
FACE_OVAL += (93, 234, 127, 162, 21, 54, 103, 67, 109)
EYES = (
    # brow (lower edge), upper lid, lower lid
    ((46, 53, 52, 65, 55), (33, 246, 161, 160, 159, 158, 157, 173, 133),
     (33, 7, 163, 144, 145, 153, 154, 155, 133)),
    ((285, 295, 282, 283, 276), (362, 398, 384, 385, 386, 387, 388, 466, 263),
     (362, 382, 381, 380, 374, 373, 390, 249, 263)),
)  # fmt: skip
TOP_OF_HEAD = 10
CHIN = 152
#: Points tests and tools can track on the reference: upper and lower inner lip
#: centres and the chin.
TRACK_POINTS = {"upper_lip": 13, "lower_lip": 14, "chin": 152}


# --------------------------------------------------------------------------------------
# Face detection and fitting (Haar: the fallback, and what other models reuse)

_THREAD_LOCAL = threading.local()


def _cascade(name: str) -> cv2.CascadeClassifier:
    """A cascade private to the calling thread.

    OpenCV's CascadeClassifier is not safe for concurrent ``detectMultiScale`` calls
    on one instance (two runner threads preparing images at once corrupted the heap),
    so every thread loads its own; they are small and cached per thread.
    """
    cache: dict[str, cv2.CascadeClassifier] = _THREAD_LOCAL.__dict__.setdefault("cascades", {})
    if name not in cache:
        cache[name] = cv2.CascadeClassifier(cv2.data.haarcascades + name)  # type: ignore[attr-defined]
    return cache[name]


def detect_face(rgb: RGBFrame) -> tuple[int, int, int, int] | None:
    """The largest frontal face as (x, y, w, h), or ``None`` (OpenCV Haar cascade)."""
    gray = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    side = min(gray.shape[:2])
    faces = _cascade("haarcascade_frontalface_default.xml").detectMultiScale(
        gray, scaleFactor=1.1, minNeighbors=5, minSize=(max(24, side // 12),) * 2
    )
    if len(faces) == 0:
        return None
    x, y, w, h = max(faces, key=lambda f: int(f[2]) * int(f[3]))
    return int(x), int(y), int(w), int(h)


def _fit_transform(
    iw: int, ih: int, width: int, height: int, face: tuple[int, int, int, int] | None
) -> tuple[float, int, int, int, int]:
    """Scale, scaled size and crop origin that cover width×height around the face."""
    scale = max(width / iw, height / ih)
    sw, sh = max(width, round(iw * scale)), max(height, round(ih * scale))
    cx = (face[0] + face[2] / 2) * scale if face else sw / 2
    cy = (face[1] + face[3] / 2) * scale if face else sh / 2
    # Keep the face horizontally centred and in the upper part of a portrait frame.
    x0 = int(np.clip(round(cx - width / 2), 0, sw - width))
    y0 = int(np.clip(round(cy - height * 0.3), 0, sh - height))
    return scale, sw, sh, x0, y0


def fit_to_frame(
    rgb: RGBFrame, width: int, height: int, face: tuple[int, int, int, int] | None
) -> tuple[RGBFrame, tuple[int, int, int, int] | None]:
    """Scale and crop the image to cover width×height, keeping the face in view.

    Returns the fitted frame and the face box mapped into it.
    """
    ih, iw = rgb.shape[:2]
    scale, sw, sh, x0, y0 = _fit_transform(iw, ih, width, height, face)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    scaled = cv2.resize(rgb, (sw, sh), interpolation=interp)
    fitted = np.ascontiguousarray(scaled[y0 : y0 + height, x0 : x0 + width], dtype=np.uint8)
    if face is None:
        return fitted, None
    fx, fy, fw, fh = (round(v * scale) for v in face)
    return fitted, (fx - x0, fy - y0, fw, fh)


def frame_features(audio: F32, centres: npt.NDArray[np.int64], sample_rate: int) -> tuple[F32, F32]:
    """Level (dBFS) and spectral spread (0 = dark/rounded, 1 = bright/spread) per frame."""
    half = int(FEATURE_WINDOW_S * sample_rate / 2)
    padded = np.pad(audio, (half, half))
    idx = centres[:, None] + np.arange(2 * half)[None, :]
    idx = np.clip(idx, 0, len(padded) - 1)
    windows = padded[idx] * np.hanning(2 * half).astype(np.float32)
    rms = np.sqrt(np.mean(windows**2, axis=1) + 1e-12)
    level = (20.0 * np.log10(rms + 1e-9)).astype(np.float32)
    spectrum = np.abs(np.fft.rfft(windows, axis=1)) ** 2
    freqs = np.fft.rfftfreq(2 * half, 1.0 / sample_rate)
    low = spectrum[:, (freqs >= 100) & (freqs < 900)].sum(axis=1)
    high = spectrum[:, (freqs >= 1500) & (freqs < 5000)].sum(axis=1)
    ratio = np.log10((high + 1e-9) / (low + 1e-9))
    spread = np.clip((ratio + 1.5) / 2.0, 0.0, 1.0).astype(np.float32)
    return level, spread


# --------------------------------------------------------------------------------------
# The face's layout: contours from the mesh, or from proportions


@dataclass
class Contour:
    """A polyline sorted by x; ``at(x)`` interpolates y (flat beyond its ends)."""

    xs: F32
    ys: F32

    @classmethod
    def of(cls, points: F32) -> Contour:
        order = np.argsort(points[:, 0], kind="stable")
        xs = points[order, 0].astype(np.float32)
        # Strictly increasing x for np.interp, whatever near-duplicates the mesh has.
        xs = np.maximum.accumulate(xs + np.arange(len(xs), dtype=np.float32) * 1e-3)
        return cls(xs=xs, ys=points[order, 1].astype(np.float32))

    def at(self, x: F32) -> F32:
        out: F32 = np.interp(x, self.xs, self.ys).astype(np.float32)
        return out


@dataclass
class FaceLayout:
    """The contours the renderer moves, in the fitted frame's pixels."""

    upper_outer: F32
    upper_inner: F32
    lower_inner: F32
    lower_outer: F32
    jaw: F32
    oval: F32
    eyes: list[tuple[F32, F32, F32]]  # brow, upper lid, lower lid
    track: dict[str, tuple[float, float]]
    from_mesh: bool


def layout_from_mesh(mesh: FaceMesh) -> FaceLayout:
    """The renderer's contours picked out of the 468 mesh points."""
    p = mesh.points

    def pick(idx: tuple[int, ...]) -> F32:
        return np.ascontiguousarray(p[list(idx)], dtype=np.float32)

    return FaceLayout(
        upper_outer=pick(LIP_UPPER_OUTER),
        upper_inner=pick(LIP_UPPER_INNER),
        lower_inner=pick(LIP_LOWER_INNER),
        lower_outer=pick(LIP_LOWER_OUTER),
        jaw=pick(JAW_LINE),
        oval=pick(FACE_OVAL),
        eyes=[(pick(b), pick(u), pick(lo)) for b, u, lo in EYES],
        track={k: (float(p[i, 0]), float(p[i, 1])) for k, i in TRACK_POINTS.items()},
        from_mesh=True,
    )


def layout_from_box(box: tuple[int, int, int, int]) -> FaceLayout:
    """Contours from face proportions, for a Haar box (or a guessed one): a closed mouth.

    A Haar box spans roughly brows to the lower lip; these proportions put the mouth,
    chin and eyes where they fall on most frontal portraits.
    """
    fx, fy, fw, fh = (float(v) for v in box)
    cx = fx + fw / 2
    u = np.linspace(-1.0, 1.0, 11, dtype=np.float32)
    arc = np.sqrt(np.clip(1 - u**2, 0, 1)).astype(np.float32)
    mx, my, mhalf = cx, fy + fh * 0.80, fw * 0.19

    def line(ys: F32, half: float = mhalf) -> F32:
        return np.stack([mx + u * half, ys], axis=1).astype(np.float32)

    seam = my + 0.008 * fh * arc
    upper_outer = line(my - 0.045 * fh * arc**0.6)
    lower_outer = line(my + 0.06 * fh * arc**0.7)
    ang = np.linspace(math.pi, 0.0, 21, dtype=np.float32)
    jaw = np.stack(
        [cx + np.cos(ang) * fw * 0.5, fy + fh * 0.5 + np.sin(ang) * fh * 0.58], axis=1
    ).astype(np.float32)
    full = np.linspace(0, 2 * math.pi, 36, endpoint=False, dtype=np.float32)
    oval = np.stack(
        [cx + np.cos(full) * fw * 0.5, fy + fh * 0.5 + np.sin(full) * fh * 0.6], axis=1
    ).astype(np.float32)
    eyes = []
    for ex in (fx + fw * 0.31, fx + fw * 0.69):
        ey, half = fy + fh * 0.42, fw * 0.1
        v = np.linspace(-1.0, 1.0, 9, dtype=np.float32)
        lid = np.sqrt(np.clip(1 - v**2, 0, 1))
        xs = ex + v * half
        eyes.append(
            (
                np.stack([xs[::2], np.full(5, ey - fh * 0.1, np.float32)], axis=1),
                np.stack([xs, ey - fh * 0.03 * lid], axis=1).astype(np.float32),
                np.stack([xs, ey + fh * 0.025 * lid], axis=1).astype(np.float32),
            )
        )
    return FaceLayout(
        upper_outer=upper_outer,
        upper_inner=line(seam - 0.3),
        lower_inner=line(seam),
        lower_outer=lower_outer,
        jaw=jaw,
        oval=oval,
        eyes=eyes,
        track={
            "upper_lip": (mx, float(my)),
            "lower_lip": (mx, float(my + 1)),
            "chin": (cx, fy + fh * 1.08),
        },
        from_mesh=False,
    )


# --------------------------------------------------------------------------------------
# Preparation


@dataclass
class EyeWarp:
    """One eye's region and the contours its lid closes between."""

    x0: int
    x1: int
    y0: int
    y1: int
    brow: F32  # per column of [x0, x1): brow y, upper lid y, lower lid y
    top: F32
    bottom: F32


@dataclass
class PreparedAvatar:
    """Everything per reference image that frames need; shared read-only by sessions."""

    base: RGBFrame  # the fitted reference, height×width×3
    static: StaticFrame
    face: tuple[int, int, int, int]  # x, y, w, h in output pixels
    face_found: bool
    mesh_found: bool
    face_h: float
    # The band of rows that moves (aligned to JPEG block rows) and its columns.
    y0: int
    y1: int
    x0: int
    x1: int
    grid_x: F32
    grid_y: F32
    head_weight: F32
    # The mouth's box inside the band, and its per-column knots (source rows).
    mx0: int
    mx1: int
    my0: int
    my1: int
    mouth_centre: float
    mouth_half: float  # inner corners' half distance
    outer_half: float
    upper_outer: Contour
    upper_inner: Contour
    seam: Contour
    lower_outer: Contour
    jaw: Contour
    chin_weight: F32  # per mouth-box column: how much of the jaw drop reaches the jaw line
    teeth_shown: F32  # per mouth-box column: 1 where the reference shows teeth/interior
    spread_basis: F32  # mouth box: horizontal offset of the lips per unit of spreading
    eyes: list[EyeWarp]
    cavity_colour: F32
    tongue_colour: F32
    teeth_colour: F32
    track: dict[str, tuple[float, float]]
    info: dict[str, Any] = field(default_factory=dict)
    # Jaw poses, tabulated by _build_mouth_tables: [openness, shape, …].
    mouth_disp: F32 = field(default_factory=lambda: np.zeros((0,), np.float32))
    gap_columns: F32 = field(default_factory=lambda: np.zeros((0,), np.float32))


def _smoothstep(edge0: float, edge1: float, x: F32) -> F32:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    out: F32 = (t * t * (3.0 - 2.0 * t)).astype(np.float32)
    return out


def _fallback_box(width: int, height: int) -> tuple[int, int, int, int]:
    fw = int(min(width, height) * 0.4)
    return (width - fw) // 2, int(height * 0.22), fw, fw


def prepare_avatar(request: PrepareRequest) -> PreparedAvatar:
    """Fit the reference, lay out the face, precompute the moving band's maps."""
    width, height = request.width, request.height
    src = request.image
    mesh = MESH_CACHE.get(request.content_hash, src) if request.content_hash else None
    face_src: tuple[int, int, int, int] | None
    if mesh is not None:
        face_src = mesh.box
    else:
        face_src = detect_face(src)
    ih, iw = src.shape[:2]
    scale, _sw, _sh, ox, oy = _fit_transform(iw, ih, width, height, face_src)
    base, face = fit_to_frame(src, width, height, face_src)
    face_found = face is not None
    if mesh is not None:
        layout = layout_from_mesh(mesh.scaled(scale, -ox, -oy))
    else:
        layout = layout_from_box(face if face is not None else _fallback_box(width, height))
    return _prepare_layout(base, layout, face_found, request.content_hash)


def _prepare_layout(
    base: RGBFrame, layout: FaceLayout, face_found: bool, content_hash: str
) -> PreparedAvatar:
    height, width = base.shape[:2]
    oval = layout.oval
    fx0, fy0 = float(oval[:, 0].min()), float(oval[:, 1].min())
    fx1 = float(oval[:, 0].max())
    chin_y = float(layout.jaw[:, 1].max())
    fw = max(8.0, fx1 - fx0)
    fh = max(8.0, chin_y - fy0)
    face = (round(fx0), round(fy0), round(fw), round(fh))

    # The moving band: the hairline above the face to the neck below the chin, whole
    # JPEG block rows; everything else is the reference, never rendered nor re-encoded.
    y0 = max(0, int(fy0 - fh * 0.2) // MCU * MCU)
    y1 = min(height, -(-int(chin_y + fh * (NECK_FADE + 0.06)) // MCU) * MCU)
    x0 = max(0, int(fx0 - fw * 0.2))
    x1 = min(width, int(fx1 + fw * 0.2) + 1)
    if y1 - y0 < MCU or x1 - x0 < 4:
        y0, y1, x0, x1 = 0, min(height, MCU), 0, min(width, 4)
    gx, gy = np.meshgrid(np.arange(x0, x1, dtype=np.float32), np.arange(y0, y1, dtype=np.float32))
    hcx, hcy = (fx0 + fx1) / 2, fy0 + fh * 0.5
    r_head = np.sqrt(((gx - hcx) / (fw * 0.55)) ** 2 + ((gy - hcy) / (fh * 0.62)) ** 2)
    head_weight = 1.0 - _smoothstep(0.9, 1.3, r_head.astype(np.float32))
    # …and nothing moves at the band's edges, whatever the face's proportions.
    margin = max(2.0, fh * 0.08)
    head_weight *= _smoothstep(0.0, margin, np.minimum(gx - x0, (x1 - 1) - gx))
    head_weight *= _smoothstep(0.0, margin, np.minimum(gy - y0, (y1 - 1) - gy))
    head_weight = head_weight.astype(np.float32)

    # Lips and jaw.
    upper_outer = Contour.of(layout.upper_outer)
    upper_inner = Contour.of(layout.upper_inner)
    lower_inner = Contour.of(layout.lower_inner)
    lower_outer = Contour.of(layout.lower_outer)
    inner_l, inner_r = float(lower_inner.xs[0]), float(lower_inner.xs[-1])
    outer_l, outer_r = float(layout.upper_outer[:, 0].min()), float(layout.upper_outer[:, 0].max())
    mouth_centre = (inner_l + inner_r) / 2
    mouth_half = max(2.0, (inner_r - inner_l) / 2)
    outer_half = max(mouth_half, (outer_r - outer_l) / 2)
    # The jaw contour's lower half only (its lateral ends rise towards the ears).
    jaw_pts = layout.jaw
    jaw = Contour.of(jaw_pts)
    jaw_l, jaw_r = float(jaw_pts[:, 0].min()), float(jaw_pts[:, 0].max())

    mx0 = max(x0, int(jaw_l))
    mx1 = min(x1, int(jaw_r) + 1)
    my0 = max(y0, int(float(layout.upper_outer[:, 1].min()) - fh * 0.05))
    my1 = min(y1, int(chin_y + fh * NECK_FADE) + 2)
    cols = np.arange(mx0, mx1, dtype=np.float32)
    chin_x = float(jaw_pts[int(np.argmax(jaw_pts[:, 1])), 0])
    chin_weight = np.clip(1.0 - ((cols - chin_x) / (fw * 0.44)) ** 2, 0.0, 1.0) ** 0.8

    # Where the reference shows its mouth's interior (teeth), the seam is the lower lip's
    # inner edge and everything above it stays with the upper jaw.
    gap = lower_inner.at(cols) - upper_inner.at(cols)
    teeth_shown = np.clip((gap - 1.5) / 3.0, 0.0, 1.0).astype(np.float32)
    teeth_shown *= (np.abs(cols - mouth_centre) < mouth_half).astype(np.float32)

    mgx, mgy = np.meshgrid(cols, np.arange(my0, my1, dtype=np.float32))
    lip_top = float(layout.upper_outer[:, 1].min())
    lip_bot = float(layout.lower_outer[:, 1].max())
    lip_pad = (lip_bot - lip_top) * 0.6 + 1.0
    band_v = _smoothstep(lip_top - lip_pad, lip_top, mgy) * (
        1.0 - _smoothstep(lip_bot, lip_bot + lip_pad, mgy)
    )
    band_h = 1.0 - _smoothstep(outer_half * 1.05, outer_half * 1.6, np.abs(mgx - mouth_centre))
    spread_basis = ((mgx - mouth_centre) * band_v * band_h).astype(np.float32)

    eyes = [_eye_warp(b, u, lo, x0, x1, y0, y1, fh) for b, u, lo in layout.eyes]

    # Colours from the person: the interior's darkest tone if the photo shows one, else a
    # darkened lip tone; the tongue a deeper lip tone; teeth a warm off-white.
    lips = _pixels_between(base, upper_outer, lower_outer, mouth_centre, outer_half)
    lip_tone = np.median(lips, axis=0) if len(lips) else np.array([150, 80, 80], np.float64)
    cavity = (lip_tone * np.array([0.22, 0.10, 0.10])).astype(np.float32)
    teeth = np.array([226, 220, 208], np.float32) * float(
        np.clip(lip_tone.mean() / 120.0, 0.85, 1.0)
    )
    shows_teeth = float(teeth_shown.sum()) > mouth_half * 0.5
    inside = _pixels_between(base, upper_inner, lower_inner, mouth_centre, mouth_half)
    if shows_teeth and len(inside) > 12:
        luma = inside @ np.array([0.3, 0.59, 0.11])
        dark = inside[luma <= np.percentile(luma, 10)]
        if len(dark) and float(dark.mean()) < float(cavity.mean()) * 1.6:
            cavity = (0.5 * cavity + 0.5 * dark.mean(axis=0)).astype(np.float32)
        bright = inside[luma >= np.percentile(luma, 80)]
        teeth = bright.mean(axis=0).astype(np.float32) * 0.92
    tongue = (lip_tone * np.array([0.5, 0.28, 0.28])).astype(np.float32)
    info = {
        "face_detected": face_found,
        "mesh_detected": layout.from_mesh,
        "face_box": list(face),
        "moving_rows": [y0, y1],
    }
    prepared = PreparedAvatar(
        base=base,
        static=StaticFrame(image=base, key=f"{MODEL_ID}:{content_hash}:{width}x{height}"),
        face=face,
        face_found=face_found,
        mesh_found=layout.from_mesh,
        face_h=fh,
        y0=y0,
        y1=y1,
        x0=x0,
        x1=x1,
        grid_x=gx,
        grid_y=gy,
        head_weight=head_weight,
        mx0=mx0,
        mx1=mx1,
        my0=my0,
        my1=my1,
        mouth_centre=mouth_centre,
        mouth_half=mouth_half,
        outer_half=outer_half,
        upper_outer=upper_outer,
        upper_inner=upper_inner,
        seam=lower_inner,
        lower_outer=lower_outer,
        jaw=jaw,
        chin_weight=chin_weight.astype(np.float32),
        teeth_shown=teeth_shown,
        spread_basis=spread_basis,
        eyes=eyes,
        cavity_colour=cavity.astype(np.float32),
        tongue_colour=tongue,
        teeth_colour=np.asarray(teeth, np.float32),
        track=layout.track,
        info=info,
    )
    if mx1 > mx0 and my1 > my0:
        _build_mouth_tables(prepared)
    return prepared


def _pixels_between(
    base: RGBFrame, top: Contour, bottom: Contour, centre: float, half: float
) -> npt.NDArray[np.float64]:
    """Reference pixels between two contours over the middle of the mouth's width."""
    height, width = base.shape[:2]
    out = []
    for x in range(int(centre - half * 0.7), int(centre + half * 0.7) + 1):
        if not 0 <= x < width:
            continue
        xs = np.array([x], np.float32)
        a, b = math.ceil(float(top.at(xs)[0])), int(float(bottom.at(xs)[0]))
        a, b = max(0, a), min(height, b)
        if b > a:
            out.append(base[a:b, x])
    if not out:
        return np.zeros((0, 3), np.float64)
    return np.concatenate(out).astype(np.float64)


def _eye_warp(
    brow: F32, upper: F32, lower: F32, x0: int, x1: int, y0: int, y1: int, fh: float
) -> EyeWarp:
    lid = Contour.of(upper)
    low = Contour.of(lower)
    br = Contour.of(brow)
    ex0 = max(x0, int(float(upper[:, 0].min())) - 1)
    ex1 = min(x1, int(float(upper[:, 0].max())) + 2)
    cols = np.arange(ex0, ex1, dtype=np.float32)
    top = lid.at(cols)
    bottom = np.maximum(low.at(cols), top + 0.5)
    brow_y = np.minimum(br.at(cols), top - fh * 0.04)
    ey0 = max(y0, int(float(brow_y.min())) - 1)
    ey1 = min(y1, int(float(bottom.max())) + 3)
    return EyeWarp(ex0, ex1, ey0, max(ey0, ey1), brow_y, top, bottom)


# --------------------------------------------------------------------------------------
# Per-frame rendering


@dataclass
class LiteState:
    """Per-session animation state carried from one chunk to the next."""

    openness: float = 0.0
    spread: float = 0.5
    peak_db: float = -30.0
    next_blink: int = -1
    seed: int = 0


@dataclass(frozen=True)
class Pose:
    """What one frame shows: jaw, lip shape, eyelids and head offset."""

    openness: float  # 0 closed … 1 wide open
    shape: float  # -1 rounded … +1 spread
    blink: float  # 0 open … 1 closed
    head_dx: float
    head_dy: float


def head_offset(t: float, seed: int, face_h: float) -> tuple[float, float]:
    """The head's sway and breathing at time ``t`` (pixels): slow, small, per session."""
    phase = (seed % 1000) / 1000.0 * 2 * math.pi
    sway = SWAY_PX * face_h / 140.0
    dx = sway * math.sin(2 * math.pi * 0.23 * t + phase)
    dy = 0.6 * sway * math.sin(2 * math.pi * 0.31 * t + 1.7 * phase)
    dy += BREATH_PX * face_h / 140.0 * math.sin(2 * math.pi * BREATH_HZ * t + 0.5 * phase)
    return dx, dy


def _piecewise_inverse(y: F32, src: F32, dst: F32) -> F32:
    """Invert per-column monotone piecewise-linear maps in one ``np.interp`` call.

    ``src``/``dst`` are (K, W) knots (source rows and the rows they land on, both
    non-decreasing down each column, equal at the first and last knot); ``y`` (H, W)
    holds destination rows. Returns each pixel's source row: exact within each segment
    and the identity beyond the end knots. Columns are laid end to end on one axis
    (column ``c`` shifted by ``c * span``) so a single sorted interpolation serves all.
    """
    w = dst.shape[1]
    lo = float(min(dst.min(), y.min())) - 8.0
    span = float(max(dst.max(), y.max())) - lo + 16.0
    shift = (np.arange(w, dtype=np.float64) * span)[None, :]
    pad_lo = np.full((1, w), lo - 4.0)
    pad_hi = np.full((1, w), lo + span - 4.0)
    xp = np.concatenate([pad_lo, dst.astype(np.float64), pad_hi]) + shift
    fp = np.concatenate(
        [pad_lo + (src[0] - dst[0]), src.astype(np.float64), pad_hi + (src[-1] - dst[-1])]
    )
    # Knots that coincide (a segment of zero height) must still be in order for interp.
    xp_flat = np.maximum.accumulate(xp.T.ravel())
    out = np.interp((y.astype(np.float64) + shift).ravel(), xp_flat, fp.T.ravel())
    result: F32 = out.reshape(y.shape).astype(np.float32)
    return result


class AvatarLite(AvatarModel):
    """The CPU renderer. Stateless: per-session state travels in the requests."""

    max_batch_cost = 96.0
    context_s = 0.1
    lookahead_s = FEATURE_WINDOW_S / 2

    def prepare(self, request: PrepareRequest) -> PreparedAvatar:
        return prepare_avatar(request)

    def render(self, chunks: list[ChunkRequest]) -> list[ChunkResult | BaseException]:
        return render_each(chunks, self._render_chunk)

    def poses(self, chunk: ChunkRequest, state: LiteState, avatar: PreparedAvatar) -> list[Pose]:
        """The chunk's poses from its audio, advancing the session's filters."""
        n = chunk.frame_count
        sr = chunk.sample_rate
        frame_idx = np.arange(chunk.first_frame_index, chunk.first_frame_index + n)
        centres = np.round((frame_idx + 0.5) * sr / chunk.fps).astype(np.int64)
        centres = centres - chunk.start_sample + chunk.audio_offset
        level, spread = frame_features(chunk.audio, centres, sr)
        decay = PEAK_DECAY_DB_PER_S / chunk.fps
        poses = []
        for i in range(n):
            db = float(level[i])
            state.peak_db = max(db, state.peak_db - decay, -30.0)
            if db < SILENCE_DBFS:
                target = 0.0
            else:
                target = float(np.clip((db - (state.peak_db - DYNAMIC_RANGE_DB)) / 22.0, 0, 1))
                target = target**0.8
            rate = ATTACK if target > state.openness else RELEASE
            state.openness += (target - state.openness) * rate
            if state.openness < CLOSED_BELOW and target == 0.0:
                state.openness = 0.0
            state.spread += (float(spread[i]) - state.spread) * 0.35
            frame_no = int(frame_idx[i])
            t = frame_no / chunk.fps
            dx, dy = head_offset(t, state.seed, avatar.face_h)
            poses.append(
                Pose(
                    openness=state.openness,
                    shape=float(np.clip(state.spread * 2.0 - 1.0, -1.0, 1.0)),
                    blink=self._blink_amount(state, frame_no, chunk.fps),
                    head_dx=dx,
                    head_dy=dy,
                )
            )
        return poses

    def _render_chunk(self, chunk: ChunkRequest) -> ChunkResult:
        avatar: PreparedAvatar = chunk.avatar
        state: LiteState = chunk.state or LiteState(
            seed=zlib.crc32(chunk.session_id.encode()) & 0x7FFFFFFF
        )
        if chunk.frame_count == 0:
            return ChunkResult(frames=[], state=state)
        partial: list[PartialFrame] = []
        frames: list[RGBFrame] = []
        for i, pose in enumerate(self.poses(chunk, state, avatar)):
            band = draw_band(avatar, pose)
            part = PartialFrame(
                static=avatar.static, y0=avatar.y0, rows=band, x0=avatar.x0, x1=avatar.x1
            )
            if chunk.partial_ok:
                if chunk.on_partial is not None:
                    chunk.on_partial(i, part)
                partial.append(part)
            else:
                frame = part.full()
                if chunk.on_frame is not None:
                    chunk.on_frame(i, frame)
                frames.append(frame)
        return ChunkResult(
            frames=frames,
            partial=partial if chunk.partial_ok else None,
            state=state,
            info={"openness": state.openness},
        )

    @staticmethod
    def _blink_amount(state: LiteState, frame_no: int, fps: int) -> float:
        """0..1 eyelid closure, on a per-session pseudo-random schedule."""
        if state.next_blink < 0 or frame_no > state.next_blink + fps:
            rng = np.random.default_rng(state.seed + frame_no)
            state.next_blink = frame_no + int(rng.uniform(*BLINK_INTERVAL_S) * fps * 0.5)
        length = max(3, round(BLINK_FRAMES_S * fps))
        k = frame_no - state.next_blink
        if k < 0:
            return 0.0
        if k >= length:
            rng = np.random.default_rng(state.seed + frame_no)
            state.next_blink = frame_no + int(rng.uniform(*BLINK_INTERVAL_S) * fps)
            return 0.0
        # Lids close fast and open a little slower, as real ones do.
        x = (k + 0.5) / length
        return float(min(1.0, math.sin(math.pi * min(1.0, x * 1.25) ** 0.9) * 1.08))


def draw_band(avatar: PreparedAvatar, pose: Pose) -> RGBFrame:
    """Render the moving band (rows ``y0:y1`` of the frame, full width) for one pose."""
    a = avatar
    hw = a.head_weight
    map_x = np.asarray(cv2.scaleAdd(hw, -pose.head_dx, a.grid_x), np.float32)
    map_y = np.asarray(cv2.scaleAdd(hw, -pose.head_dy, a.grid_y), np.float32)
    cavity: tuple[F32, F32, F32, F32] | None = None
    if pose.openness > 0.0 and a.mouth_disp.size:
        cavity = _warp_mouth(a, pose, map_x, map_y)
    if pose.blink > 0.02:
        for eye in a.eyes:
            _warp_eye(a, eye, pose, map_y)
    band: RGBFrame = np.empty((a.y1 - a.y0, a.base.shape[1], 3), np.uint8)
    band[:, : a.x0] = a.base[a.y0 : a.y1, : a.x0]
    band[:, a.x1 :] = a.base[a.y0 : a.y1, a.x1 :]
    warped = band[:, a.x0 : a.x1]
    cv2.remap(
        a.base,
        map_x,
        map_y,
        dst=warped,
        interpolation=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    if cavity is not None:
        _paint_cavity(a, warped, *cavity)
    return band


def _mouth_table(a: PreparedAvatar, open_: float, shape: float) -> tuple[F32, F32, F32, F32]:
    """The jaw's exact column-wise inverse for one pose, head still.

    Returns the mouth box's vertical displacement (source row minus destination row),
    and per column the gap's top and bottom rows and the lips' opening profile.
    """
    fh = a.face_h
    # Spread lips drop the jaw a little less; rounded lips narrow the opening.
    jaw = open_ * MAX_JAW_DROP * fh * (1.0 - 0.25 * max(shape, 0.0))
    widen = 1.0 + LIP_SHAPE * shape * open_
    cols = np.arange(a.mx0, a.mx1, dtype=np.float32)
    # Lip knots are read where the (spread or rounded) lips came from.
    lip_cols = a.mouth_centre + (cols - a.mouth_centre) / widen
    u = (lip_cols - a.mouth_centre) / a.mouth_half
    profile = np.clip(1.0 - u * u, 0.0, 1.0) ** 0.55
    u_out = (lip_cols - a.mouth_centre) / a.outer_half
    profile_out = np.clip(1.0 - u_out * u_out, 0.0, 1.0) ** 0.45
    closed = 1.0 - a.teeth_shown
    # Where the photo shows teeth the upper lip stays (the teeth are the upper jaw's);
    # a closed mouth's upper lip rises a little as it opens.
    lift = UPPER_LIP_LIFT * jaw * profile * closed
    seam = a.seam.at(lip_cols)
    upper_inner = np.minimum(a.upper_inner.at(lip_cols), seam)
    upper_outer = np.minimum(a.upper_outer.at(lip_cols), upper_inner - 0.5)
    lower_outer = np.maximum(a.lower_outer.at(lip_cols), seam + 0.5)
    chin = np.maximum(a.jaw.at(cols), lower_outer + 1.0)
    neck = chin + fh * NECK_FADE
    top = np.minimum(np.float32(a.my0), upper_outer - 1.0)
    drop_lip = jaw * profile
    drop_chin = jaw * CHIN_FOLLOW * np.maximum(a.chin_weight, profile_out * 0.85)
    src = np.stack([top, upper_outer, upper_inner, seam, seam, lower_outer, chin, neck]).astype(
        np.float32
    )
    dst = np.stack(
        [
            top,
            upper_outer - 0.4 * lift,
            upper_inner - lift,
            seam - lift,
            seam + drop_lip,
            lower_outer + jaw * profile_out,
            chin + drop_chin,
            neck,
        ]
    ).astype(np.float32)
    rows = a.grid_y[a.my0 - a.y0 : a.my1 - a.y0, a.mx0 - a.x0 : a.mx1 - a.x0]
    src_y = _piecewise_inverse(rows, src, dst)
    # Between the upper side of the seam and the lowered lower lip there is no skin: the
    # seam's row is sampled there and the cavity painted over it.
    in_gap = (rows >= dst[3][None, :]) & (rows < dst[4][None, :])
    src_y = np.where(in_gap, src[3][None, :], src_y)
    return (src_y - rows).astype(np.float32), dst[3], dst[4], profile.astype(np.float32)


def _build_mouth_tables(a: PreparedAvatar) -> None:
    """Tabulate the jaw's inverse over openness × lip shape, once per reference.

    Per frame the renderer blends the four nearest tables: exact at the table poses,
    and in between off by a fraction of a pixel only inside the gap, which the cavity
    covers, so a frame's mouth costs a few array blends instead of an inversion.
    """
    disp, tops, bottoms, profiles = [], [], [], []
    for o in np.linspace(0.0, 1.0, OPEN_LEVELS):
        for sh in np.linspace(-1.0, 1.0, SHAPE_LEVELS):
            d, t, b, p = _mouth_table(a, float(o), float(sh))
            disp.append(d)
            tops.append(t)
            bottoms.append(b)
            profiles.append(p)
    h, w = disp[0].shape
    a.mouth_disp = np.stack(disp).reshape(OPEN_LEVELS, SHAPE_LEVELS, h, w)
    # Per column: the gap's top and bottom rows and the opening's profile.
    columns = np.stack([np.stack(tops), np.stack(bottoms), np.stack(profiles)], axis=1)
    a.gap_columns = columns.reshape(OPEN_LEVELS, SHAPE_LEVELS, 3, w).astype(np.float32)


def _blend4(table: F32, i: int, j: int, f: float, g: float) -> F32:
    """Bilinear blend of ``table[i:i+2, j:j+2]`` (any trailing shape)."""
    top = cv2.addWeighted(table[i, j], 1.0 - f, table[i + 1, j], f, 0.0)
    bottom = cv2.addWeighted(table[i, j + 1], 1.0 - f, table[i + 1, j + 1], f, 0.0)
    out: F32 = cv2.addWeighted(top, 1.0 - g, bottom, g, 0.0)
    return out.reshape(table.shape[2:])


def _warp_mouth(a: PreparedAvatar, pose: Pose, map_x: F32, map_y: F32) -> tuple[F32, F32, F32, F32]:
    """Write the jaw's inverse for this pose into the maps; returns the gap's geometry."""
    fo = pose.openness * (OPEN_LEVELS - 1)
    i = min(int(fo), OPEN_LEVELS - 2)
    fs = (pose.shape + 1.0) / 2.0 * (SHAPE_LEVELS - 1)
    j = min(max(int(fs), 0), SHAPE_LEVELS - 2)
    f, g = fo - i, fs - j
    disp = _blend4(a.mouth_disp, i, j, f, g)
    ys, xs = slice(a.my0 - a.y0, a.my1 - a.y0), slice(a.mx0 - a.x0, a.mx1 - a.x0)
    dx, dy = pose.head_dx, pose.head_dy
    # The head moves the whole mouth rigidly: sample the displacement where the head
    # came from (zero outside the box, so the box's edges stay seamless).
    shift = np.array([[1.0, 0.0, -dx], [0.0, 1.0, -dy]], np.float32)
    disp = cv2.warpAffine(  # type: ignore[assignment]
        disp,
        shift,
        (disp.shape[1], disp.shape[0]),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )
    map_y[ys, xs] += disp
    widen = 1.0 + LIP_SHAPE * pose.shape * pose.openness
    map_x[ys, xs] -= (1.0 - 1.0 / widen) * a.spread_basis
    columns = _blend4(a.gap_columns, i, j, f, g)
    step = round(dx)
    if step:
        # Follow the head sideways (to the pixel: the gap's corners are a pixel wide).
        if step > 0:
            pad = np.repeat(columns[:, :1], step, axis=1)
            columns = np.concatenate([pad, columns[:, :-step]], axis=1)
        else:
            pad = np.repeat(columns[:, -1:], -step, axis=1)
            columns = np.concatenate([columns[:, -step:], pad], axis=1)
    return columns[0] + dy, columns[1] + dy, a.grid_y[ys, 0], columns[2]


def _paint_cavity(
    a: PreparedAvatar,
    warped: RGBFrame,
    gap_top: F32,
    gap_bottom: F32,
    row_ys: F32,
    profile: F32,
) -> None:
    """Fill the opened gap: a dark, soft-edged mouth with teeth under the upper lip."""
    open_cols = np.flatnonzero(gap_bottom - gap_top > 0.05)
    if len(open_cols) == 0:
        return
    c0, c1 = int(open_cols[0]), int(open_cols[-1]) + 1
    top, bottom, prof = gap_top[c0:c1], gap_bottom[c0:c1], profile[c0:c1]
    r0 = int(np.searchsorted(row_ys, float(top.min()) - 2.0))
    r1 = int(np.searchsorted(row_ys, float(bottom.max()) + 2.0))
    if r1 <= r0:
        return
    y = row_ys[r0:r1, None]
    h = np.maximum(bottom - top, 1e-3)
    rel = (y - top) / h
    # Soft edges: the lips' edges are blurred over about a pixel, never a hard line.
    inside = np.minimum(y - top, bottom - y)
    alpha = np.minimum(np.maximum(inside * 0.625 + 0.3, 0.0), 1.0) * np.minimum(h * 0.5, 1.0)
    depth = np.minimum(np.maximum(rel, 0.0), 1.0)
    # Darkest in the shadow under the upper teeth and towards the corners; the tongue
    # catches a little light low in the middle of a wide-open mouth.
    tongue = (0.6 * np.minimum(h / (a.face_h * 0.05), 1.0) * prof) * depth * depth
    shade = (0.55 + 0.45 * np.sqrt(prof)) * (0.75 + 0.25 * np.minimum(depth * 2.0, 1.0))
    w_cavity = (1.0 - tongue) * shade
    w_tongue = tongue * shade
    parts = [w_cavity[..., None] * a.cavity_colour, w_tongue[..., None] * a.tongue_colour]
    # Upper teeth under the upper lip where the photo shows none (where it does, the
    # photo's own teeth stay above the seam and the gap opens below them).
    synthetic = (
        (1.0 - a.teeth_shown[c0:c1])
        * np.sqrt(prof)
        * np.minimum(np.maximum((h - 2.5) * 0.25, 0.0), 1.0)
    )
    if float(synthetic.max()) > 0.01:
        teeth_h = np.maximum(np.minimum(h * 0.4, a.face_h * 0.04), 1e-3)
        t = np.minimum(np.maximum(((y - top) / teeth_h - 0.45) * (1 / 0.55), 0.0), 1.0)
        teeth = (1.0 - t * t * (3.0 - 2.0 * t)) * synthetic
        keep = 1.0 - teeth
        parts = [parts[0] * keep[..., None], parts[1] * keep[..., None]]
        parts.append((teeth * (0.8 + 0.2 * prof))[..., None] * a.teeth_colour)
    colour = sum(parts[1:], parts[0])
    xs = slice(a.mx0 - a.x0 + c0, a.mx0 - a.x0 + c1)
    ys = slice(a.my0 - a.y0 + r0, a.my0 - a.y0 + r1)
    patch = warped[ys, xs].astype(np.float32)
    warped[ys, xs] = (patch + (colour - patch) * alpha[..., None] + 0.5).astype(np.uint8)


def _warp_eye(a: PreparedAvatar, eye: EyeWarp, pose: Pose, map_y: F32) -> None:
    """Close one eye's lid: the skin between brow and lid slides down over the eye."""
    if eye.x1 <= eye.x0 or eye.y1 <= eye.y0:
        return
    ys, xs = slice(eye.y0 - a.y0, eye.y1 - a.y0), slice(eye.x0 - a.x0, eye.x1 - a.x0)
    dy = pose.head_dy * a.head_weight[ys, xs]
    y_dest = a.grid_y[ys, xs] - dy
    # Lid travel tapers to the eye's corners, which never move.
    cols = np.arange(eye.x0, eye.x1, dtype=np.float32)
    mid, half = (eye.x0 + eye.x1) / 2, max(1.0, (eye.x1 - eye.x0) / 2)
    taper = np.clip(1.0 - ((cols - mid) / half) ** 2, 0.0, 1.0) ** 0.3
    lid = eye.top + pose.blink * (eye.bottom - eye.top) * taper
    below = eye.bottom + 2.0
    src = np.stack([eye.brow, eye.top, eye.bottom, below]).astype(np.float32)
    dst = np.stack([eye.brow, lid, np.maximum(eye.bottom, lid + 1e-3), below]).astype(np.float32)
    src_y = _piecewise_inverse(y_dest, src, dst)
    inside = (y_dest >= dst[0][None, :]) & (y_dest < dst[-1][None, :])
    map_y[ys, xs] = np.where(inside, src_y, map_y[ys, xs])


def specs(settings: Any) -> list[ModelSpec]:
    """The embedded avatar models' registry entries (tier core, CPU, no weights).

    ``omni-avatar-lite`` is this renderer; ``omni-avatar-lite-v1`` the one it replaced,
    kept so the two can be compared in one run.
    """
    from omnistream.models.avatar_lite_v1 import specs as v1_specs
    from omnistream.models.face_mesh import mesh_installed

    def factory(ctx: LoadContext) -> AvatarLite:
        return AvatarLite()

    return [
        ModelSpec(
            id=MODEL_ID,
            tasks=("audio2video",),
            tier=Tier.CORE,
            factory=factory,
            summary="Embedded CPU talking head: a face-mesh-driven warp of the reference "
            "photo (jaw, lips, eyelids) from audio energy and spectrum; no download, "
            "real time on a laptop.",
            capabilities={
                "inputs": ["audio", "image"],
                "outputs": ["video"],
                "streaming": True,
                "resident": True,
                "batching": "frames from any sessions share a batch",
                "lookahead_ms": round(AvatarLite.lookahead_s * 1000),
                "face_mesh": mesh_installed(),
                "license": "Apache-2.0 (code, MediaPipe face mesh); default avatar is a "
                "public-domain NASA photo",
                "backends": ["cpu"],
            },
            replicas=0,
            devices=("cpu",),
        ),
        *v1_specs(settings),
    ]
