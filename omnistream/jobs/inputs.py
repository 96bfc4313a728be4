"""Media inputs the way a server must take them: from uploads, base64, data URLs, earlier
artifacts, or server-local paths under allowed roots only, with size and duration limits.

Everything here is synchronous and blocking (file reads, decoding): routes call it in a
worker thread. A problem with the input raises :class:`GenerateError` with status 400
(403 for a path outside the allowed roots, 413 past a size limit), never a 500.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from omnistream.codecs.pcm import FloatAudio
from omnistream.jobs.errors import GenerateError

AUDIO_SAMPLE_RATE = 16000
_DATA_URL = re.compile(r"^data:([\w.+/-]*)?((?:;[\w=.+-]+)*?)(;base64)?,", re.IGNORECASE)
_FILE_URL = re.compile(r"^/v1/files/([A-Za-z0-9_-]{1,80})$")


@dataclass
class MediaBytes:
    """Raw bytes of one media input and where they came from (for the report)."""

    data: bytes
    source: str
    name: str = ""

    @property
    def sha256(self) -> str:
        """Content hash: the key of caches such as the prepared avatar reference."""
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class Upload:
    """A file a client uploaded in a multipart request, already read (bounded)."""

    data: bytes
    filename: str = ""
    content_type: str = ""


@dataclass
class InputLimits:
    """The limits a server enforces on inputs (from Settings)."""

    max_upload_bytes: int
    max_audio_s: float
    max_image_bytes: int
    max_image_pixels: int
    max_text_chars: int
    roots: list[Path] = field(default_factory=list)
    artifacts_dir: Path | None = None


def _b64(text: str, name: str, limit: int) -> bytes:
    compact = "".join(text.split())
    if len(compact) * 3 // 4 > limit:
        raise GenerateError(413, "input_too_large", f"Input '{name}' is larger than {limit} bytes.")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise GenerateError(
            400, "invalid_base64", f"Input '{name}' is not valid base64 (nor a data URL)."
        ) from exc


def resolve_path(raw: str, name: str, limits: InputLimits) -> Path:
    """A server-local path, allowed only inside one of the configured roots.

    Symlinks and ``..`` are resolved before the check, so neither can escape a root.
    """
    if raw.startswith("file://"):
        raw = raw[len("file://") :]
    if not limits.roots:
        raise GenerateError(
            403,
            "path_not_allowed",
            f"Input '{name}': server-local paths are disabled on this server "
            "(set OMNISTREAM_INPUT_ROOTS); upload the file or send it as base64.",
        )
    if "\x00" in raw:
        raise GenerateError(400, "invalid_path", f"Input '{name}': invalid path.")
    path = Path(os.path.realpath(raw))
    for root in limits.roots:
        if path.is_relative_to(Path(os.path.realpath(root))):
            break
    else:
        raise GenerateError(
            403, "path_not_allowed", f"Input '{name}': path is outside the allowed input roots."
        )
    if not path.is_file():
        raise GenerateError(400, "file_not_found", f"Input '{name}': no such file {raw!r}.")
    return path


def _read_bounded(path: Path, name: str, limit: int) -> bytes:
    size = path.stat().st_size
    if size > limit:
        raise GenerateError(413, "input_too_large", f"Input '{name}' is larger than {limit} bytes.")
    return path.read_bytes()


def _artifact(file_id: str, name: str, limits: InputLimits) -> bytes:
    if limits.artifacts_dir is None or not re.fullmatch(r"[A-Za-z0-9_-]{1,80}", file_id):
        raise GenerateError(400, "file_not_found", f"Input '{name}': unknown file id.")
    for candidate in limits.artifacts_dir.glob(f"{file_id}.*"):
        if candidate.suffix != ".part" and candidate.is_file():
            return _read_bounded(candidate, name, limits.max_upload_bytes)
    raise GenerateError(400, "file_not_found", f"Input '{name}': unknown file id {file_id!r}.")


def media_bytes(
    name: str, value: Any, uploads: dict[str, Upload], limits: InputLimits
) -> MediaBytes | None:
    """Resolve one media input to bytes, or ``None`` when it was not given.

    Accepted forms: an upload named ``name``; a string that is a data URL, a
    ``/v1/files/{id}`` URL, a ``file://`` path, or base64; an object with one of
    ``path``, ``file_id``, ``url``, ``base64`` / ``b64``.
    """
    upload = uploads.get(name)
    if upload is not None:
        if len(upload.data) > limits.max_upload_bytes:
            raise GenerateError(
                413,
                "input_too_large",
                f"Upload '{name}' is larger than {limits.max_upload_bytes} bytes.",
            )
        if not upload.data:
            raise GenerateError(400, "empty_input", f"Upload '{name}' is empty.")
        return MediaBytes(upload.data, "upload", upload.filename)
    if value is None:
        return None
    if isinstance(value, dict):
        if "path" in value:
            path = resolve_path(str(value["path"]), name, limits)
            return MediaBytes(_read_bounded(path, name, limits.max_upload_bytes), "path", path.name)
        if "file_id" in value:
            return MediaBytes(_artifact(str(value["file_id"]), name, limits), "file_id")
        if "url" in value:
            value = str(value["url"])
        elif "base64" in value or "b64" in value:
            return MediaBytes(
                _b64(str(value.get("base64", value.get("b64"))), name, limits.max_upload_bytes),
                "base64",
            )
        else:
            raise GenerateError(
                400,
                "invalid_input",
                f"Input '{name}' must be base64, a data URL, or an object with 'path', "
                "'file_id', 'url' or 'base64'.",
            )
    if not isinstance(value, str):
        raise GenerateError(
            400,
            "invalid_input",
            f"Input '{name}' must be a string or an object, not {type(value).__name__}.",
        )
    if not value.strip():
        raise GenerateError(400, "empty_input", f"Input '{name}' is empty.")
    match = _DATA_URL.match(value)
    if match:
        payload = value[match.end() :]
        if match.group(3):
            return MediaBytes(_b64(payload, name, limits.max_upload_bytes), "data_url")
        from urllib.parse import unquote_to_bytes

        return MediaBytes(unquote_to_bytes(payload), "data_url")
    if value.startswith("file://"):
        path = resolve_path(value, name, limits)
        return MediaBytes(_read_bounded(path, name, limits.max_upload_bytes), "path", path.name)
    file_match = _FILE_URL.match(value)
    if file_match:
        return MediaBytes(_artifact(file_match.group(1), name, limits), "file_id")
    if value.startswith(("http://", "https://")):
        raise GenerateError(
            400, "remote_url_not_supported", f"Input '{name}': the server does not fetch URLs."
        )
    path_like = _path_like(value)
    if path_like:
        local = _plain_path(value, limits)
        if local is not None:
            data = _read_bounded(local, name, limits.max_upload_bytes)
            return MediaBytes(data, "path", local.name)
    try:
        return MediaBytes(_b64(value, name, limits.max_upload_bytes), "base64")
    except GenerateError as exc:
        if not path_like or exc.code != "invalid_base64":
            raise
        raise GenerateError(
            400,
            "file_not_found",
            f"Input '{name}' is neither base64 nor a file under the server's allowed input "
            "roots (OMNISTREAM_INPUT_ROOTS); upload the file or send it as base64.",
        ) from exc


def _path_like(value: str) -> bool:
    """Whether a string input may be a plain path, as OmniRT's documentation sends them."""
    return (
        len(value) <= 4096
        and "\x00" not in value
        and not any(c.isspace() for c in value)
        and ("/" in value or "." in value)
    )


