"""Upload slots: checking that uploaded bytes are what their declared type says, and
spooling them to disk until every slot of a task is filled.

Spool files are named from the server-made task id and a field name the catalog knows,
never from anything a client chose (the declared filename is only echoed back).
"""

from __future__ import annotations

import re
from pathlib import Path

#: Declared content types and the container their bytes must be.
CONTAINER_OF: dict[str, str] = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/webp": "webp",
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/wave": "wav",
    "audio/mpeg": "mp3",
    "audio/flac": "flac",
    "audio/ogg": "ogg",
    "audio/webm": "webm",
    "audio/mp4": "mp4",
}

_TASK_ID = re.compile(r"^pt_[0-9a-f]{24}$")
_FIELD = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def normalise_type(value: str | None) -> str:
    """``Image/PNG; charset=x`` → ``image/png``."""
    return (value or "").split(";", 1)[0].strip().lower()


def sniff(data: bytes) -> str | None:
    """The container the bytes start like, or ``None``."""
    head = data[:16]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head.startswith(b"fLaC"):
        return "flac"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "webm"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head.startswith(b"ID3") or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mp3"
    return None


def matches(declared: str, data: bytes) -> bool:
    """Whether ``data`` is the container ``declared`` names."""
    expected = CONTAINER_OF.get(normalise_type(declared))
    return expected is not None and sniff(data) == expected


class Spool:
    """The directory holding uploaded files of tasks that still wait for others.

    Blocking methods run in worker threads.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, task_id: str, field: str) -> Path:
        """Where one slot's bytes are kept."""
        if not _TASK_ID.match(task_id) or not _FIELD.match(field):
            raise ValueError("not a task id or field name")
        return self.directory / f"{task_id}.{field}"

    def write(self, task_id: str, field: str, data: bytes) -> Path:
        """Store a slot's bytes (atomically: a partial file never has the final name)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.path(task_id, field)
        part = final.with_name(final.name + ".part")
        part.write_bytes(data)
        part.replace(final)
        return final

    def read(self, task_id: str, field: str) -> bytes:
        """A slot's bytes."""
        return self.path(task_id, field).read_bytes()

    def discard(self, task_id: str, fields: list[str]) -> None:
        """Delete a task's spooled files."""
        for field in fields:
            self.path(task_id, field).unlink(missing_ok=True)
