"""The public catalog of the hosted task API: model groups, task types and their schemas.

A *task type* (``text_to_image``, ``single_image_edit``…) is what a client asks for; it
runs as one of the job engine's tasks (``text2image``, ``edit``…) on a model this server
has. A *model group* (``omni-image-aio``…) bundles task types under one name. Each task
type publishes the JSON Schema of its ``input`` (generated from the pydantic model that
also validates it, so the two cannot drift), the file fields a client uploads through
``files_to_upload`` and the JSON Schema of one output.

Which groups are shown follows what is loaded: a task type is ready when some model that
serves one of its engine tasks is allowed by the tier policy and can load here; a group
is ready when one of its task types is. An operator may define, rename or hide groups in
a YAML file (``--omni-groups FILE``); see :func:`load_groups`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from omnistream.engine.registry import ModelRegistry, ModelSpec
from omnistream.omni_api.errors import OmniError

# -- inputs -------------------------------------------------------------------------------

Prompt = Annotated[
    str, Field(min_length=1, max_length=20_000, description="What to generate, in words.")
]
Size = Annotated[
    int, Field(ge=16, le=8192, multiple_of=8, description="Pixels; a multiple of 8.")
]
Steps = Annotated[int, Field(ge=1, le=1000, description="Denoising steps.")]
Guidance = Annotated[float, Field(ge=0.0, le=50.0, description="Classifier-free guidance.")]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1, description="Same seed, same result.")]
Strength = Annotated[
    float, Field(gt=0.0, le=1.0, description="How far from the source image to move (0-1].")
]
Frames = Annotated[int, Field(ge=1, le=1024, description="Video frames.")]
Fps = Annotated[int, Field(ge=1, le=60, description="Frames per second.")]


class _Input(BaseModel):
    """Strict: unknown fields and wrongly typed values are refused, naming the field."""

    model_config = ConfigDict(extra="forbid", strict=True)


class _ImageParams(_Input):
    negative_prompt: str | None = Field(None, max_length=20_000)
    width: Size | None = None
    height: Size | None = None
    num_inference_steps: Steps | None = None
    guidance_scale: Guidance | None = None
    seed: Seed | None = None
    num_images: Annotated[int, Field(ge=1, le=16)] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    preset: Literal["fast", "balanced", "quality"] | None = None


class TextToImageInput(_ImageParams):
    """``text_to_image``."""

    prompt: Prompt


class ImageToImageInput(TextToImageInput):
    """``image_to_image`` (the source image is an upload)."""

    strength: Strength | None = None


class EditInput(ImageToImageInput):
    """``single_image_edit``: an instruction applied to the uploaded image."""

    image_guidance_scale: Annotated[float, Field(ge=0.0, le=20.0)] | None = None


class InpaintInput(ImageToImageInput):
    """``inpaint``: repaint where the uploaded mask is white."""


class _VideoParams(_Input):
    negative_prompt: str | None = Field(None, max_length=20_000)
    width: Size | None = None
    height: Size | None = None
    num_frames: Frames | None = None
    fps: Fps | None = None
    num_inference_steps: Steps | None = None
    guidance_scale: Guidance | None = None
    seed: Seed | None = None


class TextToVideoInput(_VideoParams):
    """``text_to_video``."""

    prompt: Prompt


class ImageToVideoInput(_VideoParams):
    """``image_to_video``: animate the uploaded image."""

    prompt: str | None = Field(None, max_length=20_000)


class AudioToVideoInput(_Input):
    """``audio_to_video``: a talking head from a portrait and speech (both uploads)."""

    width: Annotated[int, Field(ge=16, le=4096, multiple_of=2)] | None = None
    height: Annotated[int, Field(ge=16, le=4096, multiple_of=2)] | None = None
    fps: Fps | None = None


class TextToSpeechInput(_Input):
    """``text_to_speech``."""

    text: Annotated[str, Field(min_length=1, max_length=100_000, description="What to say.")]
    voice: str | None = Field(None, max_length=128, description="A voice of the model.")
    speed: Annotated[float, Field(ge=0.25, le=4.0)] | None = Field(
        None, description="Speaking rate; 1 is normal."
    )
    sample_rate: Annotated[int, Field(ge=8000, le=48000)] | None = Field(
        None, description="Output sample rate in Hz (the model's own if absent)."
    )


class SpeechToTextInput(_Input):
    """``speech_to_text`` (the audio is an upload)."""

    language: str | None = Field(None, max_length=16, description="e.g. 'en'.")
    prompt: str | None = Field(None, max_length=2000, description="Words to expect.")


class OmniOutput(BaseModel):
    """One output of a finished task, as ``GET /api/omni/tasks/{id}`` lists it."""

    kind: Literal["image", "video", "audio", "text"]
    url: str = Field(description="Signed, expiring URL of the file; no key needed.")
    mime: str
    width: int | None = None
    height: int | None = None
    duration_s: float | None = None
    num_frames: int | None = None
    bytes: int | None = None
    text: str | None = Field(None, description="The transcript (speech_to_text).")
    expires_at: str = Field(description="When the URL stops working (ISO 8601, UTC).")


# -- task types ---------------------------------------------------------------------------

IMAGE_TYPES: tuple[str, ...] = ("image/png", "image/jpeg", "image/webp")
AUDIO_TYPES: tuple[str, ...] = (
    "audio/wav",
    "audio/x-wav",
    "audio/wave",
    "audio/mpeg",
    "audio/flac",
    "audio/ogg",
    "audio/webm",
    "audio/mp4",
)


#: Generated JSON Schemas by (task type, "input" | "output"); read-only once made.
_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {}


@dataclass(frozen=True)
class FileField:
    """A file a task type takes through an upload slot."""

    field: str
    job_input: str
    required: bool
    content_types: tuple[str, ...]
    summary: str

    def describe(self) -> dict[str, Any]:
        """The catalog's description of the slot."""
        return {
            "field": self.field,
            "required": self.required,
            "content_types": list(self.content_types),
            "description": self.summary,
        }


