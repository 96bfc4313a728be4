"""CLI subcommands: ``generate``, ``validate``, ``models`` and ``profile validate``.

``generate`` runs a task in-process on the same engine and one-shot session code the server
uses (or, with ``--server``, submits it to a running server and follows its events), shows
a progress bar on stderr, writes the outputs to a directory and prints the RunReport.
Local files named by flags or by ``{"path": …}`` in a request file are read here and sent
inline, so the server's allowed input roots never need to include a client's files.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from omnistream.jobs.schemas import TASKS, GenerateRequest
from omnistream.jobs.yamlsource import SourceDocument, parse_error

MEDIA_INPUTS = ("audio", "image", "mask")
#: Tasks the models that ship with omnistream run; the others need diffusion weights.
EMBEDDED_TASKS: tuple[str, ...] = ("audio2video", "text2audio", "audio2text")


def register(subparsers: Any) -> None:
    """Add the subcommands to ``omnistream``'s parser."""
    g = subparsers.add_parser(
        "generate", help="run an offline task (audio2video, text2audio, audio2text)"
    )
    g.add_argument("request_file", nargs="?", help="GenerateRequest as YAML or JSON ('-' = stdin)")
    g.add_argument(
        "--task",
        choices=TASKS,
        metavar="TASK",
        help=f"{', '.join(EMBEDDED_TASKS)} run on the embedded models; "
        f"{', '.join(t for t in TASKS if t not in EMBEDDED_TASKS)} only where image or video "
        "models are installed (`omnistream models` lists what runs here)",
    )
    g.add_argument("--model")
    g.add_argument("--backend", choices=["auto", "cuda", "cpu", "cpu-stub", "ascend"])
    g.add_argument("--prompt", help="text input (text2audio)")
    g.add_argument("--audio", help="audio file")
    g.add_argument("--image", help="reference image file")
    g.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an input; VALUE '@file' reads a file (repeatable)",
    )
    g.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config value, parsed as JSON when it is JSON (repeatable)",
    )
    g.add_argument("-o", "--output-dir", default="outputs", help="where outputs are written")
    g.add_argument(
        "--server", help="submit to this server (http://host:port) instead of in-process"
    )
    g.add_argument("--report", help="also write the RunReport JSON to this file")
    g.add_argument(
        "--json",
        action="store_true",
        help="print the whole result (outputs and RunReport) as JSON instead of a summary",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)

    v = subparsers.add_parser("validate", help="check a GenerateRequest file without running it")
    v.add_argument("request_file", help="YAML or JSON ('-' = stdin)")
    v.set_defaults(func=cmd_validate)

    m = subparsers.add_parser("models", help="list models, or show one (the capability manifest)")
    m.add_argument("model_id", nargs="?")
    m.add_argument("--manifest", action="store_true", help="print the Model Capability Manifest")
    m.add_argument(
        "--tier",
        action="append",
        choices=["core", "adjacent", "experimental"],
        help="only these tiers (repeatable)",
    )
    m.add_argument("--json", action="store_true", help="JSON instead of a table")
    m.add_argument(
        "--profile", help="a Runtime Profile: show what serving it does to each model"
    )
    m.set_defaults(func=cmd_models)

    p = subparsers.add_parser("profile", help="Runtime Profile tools")
    psub = p.add_subparsers(dest="profile_command", required=True)
    pv = psub.add_parser(
        "validate",
        help="check a Runtime Profile (OmniRT format): file:line:column errors and warnings",
    )
    pv.add_argument("path")
    pv.add_argument("--json", action="store_true", help="findings and the serving plan as JSON")
    pv.add_argument(
        "--strict",
        action="store_true",
        help="models or backends this server cannot serve are errors, not warnings",
    )
    pv.set_defaults(func=cmd_profile_validate)


# -- request building -------------------------------------------------------------------


