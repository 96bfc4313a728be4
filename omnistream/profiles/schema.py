"""The Runtime Profile format (OmniRT's), its checks and what serving it would do.

The format is OmniRT's published one, field for field::

    name: realtime-avatar-local
    version: 1.0.0
    description: ...
    defaults: {max_concurrency: 1, preload: true}
    environment: {OMNISTREAM_MAX_TEXT_CHARS: "2000"}
    models:
      - id: hibari
        task: text2audio
        backend: cpu                       # auto | cuda | cpu | cpu-stub | ascend
        service: text2audio.service.v1     # the adapter an extra listener serves
        port: 9012
        resources: {vram_gb: 0}
        warmup: {text: Warm up., max_chunks: 1}
        concurrency: 4
        degrade_to: espeak-ng              # a model id, or a backend name
        config: {streaming_mode: sentence}

Unknown fields are kept and reported as warnings (OmniRT's schema asks clients to treat
them as forward-compatible additions). Two kinds of problem are told apart: a file that
is wrong (bad types, a port bound to two adapters, a model listed twice) is an error; a
profile this server cannot serve exactly as written (a model it does not have, a backend
this machine lacks) is a warning that says what ``degrade_to`` would do, so a profile
written for another deployment still validates, and ``--strict`` turns those into errors.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from omnistream.engine.devices import pick_device
from omnistream.engine.registry import ModelRegistry, ModelSpec
from omnistream.jobs.schemas import TASKS
from omnistream.jobs.yamlsource import SourceDocument, SourceError

BackendName = Literal["auto", "cuda", "cpu", "cpu-stub", "ascend"]
BACKENDS: tuple[str, ...] = ("auto", "cuda", "cpu", "cpu-stub", "ascend")

#: Service adapter name → the tasks it can serve.
SERVICE_ADAPTERS: dict[str, tuple[str, ...]] = {
    "text2audio.service.v1": ("text2audio",),
    "realtime-avatar.ws.v1": ("audio2video",),
    "batch-generate.v1": TASKS,
}

#: The adapter a model's ``port`` serves when the profile names no ``service``.
DEFAULT_ADAPTER: dict[str, str] = {
    "text2audio": "text2audio.service.v1",
    "audio2video": "realtime-avatar.ws.v1",
}

#: ``warmup`` keys this server acts on (others are kept and reported).
WARMUP_KEYS: frozenset[str] = frozenset(
    {"text", "voice", "max_chunks", "preload_reference", "resident_worker", "width", "height"}
)

Level = Literal["error", "warning"]
PlanState = Literal["serve", "degraded", "unavailable"]


class ProfileDefaults(BaseModel):
    """Defaults for every model entry; other keys are kept as data."""

    model_config = ConfigDict(extra="allow")

    max_concurrency: int | None = Field(None, ge=1)
    preload: bool = False


class ProfileModel(BaseModel):
    """One model of the composition."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1)
    task: str | None = None
    backend: BackendName = "auto"
    service: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    resources: dict[str, Any] = Field(default_factory=dict)
    warmup: dict[str, Any] | bool | None = None
    concurrency: int | None = Field(None, ge=1)
    degrade_to: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    preload: bool | None = None
    description: str | None = None

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str | None) -> str | None:
        if value is not None and value not in TASKS:
            raise ValueError(f"unknown task {value!r}; tasks: {', '.join(TASKS)}")
        return value

    def adapter(self) -> str | None:
        """The service adapter this model is served through (named, or its task's)."""
        if self.service:
            return self.service
        return DEFAULT_ADAPTER.get(self.task or "", "batch-generate.v1" if self.task else None)

    def warmup_steps(self) -> dict[str, Any]:
        """``warmup`` as a mapping (``true`` means: load and warm with defaults)."""
        if isinstance(self.warmup, dict):
            return dict(self.warmup)
        return {"resident_worker": True} if self.warmup else {}


