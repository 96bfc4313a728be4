"""``omnistream bench avatar`` and ``omnistream bench tts``.

Options can also come from a scenario file (``--scenario bench/scenarios/x.toml``, an
``[options]`` table whose keys are the long option names); options given on the command
line win over the file, and the file wins over the built-in defaults. That keeps the
project's own benchmark scenarios in ``bench/scenarios/`` reproducible by name.

Exit status: 0 report written; 1 report written but nothing at all could be measured
(every session or request failed: see the errors in it); 2 bad usage; 3 refused,
because the benchmark client itself fell behind and its figures would be wrong
(``--force`` writes the report anyway, marked).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
import tomllib
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from omnistream.bench.audio import SAMPLE_RATE, load_audio, synth_speech
from omnistream.bench.avatar import (
    AvatarRun,
    AvatarScenario,
    RampResult,
    run_avatar,
    run_ramp,
)
from omnistream.bench.images import load_ref_image
from omnistream.bench.report import (
    AVATAR_RATIO_KEYS,
    TTS_RATIO_KEYS,
    avatar_markdown,
    build_report,
    compare,
    machine_info,
    ramp_markdown,
    tts_markdown,
    write_report,
)
from omnistream.bench.tts import TtsRun, TtsScenario, run_tts

T = TypeVar("T")

EXIT_OK = 0
EXIT_NOTHING_MEASURED = 1
EXIT_USAGE = 2
EXIT_CLIENT_BEHIND = 3

SYNTH_AUDIO_S = 20.0
"""Length of the synthesised speech; sessions loop it and start at different offsets."""

AVATAR_DEFAULTS: dict[str, Any] = {
    "url": None,
    "protocol": "flashtalk",
    "sessions": 1,
    "duration": 10.0,
    "chunk_samples": None,
    "width": None,
    "height": None,
    "fps": None,
    "model": "flashtalk",
    "audio": None,
    "ref_image": None,
    "ramp": False,
    "ramp_start": 1,
    "ramp_max": 64,
    "ramp_factor": 2.0,
    "ramp_step": 0,
    "ramp_refine": 3,
    "p95_bound_ms": None,
    "late_tolerance": 0.0,
    "compare": None,
    "compare_protocol": None,
    "rounds": 1,
    "connect_timeout": 10.0,
    "init_timeout": 60.0,
    "response_timeout": 30.0,
    "stagger_ms": None,
    "max_pacing_error_ms": 50.0,
    "ws_compression": False,
    "warmup": 1,
    "out": None,
    "no_plots": False,
    "quiet": False,
    "force": False,
}

TTS_DEFAULTS: dict[str, Any] = {
    "url": None,
    "endpoint": "text2audio",
    "streams": 1,
    "requests": 2,
    "text": None,
    "model": None,
    "voice": None,
    "sample_rate": None,
    "prebuffer_ms": 0.0,
    "stagger_ms": 0.0,
    "compare": None,
    "rounds": 1,
    "connect_timeout": 10.0,
    "read_timeout": 30.0,
    "total_timeout": 120.0,
    "max_loop_lag_ms": 50.0,
    "warmup": 1,
    "out": None,
    "no_plots": False,
    "quiet": False,
    "force": False,
}


class UsageError(Exception):
    """A bad option combination, reported with exit status 2."""


def register(subparsers: Any) -> None:
    """Add ``bench`` (with ``avatar`` and ``tts``) to the ``omnistream`` parser."""
    bench = subparsers.add_parser(
        "bench",
        help="latency benchmark of any compatible avatar or TTS server",
        description="Measure a FlashTalk/native avatar server or a streaming TTS server.",
    )
    sub = bench.add_subparsers(dest="bench_command", required=True)

    avatar = sub.add_parser(
        "avatar",
        help="concurrent real-time avatar sessions (TTFF, chunk latency, jitter, late chunks)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = avatar.add_argument
    a("--url", help="ws://host:port/ (FlashTalk) or ws://host:port/v1/avatar/realtime")
    a("--protocol", choices=["flashtalk", "native"], help="wire protocol (default flashtalk)")
    a("--sessions", type=int, help="concurrent sessions (default 1)")
    a("--duration", type=float, help="seconds of audio per session (default 10)")
    a("--chunk-samples", type=int, help="AUDI chunk size asked of the server (default: its own)")
    a("--width", type=int)
    a("--height", type=int)
    a("--fps", type=int)
    a("--model", help="model of session.create (native; default flashtalk)")
    a("--audio", help="input audio file (any format PyAV reads); default synthesised speech")
    a("--ref-image", help="reference image (default: the package's default avatar)")
    a(
        "--ramp",
        action="store_true",
        default=None,
        help="raise N until a session falls behind or p95 crosses the bound",
    )
    a("--ramp-start", type=int, help="first N of the ramp (default 1)")
    a("--ramp-max", type=int, help="largest N tried (default 64)")
    a("--ramp-factor", type=float, help="N grows by this factor per step (default 2)")
    a("--ramp-step", type=int, help="grow N by this many instead of a factor")
    a("--ramp-refine", type=int, help="bisection steps after the first failure (default 3)")
    a("--p95-bound-ms", type=float, help="p95 latency bound (default: one chunk duration)")
    a("--late-tolerance", type=float, help="fraction of late chunks a session may have (0)")
    a("--compare", metavar="URL2", help="also run the same scenario against URL2, alternating")
    a("--compare-protocol", choices=["flashtalk", "native"], help="protocol of URL2")
    a("--rounds", type=int, help="alternating rounds per target with --compare (default 1)")
    a("--connect-timeout", type=float, help="seconds (default 10)")
    a("--init-timeout", type=float, help="seconds to wait for init_ok (default 60)")
    a("--response-timeout", type=float, help="seconds to wait for a chunk's VIDX (default 30)")
    a(
        "--stagger-ms",
        type=float,
        help="delay between session starts (default: starts spread over one chunk)",
    )
    a(
        "--max-pacing-error-ms",
        type=float,
        help="refuse to report when over 5%% of the client's sends are later than this "
        "(default 50)",
    )
    a(
        "--ws-compression",
        action="store_true",
        default=None,
        help="offer permessage-deflate like a default websockets client",
    )
    _common(avatar)
    avatar.set_defaults(func=_cmd_avatar)

    tts = sub.add_parser(
        "tts",
        help="concurrent streaming TTS requests (TTFA, RTF, playback underruns)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t = tts.add_argument
    t("--url", help="http://host:port (the endpoint path is added)")
    t(
        "--endpoint",
        choices=["text2audio", "speech"],
        help="/v1/text2audio/stream or OpenAI /v1/audio/speech (pcm, 24 kHz)",
    )
    t("--streams", type=int, help="concurrent request streams (default 1)")
    t("--requests", type=int, help="requests per stream, back to back (default 2)")
    t("--text", action="append", help="text to synthesise (repeatable; default built-in set)")
    t("--model")
    t("--voice")
    t("--sample-rate", type=int, help="rate asked of text2audio (default: the server's)")
    t("--prebuffer-ms", type=float, help="audio a simulated player buffers first (default 0)")
    t("--stagger-ms", type=float, help="delay between stream starts (default 0: all at once)")
    t("--compare", metavar="URL2", help="also run the same scenario against URL2, alternating")
    t("--rounds", type=int, help="alternating rounds per target with --compare (default 1)")
    t("--connect-timeout", type=float)
    t("--read-timeout", type=float, help="longest silence inside a response (default 30)")
    t("--total-timeout", type=float, help="ceiling on one request (default 120)")
    t(
        "--max-loop-lag-ms",
        type=float,
        help="refuse to report when over 5%% of the client's loop-lag samples exceed this "
        "(default 50)",
    )
    _common(tts)
    tts.set_defaults(func=_cmd_tts)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenario", help="TOML scenario file with an [options] table")
    parser.add_argument("--out", help="output directory (default bench-results/<kind>-<time>)")
    parser.add_argument(
        "--warmup",
        type=int,
        help="unrecorded warm-up sessions/requests per target before measuring (default 1)",
    )
    parser.add_argument("--no-plots", action="store_true", default=None)
    parser.add_argument("--quiet", action="store_true", default=None, help="no progress line")
    parser.add_argument(
        "--force",
        action="store_true",
        default=None,
        help="write the report even when the client fell behind",
    )


def load_scenario(path: str | Path) -> dict[str, Any]:
    """Options of a scenario file: the ``[options]`` table, keys normalised to dests."""
    with open(path, "rb") as handle:
        data = tomllib.load(handle)
    options = data.get("options", {})
    if not isinstance(options, dict):
        raise UsageError(f"{path}: [options] must be a table")
    return {str(k).replace("-", "_"): v for k, v in options.items()}


def resolve_options(args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
    """Command line over scenario file over defaults."""
    scenario = load_scenario(args.scenario) if getattr(args, "scenario", None) else {}
    unknown = set(scenario) - set(defaults)
    if unknown:
        raise UsageError(f"{args.scenario}: unknown option(s) {sorted(unknown)}")
    out = dict(defaults)
    out.update(scenario)
    for key in defaults:
        value = getattr(args, key, None)
        if value is not None:
            out[key] = value
    return out


def _out_dir(opts: dict[str, Any], kind: str) -> Path:
    if opts["out"]:
        return Path(opts["out"])
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    return Path("bench-results") / f"{kind}-{stamp}"


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run the benchmark's event loop, on uvloop where available.

    uvloop's lower per-message overhead keeps the client's own share of the timings
    small, which matters when client and server share a machine.
    """
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _machine(at_start: dict[str, Any]) -> dict[str, Any]:
    """Machine info taken before the run, with the load average after it added."""
    end = machine_info()["loadavg_at_start"]
    return {**at_start, "loadavg_at_end": end}


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# avatar