@dataclass(frozen=True)
class TaskType:
    """A task type: its engine tasks (preferred first), input model, files and output."""

    name: str
    job_tasks: tuple[str, ...]
    input_model: type[_Input]
    files: tuple[FileField, ...]
    output_kind: Literal["image", "video", "audio", "text"]
    summary: str
    renames: Mapping[str, str] = field(default_factory=dict)

    def file(self, name: str) -> FileField | None:
        """The file field of that name."""
        return next((f for f in self.files if f.field == name), None)

    def input_schema(self) -> dict[str, Any]:
        """JSON Schema of ``input`` (made once: generating it costs milliseconds)."""
        key = (self.name, "input")
        if key not in _SCHEMAS:
            schema = self.input_model.model_json_schema()
            schema["title"] = f"{self.name} input"
            schema["description"] = self.summary
            _SCHEMAS[key] = schema
        return _SCHEMAS[key]

    def output_schema(self) -> dict[str, Any]:
        """JSON Schema of one item of ``outputs`` (made once)."""
        key = (self.name, "output")
        if key not in _SCHEMAS:
            schema = OmniOutput.model_json_schema()
            schema["title"] = f"{self.name} output"
            schema["description"] = "One item of the task's outputs once it succeeded."
            schema["properties"]["kind"] = {"const": self.output_kind, "type": "string"}
            _SCHEMAS[key] = schema
        return _SCHEMAS[key]

    def validate(self, raw: Any) -> dict[str, Any]:
        """``input`` checked against the schema; returns the job's inputs.

        Raises:
            OmniError: 400 ``invalid_input`` naming the first offending field.
        """
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise OmniError(400, "invalid_input", "input: must be a JSON object.")
        try:
            parsed = self.input_model.model_validate(raw)
        except ValidationError as exc:
            raise OmniError(400, "invalid_input", self._message(exc)) from exc
        values = parsed.model_dump(exclude_none=True)
        return {self.renames.get(k, k): v for k, v in values.items()}

    def _message(self, exc: ValidationError) -> str:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        path = f"input.{where}" if where else "input"
        if first.get("type") == "extra_forbidden":
            name = str(first["loc"][0]) if first.get("loc") else ""
            if self.file(name) is not None:
                return (
                    f"{path}: '{name}' is a file: declare it in files_to_upload and PUT it "
                    "to the upload_url the create call returns."
                )
            known = ", ".join(self.input_model.model_fields)
            return f"{path}: unknown field for {self.name}; its fields are: {known}."
        message = f"{path}: {first.get('msg', 'invalid value')}"
        more = len(exc.errors()) - 1
        return message + (f" (and {more} more problem{'s' * (more > 1)})" if more else ".")


