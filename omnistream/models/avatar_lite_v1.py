"""``omni-avatar-lite-v1``: the first embedded renderer, kept for comparison.

:mod:`omnistream.models.avatar_lite` replaced it as ``omni-avatar-lite``; this one stays
registered (``OMNISTREAM_AVATAR_MODEL=omni-avatar-lite-v1``) so benchmarks can run the old
and new renderers in one run on one machine. It animates the reference photo itself, so
the output looks like that person talking:

* once per reference image (cached upstream by content hash): fit the photo to the
  output size around the face, find the face (OpenCV Haar) and the mouth (Haar smile
  cascade on the lower face, else face proportions), and precompute sampling grids and
  weight maps for one region of interest around the head;
* per frame: read the audio around the frame's time (energy for how far the jaw drops,
  spectral balance for how wide the lips spread), smooth it with an attack/release filter
  so it reads as speech rather than flicker, gate it so the mouth closes on silence, add
  blinks and a slow head sway, and render everything with one ``cv2.remap`` of the head
  region plus a feathered mouth cavity.

Everything per frame touches only the head region, about 1 ms on one core at 416×704, so
a 2-core machine renders (and JPEG-encodes) many 25 fps sessions in real time.
"""

from __future__ import annotations

import logging
import math
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
    PrepareRequest,
    RGBFrame,
    render_each,
)
from omnistream.models.avatar_lite import _cascade, detect_face, fit_to_frame, frame_features

log = logging.getLogger(__name__)

MODEL_ID = "omni-avatar-lite-v1"

F32 = npt.NDArray[np.float32]

# Audio analysis around each frame.
FEATURE_WINDOW_S = 0.064  # analysed span centred on the frame's time
SILENCE_DBFS = -50.0  # below this the mouth is closed whatever the history
DYNAMIC_RANGE_DB = 28.0  # speech this far under the running peak counts as closed
PEAK_DECAY_DB_PER_S = 6.0  # how fast the automatic gain forgets a loud passage
ATTACK = 0.65  # fraction of the gap closed per frame while opening
RELEASE = 0.4  # …while closing: slower, as real jaws are

# Geometry, as fractions of the detected face box.
MAX_JAW_DROP = 0.105  # of face height, at full openness
BLINK_INTERVAL_S = (2.2, 5.5)
BLINK_FRAMES_S = 0.16
SWAY_PX = 1.6  # head sway amplitude at 416×704, scaled with the face


@dataclass
class PreparedAvatar:
    """Everything per-reference that frames need; shared read-only by all sessions."""

    base: RGBFrame  # the fitted reference, height×width×3
    face: tuple[int, int, int, int]  # x, y, w, h in output pixels
    face_found: bool
    mouth_found: bool
    roi: tuple[int, int, int, int]  # x0, y0, x1, y1 of the rendered region
    grid_x: F32
    grid_y: F32
    head_weight: F32  # 1 on the head, feathered to 0 at the ROI border
    jaw_weight: F32  # how much each ROI pixel follows the jaw
    lip_rows: F32  # signed vertical distance from the lip line (pixels)
    lip_cols: F32  # signed horizontal distance from the mouth centre (pixels)
    mouth: tuple[float, float, float]  # centre x, lip-line y, half width (ROI coords)
    eyes: list[tuple[float, float, float, float]]  # cx, cy, half w, half h (ROI coords)
    face_h: float
    cavity_colour: npt.NDArray[np.float32]
    teeth_colour: npt.NDArray[np.float32]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class LiteState:
    """Per-session animation state carried from one chunk to the next."""

    openness: float = 0.0
    spread: float = 0.0
    peak_db: float = -30.0
    next_blink: int = -1
    seed: int = 0


