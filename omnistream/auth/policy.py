"""Which scope each route needs and which error shape its surface speaks.

The auth middleware consults :func:`rule_for` for every HTTP request and WebSocket
handshake, so a route added later is covered by the first rule whose prefix matches it;
a path no rule names falls to the catch-all and needs the ``admin`` scope (fail closed).
Add a rule here when a new surface appears.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Surface = Literal["openai", "anthropic", "omni", "omnirt"]

#: Every scope a key may hold. ``admin`` implies all of them.
SCOPES: tuple[str, ...] = (
    "realtime",  # avatar WebSockets, WebRTC, /v1/realtime
    "tts",  # text2audio routes, /v1/audio/speech, TTS WebSocket
    "stt",  # transcription
    "generate",  # /v1/generate, jobs, files, images, videos
    "gateway",  # chat, messages, responses, embeddings, rerank, moderations, web tools
    "tasks",  # the hosted task API (/api/omni)
    "metrics",  # /metrics
    "admin",  # everything, and other keys' jobs and tasks
)

#: Paths that answer without a key (liveness and readiness probes).
EXEMPT_PATHS: frozenset[str] = frozenset({"/healthz", "/health", "/readyz"})

#: Paths that answer without a key because the URL itself is the credential: the hosted
#: task API's upload slots and output files carry an HMAC signature and an expiry that
#: the route verifies (constant time) before it touches anything. The caller there is
#: :data:`~omnistream.auth.PUBLIC` (no scopes), whatever header it sends.
SIGNED_PATHS = re.compile(
    r"^/api/omni/(uploads|files)/[^/]+/[^/]+$"
    r"|^/internal/cluster/files/[^/]+$"  # node to node: signed with the cluster secret
)

#: Paths where a key is optional: without one the caller is the public (no scopes);
#: one that is sent is checked as anywhere else (the task API's public model catalog,
#: whose ``?all=true`` needs an admin key).
KEY_OPTIONAL_PATHS = re.compile(r"^/api/omni/models$")


#: Routes that take files (multipart uploads, base64 media in JSON, raw PUT uploads): their
#: body limit derives from ``max_upload_bytes``; every other body is held to
#: ``max_body_bytes``.
UPLOAD_PATHS = re.compile(
    r"^(/v1/generate$|(/api)?/v1/audio/(transcriptions|translations)$|(/api)?/v1/images/"
    r"|(/api)?/v1/videos|/api/omni/)"
)


@dataclass(frozen=True)
class RouteRule:
    """A path pattern, the scope it needs, and the error shape of its surface."""

    pattern: re.Pattern[str]
    scope: str
    surface: Surface


def _r(pattern: str, scope: str, surface: Surface) -> RouteRule:
    return RouteRule(re.compile(pattern), scope, surface)


# First match wins: specific before general.
RULES: tuple[RouteRule, ...] = (
    _r(r"^/metrics$", "metrics", "omnirt"),
    # Realtime media
    _r(r"^/v1/realtime(/|$)", "realtime", "openai"),
    _r(r"^/v1/avatar/", "realtime", "omnirt"),
    _r(r"^/v1/audio2video/", "realtime", "omnirt"),
    _r(r"^/v1/webrtc/", "realtime", "omnirt"),
    _r(r"^/demo(/|$)", "realtime", "omnirt"),
    _r(r"^/$", "realtime", "omnirt"),  # FlashTalk catch-all WS (and its GET probe)
    # Speech
    _r(r"^/v1/text2audio(/|$)", "tts", "omnirt"),
    _r(r"^(/api)?/v1/audio/speech$", "tts", "openai"),
    _r(r"^(/api)?/v1/models/tts$", "tts", "openai"),
    _r(r"^(/api)?/v1/audio/(transcriptions|translations)$", "stt", "openai"),
    # Generation and jobs
    _r(r"^/v1/(generate|jobs|files)(/|$)", "generate", "omnirt"),
    _r(r"^(/api)?/v1/images/", "generate", "openai"),
    _r(r"^(/api)?/v1/videos(/|$)", "generate", "openai"),
    # Hosted task API
    _r(r"^/api/omni(/|$)", "tasks", "omni"),
    # Inference gateway (Anthropic-shaped routes first)
    _r(r"^(/api)?/v1/messages(/|$)", "gateway", "anthropic"),
    _r(r"^(/api)?/v1/models(/|$)", "gateway", "openai"),
    _r(r"^/api/v1(/|$)", "gateway", "openai"),
    _r(r"^/api/(chat|tags)$", "gateway", "openai"),
    _r(
        r"^/v1/(api|chat|responses|embeddings|rerank|moderations|web|providers|completions)"
        r"(/|$)",
        "gateway",
        "openai",
    ),
    # Cluster and operator routes
    _r(r"^/v1/cluster(/|$)", "admin", "omnirt"),
)

CATCH_ALL = RouteRule(re.compile(r""), "admin", "omnirt")


def rule_for(path: str) -> RouteRule:
    """The rule that governs ``path`` (the catch-all needs ``admin``)."""
    for rule in RULES:
        if rule.pattern.search(path):
            return rule
    return CATCH_ALL