def avatar_scenario(opts: dict[str, Any], url: str, protocol: str) -> AvatarScenario:
    """Build the scenario for one target from resolved options."""
    stagger = opts["stagger_ms"]
    return AvatarScenario(
        url=url,
        protocol=protocol,  # type: ignore[arg-type]
        sessions=int(opts["sessions"]),
        duration_s=float(opts["duration"]),
        chunk_samples=opts["chunk_samples"],
        width=opts["width"],
        height=opts["height"],
        fps=opts["fps"],
        model=opts["model"],
        connect_timeout_s=float(opts["connect_timeout"]),
        init_timeout_s=float(opts["init_timeout"]),
        response_timeout_s=float(opts["response_timeout"]),
        stagger_s=None if stagger is None else float(stagger) / 1000,
        late_tolerance=float(opts["late_tolerance"]),
        p95_bound_ms=opts["p95_bound_ms"],
        max_pacing_error_ms=float(opts["max_pacing_error_ms"]),
        ws_compression=bool(opts["ws_compression"]),
    )


def _validate_avatar(opts: dict[str, Any]) -> None:
    if not opts["url"]:
        raise UsageError("--url is required (e.g. ws://127.0.0.1:8000/)")
    if int(opts["sessions"]) < 1:
        raise UsageError("--sessions must be at least 1")
    if float(opts["duration"]) <= 0:
        raise UsageError("--duration must be positive")
    if opts["chunk_samples"] is not None and int(opts["chunk_samples"]) <= 0:
        raise UsageError("--chunk-samples must be positive")
    if int(opts["rounds"]) < 1:
        raise UsageError("--rounds must be at least 1")
    if opts["ramp"] and int(opts["ramp_max"]) < int(opts["ramp_start"]):
        raise UsageError("--ramp-max must be at least --ramp-start")


