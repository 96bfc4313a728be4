"""Render a strip of ``omni-avatar-lite`` frames for eyes, not for numbers.

    python bench/avatar_strip.py --out docs/avatar_strip.png [--image face.jpg] [--model v1]

Synthesised speech (a voiced source with syllable-rate loudness and vowel-like formants,
then a pause) drives the renderer directly, in one process; the strip shows the face
region of every ``--step``-th frame, the reference first.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import cv2
import numpy as np

from omnistream.codecs.image import decode_image
from omnistream.models.avatar_base import ChunkRequest, PrepareRequest
from omnistream.sessions.avatar import default_avatar_bytes

SR = 16000


def speech(seconds: float, seed: int = 1) -> np.ndarray:
    """Voiced syllables with wandering formants, then silence in the last quarter."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    f0 = 130 + 25 * np.sin(2 * np.pi * 0.6 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    harmonics = np.arange(1, 30)
    formant = 500 + 1500 * (0.5 + 0.5 * np.sin(2 * np.pi * 1.3 * t + rng.uniform(0, 6)))
    voice = np.zeros(n)
    for k in harmonics:
        gain = np.exp(-(((k * f0) - formant) ** 2) / (2 * 400.0**2)) + 0.3 / k
        voice += gain * np.sin(k * phase)
    syll = np.clip(np.sin(2 * np.pi * 3.5 * t + rng.uniform(0, 6)), 0, None) ** 0.7
    x = 0.25 * voice / np.abs(voice).max() * syll
    x[int(n * 0.75) :] = 0.0
    return x.astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/avatar_strip.png")
    ap.add_argument("--image")
    ap.add_argument("--model", default="lite", choices=["lite", "v1"])
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--step", type=int, default=3)
    ap.add_argument("--cols", type=int, default=8)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--colors", type=int, default=0, help="palette PNG with this many colours")
    args = ap.parse_args()
    if args.model == "v1":
        from omnistream.models.avatar_lite_v1 import AvatarLite as Model
    else:
        from omnistream.models.avatar_lite import AvatarLite as Model  # type: ignore[assignment]
    data = Path(args.image).read_bytes() if args.image else default_avatar_bytes()
    image = decode_image(data, 50_000_000, 50_000_000)
    model = Model()
    prepared = model.prepare(PrepareRequest(image, 416, 704, hashlib.sha256(data).hexdigest()))
    fps = 25
    audio = speech(args.frames / fps)
    result = model.render(
        [
            ChunkRequest(
                avatar=prepared,
                audio=audio,
                audio_offset=0,
                start_sample=0,
                first_frame_index=0,
                frame_count=args.frames,
                fps=fps,
                session_id="strip",
            )
        ]
    )[0]
    assert not isinstance(result, BaseException)
    frames = [prepared.base, *result.full_frames()[:: args.step]]
    face = getattr(prepared, "face", (0, 0, 416, 704))
    fx, fy, fw, fh = face
    x0, x1 = max(0, int(fx - fw * 0.15)), min(416, int(fx + fw * 1.15))
    y0, y1 = max(0, int(fy - fh * 0.1)), min(704, int(fy + fh * 1.2))
    tiles = [f[y0:y1, x0:x1] for f in frames]
    cols = args.cols
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i : i + cols], axis=1) for i in range(0, len(tiles), cols)]
    strip = np.concatenate(rows, axis=0)
    if args.scale != 1.0:
        strip = cv2.resize(strip, None, fx=args.scale, fy=args.scale, interpolation=cv2.INTER_AREA)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.colors:
        from PIL import Image

        Image.fromarray(strip).quantize(args.colors).save(args.out, optimize=True)
    else:
        cv2.imwrite(args.out, cv2.cvtColor(strip, cv2.COLOR_RGB2BGR))
    print(args.out, strip.shape, prepared.info if hasattr(prepared, "info") else "")


if __name__ == "__main__":
    main()
