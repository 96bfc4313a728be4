"""The ``omnistream`` command: ``serve`` here, other subcommands from their own modules.

Each feature that adds a subcommand exposes ``register(subparsers)`` in its own module and
is listed in :data:`SUBCOMMAND_MODULES`, so this file stays small.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

SUBCOMMAND_MODULES: tuple[str, ...] = (
    "omnistream.bench.cli",
    "omnistream.jobs.cli",
    "omnistream.cluster.haproxy",
)

log = logging.getLogger("omnistream")


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the streaming server (embedded default models)")
    p.add_argument("--host", help="bind address (default 127.0.0.1; OMNISTREAM_HOST)")
    p.add_argument("--port", type=_port, help="port 1-65535 (default 8000; OMNISTREAM_PORT)")
    p.add_argument("--max-sessions", type=int, help="hard cap on live realtime sessions")
    p.add_argument("--avatar-model", help="default avatar model for FlashTalk routes")
    p.add_argument(
        "--model-tier",
        action="append",
        choices=["core", "adjacent", "experimental"],
        help="allow only models of these tiers (repeatable)",
    )
    p.add_argument("--idle-timeout", type=float, dest="idle_timeout_s")
    p.add_argument(
        "--voice-alias",
        action="append",
        type=_alias,
        dest="voice_aliases",
        metavar="NAME=VOICE",
        help="let TTS clients name VOICE as NAME, e.g. local-default=heart (repeatable; "
        "OMNISTREAM_VOICE_ALIASES as JSON)",
    )
    p.add_argument("--jpeg-quality", type=int)
    p.add_argument("--log-level", default=None)
    p.add_argument(
        "--profile",
        metavar="FILE",
        help="serve a Runtime Profile (OmniRT format): its environment, models, ports, "
        "warmup, concurrency and fallbacks",
    )
    p.add_argument(
        "--models-dir",
        action="append",
        dest="models_dir",
        metavar="DIR",
        help="directory of diffusers pipelines (one subdirectory each, registered under its "
        "name); repeatable (OMNISTREAM_MODELS_DIR: a path or a JSON list)",
    )
    p.add_argument(
        "--providers",
        metavar="FILE",
        dest="providers_file",
        help="upstream LLM/web providers, aliases and combos for the gateway routes (YAML; "
        "OMNISTREAM_PROVIDERS_FILE); a file with an error refuses to start",
    )
    p.add_argument(
        "--omni-groups",
        dest="omni_groups_file",
        metavar="FILE",
        help="YAML file defining, renaming or hiding the task API's model groups "
        "(OMNISTREAM_OMNI_GROUPS_FILE)",
    )
    keys = p.add_argument_group("keys and browsers")
    keys.add_argument(
        "--api-key-file",
        help="require a key on every route and socket: one key per line, or YAML with "
        "per-key scopes and quotas; SIGHUP reloads it (OMNISTREAM_API_KEY_FILE)",
    )
    keys.add_argument(
        "--no-auth",
        action="store_true",
        default=None,
        help="allow serving a non-loopback address without keys",
    )
    keys.add_argument(
        "--public-metrics", action="store_true", default=None, help="/metrics needs no key"
    )
    keys.add_argument(
        "--allowed-origin",
        action="append",
        dest="allowed_origins",
        metavar="ORIGIN",
        help="browser Origin allowed besides the server's own host (repeatable; '*' = any)",
    )
    keys.add_argument(
        "--cors-origin",
        action="append",
        dest="cors_origins",
        metavar="ORIGIN",
        help="Origin given CORS access (repeatable; default: CORS off)",
    )
    cluster = p.add_argument_group("cluster (needs the 'cluster' extra)")
    cluster.add_argument(
        "--redis-url",
        help="join a cluster: jobs, events and node registry in Redis "
        "(redis://HOST:PORT/DB; OMNISTREAM_REDIS_URL)",
    )
    cluster.add_argument("--node-id", help="this node's id (default host:port; OMNISTREAM_NODE_ID)")
    cluster.add_argument(
        "--advertise-url",
        help="how other nodes reach this one (default http://host:port; OMNISTREAM_ADVERTISE_URL)",
    )
    cluster.add_argument(
        "--agent-port", type=int, help="TCP port answering HAProxy agent checks"
    )
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from omnistream.settings import Settings
    from omnistream.transports.app import create_app

    profile = None
    if args.profile:
        from omnistream.profiles.launch import ProfileRefused, read_runtime

        try:
            profile = read_runtime(args.profile)
        except ProfileRefused as exc:
            print(f"omnistream serve: {exc}", file=sys.stderr)
            return 2
        profile.apply_environment()  # before Settings: OMNISTREAM_* there count
    overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "max_sessions": args.max_sessions,
            "avatar_model": args.avatar_model,
            "model_tiers": args.model_tier,
            "idle_timeout_s": args.idle_timeout_s,
            "voice_aliases": dict(args.voice_aliases) if args.voice_aliases else None,
            "jpeg_quality": args.jpeg_quality,
            "log_level": args.log_level,
            "models_dir": getattr(args, "models_dir", None),
            "omni_groups_file": getattr(args, "omni_groups_file", None),
            "api_key_file": args.api_key_file,
            "providers_file": getattr(args, "providers_file", None),
            "no_auth": args.no_auth,
            "public_metrics": args.public_metrics,
            "allowed_origins": args.allowed_origins,
            "cors_origins": args.cors_origins,
            "redis_url": getattr(args, "redis_url", None),
            "node_id": getattr(args, "node_id", None),
            "advertise_url": getattr(args, "advertise_url", None),
            "agent_port": getattr(args, "agent_port", None),
        }.items()
        if v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:  # OMNISTREAM_* environment: one line per bad value
        for error in exc.errors():
            name = ".".join(str(p) for p in error["loc"])
            print(f"omnistream serve: setting {name}: {error['msg']}", file=sys.stderr)
        return 2
    problem = (
        exposure_problem(settings) or omni_groups_problem(settings) or port_problem(settings)
    )
    if problem:
        print(f"omnistream serve: {problem}", file=sys.stderr)
        return 2
    if settings.providers_file:
        from omnistream.gateway.config import ProvidersFileError, load_providers

        try:
            load_providers(settings.providers_file)
        except ProvidersFileError as exc:
            print(f"omnistream serve: providers file refused: {exc}", file=sys.stderr)
            return 2
    if settings.redis_url:  # cluster mode: no node starts without its Redis
        try:
            from omnistream.cluster.node import preflight
        except ImportError:
            print("omnistream serve: --redis-url needs the 'cluster' extra "
                  "(pip install 'omnistream[cluster]')", file=sys.stderr)
            return 2
        problem = preflight(settings.redis_url)
        if problem:
            print(f"omnistream serve: {problem}", file=sys.stderr)
            return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings, profile=profile)
    shown = "localhost" if settings.host in ("0.0.0.0", "::") else settings.host
    base = f"{shown}:{settings.port}"
    log.info(
        "omnistream serving: FlashTalk WS ws://%s/ (also /v1/audio2video/{model}), native "
        "ws://%s/v1/avatar/realtime, metrics http://%s/metrics, demo http://%s/demo",
        base,
        base,
        base,
        base,
    )
    uvicorn.run(app, **uvicorn_options(settings))
    return 0


def _port(text: str) -> int:
    """argparse type: a TCP port number (1-65535)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: use 1-65535")
    return port