def _merge_avatar(runs: list[AvatarRun]) -> AvatarRun:
    """Pool the rounds against one target into one run for its summary."""
    first = runs[0]
    return AvatarRun(
        url=first.url,
        label=first.label,
        sessions=[s for r in runs for s in r.sessions],
        pacing_ms=[p for r in runs for p in r.pacing_ms],
        loop_lag_ms=[x for r in runs for x in r.loop_lag_ms],
        wall_s=sum(r.wall_s for r in runs),
        scenario=first.scenario,
    )


def _cmd_avatar(args: argparse.Namespace) -> int:
    try:
        opts = resolve_options(args, AVATAR_DEFAULTS)
        _validate_avatar(opts)
        if opts["audio"]:
            audio = load_audio(opts["audio"], SAMPLE_RATE)
        else:
            audio = synth_speech(SYNTH_AUDIO_S, SAMPLE_RATE)
        ref_image = load_ref_image(opts["ref_image"])
    except (UsageError, OSError, ValueError) as exc:
        _say(f"omnistream bench avatar: {exc}")
        return EXIT_USAGE
    machine = machine_info()
    targets = [("A", opts["url"], opts["protocol"])]
    if opts["compare"]:
        targets.append(("B", opts["compare"], opts["compare_protocol"] or opts["protocol"]))
    scenarios = {label: avatar_scenario(opts, url, proto) for label, url, proto in targets}
    progress = not opts["quiet"]
    command = ["omnistream", *sys.argv[1:]] if sys.argv else None
    if opts["ramp"]:
        return _avatar_ramp(opts, scenarios, audio, ref_image, progress, command, machine)

    async def go() -> list[tuple[int, AvatarRun]]:
        await _avatar_warmup(opts, scenarios, audio, ref_image)
        out = []
        for round_ in range(int(opts["rounds"]) if opts["compare"] else 1):
            for label, sc in scenarios.items():
                run = await run_avatar(sc, audio, ref_image, label=label, progress=progress)
                out.append((round_ + 1, run))
        return out

    runs = run_async(go())
    refused = [r for _, r in runs if not r.client_ok()[0]]
    if refused and not opts["force"]:
        _say(
            f"omnistream bench avatar: refusing to report: {refused[0].client_ok()[1]}. "
            "Run fewer sessions, or run the client on another machine (--force writes "
            "the report anyway, marked)."
        )
        return EXIT_CLIENT_BEHIND
    pooled = {
        label: _merge_avatar([r for _, r in runs if r.label == label]).summary()
        for label in scenarios
    }
    for label, sc in scenarios.items():
        # Pooled over rounds: N stays the concurrency of one run.
        rounds = sum(1 for _, r in runs if r.label == label)
        pooled[label]["sessions_measured"] = pooled[label]["sessions"]
        pooled[label]["sessions"] = sc.sessions
        pooled[label]["rounds"] = rounds
    ratios = compare(pooled["A"], pooled["B"], AVATAR_RATIO_KEYS) if "B" in pooled else None
    summary: dict[str, Any] = dict(pooled["A"]) if len(pooled) == 1 else {"targets": pooled}
    if ratios:
        summary["ratios_b_over_a"] = ratios
    run_dicts = [{"round": rnd, **r.to_dict()} for rnd, r in runs]
    settings = {
        "targets": {label: sc.settings() for label, sc in scenarios.items()},
        "rounds": int(opts["rounds"]) if opts["compare"] else 1,
        "audio": opts["audio"] or f"synthesised speech ({SYNTH_AUDIO_S:g} s, looped)",
        "ref_image": opts["ref_image"] or "package default avatar",
        "warmup": int(opts["warmup"]),
    }
    title = "omnistream bench avatar" + (" (compare)" if ratios else "")
    row_summaries = [r.summary() for _, r in runs] if len(runs) > 1 else [pooled["A"]]
    if ratios:
        row_summaries = list(pooled.values())
    markdown = avatar_markdown(title, row_summaries, ratios)
    report = build_report("avatar", settings, run_dicts, summary, _machine(machine), command)
    out_dir = _out_dir(opts, "avatar")
    paths = write_report(report, markdown, out_dir)
    if not opts["no_plots"]:
        labels = [f"{r.label} r{rnd}" if len(runs) > 1 else r.label for rnd, r in runs]
        _plots_avatar(run_dicts, labels, out_dir, None)
    print(markdown)
    _say(f"report: {paths['json']}  summary: {paths['markdown']}")
    measured = any(s["chunks_answered"] for s in pooled.values())
    return EXIT_OK if measured else EXIT_NOTHING_MEASURED