_SOURCE = FileField("source_image", "image", True, IMAGE_TYPES, "The image to start from.")

TASK_TYPES: dict[str, TaskType] = {
    t.name: t
    for t in (
        TaskType("text_to_image", ("text2image",), TextToImageInput, (), "image",
                 "An image from a prompt."),
        TaskType("image_to_image", ("image2image",), ImageToImageInput, (_SOURCE,), "image",
                 "A new image from a prompt and a source image."),
        TaskType("single_image_edit", ("edit", "image2image"), EditInput, (_SOURCE,), "image",
                 "The source image changed as the prompt says (an instruction-edit pipeline "
                 "when one is loaded, else image-to-image)."),
        TaskType(
            "inpaint",
            ("inpaint",),
            InpaintInput,
            (_SOURCE, FileField("mask_image", "mask", True, IMAGE_TYPES,
                                "White where to repaint; the source image's size.")),
            "image",
            "The masked part of the source image repainted from the prompt.",
        ),
        TaskType("text_to_video", ("text2video",), TextToVideoInput, (), "video",
                 "A short video (MP4) from a prompt."),
        TaskType("image_to_video", ("image2video",), ImageToVideoInput, (_SOURCE,), "video",
                 "The source image animated into a short video (MP4)."),
        TaskType(
            "audio_to_video",
            ("audio2video",),
            AudioToVideoInput,
            (
                FileField("audio", "audio", True, AUDIO_TYPES, "The speech to lip-sync."),
                FileField("portrait_image", "image", False, IMAGE_TYPES,
                          "The face to animate (the bundled portrait if absent)."),
            ),
            "video",
            "A talking-head video (MP4 with the speech) from a portrait and speech.",
        ),
        TaskType("text_to_speech", ("text2audio",), TextToSpeechInput, (), "audio",
                 "Speech (WAV) from text.", {"text": "prompt"}),
        TaskType(
            "speech_to_text",
            ("audio2text",),
            SpeechToTextInput,
            (FileField("audio", "audio", True, AUDIO_TYPES, "The speech to transcribe."),),
            "text",
            "A transcript with timed segments (JSON) from speech.",
            {"prompt": "reference_text"},
        ),
    )
}
"""Every task type this server knows, by name."""

# -- groups -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupDef:
    """A model group: its task types, each optionally narrowed to listed models.

    ``task_types`` maps a task type to the models it may run on, in order of preference
    (``None``: any model that serves it, the server's configured default first).
    """

    id: str
    title: str
    summary: str
    task_types: dict[str, tuple[str, ...] | None]
    hidden: bool = False


DEFAULT_GROUPS: tuple[GroupDef, ...] = (
    GroupDef(
        "omni-image-aio",
        "Omni Image AIO",
        "Image generation and editing on the diffusion pipelines this server loads.",
        {"text_to_image": None, "image_to_image": None, "single_image_edit": None,
         "inpaint": None},
    ),
    GroupDef("omni-video", "Omni Video", "Short video generation (MP4).",
             {"text_to_video": None, "image_to_video": None}),
    GroupDef("omni-avatar", "Omni Avatar", "Talking heads from a portrait and speech.",
             {"audio_to_video": None}),
    GroupDef("omni-tts", "Omni TTS", "Text to speech.", {"text_to_speech": None}),
    GroupDef("omni-stt", "Omni STT", "Speech to text.", {"speech_to_text": None}),
)

