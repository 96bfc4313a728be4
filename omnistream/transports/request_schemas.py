"""Request bodies of the routes that read their own body, declared for ``/openapi.json``.

Several routes parse the raw body themselves instead of taking a pydantic argument: to
enforce size limits while it streams in, to accept JSON or multipart on one path, and to
answer in their surface's error shape (OpenAI's ``{"error": …}``, OmniRT's codes) rather
than FastAPI's 422. Without a declaration the schema shows no body at all, so client
generators and API fuzzers see nothing. :func:`json_body` and :func:`body_of` turn the
models below into ``openapi_extra`` request bodies; the handlers stay the authority on
validation (the models document, they do not validate).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from omnistream.jobs.schemas import TASKS

SampleRate = Literal[8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class Text2AudioBody(_Body):
    """``POST /v1/text2audio/stream`` and ``/v1/text2audio/{model}`` (PROTOCOLS §4)."""

    text: str = Field(description="Text to speak (non-empty, at most max_text_chars)")
    model: str | None = Field(None, description="Voice model id; empty means the default")
    voice: str | None = Field(None, description="A voice of the model; empty: its default")
    speaker_profile: str | None = Field(None, description="Alias of voice")
    prompt_audio: str | None = Field(None, description="Voice cloning (refused: unsupported)")
    reference_text: str | None = Field(None, description="Voice cloning (refused)")
    audio_format: Literal["pcm_s16le", "wav"] = "pcm_s16le"
    sample_rate: SampleRate | None = Field(None, description="Output rate; default native")
    stream: bool = Field(True, description="false: one body once synthesis is done")
    speed: float | None = Field(None, ge=0.25, le=4.0)
    config: dict[str, Any] = Field(default_factory=dict, description="e.g. {speed}")


class WarmupBody(_Body):
    """``POST /v1/text2audio/warmup`` (optional body)."""

    model: str | None = None
    models: list[str] | None = None


class SpeechBody(_Body):
    """OpenAI ``POST /v1/audio/speech``."""

    input: str = Field(description="Text to speak (at most 4096 characters)")
    model: str = Field("tts-1", description="tts-1, tts-1-hd, gpt-4o-mini-tts or a model id")
    voice: str | None = Field(None, description="OpenAI voice names mean the default voice")
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"
    stream: bool = Field(
        False, description="wav only: send it while synthesised (sizes 0xFFFFFFFF)"
    )
    instructions: str | None = Field(None, description="Accepted; the voices ignore it")


class GenerateBody(_Body):
    """``POST /v1/generate`` as JSON (PROTOCOLS §5)."""

    task: str = Field(
        description="The task to run (GET /v1/models lists who serves each)",
        json_schema_extra={"enum": list(TASKS)},
    )
    model: str | None = None
    backend: Literal["auto", "cuda", "cpu", "cpu-stub"] = "auto"
    inputs: dict[str, Any] = Field(
        default_factory=dict,
        description="prompt, negative_prompt, image, mask, audio, reference_text, num_frames, "
        "fps: text, numbers, base64, data URLs, {file_id} or {path} under the allowed roots",
    )
    config: dict[str, Any] = Field(default_factory=dict)
    adapters: list[Any] | dict[str, Any] | None = None
    async_run: bool = False


class GenerateForm(_Body):
    """``POST /v1/generate`` as ``multipart/form-data``: files beside plain fields."""

    task: str
    model: str | None = None
    backend: str | None = None
    config: str | None = Field(None, description="A JSON object, as text")
    async_run: bool | None = None
    prompt: str | None = None
    audio: bytes | None = Field(None, json_schema_extra={"format": "binary"})
    image: bytes | None = Field(None, json_schema_extra={"format": "binary"})
    mask: bytes | None = Field(None, json_schema_extra={"format": "binary"})
    request: str | None = Field(None, description="The whole JSON request, as text")


class TranscriptionForm(_Body):
    """OpenAI ``POST /v1/audio/transcriptions`` (``multipart/form-data``)."""

    file: bytes = Field(json_schema_extra={"format": "binary"})
    model: str = "whisper-1"
    language: str | None = None
    prompt: str | None = None
    response_format: Literal["json", "text", "srt", "verbose_json", "vtt"] = "json"
    temperature: float | None = None


class WebRtcOfferBody(_Body):
    """``POST /v1/webrtc/offer``: a non-trickle SDP offer and the avatar's options."""

    sdp: str
    type: Literal["offer"] = "offer"
    image_b64: str | None = None
    voice: str | None = None
    tts_model: str | None = None
    fps: int | None = Field(None, ge=1, le=60)
    width: int | None = None
    height: int | None = None
    codec: Literal["vp8", "h264"] | None = None


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    """Replace ``$ref: #/$defs/X`` with the definition (our bodies are not recursive)."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.rsplit("/", 1)[1]], defs)
        return {k: _inline(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline(v, defs) for v in schema]
    return schema


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema, self-contained (no ``$defs`` to resolve)."""
    schema = model.model_json_schema()
    inlined: dict[str, Any] = _inline(schema, schema.get("$defs", {}))
    return inlined