def _avatar_ramp(
    opts: dict[str, Any],
    scenarios: dict[str, AvatarScenario],
    audio: Any,
    ref_image: bytes,
    progress: bool,
    command: list[str] | None,
    machine: dict[str, Any],
) -> int:
    async def go() -> dict[str, RampResult]:
        await _avatar_warmup(opts, scenarios, audio, ref_image)
        results = {}
        for label, sc in scenarios.items():
            results[label] = await run_ramp(
                sc,
                audio,
                ref_image,
                start=int(opts["ramp_start"]),
                limit=int(opts["ramp_max"]),
                factor=float(opts["ramp_factor"]),
                step=int(opts["ramp_step"]),
                refine=int(opts["ramp_refine"]),
                label=label,
                progress=progress,
                on_step=(lambda run: _say(_step_line(run))) if progress else None,
            )
        return results

    ramps = run_async(go())
    first_a = ramps["A"].steps[0] if ramps["A"].steps else None
    if first_a is not None and not first_a.client_ok()[0] and not opts["force"]:
        _say(f"omnistream bench avatar: refusing to report: {first_a.client_ok()[1]}.")
        return EXIT_CLIENT_BEHIND
    ramp_summaries = {label: r.summary() for label, r in ramps.items()}
    step_summaries = {label: [s.summary() for s in r.steps] for label, r in ramps.items()}
    summary: dict[str, Any] = (
        dict(ramp_summaries["A"]) if len(ramps) == 1 else {"targets": ramp_summaries}
    )
    if "B" in ramps:
        summary["ratios_b_over_a"] = {
            "max_sessions_held": {
                "a": ramps["A"].max_sessions_held,
                "b": ramps["B"].max_sessions_held,
                "b_over_a": (
                    round(ramps["B"].max_sessions_held / ramps["A"].max_sessions_held, 3)
                    if ramps["A"].max_sessions_held
                    else None
                ),
            }
        }
    run_dicts = [
        {"ramp": label, "step": i, **run.to_dict()}
        for label, r in ramps.items()
        for i, run in enumerate(r.steps)
    ]
    settings = {
        "targets": {label: sc.settings() for label, sc in scenarios.items()},
        "ramp": {
            k: opts[k]
            for k in ("ramp_start", "ramp_max", "ramp_factor", "ramp_step", "ramp_refine")
        },
        "audio": opts["audio"] or f"synthesised speech ({SYNTH_AUDIO_S:g} s, looped)",
        "ref_image": opts["ref_image"] or "package default avatar",
        "warmup": int(opts["warmup"]),
    }
    markdown = ramp_markdown(
        "omnistream bench avatar --ramp",
        [(label, ramp_summaries[label], step_summaries[label]) for label in ramps],
    )
    if "B" in ramps:
        ratio = summary["ratios_b_over_a"]["max_sessions_held"]["b_over_a"]
        markdown += f"\nB / A largest N held: {ratio}\n"
    report = build_report("avatar_ramp", settings, run_dicts, summary, _machine(machine), command)
    out_dir = _out_dir(opts, "avatar-ramp")
    paths = write_report(report, markdown, out_dir)
    if not opts["no_plots"] and run_dicts:
        labels = [f"{d['ramp']} N={d['summary']['sessions']}" for d in run_dicts]
        _plots_avatar(run_dicts, labels, out_dir, [(k, v) for k, v in step_summaries.items()])
    print(markdown)
    _say(f"report: {paths['json']}  summary: {paths['markdown']}")
    measured = any(s["chunks_answered"] for steps in step_summaries.values() for s in steps)
    return EXIT_OK if measured else EXIT_NOTHING_MEASURED


