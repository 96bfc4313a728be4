"""Render + encode throughput in one process, 1 and 2 render threads, old vs new renderer.

    python bench/avatar_lite_threads.py

The server's pipeline without the network: render threads hand each frame to a 2-thread
JPEG pool as it is drawn (old: whole frames, simplejpeg; new: partial frames, spliced).
Prints process CPU per frame and frames per second; when 2 render threads barely beat 1
on 2 cores, the GIL (not the cores) is what limits.
"""

from __future__ import annotations

import hashlib
import resource
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from avatar_strip import speech

from omnistream.codecs.image import decode_image
from omnistream.codecs.jpeg import encode_jpeg
from omnistream.codecs.jpeg_splice import SpliceCache
from omnistream.models import avatar_lite, avatar_lite_v1
from omnistream.models.avatar_base import ChunkRequest, PrepareRequest
from omnistream.sessions.avatar import default_avatar_bytes

CHUNKS = 12  # per render thread, 28 frames each


def process_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(name: str, mod: Any, threads: int) -> str:
    """Render CHUNKS chunks per thread with ``threads`` render threads; one line of figures."""
    data = default_avatar_bytes()
    img = decode_image(data, 1 << 30, 1 << 30)
    audio = speech(1.12 * 4)
    model: Any = mod.AvatarLite()
    prepared = model.prepare(PrepareRequest(img, 416, 704, hashlib.sha256(data).hexdigest()))
    cache = SpliceCache()
    pool = ThreadPoolExecutor(2)
    partial = name == "new"

    def encode(frame: Any) -> bytes:
        if partial:
            static = cache.get(frame.static.key, frame.static.image, 80)
            return static.splice(frame.rows, frame.y0, frame.x0, frame.x1)
        return encode_jpeg(frame, 80)

    def worker(out: list[int]) -> None:
        state = None
        for c in range(CHUNKS):
            start = (c % 4) * 28 * 640
            futures: list[Future[bytes]] = []

            def queue(i: int, frame: Any, futures: list[Future[bytes]] = futures) -> None:
                futures.append(pool.submit(encode, frame))

            request = ChunkRequest(
                avatar=prepared,
                audio=audio,
                audio_offset=start,
                start_sample=start,
                first_frame_index=c * 28,
                frame_count=28,
                fps=25,
                state=state,
                session_id=f"s{threading.get_ident()}",
                partial_ok=partial,
                on_frame=queue,
                on_partial=queue,
            )
            state = model.render([request])[0].state
            for f in futures:
                f.result()
            out.append(28)

    out: list[int] = []
    cpu0, wall0 = process_cpu(), time.perf_counter()
    workers = [threading.Thread(target=worker, args=(out,)) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    frames, cpu, wall = sum(out), process_cpu() - cpu0, time.perf_counter() - wall0
    pool.shutdown()
    return (
        f"{name} render_threads={threads} cpu_ms_per_frame={cpu * 1000 / frames:.3f} "
        f"frames_per_s={frames / wall:.0f}"
    )


def main() -> None:
    for name, mod in (("old", avatar_lite_v1), ("new", avatar_lite)):
        for threads in (1, 2):
            print(measure(name, mod, threads), flush=True)


if __name__ == "__main__":
    main()