def _value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _file_b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _inline_paths(inputs: dict[str, Any], base: Path) -> dict[str, Any]:
    """Replace ``{"path": p}`` and ``"@p"`` media inputs by the file's base64."""
    out = dict(inputs)
    for key, value in inputs.items():
        path: Path | None = None
        if isinstance(value, dict) and set(value) == {"path"}:
            path = Path(str(value["path"]))
        elif isinstance(value, str) and value.startswith("@"):
            path = Path(value[1:])
        if path is not None:
            if not path.is_absolute():
                path = base / path
            out[key] = _file_b64(path)
    return out


def build_request(args: argparse.Namespace) -> GenerateRequest:
    """A GenerateRequest from a request file and flags (flags win)."""
    body: dict[str, Any] = {}
    base = Path.cwd()
    if args.request_file:
        doc = SourceDocument.read(args.request_file)
        if not isinstance(doc.data, dict):
            raise SystemExit(f"{doc.path}: a request must be a mapping")
        body = dict(doc.data)
        if args.request_file != "-":
            base = Path(args.request_file).resolve().parent
    inputs = _inline_paths(dict(body.get("inputs") or {}), base)
    cwd_inputs: dict[str, Any] = {}
    for name in ("audio", "image"):
        if getattr(args, name, None):
            cwd_inputs[name] = {"path": getattr(args, name)}
    if getattr(args, "prompt", None):
        cwd_inputs["prompt"] = args.prompt
    for item in args.input:
        key, _, raw = item.partition("=")
        cwd_inputs[key] = raw if raw.startswith("@") else _value(raw)
    inputs.update(_inline_paths(cwd_inputs, Path.cwd()))
    config = dict(body.get("config") or {})
    for item in args.config:
        key, _, raw = item.partition("=")
        config[key] = _value(raw)
    for key in ("task", "model", "backend"):
        if getattr(args, key, None):
            body[key] = getattr(args, key)
    body.update(inputs=inputs, config=config, async_run=False)
    if "task" not in body:
        raise SystemExit("omnistream generate: give --task or a request file with 'task'")
    return GenerateRequest.model_validate(body)


# -- progress ----------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr (a line per stage when not a terminal)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self._last = ""

    def event(self, event: dict[str, Any]) -> None:
        if self.quiet:
            return
        name, stage = event.get("event"), event.get("stage")
        data = event.get("data") or {}
        if name == "stage_progress":
            fraction = float(data.get("fraction", 0.0))
            bar = "#" * int(fraction * 30)
            line = f"[{bar:<30}] {fraction * 100:5.1f}% {stage}"
            if self.tty:
                sys.stderr.write("\r" + line)
            elif fraction >= 1.0:
                sys.stderr.write(line + "\n")
            self._last = line
        elif name == "stage_start":
            if self.tty and self._last:
                sys.stderr.write("\n")
            self._last = ""
            sys.stderr.write(f"{stage}...\n")
        elif name in ("job_finished", "job_failed", "job_cancelled"):
            if self.tty and self._last:
                sys.stderr.write("\n")
            sys.stderr.write(f"{name}\n")
        sys.stderr.flush()


# -- generate ------------------------------------------------------------------------------


def _output_name(task: str, index: int, src: Path | str) -> str:
    suffix = Path(str(src)).suffix or ".bin"
    return f"{task}-{index}{suffix}"