class RuntimeProfile(BaseModel):
    """A whole composition: OmniRT's Runtime Profile."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)
    version: str = "1.0.0"
    description: str = ""
    defaults: ProfileDefaults = Field(default_factory=lambda: ProfileDefaults())
    environment: dict[str, str | int | float | bool] = Field(default_factory=dict)
    models: list[ProfileModel] = Field(default_factory=list)

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        return (
            str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
        )

    def env(self) -> dict[str, str]:
        """``environment`` as strings (YAML ``true`` becomes ``"true"``)."""
        return {
            k: (str(v).lower() if isinstance(v, bool) else str(v))
            for k, v in self.environment.items()
        }

    def concurrency_of(self, model: ProfileModel) -> int | None:
        """The model's concurrency, or the profile's default."""
        return model.concurrency if model.concurrency is not None else self.defaults.max_concurrency

    def preloads(self, model: ProfileModel) -> bool:
        """Whether the model loads at start-up (its own ``preload`` or the default)."""
        return model.preload if model.preload is not None else self.defaults.preload


@dataclass(frozen=True)
class Finding:
    """One problem in a profile, located in its file.

    ``serving`` marks problems of this server rather than of the file (a model or
    backend it does not have): warnings normally, errors under ``--strict``.
    """

    level: Level
    code: str
    error: SourceError
    serving: bool = False

    def __str__(self) -> str:
        e = self.error
        where = f" ({e.location})" if e.location else ""
        return f"{e.path}:{e.line}:{e.column}: {self.level}: {e.message}{where}"

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of ``profile validate --json``."""
        e = self.error
        return {
            "level": self.level,
            "code": self.code,
            "path": e.path,
            "line": e.line,
            "column": e.column,
            "location": e.location,
            "message": e.message,
        }

    def strict(self) -> Finding:
        """The same finding as an error when it is about serving (``--strict``)."""
        if self.level == "warning" and self.serving:
            return Finding("error", self.code, self.error, self.serving)
        return self