def body_of(
    content: dict[str, type[BaseModel]], *, required: bool = True
) -> dict[str, Any]:
    """``openapi_extra`` declaring a request body per media type."""
    return {
        "requestBody": {
            "required": required,
            "content": {media: {"schema": schema_of(model)} for media, model in content.items()},
        }
    }


def json_body(model: type[BaseModel], *, required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` declaring an ``application/json`` request body."""
    return body_of({"application/json": model}, required=required)


class ImageGenerationBody(_Body):
    """OpenAI ``POST /v1/images/generations`` (``seed`` and the diffusion keys are ours)."""

    prompt: str = Field(description="What to draw")
    model: str | None = Field(None, description="A local diffusion model id (or dall-e-*)")
    n: int = Field(1, ge=1, description="Images to make (at most diffusion_max_images)")
    size: str | None = Field(None, description='"WxH", multiples of 8', examples=["512x512"])
    response_format: Literal["url", "b64_json"] = "url"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    quality: str | None = Field(None, description="low | medium | high | standard | hd")
    seed: int | None = Field(None, description="Same seed and request, same pixels")
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    scheduler: str | None = None


class ImageEditForm(_Body):
    """OpenAI ``POST /v1/images/edits`` (``multipart/form-data``)."""

    image: bytes = Field(json_schema_extra={"format": "binary"})
    mask: bytes | None = Field(
        None, json_schema_extra={"format": "binary"},
        description="PNG whose transparent pixels mark what to repaint",
    )
    prompt: str
    model: str | None = None
    n: int | None = Field(None, ge=1)
    size: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    strength: float | None = Field(None, gt=0, le=1)
    seed: int | None = None


class VideoBody(_Body):
    """``POST /v1/videos`` (OpenAI) and ``/v1/videos/generations`` (OmniRT's shape)."""

    prompt: str | None = Field(None, description="Required unless an image is given")
    model: str | None = None
    image: str | None = Field(None, description="image2video: base64, data URL or file id")
    size: str | None = Field(None, examples=["256x256"])
    seconds: float | None = Field(None, gt=0, le=60)
    num_frames: int | None = Field(None, ge=1)
    fps: int | None = Field(None, ge=1)
    seed: int | None = None
    num_inference_steps: int | None = None
    async_run: bool | None = Field(None, description="/v1/videos/generations only")


class VideoForm(VideoBody):
    """The video routes as ``multipart/form-data`` (an image file beside the fields)."""

    image: bytes | None = Field(None, json_schema_extra={"format": "binary"})  # type: ignore[assignment]
    input_reference: bytes | None = Field(None, json_schema_extra={"format": "binary"})
