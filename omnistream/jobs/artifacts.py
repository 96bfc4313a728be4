"""The artifacts directory: where runs write their outputs, with bounded retention.

A run reserves a path (``<id>.<ext>.part``), writes it in a worker thread and commits it
(an atomic rename to ``<id>.<ext>``); a cancelled or failed run discards its reservations,
so ``GET /v1/files/{id}`` never serves a half-written file and nothing is left behind.
Ids are random and validated against a strict pattern before any file-system lookup, so
no request can name a path outside this directory.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

FILE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
PART_SUFFIX = ".part"

MIME_BY_EXT = {
    ".mp4": "video/mp4",
    ".wav": "audio/wav",
    ".mp3": "audio/mpeg",
    ".flac": "audio/flac",
    ".ogg": "audio/ogg",
    ".txt": "text/plain; charset=utf-8",
    ".json": "application/json",
    ".srt": "application/x-subrip",
    ".vtt": "text/vtt",
    ".png": "image/png",
    ".jpg": "image/jpeg",
}


def owner_tag(owner: str | None) -> str:
    """The short, non-reversible digest of an owner id that a file name carries."""
    return hashlib.sha256((owner or "anonymous").encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Reservation:
    """A path a run may write to before it commits the artifact."""

    id: str
    ext: str
    part_path: Path
    final_path: Path


class ArtifactStore:
    """Files under one directory, kept for at most ``max_files`` and ``ttl_s``.

    Blocking methods (:meth:`commit`, :meth:`discard`, :meth:`sweep`, :meth:`find`) are
    meant to run in worker threads.
    """

    def __init__(self, directory: str | Path, *, max_files: int, ttl_s: float) -> None:
        self.directory = Path(directory).resolve()
        self.max_files = max_files
        self.ttl_s = ttl_s
        self._lock = threading.Lock()

    def ensure_dir(self) -> None:
        """Create the directory (blocking)."""
        self.directory.mkdir(parents=True, exist_ok=True)

    def reserve(self, ext: str, owner: str | None = None) -> Reservation:
        """A fresh id and the paths for one artifact (nothing is created yet).

        The owner (the key that asked for the run) is kept in the file name as a short
        digest, so ownership survives a restart and needs no index beside the files.
        """
        ext = ext if ext.startswith(".") else f".{ext}"
        file_id = f"file_{secrets.token_hex(12)}"
        final = self.directory / f"{file_id}.{owner_tag(owner)}{ext}"
        return Reservation(file_id, ext, final.with_name(final.name + PART_SUFFIX), final)

    def commit(self, reservation: Reservation) -> int:
        """Publish a written artifact; returns its size in bytes. Then applies retention."""
        os.replace(reservation.part_path, reservation.final_path)
        size = reservation.final_path.stat().st_size
        self.sweep()
        return size

    def discard(self, reservation: Reservation) -> None:
        """Delete whatever a reservation wrote (partial or committed)."""
        for path in (reservation.part_path, reservation.final_path):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def find(self, file_id: str, owner: str | None = None) -> Path | None:
        """The committed file of an id, or ``None`` (also for ids that are not ids).

        With ``owner``, a file another key's run wrote is ``None`` too: to a caller
        it does not exist.
        """
        if not FILE_ID_RE.match(file_id) or not self.directory.is_dir():
            return None
        for candidate in self.directory.glob(f"{file_id}.*"):
            if owner is not None and candidate.name.split(".")[1] != owner_tag(owner):
                continue
            if candidate.suffix != PART_SUFFIX and candidate.is_file():
                if time.time() - candidate.stat().st_mtime > self.ttl_s:
                    return None
                return candidate
        return None

    @staticmethod
    def mime_of(path: Path) -> str:
        """The content type served for a file."""
        return MIME_BY_EXT.get(path.suffix.lower()) or (
            mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        )

    def sweep(self) -> int:
        """Delete expired files and the oldest past ``max_files``; returns how many went.

        Partial files count only by age (a run may still be writing a young one).
        """
        if not self.directory.is_dir():
            return 0
        now = time.time()
        removed = 0
        with self._lock:
            done: list[tuple[float, Path]] = []
            for entry in os.scandir(self.directory):
                if not entry.is_file():
                    continue
                try:
                    mtime = entry.stat().st_mtime
                except FileNotFoundError:
                    continue
                path = Path(entry.path)
                if now - mtime > self.ttl_s:
                    path.unlink(missing_ok=True)
                    removed += 1
                elif not entry.name.endswith(PART_SUFFIX):
                    done.append((mtime, path))
            done.sort()
            for _, path in done[: max(0, len(done) - self.max_files)]:
                path.unlink(missing_ok=True)
                removed += 1
        return removed