def _find_mouth(
    rgb: RGBFrame, face: tuple[int, int, int, int]
) -> tuple[float, float, float] | None:
    """Mouth centre x, lip-line y and half width from the smile cascade, if it agrees."""
    x, y, w, h = face
    top = y + int(h * 0.6)
    region = rgb[top : min(rgb.shape[0], y + int(h * 1.05)), x : x + w]
    if region.size == 0:
        return None
    gray = cv2.equalizeHist(cv2.cvtColor(region, cv2.COLOR_RGB2GRAY))
    found = _cascade("haarcascade_smile.xml").detectMultiScale(
        gray, scaleFactor=1.1, minNeighbors=12, minSize=(max(8, w // 5), max(5, h // 12))
    )
    candidates = []
    for mx, my, mw, mh in found:
        cx, cy = x + mx + mw / 2, top + my + mh / 2
        # Plausible mouths sit near the face's vertical axis at a sensible width.
        if abs(cx - (x + w / 2)) < w * 0.15 and w * 0.25 < mw < w * 0.7:
            candidates.append((mw * mh, cx, cy, mw / 2))
    if not candidates:
        return None
    _, cx, cy, half = max(candidates)
    return float(cx), float(cy), float(min(half * 0.85, w * 0.26))


def _smoothstep(edge0: float, edge1: float, x: F32) -> F32:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    out: F32 = (t * t * (3.0 - 2.0 * t)).astype(np.float32)
    return out


def prepare_avatar(request: PrepareRequest) -> PreparedAvatar:
    """Fit the reference, find face, mouth and eyes, precompute the head region's maps."""
    width, height = request.width, request.height
    face_src = detect_face(request.image)
    base, face = fit_to_frame(request.image, width, height, face_src)
    face_found = face is not None
    if face is None:
        # No face: animate a sensible region (a centred face-sized box in the upper
        # half) rather than fail, and say so in the session's info.
        fw = int(min(width, height) * 0.4)
        face = ((width - fw) // 2, int(height * 0.22), fw, fw)
    fx, fy, fw, fh = face
    mouth = _find_mouth(base, face) if face_found else None
    mouth_found = mouth is not None
    if mouth is None:
        mouth = (fx + fw / 2, fy + fh * 0.80, fw * 0.21)

    # Region of interest: the head with hair, chin and a little neck.
    x0 = max(0, int(fx - fw * 0.35))
    x1 = min(width, int(fx + fw * 1.35))
    y0 = max(0, int(fy - fh * 0.45))
    y1 = min(height, int(fy + fh * 1.5))
    rw, rh = x1 - x0, y1 - y0
    gx, gy = np.meshgrid(np.arange(rw, dtype=np.float32), np.arange(rh, dtype=np.float32))

    # Head weight: 1 on the head ellipse, fading to 0 well inside the ROI border so
    # the sway never tears the background.
    hcx, hcy = fx + fw / 2 - x0, fy + fh * 0.5 - y0
    r_head = np.sqrt(((gx - hcx) / (fw * 0.62)) ** 2 + ((gy - hcy) / (fh * 0.85)) ** 2)
    head_weight = (1.0 - _smoothstep(0.85, 1.25, r_head.astype(np.float32))).astype(np.float32)

    mcx, mcy, mhalf = mouth[0] - x0, mouth[1] - y0, mouth[2]
    lip_rows = (gy - mcy).astype(np.float32)
    lip_cols = (gx - mcx).astype(np.float32)
    chin_y = fy + fh * 1.08 - y0
    # The jaw: everything below the lip line down to the chin moves with it, fading out
    # over the neck and sideways over the jaw's width. Between the lips the lower lip
    # parts sharply (the cavity fills that gap); beyond the mouth corners the skin
    # stretches over a longer span so the cheeks never smear.
    corner = _smoothstep(mhalf * 0.7, mhalf * 1.4, np.abs(lip_cols))
    ramp = fh * (0.03 + 0.3 * corner)
    below = np.clip(lip_rows / ramp, 0.0, 1.0)
    below = (below * below * (3.0 - 2.0 * below)).astype(np.float32)
    above_neck = 1.0 - _smoothstep(chin_y - mcy, chin_y - mcy + fh * 0.25, lip_rows)
    across = np.exp(-0.5 * (lip_cols / (fw * 0.3)) ** 2).astype(np.float32)
    jaw_weight = (below * above_neck * across).astype(np.float32)

    eyes = []
    for ex in (fx + fw * 0.31, fx + fw * 0.69):
        eyes.append((ex - x0, fy + fh * 0.42 - y0, fw * 0.12, fh * 0.085))

    # Colours sampled from the person: the cavity is a darkened lip tone, teeth a
    # slightly warm off-white tied to the image's brightness.
    my0, my1 = int(mouth[1] - fh * 0.04), int(mouth[1] + fh * 0.04)
    mx0, mx1 = int(mouth[0] - mhalf), int(mouth[0] + mhalf)
    lips = base[max(0, my0) : max(1, my1), max(0, mx0) : max(1, mx1)].reshape(-1, 3)
    lip_tone = lips.mean(axis=0) if lips.size else np.array([150, 80, 80], np.float32)
    cavity = (lip_tone * np.array([0.42, 0.22, 0.22])).astype(np.float32)
    teeth = np.array([228, 222, 210], np.float32) * float(np.clip(base.mean() / 140.0, 0.75, 1.05))
    return PreparedAvatar(
        base=base,
        face=(fx, fy, fw, fh),
        face_found=face_found,
        mouth_found=mouth_found,
        roi=(x0, y0, x1, y1),
        grid_x=gx,
        grid_y=gy,
        head_weight=head_weight,
        jaw_weight=jaw_weight,
        lip_rows=lip_rows,
        lip_cols=lip_cols,
        mouth=(mcx, mcy, mhalf),
        eyes=eyes,
        face_h=float(fh),
        cavity_colour=cavity,
        teeth_colour=teeth,
        info={
            "face_detected": face_found,
            "mouth_detected": mouth_found,
            "face_box": [fx, fy, fw, fh],
        },
    )


class AvatarLite(AvatarModel):
    """The CPU renderer. Stateless: per-session state travels in the requests."""

    max_batch_cost = 96.0
    context_s = 0.1
    lookahead_s = FEATURE_WINDOW_S / 2

    def prepare(self, request: PrepareRequest) -> PreparedAvatar:
        return prepare_avatar(request)

    def render(self, chunks: list[ChunkRequest]) -> list[ChunkResult | BaseException]:
        return render_each(chunks, self._render_chunk)

    def _render_chunk(self, chunk: ChunkRequest) -> ChunkResult:
        avatar: PreparedAvatar = chunk.avatar
        state: LiteState = chunk.state or LiteState(
            seed=zlib.crc32(chunk.session_id.encode()) & 0x7FFFFFFF
        )
        n = chunk.frame_count
        if n == 0:
            return ChunkResult(frames=[], state=state)
        sr = chunk.sample_rate
        # Centre sample of each frame relative to the supplied audio buffer.
        frame_idx = np.arange(chunk.first_frame_index, chunk.first_frame_index + n)
        centres = np.round((frame_idx + 0.5) * sr / chunk.fps).astype(np.int64)
        centres = centres - chunk.start_sample + chunk.audio_offset
        level, spread = frame_features(chunk.audio, centres, sr)

        frames: list[RGBFrame] = []
        decay = PEAK_DECAY_DB_PER_S / chunk.fps
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
            state.spread += (float(spread[i]) - state.spread) * 0.35
            frame_no = int(frame_idx[i])
            blink = self._blink_amount(state, frame_no, chunk.fps)
            t = frame_no / chunk.fps
            frame = self._draw(avatar, state.openness, state.spread, blink, t, state.seed)
            if chunk.on_frame is not None:
                chunk.on_frame(i, frame)
            frames.append(frame)
        return ChunkResult(frames=frames, state=state, info={"openness": state.openness})

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
        return float(math.sin(math.pi * (k + 0.5) / length))

    @staticmethod
    def _draw(
        avatar: PreparedAvatar, openness: float, spread: float, blink: float, t: float, seed: int
    ) -> RGBFrame:
        x0, y0, x1, y1 = avatar.roi
        fh = avatar.face_h
        phase = (seed % 1000) / 1000.0 * 2 * math.pi
        sway = SWAY_PX * fh / 130.0
        hx = sway * math.sin(2 * math.pi * 0.23 * t + phase)
        hy = 0.6 * sway * math.sin(2 * math.pi * 0.31 * t + 1.7 * phase) - openness * fh * 0.012

        drop = openness * fh * MAX_JAW_DROP
        widen = 1.0 + 0.12 * (spread - 0.5) * 2 * openness - 0.06 * openness
        # Lips spread or round: horizontal scaling about the mouth centre near the lips.
        lip_band = np.exp(-0.5 * (avatar.lip_rows / (fh * 0.07)) ** 2)
        map_x = avatar.grid_x - hx * avatar.head_weight
        map_x -= avatar.lip_cols * (1.0 - 1.0 / widen) * lip_band * avatar.jaw_weight.clip(0.3)
        map_y = avatar.grid_y - hy * avatar.head_weight - drop * avatar.jaw_weight
        if blink > 0.01:
            for ecx, ecy, ehw, ehh in avatar.eyes:
                top = ecy - ehh
                col = np.exp(-0.5 * ((avatar.grid_x - ecx) / ehw) ** 2)
                rows = avatar.grid_y - top
                inside = (rows >= 0) & (rows <= 2 * ehh)
                cover = blink * 2 * ehh * col
                # Rows the lid covers sample the lid's top edge; the rest is untouched.
                pull = np.where(inside & (rows <= cover), rows, 0.0)
                map_y -= pull.astype(np.float32)
        roi = avatar.base[y0:y1, x0:x1]
        warped: RGBFrame = np.asarray(
            cv2.remap(
                roi, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
            ),
            dtype=np.uint8,
        )
        if drop > 0.5:
            warped = AvatarLite._paint_cavity(avatar, warped, drop, widen)
        frame = avatar.base.copy()
        frame[y0:y1, x0:x1] = warped
        return frame

    @staticmethod
    def _paint_cavity(
        avatar: PreparedAvatar, warped: RGBFrame, drop: float, widen: float
    ) -> RGBFrame:
        """Fill the gap the jaw opened with a dark mouth interior, feathered at the lips."""
        mcx, mcy, mhalf = avatar.mouth
        half_w = mhalf * widen * 0.95
        ys = slice(max(0, int(mcy - 2)), int(mcy + drop + 3))
        xs = slice(max(0, int(mcx - half_w - 2)), int(mcx + half_w + 3))
        gx = avatar.grid_x[ys, xs]
        gy = avatar.grid_y[ys, xs]
        # Per column, the gap is how far the jaw moved there, narrowing to the corners.
        dx = np.abs(gx - mcx) / half_w
        gap = drop * np.exp(-0.5 * ((gx - mcx) / (avatar.face_h * 0.3)) ** 2)
        gap = gap * np.sqrt(np.clip(1.0 - dx**2, 0.0, 1.0))
        inside = np.minimum(gy - (mcy - 0.5), (mcy + gap * 0.92) - gy)
        alpha = np.clip(inside / 1.5, 0.0, 1.0)[..., None]
        depth = np.clip((gy - mcy) / np.maximum(gap, 1.0), 0.0, 1.0)
        shade = (0.75 + 0.5 * np.abs(depth - 0.5))[..., None]
        colour = avatar.cavity_colour[None, None, :] * shade
        teeth = np.clip(1.0 - (gy - mcy) / max(1.5, drop * 0.18), 0.0, 1.0)[..., None]
        teeth = teeth * float(np.clip((drop - 5.0) / 6.0, 0.0, 0.8))
        colour = colour * (1 - teeth) + avatar.teeth_colour[None, None, :] * teeth
        patch = warped[ys, xs].astype(np.float32)
        warped[ys, xs] = (patch * (1 - alpha) + colour * alpha).astype(np.uint8)
        return warped


def specs(settings: Any) -> list[ModelSpec]:
    """The embedded avatar model's registry entry (tier core, CPU, no weights)."""

    def factory(ctx: LoadContext) -> AvatarLite:
        return AvatarLite()

    return [
        ModelSpec(
            id=MODEL_ID,
            tasks=("audio2video",),
            tier=Tier.CORE,
            factory=factory,
            summary="First-generation embedded CPU talking head (one remap of the head and "
            "a painted mouth), kept so the current renderer can be compared with it.",
            capabilities={
                "inputs": ["audio", "image"],
                "outputs": ["video"],
                "streaming": True,
                "resident": True,
                "batching": "frames from any sessions share a batch",
                "lookahead_ms": round(AvatarLite.lookahead_s * 1000),
                "license": "Apache-2.0 (code); default avatar is a public-domain NASA photo",
                "backends": ["cpu"],
            },
            replicas=0,
            devices=("cpu",),
        )
    ]
