"""The inference gateway: upstream LLM providers, format translation and fallback.

A provider is a model that lives across the network, so this room sits beside
``models/``: providers are called with async I/O on the event loop (never from a runner
thread), and only the built-in embedding model goes through the engine's scheduler.

Other rooms call the gateway through :func:`gateway_of` (the voice-agent session asks
:meth:`Gateway.chat_stream` for its LLM turn); the HTTP surface is
``omnistream/transports/gateway_http.py``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from omnistream.gateway.config import (
    GatewayConfig,
    ProviderConfig,
    ProvidersFileError,
    load_providers,
    parse_providers,
)
from omnistream.gateway.errors import GatewayError
from omnistream.gateway.gateway import Gateway, Target
from omnistream.gateway.webfetch import WebFetcher

if TYPE_CHECKING:
    from omnistream.transports.state import AppState

_KEY = "gateway"
_FETCH_KEY = "gateway.fetcher"


def _build(state: AppState) -> Gateway:
    settings = state.settings
    config = load_providers(settings.providers_file)
    return Gateway(
        config,
        state.metrics.registry,
        breaker_failures=settings.gateway_breaker_failures,
        breaker_cooldown_s=settings.gateway_breaker_cooldown_s,
        deadline_s=settings.gateway_deadline_s,
    )


def _install(state: AppState, gateway: Gateway) -> Gateway:
    existing = state.extras.get(_KEY)
    if isinstance(existing, Gateway):  # built meanwhile by another caller
        return existing
    state.extras[_KEY] = gateway
    state.extras.setdefault("shutdown_hooks", []).append(gateway.aclose)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        gateway.start_discovery()
    return gateway


async def start_gateway(state: AppState) -> Gateway:
    """Build the app's gateway at start-up, off the event loop.

    Reading the providers file and building the TLS context (the CA bundle: a quarter
    second) would stall every live session if done on the loop by the first request.
    Raises :class:`ProvidersFileError`, so a bad file stops the app from starting.
    """
    existing = state.extras.get(_KEY)
    if isinstance(existing, Gateway):
        return existing
    built = await asyncio.to_thread(_build, state)
    installed = _install(state, built)
    if installed is not built:  # a request built one meanwhile: keep that one
        await built.aclose()
    return installed


def gateway_of(state: AppState) -> Gateway:
    """The app's gateway (built at start-up by :func:`start_gateway`, else here).

    Its HTTP clients are closed by the app's shutdown hooks. Raises
    :class:`ProvidersFileError` if the file is invalid (``omnistream serve`` checks it
    before starting, so a running server already has a good one).
    """
    existing = state.extras.get(_KEY)
    if isinstance(existing, Gateway):
        return existing
    return _install(state, _build(state))


def fetcher_of(state: AppState) -> WebFetcher:
    """The app's ``local/fetch`` fetcher, with the operator's allow-list and caps."""
    existing = state.extras.get(_FETCH_KEY)
    if isinstance(existing, WebFetcher):
        return existing
    settings = state.settings
    fetcher = WebFetcher(settings.web_fetch_allow, max_bytes=settings.web_fetch_max_bytes,
                         timeout_s=settings.web_fetch_timeout_s)
    state.extras[_FETCH_KEY] = fetcher
    return fetcher


__all__ = [
    "Gateway",
    "GatewayConfig",
    "GatewayError",
    "ProviderConfig",
    "ProvidersFileError",
    "Target",
    "WebFetcher",
    "fetcher_of",
    "gateway_of",
    "load_providers",
    "parse_providers",
    "start_gateway",
]