@dataclass
class ModelPlan:
    """What serving one profile entry does on this server.

    Attributes:
        state: ``serve`` (the model itself), ``degraded`` (its ``degrade_to`` serves it:
            another model, or the same one on another backend) or ``unavailable``.
        served_by: the model id that answers its requests (None when unavailable).
        device: the device it runs on.
        reason: why it is degraded or unavailable.
    """

    id: str
    task: str | None
    service: str | None
    port: int | None
    backend: str
    state: PlanState
    served_by: str | None
    device: str | None
    reason: str = ""
    degrade_to: str | None = None
    concurrency: int | None = None
    preload: bool = False
    warmup: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON for ``/readyz``, the manifest and ``validate --json``."""
        return asdict(self)


def _device_for(spec: ModelSpec, backend: str) -> tuple[str | None, str]:
    """The device ``backend`` resolves to for ``spec``, or None and why not."""
    if backend == "ascend":
        return None, "backend 'ascend' (Huawei Ascend NPU) is not supported by this server"
    try:
        return pick_device(backend, spec.devices), ""
    except ValueError as exc:
        return None, f"backend '{backend}': {exc}"


def _problem(spec: ModelSpec | None, entry: ProfileModel, registry: ModelRegistry) -> str:
    """Why this server cannot serve the entry as written ('' when it can)."""
    if spec is None:
        task = entry.task
        known = [s.id for s in registry.specs(task, include_disallowed=True)]
        what = f"{task} models" if task else "models"
        return (
            f"model '{entry.id}' is not in this server's registry "
            f"({what} here: {', '.join(known) or 'none'})"
        )
    if not registry.allowed(spec):
        allowed = ", ".join(sorted(registry.allowed_tiers))
        return f"model '{spec.id}' is tier '{spec.tier}', outside this server's tiers ({allowed})"
    reason = spec.unavailable_reason()
    if reason is not None:
        return f"model '{spec.id}' cannot load here: {reason}"
    _, why = _device_for(spec, entry.backend)
    return why


def plan_model(
    entry: ProfileModel,
    registry: ModelRegistry,
    profile: RuntimeProfile | None = None,
    *,
    failure: str | None = None,
) -> ModelPlan:
    """What serving ``entry`` does here, including its ``degrade_to`` when it cannot.

    ``failure`` forces the degrade path (the model failed to load at start-up).
    """
    spec = registry.get(entry.id)
    problem = failure or _problem(spec, entry, registry)
    plan = ModelPlan(
        id=entry.id,
        task=entry.task or (spec.tasks[0] if spec is not None and spec.tasks else None),
        service=entry.adapter(),
        port=entry.port,
        backend=entry.backend,
        state="serve",
        served_by=entry.id,
        device=None,
        degrade_to=entry.degrade_to,
        concurrency=profile.concurrency_of(entry) if profile else entry.concurrency,
        preload=profile.preloads(entry) if profile else bool(entry.preload),
        warmup=entry.warmup_steps(),
        config=dict(entry.config),
    )
    if not problem and spec is not None:
        plan.device, _ = _device_for(spec, entry.backend)
        return plan
    plan.reason = problem
    fallback = entry.degrade_to
    if not fallback:
        plan.state, plan.served_by = "unavailable", None
        plan.reason += "; no degrade_to, so it would not be served"
        return plan
    if fallback in BACKENDS:
        usable = spec is not None and registry.allowed(spec) and spec.unavailable_reason() is None
        device, why = _device_for(spec, fallback) if usable and spec is not None else (None, "")
        if device is not None:
            plan.state, plan.device = "degraded", device
            plan.reason += f"; degrade_to '{fallback}' runs it on {device} instead"
            return plan
        plan.state, plan.served_by = "unavailable", None
        plan.reason += (
            f"; degrade_to '{fallback}' names a backend, "
            + (why if why else "which cannot stand in for the model itself")
            + ", so nothing would serve it"
        )
        return plan
    fb = registry.get(fallback)
    if fb is None:
        fb_problem = f"'{fallback}' is neither a backend nor a model here"
    elif plan.task is not None and plan.task not in fb.tasks:
        fb_problem = f"model '{fallback}' does not serve task '{plan.task}'"
    else:
        fb_problem = _problem(
            fb, entry.model_copy(update={"id": fallback, "backend": "auto"}), registry
        )
    if fb is None or fb_problem:
        plan.state, plan.served_by = "unavailable", None
        plan.reason += f"; degrade_to '{fallback}' cannot serve it either ({fb_problem})"
        return plan
    plan.state, plan.served_by = "degraded", fb.id
    plan.device, _ = _device_for(fb, "auto")
    plan.reason += f"; degrade_to '{fallback}' would serve its routes instead"
    return plan


def check_profile(
    doc: SourceDocument, registry: ModelRegistry
) -> tuple[RuntimeProfile | None, list[Finding], list[ModelPlan]]:
    """Every finding in a profile document, and each model's plan when it parses."""
    findings: list[Finding] = []

    def add(
        level: Level, code: str, loc: tuple[Any, ...], message: str, serving: bool = False
    ) -> None:
        findings.append(Finding(level, code, doc.error(loc, message), serving))

    if not isinstance(doc.data, dict):
        add("error", "schema", (), "a runtime profile must be a mapping (name, models, ...)")
        return None, findings, []
    parsed, errors = doc.validate(RuntimeProfile)
    if errors or parsed is None:
        return None, [Finding("error", "schema", e) for e in errors], []
    assert isinstance(parsed, RuntimeProfile)
    profile = parsed
    for key in profile.model_extra or {}:
        add("warning", "unknown_field", (key,), f"unknown field '{key}' (kept, not used here)")
    seen: dict[str, int] = {}
    adapters_by_port: dict[int, tuple[str, int]] = {}
    plans: list[ModelPlan] = []
    for index, entry in enumerate(profile.models):
        at: tuple[Any, ...] = ("models", index)
        for key in entry.model_extra or {}:
            add(
                "warning",
                "unknown_field",
                (*at, key),
                f"unknown field '{key}' in model '{entry.id}' (kept, not used here)",
            )
        if entry.id in seen:
            add("error", "duplicate_model", (*at, "id"), f"model '{entry.id}' is listed twice")
        seen[entry.id] = index
        spec = registry.get(entry.id)
        if spec is not None and entry.task is not None and entry.task not in spec.tasks:
            add(
                "error",
                "task_mismatch",
                (*at, "task"),
                f"model '{entry.id}' does not serve task '{entry.task}' "
                f"(it serves {', '.join(spec.tasks)})",
            )
        adapter = entry.adapter()
        if entry.service is not None and entry.service not in SERVICE_ADAPTERS:
            add(
                "warning",
                "unknown_adapter",
                (*at, "service"),
                f"service adapter '{entry.service}' is not one this server has "
                f"({', '.join(SERVICE_ADAPTERS)}); its port would not be opened",
                serving=True,
            )
        elif adapter is not None and entry.service is not None:
            task = entry.task or (spec.tasks[0] if spec is not None and spec.tasks else None)
            if task is not None and task not in SERVICE_ADAPTERS[adapter]:
                add(
                    "error",
                    "adapter_mismatch",
                    (*at, "service"),
                    f"service '{adapter}' does not serve task '{task}'",
                )
        if entry.port is not None and adapter is not None:
            other = adapters_by_port.get(entry.port)
            if other is not None and other[0] != adapter:
                add(
                    "error",
                    "port_conflict",
                    (*at, "port"),
                    f"port {entry.port} already serves '{other[0]}' "
                    f"(model '{profile.models[other[1]].id}')",
                )
            adapters_by_port.setdefault(entry.port, (adapter, index))
        for key in entry.warmup_steps():
            if key not in WARMUP_KEYS:
                add(
                    "warning",
                    "unknown_warmup",
                    (*at, "warmup", key),
                    f"warmup step '{key}' is not one this server runs "
                    f"({', '.join(sorted(WARMUP_KEYS))})",
                    serving=True,
                )
        if entry.degrade_to == entry.id:
            add("error", "self_degrade", (*at, "degrade_to"), "a model cannot degrade to itself")
        plan = plan_model(entry, registry, profile)
        plans.append(plan)
        if plan.state != "serve":
            loc = (
                (*at, "backend") if spec is not None and "backend '" in plan.reason else (*at, "id")
            )
            add("warning", f"model_{plan.state}", loc, plan.reason, serving=True)
    return profile, findings, plans


