"""The edge's runtime: keys in force, client secrets, quotas, Origin policy and metrics.

One :class:`AuthService` per app. The middleware asks it who a credential belongs to and
whether that caller may go on; transports that create sessions outside a WebSocket's
lifetime (WebRTC) take a session slot from it explicitly.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge

from omnistream.auth import Principal
from omnistream.auth.client_secrets import ClientSecrets
from omnistream.auth.keys import KeyFileError, KeyStore
from omnistream.auth.limits import RateLimiter, SessionCounter
from omnistream.settings import Settings

log = logging.getLogger(__name__)


class QuotaExceeded(Exception):
    """A per-key quota refused the call; ``retry_after`` seconds is a fair wait."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class AuthService:
    """Keys, secrets, quotas and the Origin allow-list of one server."""

    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.keys: KeyStore | None = (
            KeyStore(settings.api_key_file) if settings.api_key_file else None
        )
        self.secrets = ClientSecrets()
        self.rate = RateLimiter()
        self.sessions = SessionCounter()
        self.requests = Counter(
            "omnistream_key_requests_total",
            "Requests and WebSocket handshakes by key name and outcome",
            ["key", "outcome"],
            registry=registry,
        )
        self.live_sessions = Gauge(
            "omnistream_key_live_sessions", "Live sessions by key name", ["key"],
            registry=registry,
        )
        self.reloads = Counter(
            "omnistream_key_file_reloads_total", "Key file reloads by result", ["result"],
            registry=registry,
        )

    @property
    def enabled(self) -> bool:
        """Whether a key is required (a key file is configured)."""
        return self.keys is not None

    def authenticate(self, credential: str) -> Principal | None:
        """The principal a key or a live client secret stands for."""
        if self.keys is None:
            return None
        return self.keys.lookup(credential) or self.secrets.lookup(credential)

    def reload(self) -> bool:
        """Re-read the key file (SIGHUP). Live sessions keep running either way."""
        if self.keys is None:
            return False
        try:
            count = self.keys.reload()
        except KeyFileError as exc:
            self.reloads.labels("error").inc()
            log.error("key file not reloaded, the previous keys stay in force: %s", exc)
            return False
        self.reloads.labels("ok").inc()
        log.info("key file reloaded: %d keys", count)
        return True

    # -- quotas ----------------------------------------------------------------------------

    def check_rate(self, principal: Principal) -> float:
        """0.0 if ``principal`` may make one more request now, else seconds to wait."""
        if principal.requests_per_minute is None:
            return 0.0
        return self.rate.acquire(principal.name, principal.requests_per_minute)

    def acquire_session(self, principal: Principal) -> None:
        """Take one of the key's session slots.

        Raises:
            QuotaExceeded: the key already holds ``max_sessions`` live sessions.
        """
        if not self.sessions.try_acquire(principal.name, principal.max_sessions):
            self.requests.labels(principal.name, "session_quota").inc()
            raise QuotaExceeded(
                f"Key '{principal.name}' already holds its {principal.max_sessions} live "
                "sessions; close one first.",
                retry_after=5.0,
            )
        self.live_sessions.labels(principal.name).set(self.sessions.live(principal.name))

    def release_session(self, principal: Principal) -> None:
        """Give back a slot taken with :meth:`acquire_session`."""
        self.sessions.release(principal.name)
        self.live_sessions.labels(principal.name).set(self.sessions.live(principal.name))

    def check_queued_jobs(self, principal: Principal, active: int) -> None:
        """Refuse a new job when the key already has ``max_queued_jobs`` not finished.

        Raises:
            QuotaExceeded: over the key's job quota.
        """
        limit = principal.max_queued_jobs
        if limit is not None and active >= limit:
            self.requests.labels(principal.name, "job_quota").inc()
            raise QuotaExceeded(
                f"Key '{principal.name}' already has {active} jobs queued or running "
                f"(its limit is {limit}); wait for one to finish.",
                retry_after=2.0,
            )

    # -- browsers --------------------------------------------------------------------------

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        """Whether a browser page at ``origin`` may drive this server.

        Allowed: the same host as the request's ``Host`` header, an origin listed by
        ``--allowed-origin`` or ``--cors-origin`` (``*`` allows any).
        """
        listed = [*self.settings.allowed_origins, *self.settings.cors_origins]
        if "*" in listed or origin.rstrip("/") in {o.rstrip("/") for o in listed}:
            return True
        netloc = urlsplit(origin).netloc
        return bool(host) and netloc.lower() == (host or "").lower()