def _step_line(run: AvatarRun) -> str:
    s = run.summary()
    return (
        f"[bench ramp {run.label}] N={s['sessions']}: p95 {s['latency_ms']['p95']} ms, "
        f"late {s['late_chunks']}, errors {s['errors']['total']} -> "
        f"{'held' if s['held'] else 'did not hold'} ({s['held_reason']})"
    )


async def _avatar_warmup(
    opts: dict[str, Any], scenarios: dict[str, AvatarScenario], audio: Any, ref_image: bytes
) -> None:
    """Unrecorded sessions of one chunk each, so model loading is not in the first TTFF."""
    for sc in scenarios.values():
        for _ in range(int(opts["warmup"])):
            await run_avatar(
                replace(sc, sessions=1, duration_s=sc.nominal_chunk_s), audio, ref_image
            )


def _plots_avatar(
    run_dicts: list[dict[str, Any]],
    labels: list[str],
    out_dir: Path,
    ramps: list[tuple[str, list[dict[str, Any]]]] | None,
) -> None:
    try:
        from omnistream.bench import plots
    except ImportError:  # pragma: no cover - matplotlib missing
        _say("plots skipped: matplotlib is not installed (pip install 'omnistream[bench]')")
        return
    try:
        if ramps:
            # One CDF curve per step, in order of N; timelines of the interesting steps:
            # the largest N that held and the smallest that did not, per target.
            order = sorted(
                range(len(run_dicts)),
                key=lambda i: (run_dicts[i]["ramp"], run_dicts[i]["summary"]["sessions"]),
            )
            plots.latency_cdf(
                [run_dicts[i] for i in order],
                [labels[i] for i in order],
                out_dir / "latency_cdf.png",
            )
            chosen = []
            for label in dict.fromkeys(d["ramp"] for d in run_dicts):
                mine = [
                    (d, lab) for d, lab in zip(run_dicts, labels, strict=True) if d["ramp"] == label
                ]
                held = [x for x in mine if x[0]["summary"]["held"]]
                failed = [x for x in mine if not x[0]["summary"]["held"]]
                if held:
                    chosen.append(max(held, key=lambda x: x[0]["summary"]["sessions"]))
                if failed:
                    chosen.append(min(failed, key=lambda x: x[0]["summary"]["sessions"]))
            plots.latency_timeline(
                [d for d, _ in chosen], [lab for _, lab in chosen], out_dir / "latency_timeline.png"
            )
            plots.ramp_plot(ramps, out_dir / "ramp_p95.png")
        else:
            plots.latency_cdf(run_dicts, labels, out_dir / "latency_cdf.png")
            plots.latency_timeline(run_dicts, labels, out_dir / "latency_timeline.png")
    except ModuleNotFoundError as exc:  # pragma: no cover - matplotlib missing
        _say(f"plots skipped: {exc} (pip install 'omnistream[bench]')")


