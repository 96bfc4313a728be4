"""The offline tasks: text2audio, audio2video and audio2text as one-shot sessions.

Each task has two halves:

* ``prepare`` — synchronous, run in a worker thread before the job is created: resolves and
  decodes the inputs and checks the config, so bad input is a 400 for sync and async calls
  alike and never becomes a failed job;
* ``run`` — a coroutine on the event loop that submits small steps to the model's runner
  through :class:`RunContext` and writes its outputs to the artifacts directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import wave
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
import numpy.typing as npt

from omnistream.codecs.pcm import FloatAudio, float32_to_s16le
from omnistream.engine.runner import Priority
from omnistream.jobs.errors import GenerateError
from omnistream.jobs.inputs import (
    AUDIO_SAMPLE_RATE,
    InputLimits,
    Upload,
    decode_audio,
    decode_image_input,
    media_bytes,
    text_input,
)
from omnistream.jobs.runtime import RunContext, run_offline
from omnistream.jobs.schemas import Artifact, GenerateRequest

DEFAULT_WIDTH = 416
DEFAULT_HEIGHT = 704
DEFAULT_FPS = 25
AVATAR_STEP_S = 1.0
AVATAR_CONTEXT_S = 0.2
AVATAR_LOOKAHEAD_S = 0.04
WHISPER_PIECE_S = 28.0


@dataclass
class Prepared:
    """Decoded, validated inputs of one run."""

    task: str
    text: str = ""
    audio: FloatAudio = field(default_factory=lambda: np.zeros(0, np.float32))
    image: npt.NDArray[np.uint8] | None = None
    image_hash: str = ""
    image_bytes: bytes = b""
    options: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)


def _option(request: GenerateRequest, name: str, default: Any = None) -> Any:
    """A setting from ``inputs`` first (semantic inputs such as ``fps``), then ``config``."""
    if name in request.inputs and request.inputs[name] is not None:
        return request.inputs[name]
    return request.config.get(name, default)


def _int_option(request: GenerateRequest, name: str, default: int, low: int, high: int) -> int:
    value = _option(request, name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise GenerateError(400, "invalid_config", f"'{name}' must be an integer, got {value!r}.")
    if not low <= int(value) <= high:
        raise GenerateError(400, "invalid_config", f"'{name}' must be between {low} and {high}.")
    return int(value)


def _float_option(
    request: GenerateRequest, name: str, default: float, low: float, high: float
) -> float:
    value = _option(request, name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GenerateError(400, "invalid_config", f"'{name}' must be a number, got {value!r}.")
    if not low <= float(value) <= high:
        raise GenerateError(
            400, "invalid_config", f"'{name}' must be between {low:g} and {high:g}."
        )
    return float(value)


def _str_option(request: GenerateRequest, name: str) -> str | None:
    value = _option(request, name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise GenerateError(400, "invalid_config", f"'{name}' must be a string, got {value!r}.")
    return value


def _audio(
    request: GenerateRequest, uploads: dict[str, Upload], limits: InputLimits, out: Prepared
) -> None:
    media = media_bytes("audio", request.inputs.get("audio"), uploads, limits)
    if media is None:
        raise GenerateError(400, "missing_input", "Input 'audio' is required for this task.")
    out.audio = decode_audio(media.data, "audio", limits.max_audio_s)
    out.sources["audio"] = media.source


def _write_wav(path: str, audio: FloatAudio, sample_rate: int) -> None:
    with wave.open(path, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(float32_to_s16le(audio))


# -- text2audio ------------------------------------------------------------------------


def prepare_text2audio(
    request: GenerateRequest, uploads: dict[str, Upload], limits: InputLimits, spec: Any
) -> Prepared:
    """Text (``prompt``, or its alias ``text``), voice, speed and output sample rate."""
    out = Prepared(task="text2audio")
    out.text = text_input(request.inputs, limits, "prompt", "text")
    voices = [
        v["id"] if isinstance(v, dict) else str(v) for v in spec.capabilities.get("voices", [])
    ]
    voice = (
        _str_option(request, "voice")
        or spec.capabilities.get("default_voice")
        or (voices[0] if voices else "")
    )
    if voices and voice not in voices:
        raise GenerateError(
            400, "invalid_voice", f"Voice {voice!r} is not available; voices: {', '.join(voices)}."
        )
    out.options["voice"] = voice
    out.options["speed"] = _float_option(request, "speed", 1.0, 0.25, 4.0)
    rate = _option(request, "sample_rate")
    if rate is not None:
        out.options["sample_rate"] = _int_option(request, "sample_rate", 24000, 8000, 48000)
    return out


async def run_text2audio(ctx: RunContext, prepared: Prepared) -> list[Artifact]:
    """Synthesise the text through the TTS runner at offline priority, then write a WAV.

    The TTS sessions' own stream (the one ``synthesize_text`` wraps) submits one segment
    per step, so live TTS streams overtake the job at every segment; progress is reported
    per finished segment, and a cancel closes the stream, which drops its queued segments.
    """
    from omnistream.sessions.tts import TtsStream

    async with ctx.stage("load"):
        await ctx.runner.wait_ready()
    stream = TtsStream(
        ctx.runner,
        model_id=ctx.spec.id,
        voice=prepared.options["voice"],
        native_rate=int(ctx.spec.capabilities.get("sample_rate", 24000)),
        out_rate=prepared.options.get("sample_rate"),
        speed=prepared.options["speed"],
        priority=Priority.OFFLINE,
        chunk_ms=100,
        buffer_ms=60_000,
        sample_format="f32le",
        metrics=ctx.services.state.metrics,
        max_pending_chars=len(prepared.text) + 1,
    )
    parts: list[bytes] = []

    async def consume() -> None:
        stream.say(prepared.text)
        total = max(1, stream.segments_queued)
        reported = 0
        while True:
            item = await stream.read()
            if item is None:
                break
            if isinstance(item, bytes):
                parts.append(item)
            done = sum(1 for e in stream.events if e.type == "segment.done")
            if done > reported:
                reported = done
                ctx.steps = done
                ctx.progress("synthesize", done, total)

    try:
        async with ctx.stage("synthesize", characters=len(prepared.text)):
            await ctx.await_cancellable(asyncio.ensure_future(consume()))
    finally:
        await stream.aclose("offline job ended")
    rate = stream.out_rate
    audio = np.frombuffer(b"".join(parts), dtype="<f4").astype(np.float32)
    if audio.size == 0:
        raise GenerateError(400, "missing_input", "Input 'prompt' has nothing to speak.")
    async with ctx.stage("encode"):
        reservation = ctx.reserve(".wav")
        await ctx.blocking(_write_wav, str(reservation.part_path), audio, rate)
    ctx.extra["rtf"] = round(stream.rtf, 4)
    return [
        Artifact(
            kind="audio",
            mime="audio/wav",
            duration_s=round(len(audio) / rate, 4),
            data={"sample_rate": rate, "voice": prepared.options["voice"]},
            id=reservation.id,
        )
    ]


# -- audio2video -------------------------------------------------------------------------


def default_avatar_bytes() -> bytes:
    """The bundled default face."""
    return resources.files("omnistream.assets").joinpath("default_avatar.jpg").read_bytes()


def prepare_audio2video(
    request: GenerateRequest, uploads: dict[str, Upload], limits: InputLimits, spec: Any
) -> Prepared:
    """Audio (required), reference image (default face if absent), width/height/fps."""
    out = Prepared(task="audio2video")
    max_dim = int(spec.capabilities.get("max_dimension", 0)) or 1920
    width = _int_option(request, "width", DEFAULT_WIDTH, 16, max_dim)
    height = _int_option(request, "height", DEFAULT_HEIGHT, 16, max_dim)
    if width % 2 or height % 2:
        raise GenerateError(
            400, "invalid_config", f"width and height must be even, got {width}x{height}."
        )
    out.options.update(
        width=width, height=height, fps=_int_option(request, "fps", DEFAULT_FPS, 1, 60)
    )
    _audio(request, uploads, limits, out)
    media = media_bytes("image", request.inputs.get("image"), uploads, limits)
    data = media.data if media is not None else default_avatar_bytes()
    out.sources["image"] = media.source if media is not None else "default"
    out.image = decode_image_input(data, "image", limits)
    out.image_hash = hashlib.sha256(data).hexdigest()
    out.image_bytes = data
    return out


async def run_audio2video(ctx: RunContext, prepared: Prepared) -> list[Artifact]:
    """Render the avatar one ~1 s chunk per step and mux H.264 + AAC into an MP4.

    Encoding chunk *k* (in a thread) overlaps rendering chunk *k+1* on the runner; the
    audio written is cut to exactly the video's frame count so both streams end together.
    """
    from omnistream.codecs.mp4 import Mp4Writer, frames_for_samples
    from omnistream.models.avatar_base import ChunkRequest

    width, height, fps = (prepared.options[k] for k in ("width", "height", "fps"))
    sr = AUDIO_SAMPLE_RATE
    assert prepared.image is not None
    async with ctx.stage("load"):
        await ctx.runner.wait_ready()
    avatars = ctx.services.state.avatars
    async with ctx.stage("prepare"):
        # The same cache live sessions use: an image a live session already prepared
        # (or that another job prepared) is not prepared again.
        misses = avatars.references.misses
        reference = await avatars.reference(
            ctx.spec.id,
            ctx.runner,
            prepared.image_bytes,
            width=width,
            height=height,
            image=prepared.image,
            priority=Priority.OFFLINE,
        )
        if avatars.references.misses == misses:
            ctx.cache_hits.append(f"avatar_reference:{prepared.image_hash[:12]}")
        avatar = reference.prepared
    total_frames = frames_for_samples(len(prepared.audio), sr, fps)
    audio = prepared.audio[: round(total_frames * sr / fps)]
    reservation = ctx.reserve(".mp4")
    writer = await ctx.blocking(
        lambda: Mp4Writer(
            reservation.part_path, width=width, height=height, fps=fps, sample_rate=sr
        )
    )
    step_frames = max(1, round(AVATAR_STEP_S * fps))
    context = int(AVATAR_CONTEXT_S * sr)
    lookahead = int(AVATAR_LOOKAHEAD_S * sr)
    state: Any = None
    encoding: Any = None
    encode_ms = 0.0

    def encode(frames: list[Any], pcm: FloatAudio) -> float:
        import time

        started = time.perf_counter()
        writer.write_audio(pcm)
        writer.write_frames(frames)
        return (time.perf_counter() - started) * 1000.0

    try:
        async with ctx.stage("render", frames=total_frames, fps=fps):
            for first in range(0, total_frames, step_frames):
                count = min(step_frames, total_frames - first)
                start = round(first * sr / fps)
                end = round((first + count) * sr / fps)
                lo, hi = max(0, start - context), min(len(audio), end + lookahead)
                result = await ctx.submit(
                    ChunkRequest(
                        avatar=avatar,
                        audio=np.ascontiguousarray(audio[lo:hi]),
                        audio_offset=start - lo,
                        start_sample=start,
                        first_frame_index=first,
                        frame_count=count,
                        fps=fps,
                        sample_rate=sr,
                        state=state,
                        session_id=ctx.job.id,
                    ),
                    cost=float(count),
                )
                state = result.value.state
                if encoding is not None:
                    encode_ms += await encoding
                encoding = asyncio_thread(encode, result.value.frames, audio[start:end])
                ctx.progress("render", first + count, total_frames)
            if encoding is not None:
                encode_ms += await encoding
                encoding = None
        async with ctx.stage("mux"):
            await ctx.blocking(writer.close)
    except BaseException:
        if encoding is not None:
            try:
                await encoding
            except Exception:
                pass
        await ctx.blocking(writer.abort)
        raise
    ctx.add_time("encode", encode_ms)
    return [
        Artifact(
            kind="video",
            mime="video/mp4",
            width=width,
            height=height,
            num_frames=total_frames,
            duration_s=round(total_frames / fps, 4),
            data={"fps": fps, "audio_sample_rate": sr, "video_codec": "h264", "audio_codec": "aac"},
            id=reservation.id,
        )
    ]


def asyncio_thread(fn: Callable[..., float], *args: Any) -> Awaitable[float]:
    """Start ``fn`` on the offline pool now and return something to await later."""
    return asyncio.ensure_future(run_offline(fn, *args))


# -- audio2text --------------------------------------------------------------------------


def prepare_audio2text(
    request: GenerateRequest, uploads: dict[str, Upload], limits: InputLimits, spec: Any
) -> Prepared:
    """Audio (required), ``language``, optional ``reference_text`` used as the prompt."""
    out = Prepared(task="audio2text")
    language = _str_option(request, "language")
    languages = spec.capabilities.get("languages") or []
    if language and languages and language not in languages:
        raise GenerateError(
            400,
            "unsupported_language",
            f"Model {spec.id} transcribes {', '.join(languages)}, not {language!r}.",
        )
    out.options["language"] = language
    prompt = _option(request, "reference_text")
    if prompt is not None and not isinstance(prompt, str):
        raise GenerateError(400, "invalid_input", "Input 'reference_text' must be a string.")
    out.options["prompt"] = prompt
    _audio(request, uploads, limits, out)
    return out


async def run_audio2text(ctx: RunContext, prepared: Prepared) -> list[Artifact]:
    """Cut long audio at pauses (VAD step), then transcribe one piece per step."""
    from omnistream.models.stt.whisper import SpeechRegionsRequest, TranscribeRequest, Transcript

    sr = AUDIO_SAMPLE_RATE
    audio = prepared.audio
    duration = len(audio) / sr
    async with ctx.stage("load"):
        await ctx.runner.wait_ready()
    pieces: list[tuple[int, int]] = [(0, len(audio))]
    if duration > WHISPER_PIECE_S:
        async with ctx.stage("vad"):
            result = await ctx.submit(
                SpeechRegionsRequest(audio=audio, max_piece_s=WHISPER_PIECE_S)
            )
            pieces = list(result.value)
    segments: list[dict[str, Any]] = []
    language = prepared.options.get("language") or "en"
    async with ctx.stage("transcribe", pieces=len(pieces)):
        for index, (start, end) in enumerate(pieces):
            result = await ctx.submit(
                TranscribeRequest(
                    audio=np.ascontiguousarray(audio[start:end]),
                    offset_s=start / sr,
                    language=prepared.options.get("language"),
                    prompt=prepared.options.get("prompt"),
                ),
                cost=(end - start) / sr,
            )
            transcript: Transcript = result.value
            language = transcript.language or language
            # Numbered from the count before this piece: len(segments) inside the
            # generator grows as extend() appends, which skipped every other id.
            first = len(segments)
            segments.extend(
                {"id": first + i, "start": s.start, "end": s.end, "text": s.text}
                for i, s in enumerate(transcript.segments)
            )
            ctx.progress("transcribe", index + 1, len(pieces))
    text = " ".join(s["text"] for s in segments if s["text"]).strip()
    async with ctx.stage("write"):
        reservation = ctx.reserve(".json")
        payload = {
            "text": text,
            "language": language,
            "duration": round(duration, 3),
            "segments": segments,
        }
        await ctx.blocking(
            lambda: reservation.part_path.write_text(
                json.dumps(payload, ensure_ascii=False), "utf-8"
            )
        )
    return [
        Artifact(
            kind="text",
            mime="application/json",
            duration_s=round(duration, 3),
            text=text,
            data={"language": language, "duration": round(duration, 3), "segments": segments},
            id=reservation.id,
        )
    ]


# -- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskDef:
    """How one task is prepared and run, and which setting names its default model."""

    prepare: Callable[[GenerateRequest, dict[str, Upload], InputLimits, Any], Prepared]
    run: Callable[[RunContext, Prepared], Awaitable[list[Artifact]]]
    default_model_setting: str | None
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


TASK_IMPLS: dict[str, TaskDef] = {
    "text2audio": TaskDef(
        prepare_text2audio,
        run_text2audio,
        "tts_model",
        ("prompt", "voice", "speed"),
        ("audio/wav",),
    ),
    "audio2video": TaskDef(
        prepare_audio2video,
        run_audio2video,
        "avatar_model",
        ("audio", "image", "width", "height", "fps"),
        ("video/mp4",),
    ),
    "audio2text": TaskDef(
        prepare_audio2text,
        run_audio2text,
        "stt_model",
        ("audio", "language", "reference_text"),
        ("text", "segments"),
    ),
}

# The image and video tasks live in their own module (they import this one).
from omnistream.jobs.diffusion_tasks import DIFFUSION_TASK_IMPLS  # noqa: E402

TASK_IMPLS.update(DIFFUSION_TASK_IMPLS)