def _copy_outputs(task: str, result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for index, artifact in enumerate(result["outputs"]):
        src = Path(artifact["path"])
        dest = out_dir / _output_name(task, index, src)
        shutil.copyfile(src, dest)
        artifact["path"] = str(dest)
        artifact["url"] = None


async def _generate_local(
    request: GenerateRequest, out_dir: Path, progress: Progress
) -> tuple[int, dict[str, Any]]:
    from omnistream.jobs.errors import GenerateError
    from omnistream.jobs.service import JobService
    from omnistream.settings import Settings
    from omnistream.transports.app import build_state

    tmp = Path(tempfile.mkdtemp(prefix="omnistream-artifacts-"))
    settings = Settings(artifacts_dir=str(tmp))
    state = build_state(settings)
    service = JobService(state)
    try:
        try:
            job = await service.submit(request, mode="cli")
        except GenerateError as exc:
            return 2, {"error": exc.as_dict()}
        async for event in job.follow():
            progress.event(event.model_dump(mode="json"))
        record = job.record(with_events=False).model_dump(mode="json")
        if job.state != "succeeded" or job.result is None:
            return 1, record
        result = job.result.model_dump(mode="json")
        await asyncio.to_thread(_copy_outputs, request.task, result, out_dir)
        return 0, result
    finally:
        await service.aclose()
        await asyncio.to_thread(state.engine.close)
        shutil.rmtree(tmp, ignore_errors=True)


def _generate_remote(
    request: GenerateRequest, server: str, out_dir: Path, progress: Progress
) -> tuple[int, dict[str, Any]]:
    import httpx

    try:
        return _run_remote(request, server, out_dir, progress)
    except httpx.HTTPError as exc:
        # One line, not a traceback: the usual causes are a wrong URL or a server down.
        reason = str(exc) or type(exc).__name__
        return 3, {"error": {"code": "server_unreachable", "message": f"{server}: {reason}"}}


def _error_body(response: Any) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        return body
    text = response.text.strip()[:200] or response.reason_phrase
    return {"error": {"code": f"http_{response.status_code}", "message": text}}


def _run_remote(
    request: GenerateRequest, server: str, out_dir: Path, progress: Progress
) -> tuple[int, dict[str, Any]]:
    import httpx

    body = request.model_dump(mode="json") | {"async_run": True}
    with httpx.Client(
        base_url=server.rstrip("/"), timeout=httpx.Timeout(30.0, read=None)
    ) as client:
        response = client.post("/v1/generate", json=body)
        if response.status_code != 200:
            return 2, _error_body(response)
        job_id = response.json()["id"]
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    progress.event(json.loads(line[6:]))
        record = client.get(f"/v1/jobs/{job_id}").json()
        if record.get("state") != "succeeded":
            record.pop("events", None)
            return 1, record
        result: dict[str, Any] = record["result"]
        out_dir.mkdir(parents=True, exist_ok=True)
        for index, artifact in enumerate(result["outputs"]):
            dest = out_dir / _output_name(
                request.task, index, artifact.get("path") or artifact["url"]
            )
            with client.stream("GET", artifact["url"]) as download, dest.open("wb") as fh:
                download.raise_for_status()
                for chunk in download.iter_bytes():
                    fh.write(chunk)
            artifact["path"] = str(dest)
        return 0, result


def cmd_generate(args: argparse.Namespace) -> int:
    """``omnistream generate``: run, write outputs, print the report (JSON on stdout)."""
    from pydantic import ValidationError

    try:
        request = build_request(args)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'request'}: "
            f"{(err.get('ctx') or {}).get('error') or err['msg']}"
            for err in exc.errors()
        )
        sys.stderr.write(f"omnistream generate: invalid request: {problems}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"cannot read input: {exc}\n")
        return 2
    progress = Progress(args.quiet)
    out_dir = Path(args.output_dir)
    if args.server:
        code, result = _generate_remote(request, args.server, out_dir, progress)
    else:
        code, result = asyncio.run(_generate_local(request, out_dir, progress))
    if code == 0 and args.report:
        Path(args.report).write_text(json.dumps(result["metadata"], indent=2), encoding="utf-8")
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif code == 0:
        print(summary(result))
    else:
        sys.stderr.write(f"omnistream generate: {failure(result)}\n")
    return code


def summary(result: dict[str, Any]) -> str:
    """A few lines for a person: what ran, how long it took, where the outputs are.

    The full RunReport (timings per stage, events, placement…) is ``--json`` or
    ``--report FILE``: a hundred lines nobody reads by default.
    """
    report = result.get("metadata") or {}
    timings = report.get("timings") or {}
    total_ms = timings.get("total_ms") or sum(float(v) for v in timings.values())
    lines = [
        f"{report.get('task', '?')} on {report.get('model', '?')}: done in "
        f"{float(total_ms) / 1000:.2f} s (job {report.get('job_id') or '-'})"
    ]
    for artifact in result.get("outputs") or []:
        details = [artifact.get("mime") or artifact.get("kind") or ""]
        if artifact.get("duration_s") is not None:
            details.append(f"{float(artifact['duration_s']):.2f} s")
        if artifact.get("width") and artifact.get("height"):
            details.append(f"{artifact['width']}x{artifact['height']}")
        lines.append(f"  {artifact.get('path') or artifact.get('url')}  ({', '.join(details)})")
        text = artifact.get("text")
        if text:
            lines.append(f"  text: {text if len(text) <= 200 else text[:200] + '…'}")
    return "\n".join(lines)


def failure(result: dict[str, Any]) -> str:
    """One line saying why a run failed or was refused."""
    error = result.get("error")
    if isinstance(error, dict):
        code, message = error.get("code"), error.get("message")
        return f"{code}: {message}" if code else str(message)
    if error:
        return str(error)
    return f"job {result.get('id', '?')} ended {result.get('state', 'badly')}"


# -- validate ------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    """``omnistream validate``: schema, task, model and inputs of a request file."""
    from omnistream.jobs.errors import GenerateError
    from omnistream.jobs.service import JobService
    from omnistream.jobs.tasks import TASK_IMPLS
    from omnistream.settings import Settings
    from omnistream.transports.app import build_state

    try:
        doc = SourceDocument.read(args.request_file)
    except yaml.YAMLError as exc:
        print(parse_error(exc, args.request_file), file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{args.request_file}: {exc}", file=sys.stderr)
        return 1
    if not isinstance(doc.data, dict):
        print(
            doc.error((), "a request must be a mapping with 'task' and 'inputs'"), file=sys.stderr
        )
        return 1
    parsed, errors = doc.validate(GenerateRequest)
    if errors or parsed is None:
        for error in errors:
            print(error, file=sys.stderr)
        return 1
    assert isinstance(parsed, GenerateRequest)
    base = Path(args.request_file).resolve().parent if args.request_file != "-" else Path.cwd()
    try:
        inputs = _inline_paths(parsed.inputs, base)
    except OSError as exc:
        print(doc.error(("inputs",), f"cannot read input file: {exc}"), file=sys.stderr)
        return 1
    request = parsed.model_copy(update={"inputs": inputs})
    state = build_state(Settings())
    service = JobService(state)
    try:
        spec = service.resolve(request)
        TASK_IMPLS[request.task].prepare(request, {}, service.limits, spec)
    except GenerateError as exc:
        loc: tuple[Any, ...] = ("model",) if "model" in exc.code else ("task",)
        if exc.code.endswith("input") or (
            exc.code.startswith("invalid_") and "config" not in exc.code
        ):
            loc = ("inputs",)
        if "config" in exc.code:
            loc = ("config",)
        print(doc.error(loc, f"{exc.code}: {exc.message}"), file=sys.stderr)
        return 1
    finally:
        state.engine.close()
    print(f"{doc.path}: ok (task {request.task}, model {spec.id})")
    return 0


# -- models --------------------------------------------------------------------------------


def manifest(spec: Any) -> Any:
    """The Model Capability Manifest of one model (OmniRT field names)."""
    from omnistream.profiles.manifest import manifest_of

    return manifest_of(spec)


def cmd_models(args: argparse.Namespace) -> int:
    """``omnistream models``: the registry, tier-filtered; one model's manifest by id."""
    from omnistream.models.catalog import build_registry
    from omnistream.profiles.manifest import MANIFEST_SCHEMA_VERSION, manifest_entry, manifest_of
    from omnistream.profiles.schema import ModelPlan, load_profile
    from omnistream.settings import Settings

    settings = Settings(**({"model_tiers": args.tier} if args.tier else {}))
    registry = build_registry(settings)
    specs = registry.specs()
    plans: dict[str, ModelPlan] = {}
    if args.profile:
        try:
            tiers = {"model_tiers": args.tier} if args.tier else {}
            _, findings, plan_list = load_profile(args.profile, **tiers)
        except OSError as exc:
            print(f"{args.profile}: {exc}", file=sys.stderr)
            return 1
        for finding in findings:
            if finding.level == "error":
                print(finding, file=sys.stderr)
        plans = {p.id: p for p in plan_list}
    if args.model_id:
        spec = registry.get(args.model_id)
        if spec is None:
            print(
                f"unknown model '{args.model_id}'; known: {', '.join(s.id for s in specs)}",
                file=sys.stderr,
            )
            return 1
        if not registry.allowed(spec):
            print(
                f"model '{args.model_id}' is tier '{spec.tier}', "
                f"outside {', '.join(args.tier or [])}",
                file=sys.stderr,
            )
            return 1
        specs = [spec]
    if args.model_id:
        print(json.dumps(manifest_of(specs[0], plans.get(specs[0].id)), indent=2, default=str))
        return 0
    if args.manifest:
        entries = [manifest_entry(s, task, plans.get(s.id)) for s in specs for task in s.tasks]
        payload: Any = {"schema_version": MANIFEST_SCHEMA_VERSION, "models": entries}
        print(json.dumps(payload, indent=2, default=str))
        return 0
    if args.json:
        payload = {
            "models": [
                {
                    "id": s.id,
                    "tasks": list(s.tasks),
                    "tier": str(s.tier),
                    "available": s.unavailable_reason() is None,
                    "reason": s.unavailable_reason() or "",
                }
                for s in specs
            ]
        }
        print(json.dumps(payload, indent=2, default=str))
        return 0
    rows = [("ID", "TASKS", "TIER", "MATURITY", "AVAILABLE")]
    for s in specs:
        reason = s.unavailable_reason()
        rows.append(
            (
                s.id,
                ",".join(s.tasks),
                str(s.tier),
                s.maturity,
                "yes" if reason is None else f"no: {reason}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
    return 0


# -- profile ---------------------------------------------------------------------------------


def cmd_profile_validate(args: argparse.Namespace) -> int:
    """``omnistream profile validate``: findings as ``file:line:column: level: message``.

    Exit 0 when there are no errors (warnings are printed), 1 otherwise. With ``--json``
    the findings and each model's serving plan go to stdout as one object.
    """
    from omnistream.profiles.schema import load_profile

    try:
        profile, findings, plans = load_profile(args.path)  # under its own environment
    except OSError as exc:
        print(f"{args.path}: {exc}", file=sys.stderr)
        return 1
    if args.strict:
        findings = [f.strict() for f in findings]
    errors = [f for f in findings if f.level == "error"]
    warnings = [f for f in findings if f.level == "warning"]
    if args.json:
        payload = {
            "path": args.path,
            "valid": not errors,
            "strict": bool(args.strict),
            "name": profile.name if profile else None,
            "version": profile.version if profile else None,
            "errors": [f.as_dict() for f in errors],
            "warnings": [f.as_dict() for f in warnings],
            "models": [p.as_dict() for p in plans],
        }
        print(json.dumps(payload, indent=2, default=str))
        return 1 if errors else 0
    for finding in findings:
        print(finding, file=sys.stderr)
    if errors:
        return 1
    served = sum(1 for p in plans if p.state != "unavailable")
    summary = f"{len(warnings)} warning(s)" if warnings else "no warnings"
    print(f"{args.path}: ok ({served} of {len(plans)} model(s) servable here; {summary})")
    return 0