# ------------------------------------------------------------------------------------------
# tts


def tts_scenario(opts: dict[str, Any], url: str) -> TtsScenario:
    """Build the TTS scenario for one target from resolved options."""
    sc = TtsScenario(
        url=url,
        endpoint=opts["endpoint"],
        streams=int(opts["streams"]),
        requests=int(opts["requests"]),
        model=opts["model"],
        voice=opts["voice"],
        sample_rate=opts["sample_rate"],
        connect_timeout_s=float(opts["connect_timeout"]),
        read_timeout_s=float(opts["read_timeout"]),
        total_timeout_s=float(opts["total_timeout"]),
        prebuffer_ms=float(opts["prebuffer_ms"]),
        stagger_s=float(opts["stagger_ms"]) / 1000,
        max_loop_lag_ms=float(opts["max_loop_lag_ms"]),
    )
    if opts["text"]:
        sc.texts = list(opts["text"]) if not isinstance(opts["text"], str) else [opts["text"]]
    return sc


def _cmd_tts(args: argparse.Namespace) -> int:
    try:
        opts = resolve_options(args, TTS_DEFAULTS)
        if not opts["url"]:
            raise UsageError("--url is required (e.g. http://127.0.0.1:8000)")
        if int(opts["streams"]) < 1 or int(opts["requests"]) < 1:
            raise UsageError("--streams and --requests must be at least 1")
        if int(opts["rounds"]) < 1:
            raise UsageError("--rounds must be at least 1")
    except (UsageError, OSError, ValueError) as exc:
        _say(f"omnistream bench tts: {exc}")
        return EXIT_USAGE
    machine = machine_info()
    targets = {"A": tts_scenario(opts, opts["url"])}
    if opts["compare"]:
        targets["B"] = tts_scenario(opts, opts["compare"])
    progress = not opts["quiet"]
    command = ["omnistream", *sys.argv[1:]] if sys.argv else None

    async def go() -> list[tuple[int, TtsRun]]:
        for sc in targets.values():
            if int(opts["warmup"]) > 0:
                # Not recorded: loads the model so the first measured TTFA is not a cold start.
                await run_tts(replace(sc, streams=1, requests=int(opts["warmup"])))
        out = []
        for round_ in range(int(opts["rounds"]) if opts["compare"] else 1):
            for label, sc in targets.items():
                out.append((round_ + 1, await run_tts(sc, label=label, progress=progress)))
        return out

    runs = run_async(go())
    refused = [r for _, r in runs if not r.client_ok()[0]]
    if refused and not opts["force"]:
        _say(f"omnistream bench tts: refusing to report: {refused[0].client_ok()[1]}.")
        return EXIT_CLIENT_BEHIND
    pooled: dict[str, dict[str, Any]] = {}
    for label in targets:
        mine = [r for _, r in runs if r.label == label]
        merged = TtsRun(
            url=mine[0].url,
            label=label,
            requests=[q for r in mine for q in r.requests],
            loop_lag_ms=[x for r in mine for x in r.loop_lag_ms],
            wall_s=sum(r.wall_s for r in mine),
            scenario=mine[0].scenario,
            errors=_merge_errors([r.errors for r in mine]),
        )
        pooled[label] = merged.summary()
    ratios = compare(pooled["A"], pooled["B"], TTS_RATIO_KEYS) if "B" in pooled else None
    summary: dict[str, Any] = dict(pooled["A"]) if len(pooled) == 1 else {"targets": pooled}
    if ratios:
        summary["ratios_b_over_a"] = ratios
    run_dicts = [{"round": rnd, **r.to_dict()} for rnd, r in runs]
    settings = {
        "targets": {label: sc.settings() for label, sc in targets.items()},
        "rounds": int(opts["rounds"]) if opts["compare"] else 1,
        "warmup": int(opts["warmup"]),
    }
    markdown = tts_markdown(
        "omnistream bench tts" + (" (compare)" if ratios else ""), list(pooled.values()), ratios
    )
    report = build_report("tts", settings, run_dicts, summary, _machine(machine), command)
    out_dir = _out_dir(opts, "tts")
    paths = write_report(report, markdown, out_dir)
    if not opts["no_plots"]:
        try:
            from omnistream.bench import plots

            labels = [f"{r.label} r{rnd}" if len(runs) > 1 else r.label for rnd, r in runs]
            plots.ttfa_cdf(run_dicts, labels, out_dir / "ttfa_cdf.png")
            plots.tts_timeline(run_dicts, labels, out_dir / "tts_timeline.png")
        except ModuleNotFoundError as exc:  # pragma: no cover - matplotlib missing
            _say(f"plots skipped: {exc} (pip install 'omnistream[bench]')")
    print(markdown)
    _say(f"report: {paths['json']}  summary: {paths['markdown']}")
    measured = any(s["requests_ok"] for s in pooled.values())
    return EXIT_OK if measured else EXIT_NOTHING_MEASURED


def _merge_errors(logs: list[Any]) -> Any:
    from omnistream.bench.errors import ErrorLog

    return ErrorLog.merged(logs)