#: How long a model's availability check is trusted before it runs again.
REASON_TTL_S = 5.0

_GROUP_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_GROUP_FIELDS = frozenset({"id", "replaces", "title", "summary", "task_types", "hidden"})


class GroupsFileError(ValueError):
    """The groups file cannot be used; the message names the entry and the problem."""


def _task_types(raw: Any, where: str) -> dict[str, tuple[str, ...] | None]:
    if isinstance(raw, list):
        raw = {name: None for name in raw}
    if not isinstance(raw, dict) or not raw:
        raise GroupsFileError(
            f"{where}: 'task_types' must be a non-empty list of task types, or a mapping of "
            "task type to {models: [...]}"
        )
    out: dict[str, tuple[str, ...] | None] = {}
    for name, options in raw.items():
        if name not in TASK_TYPES:
            raise GroupsFileError(
                f"{where}: unknown task type {name!r} (known: {', '.join(TASK_TYPES)})"
            )
        models = None
        if isinstance(options, dict):
            unknown = sorted(set(options) - {"models"})
            if unknown:
                raise GroupsFileError(f"{where}.{name}: unknown field(s) {', '.join(unknown)}")
            models = options.get("models")
        elif options is not None:
            raise GroupsFileError(f"{where}.{name}: expected a mapping like {{models: [...]}}")
        if models is not None:
            if isinstance(models, str):
                models = [models]
            if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
                raise GroupsFileError(f"{where}.{name}: 'models' must be a list of model ids")
            out[name] = tuple(models)
        else:
            out[name] = None
    return out


def parse_groups(data: Any, defaults: Iterable[GroupDef] = DEFAULT_GROUPS) -> list[GroupDef]:
    """Groups from a parsed groups file, applied over the defaults.

    The file holds ``groups:`` (a list) and optionally ``include_defaults: false``. An
    entry whose ``id`` is a default group changes it (``hidden: true`` hides it); one
    with ``replaces: <default id>`` takes that group's place under a new id (a rename),
    inheriting what it does not set; any other entry is a new group and must list its
    ``task_types``.

    Raises:
        GroupsFileError: malformed entries, unknown task types, repeated ids.
    """
    if data is None:
        data = {}
    if isinstance(data, list):
        data = {"groups": data}
    if not isinstance(data, dict):
        raise GroupsFileError("expected a mapping with 'groups' (a list of groups)")
    unknown_top = sorted(set(data) - {"groups", "include_defaults"})
    if unknown_top:
        raise GroupsFileError(f"unknown top-level field(s) {', '.join(unknown_top)}")
    include = data.get("include_defaults", True)
    if not isinstance(include, bool):
        raise GroupsFileError("'include_defaults' must be true or false")
    groups: dict[str, GroupDef] = {g.id: g for g in defaults} if include else {}
    known_defaults = {g.id: g for g in defaults}
    entries = data.get("groups") or []
    if not isinstance(entries, list):
        raise GroupsFileError("'groups' must be a list")
    seen: set[str] = set()
    for index, raw in enumerate(entries):
        where = f"group #{index + 1}"
        if not isinstance(raw, dict):
            raise GroupsFileError(f"{where}: expected a mapping with 'id'")
        unknown = sorted(set(raw) - _GROUP_FIELDS)
        if unknown:
            raise GroupsFileError(f"{where}: unknown field(s) {', '.join(unknown)}")
        group_id = raw.get("id")
        if not isinstance(group_id, str) or not _GROUP_ID.match(group_id):
            raise GroupsFileError(
                f"{where}: 'id' must be lowercase letters, digits, '.', '_' or '-' "
                "(at most 64 characters)"
            )
        where = f"group '{group_id}'"
        if group_id in seen:
            raise GroupsFileError(f"{where} appears twice")
        seen.add(group_id)
        base = groups.get(group_id) or known_defaults.get(group_id)
        replaces = raw.get("replaces")
        if replaces is not None:
            if replaces not in known_defaults:
                raise GroupsFileError(
                    f"{where}: 'replaces' must name a default group "
                    f"({', '.join(known_defaults)}), not {replaces!r}"
                )
            base = known_defaults[replaces]
        for text_field in ("title", "summary"):
            if text_field in raw and not isinstance(raw[text_field], str):
                raise GroupsFileError(f"{where}: '{text_field}' must be a string")
        hidden = raw.get("hidden", base.hidden if base else False)
        if not isinstance(hidden, bool):
            raise GroupsFileError(f"{where}: 'hidden' must be true or false")
        if "task_types" in raw:
            task_types = _task_types(raw["task_types"], where)
        elif base is not None:
            task_types = dict(base.task_types)
        else:
            raise GroupsFileError(f"{where}: a new group needs 'task_types'")
        group = GroupDef(
            group_id,
            str(raw.get("title", base.title if base else group_id)),
            str(raw.get("summary", base.summary if base else "")),
            task_types,
            hidden,
        )
        if replaces is not None and replaces in groups:
            # Keep the renamed group where the original was listed.
            groups = {(group_id if k == replaces else k): (group if k == replaces else v)
                      for k, v in groups.items()}
        else:
            groups[group_id] = group
    return list(groups.values())


