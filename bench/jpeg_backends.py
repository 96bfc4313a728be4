"""Which JPEG encoder is fastest here? simplejpeg vs OpenCV vs Pillow (all libjpeg-turbo).

Encodes a real avatar frame (416×704, quality 80, 4:2:0) on one thread and on a pool of
``os.cpu_count()`` threads (the way a VIDX chunk is encoded), alternating backends in
rounds so machine noise hits them all alike. Writes ``bench/results/jpeg_backends.json``.

Usage: ``python bench/jpeg_backends.py [--rounds 5] [--frames 200]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from omnistream.codecs.image import decode_image
from omnistream.codecs.jpeg import JPEG_BACKENDS
from omnistream.models.avatar_lite import fit_to_frame
from omnistream.sessions.avatar import default_avatar_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--quality", type=int, default=80)
    args = parser.parse_args()
    image = decode_image(default_avatar_bytes(), 10**8, 10**8)
    frame, _ = fit_to_frame(image, 416, 704, None)
    threads = os.cpu_count() or 1
    pool = ThreadPoolExecutor(threads)
    one: dict[str, list[float]] = {name: [] for name in JPEG_BACKENDS}
    many: dict[str, list[float]] = {name: [] for name in JPEG_BACKENDS}
    sizes = {name: len(fn(frame, args.quality)) for name, fn in JPEG_BACKENDS.items()}
    for _ in range(args.rounds):
        for name, fn in JPEG_BACKENDS.items():
            t0 = time.perf_counter()
            for _ in range(args.frames):
                fn(frame, args.quality)
            one[name].append((time.perf_counter() - t0) / args.frames * 1000)
            t0 = time.perf_counter()
            list(pool.map(lambda _, f=fn: f(frame, args.quality), range(args.frames)))
            many[name].append(args.frames / (time.perf_counter() - t0))
    report = {
        "frame": f"416x704 RGB, quality {args.quality}, 4:2:0",
        "threads": threads,
        "backends": {
            name: {
                "ms_per_frame_1_thread": round(statistics.median(one[name]), 3),
                "frames_per_s_pool": round(statistics.median(many[name])),
                "bytes": sizes[name],
            }
            for name in JPEG_BACKENDS
        },
    }
    report["fastest_pool"] = max(
        report["backends"], key=lambda n: report["backends"][n]["frames_per_s_pool"]
    )
    out = Path(__file__).parent / "results" / "jpeg_backends.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