def registry_under(environment: dict[str, str], **overrides: Any) -> ModelRegistry:
    """The registry this server would build with a profile's ``environment`` applied.

    ``serve --profile`` exports the environment before reading settings, so a model
    whose weights the environment configures is servable; validation must see the same.
    The process environment is restored afterwards.
    """
    from unittest import mock

    from omnistream.models.catalog import build_registry
    from omnistream.settings import Settings

    with mock.patch.dict(os.environ, environment):
        return build_registry(Settings(**overrides))


def load_profile(
    path: str, registry: ModelRegistry | None = None, **overrides: Any
) -> tuple[RuntimeProfile | None, list[Finding], list[ModelPlan]]:
    """Read and check a profile file; YAML syntax errors come back as located findings.

    Without a ``registry`` the check uses the one this server builds under the profile's
    ``environment`` (``overrides`` go to its settings, e.g. ``model_tiers``).

    Raises:
        OSError: the file cannot be read.
    """
    import yaml

    from omnistream.jobs.yamlsource import parse_error

    try:
        doc = SourceDocument.read(path)
    except yaml.YAMLError as exc:
        return None, [Finding("error", "yaml", parse_error(exc, path))], []
    if registry is not None:
        return check_profile(doc, registry)
    profile, findings, plans = check_profile(doc, registry_under({}, **overrides))
    if profile is None or not profile.environment:
        return profile, findings, plans
    return check_profile(doc, registry_under(profile.env(), **overrides))