def _plain_path(value: str, limits: InputLimits) -> Path | None:
    """A plain path string read as a path only when it is a file under an allowed root.

    Anything else falls back to base64 (a JPEG's base64 starts with ``/9j/``), and the
    answer is the same whether a file outside the roots exists or not.
    """
    if not limits.roots:
        return None
    path = Path(os.path.realpath(os.path.expanduser(value)))
    for root in limits.roots:
        if path.is_relative_to(Path(os.path.realpath(root))) and path.is_file():
            return path
    return None


def decode_audio(
    data: bytes, name: str, max_seconds: float, sample_rate: int = AUDIO_SAMPLE_RATE
) -> FloatAudio:
    """Decode any audio container PyAV reads into float32 mono at ``sample_rate``.

    Decoding stops as soon as the audio passes ``max_seconds``, so a long file costs no
    more than the limit. Corrupt, truncated-to-nothing or non-audio data is a 400.
    """
    import av

    limit = int(max_seconds * sample_rate)
    parts: list[npt.NDArray[np.float32]] = []
    total = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise GenerateError(400, "invalid_audio", f"Input '{name}' has no audio stream.")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            try:
                for frame in container.decode(stream):
                    for out in resampler.resample(frame):
                        chunk = out.to_ndarray().reshape(-1).astype(np.float32)
                        parts.append(chunk)
                        total += chunk.size
                    if total > limit:
                        raise GenerateError(
                            413,
                            "audio_too_long",
                            f"Input '{name}' is longer than {max_seconds:g} s.",
                        )
            except av.error.InvalidDataError:
                if total == 0:
                    raise
                # a truncated tail: keep what decoded cleanly
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1).astype(np.float32))
    except GenerateError:
        raise
    except (av.error.FFmpegError, ValueError, EOFError, IndexError) as exc:
        raise GenerateError(
            400, "invalid_audio", f"Input '{name}' is not decodable audio ({type(exc).__name__})."
        ) from exc
    audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if audio.size == 0:
        raise GenerateError(400, "invalid_audio", f"Input '{name}' contains no audio samples.")
    if not np.all(np.isfinite(audio)):
        audio = np.nan_to_num(audio, nan=0.0, posinf=0.0, neginf=0.0)
    return np.ascontiguousarray(audio[:limit], dtype=np.float32)


def decode_image_input(data: bytes, name: str, limits: InputLimits) -> npt.NDArray[np.uint8]:
    """Decode an image input to RGB uint8 with the server's image limits."""
    from omnistream.codecs.image import ImageError, decode_image

    try:
        return decode_image(data, limits.max_image_bytes, limits.max_image_pixels)
    except ImageError as exc:
        status = 413 if exc.code == "image_too_large" else 400
        code = "input_too_large" if status == 413 else "invalid_image"
        raise GenerateError(status, code, f"Input '{name}': {exc}") from exc


def text_input(inputs: dict[str, Any], limits: InputLimits, *names: str) -> str:
    """The first of ``names`` present in ``inputs``, checked to be non-empty text."""
    for name in names:
        if name in inputs and inputs[name] is not None:
            value = inputs[name]
            if not isinstance(value, str):
                raise GenerateError(
                    400,
                    "invalid_input",
                    f"Input '{name}' must be a string, not {type(value).__name__}.",
                )
            if not value.strip():
                raise GenerateError(400, "missing_input", f"Input '{name}' is empty.")
            if len(value) > limits.max_text_chars:
                # 400 like the TTS routes and OpenAI: the body was an acceptable size (413
                # is for that), one field is over its own limit.
                raise GenerateError(
                    400,
                    "input_too_long",
                    f"Input '{name}' has {len(value)} characters; "
                    f"the limit is {limits.max_text_chars}.",
                )
            return value
    raise GenerateError(400, "missing_input", f"Input '{names[0]}' is required for this task.")