def _alias(text: str) -> tuple[str, str]:
    """argparse type: ``NAME=VOICE``."""
    name, sep, voice = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"'{text}' is not NAME=VOICE")
    return name.strip(), voice.strip()


def port_problem(settings: Any) -> str | None:
    """Why the server could not listen on its address, found before any model loads.

    Binds and releases the address with the options uvicorn uses (``SO_REUSEADDR``, so
    a port in TIME_WAIT is not a problem): a port another process listens on is refused
    here in a second, not after a minute of loading models.
    """
    import socket

    try:
        infos = socket.getaddrinfo(
            settings.host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, UnicodeError) as exc:
        return f"cannot resolve --host {settings.host!r}: {exc}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            hint = " (is another server running? pick one with --port)"
            return f"cannot listen on {settings.host}:{settings.port}: {reason}{hint}"
    return None


def exposure_problem(settings: Any) -> str | None:
    """Why these settings must not start (keys missing on a public address), or None.

    A server reachable from other machines with no key would let anyone there use every
    route, so that needs a key file or an explicit ``--no-auth``. A key file that cannot
    be read is refused here too, before any model loads.
    """
    if settings.api_key_file:
        from omnistream.auth.keys import KeyFileError, KeyStore

        try:
            KeyStore(settings.api_key_file)
        except KeyFileError as exc:
            return f"API key file refused: {exc}"
        return None
    if settings.no_auth or is_loopback(settings.host):
        return None
    return (
        f"refusing to serve {settings.host} without API keys: anyone who can reach it could "
        "use every route. Give --api-key-file FILE (or OMNISTREAM_API_KEY_FILE), or pass "
        "--no-auth to serve it open anyway."
    )


def omni_groups_problem(settings: Any) -> str | None:
    """Why the task API's groups file cannot be used, or None (checked before serving)."""
    if not settings.omni_groups_file:
        return None
    from omnistream.omni_api.catalog import GroupsFileError, load_groups

    try:
        load_groups(settings.omni_groups_file)
    except GroupsFileError as exc:
        return str(exc)
    return None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ws_protocol() -> Any:
    from omnistream.transports.ws_protocol import OmnistreamWebSocketProtocol

    return OmnistreamWebSocketProtocol


def uvicorn_options(settings: Any) -> dict[str, Any]:
    """uvicorn options that enforce the server's WebSocket limits (shared with tests)."""
    return {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop" if sys.platform != "win32" else "asyncio",
        # uvicorn's websockets-sansio protocol, plus aborting connections whose peer
        # stopped reading (a graceful close would wait for them forever).
        "ws": _ws_protocol(),
        # The transport refuses messages far past the app limit outright; between the
        # two the app answers with a protocol error and keeps the socket.
        "ws_max_size": settings.max_message_bytes * 2,
        "ws_max_queue": 4,
        # Media frames are JPEG and PCM: deflate saves nothing on them and costs more CPU
        # than rendering (measured: 2.6x the per-chunk time). Clients whose library
        # offers permessage-deflate by default (websockets does) fall back to plain.
        "ws_per_message_deflate": False,
        "ws_ping_interval": 20.0,
        "ws_ping_timeout": 180.0,
        "log_level": settings.log_level.lower(),
        "timeout_graceful_shutdown": 5,
    }


def build_parser() -> argparse.ArgumentParser:
    """The full parser, with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="omnistream",
        description="A realtime streaming media engine: talking-head avatars, streaming "
        "speech, WebRTC and offline generation on one scheduler. Start with "
        "`omnistream serve`; `omnistream <command> --help` explains each command.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``omnistream`` console script."""
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