def load_groups(path: str | Path | None) -> list[GroupDef]:
    """The groups of this server: the defaults, changed by the groups file when given.

    Raises:
        GroupsFileError: the file is unreadable or malformed.
    """
    if not path:
        return list(DEFAULT_GROUPS)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise GroupsFileError(f"cannot read groups file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise GroupsFileError(f"groups file {path} is not valid YAML or JSON: {exc}") from exc
    try:
        return parse_groups(data)
    except GroupsFileError as exc:
        raise GroupsFileError(f"groups file {path}: {exc}") from exc


# -- resolving against the registry -------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where a task type runs now: the engine task and the models that can serve it."""

    job_task: str | None
    models: tuple[str, ...]
    reason: str | None

    @property
    def ready(self) -> bool:
        """Whether some model can serve the task type."""
        return self.job_task is not None and bool(self.models)


@dataclass(frozen=True)
class Resolved:
    """A create request's task type, engine task and model."""

    group: GroupDef
    task_type: TaskType
    job_task: str
    model: str


class Catalog:
    """Groups resolved against a model registry.

    Args:
        groups: the groups in force (defaults and the groups file).
        registry: the server's models (tier policy applied by the registry).
        preferred: engine task → the model configured as its default (listed first).
        runnable: engine tasks the job engine implements.
    """

    def __init__(
        self,
        groups: list[GroupDef],
        registry: ModelRegistry,
        preferred: Mapping[str, str | None],
        runnable: Iterable[str],
    ) -> None:
        self.groups = groups
        self.registry = registry
        self.preferred = dict(preferred)
        self.runnable = frozenset(runnable)
        self._reasons: dict[str, tuple[float, str | None]] = {}

    def _reason(self, spec: ModelSpec) -> str | None:
        """Why a model cannot load here, remembered for a few seconds: the checks look
        for packages and files, and the catalog is asked on the event loop."""
        now = time.monotonic()
        known = self._reasons.get(spec.id)
        if known is not None and now - known[0] < REASON_TTL_S:
            return known[1]
        reason = spec.unavailable_reason()
        self._reasons[spec.id] = (now, reason)
        return reason

    def _candidates(self, job_task: str, only: tuple[str, ...] | None) -> list[ModelSpec]:
        specs = self.registry.specs(job_task)
        if only is not None:
            by_id = {s.id: s for s in specs}
            return [by_id[m] for m in only if m in by_id]
        preferred = self.preferred.get(job_task)
        return sorted(specs, key=lambda s: s.id != preferred)

    def place(
        self, task_type: TaskType, only: tuple[str, ...] | None,
        tiers: frozenset[str] | None = None,
    ) -> Placement:
        """The first engine task of ``task_type`` with a model that can load here.

        ``tiers`` narrows the models to a key's tiers.
        """
        reasons: list[str] = []
        for job_task in task_type.job_tasks:
            if job_task not in self.runnable:
                reasons.append(f"the job engine here has no '{job_task}' task")
                continue
            candidates = self._candidates(job_task, only)
            if tiers is not None and candidates:
                outside = [s.id for s in candidates if str(s.tier) not in tiers]
                candidates = [s for s in candidates if str(s.tier) in tiers]
                if not candidates:
                    reasons.append(
                        f"this key's tiers ({', '.join(sorted(tiers))}) allow none of "
                        f"{', '.join(outside)}"
                    )
                    continue
            if not candidates:
                listed = f" among {', '.join(only)}" if only else ""
                reasons.append(f"no model serves '{job_task}'{listed} on this server")
                continue
            ready: list[str] = []
            for spec in candidates:
                why = self._reason(spec)
                if why is None:
                    ready.append(spec.id)
                else:
                    reasons.append(f"{spec.id}: {why}")
            if ready:
                return Placement(job_task, tuple(ready), None)
        return Placement(None, (), "; ".join(reasons) or "no model")

    def describe(self, *, include_hidden: bool) -> list[dict[str, Any]]:
        """The catalog: ready groups with their ready task types (all, with reasons,
        when ``include_hidden``)."""
        out: list[dict[str, Any]] = []
        for group in self.groups:
            types: list[dict[str, Any]] = []
            for name, only in group.task_types.items():
                task_type = TASK_TYPES[name]
                placement = self.place(task_type, only)
                if not placement.ready and not include_hidden:
                    continue
                entry: dict[str, Any] = {
                    "task_type": name,
                    "description": task_type.summary,
                    "models": list(placement.models),
                    "input_schema": task_type.input_schema(),
                    "files": [f.describe() for f in task_type.files],
                    "output_schema": task_type.output_schema(),
                }
                if include_hidden:
                    entry["ready"] = placement.ready
                    entry["runs_as"] = placement.job_task
                    if placement.reason:
                        entry["reason"] = placement.reason
                types.append(entry)
            ready = any(t.get("models") for t in types)
            if (not ready or group.hidden) and not include_hidden:
                continue
            item: dict[str, Any] = {
                "model_group": group.id,
                "title": group.title,
                "description": group.summary,
                "task_types": types,
            }
            if include_hidden:
                item["ready"] = ready and not group.hidden
                reasons = []
                if group.hidden:
                    reasons.append("hidden by the groups file")
                if not ready:
                    reasons.append("no task type has a model that can run here")
                if reasons:
                    item["reason"] = "; ".join(reasons)
            out.append(item)
        return out

    def resolve(
        self, group_id: str, task_type_name: str, tiers: frozenset[str] | None = None
    ) -> Resolved:
        """The engine task and model a create request runs on.

        Raises:
            OmniError: 400 naming ``model_group`` or ``task_type`` when unknown, 503 when
                the task type has no model that can run here now.
        """
        group = next((g for g in self.groups if g.id == group_id and not g.hidden), None)
        if group is None:
            shown = ", ".join(g["model_group"] for g in self.describe(include_hidden=False))
            raise OmniError(
                400,
                "invalid_model_group",
                f"model_group: unknown model group {group_id!r}; this server has: "
                f"{shown or 'none'}.",
            )
        if task_type_name not in group.task_types:
            raise OmniError(
                400,
                "invalid_task_type",
                f"task_type: {group.id} has no task type {task_type_name!r}; it has: "
                f"{', '.join(group.task_types)}.",
            )
        task_type = TASK_TYPES[task_type_name]
        placement = self.place(task_type, group.task_types[task_type_name], tiers)
        if not placement.ready or placement.job_task is None:
            raise OmniError(
                503,
                "task_type_unavailable",
                f"{group.id}/{task_type_name} cannot run on this server now: "
                f"{placement.reason}.",
            )
        return Resolved(group, task_type, placement.job_task, placement.models[0])
