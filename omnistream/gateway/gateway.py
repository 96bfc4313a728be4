"""The gateway: resolves a model name to targets and walks them until one answers.

A model name is a combo (an ordered fallback chain), an alias, ``provider/model``, or a
bare model id some provider lists (every provider listing it, in file order, is then a
target). Each target's provider has a :class:`~omnistream.gateway.breaker.CircuitBreaker`;
the router skips open circuits and rate-limited providers, moves on after connection
errors, timeouts, 5xx and 429, and stops at the caller's own 4xx (another target would
refuse it too). A stream moves on only before its first chunk: after that the caller has
seen output, and switching model midway would splice two different answers.

When nothing answers, the error says why: ``503 circuit_open`` when every target's
circuit is open, ``429 rate_limited`` with ``Retry-After`` when every target is limited
(or open), otherwise ``502 upstream_error`` (``504 upstream_timeout`` when every attempt
timed out) naming what each target did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import httpx
from prometheus_client import CollectorRegistry

from omnistream.gateway.breaker import CircuitBreaker
from omnistream.gateway.config import CHAT_KINDS, WEB_KINDS, GatewayConfig
from omnistream.gateway.errors import GatewayError
from omnistream.gateway.metrics import BREAKER_VALUE, gateway_metrics
from omnistream.gateway.providers import (
    AnthropicUpstream,
    ClientShards,
    Upstream,
    UpstreamFailure,
    WebToolUpstream,
    make_upstream,
)
from omnistream.gateway.translate import UpstreamStreamError, check_openai_request

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Which provider kinds serve each capability (the 503 message names them).
CAPABILITY_KINDS: dict[str, tuple[str, ...]] = {
    "chat": CHAT_KINDS,
    "embeddings": ("openai", "ollama"),
    "moderations": ("openai",),
    "images": ("openai",),
    "web_search": ("tavily", "jina", "firecrawl"),
    "web_fetch": ("jina", "firecrawl"),
}


@dataclass(frozen=True)
class Target:
    """One place a request may go: a provider and the model id it knows."""

    upstream: Upstream
    model: str

    @property
    def id(self) -> str:
        """``provider/model``."""
        return f"{self.upstream.name}/{self.model}"


class Gateway:
    """Routes chat, embeddings, moderations and web tools to the configured providers.

    Args:
        config: the parsed providers file.
        registry: Prometheus registry the gateway's metrics go on (the app's own).
        breaker_failures / breaker_cooldown_s: circuit breaker settings.
        deadline_s: longest one request may take, every fallback included.
        clients: the HTTP clients (built here, honouring proxies, when not given).
    """

    def __init__(
        self,
        config: GatewayConfig,
        registry: CollectorRegistry | None = None,
        *,
        breaker_failures: int = 5,
        breaker_cooldown_s: float = 30.0,
        deadline_s: float = 300.0,
        clients: ClientShards | None = None,
    ) -> None:
        self.config = config
        self.deadline_s = deadline_s
        self.clients = clients or ClientShards()
        if config.providers:
            self.clients.prepare()  # here, in start_gateway's thread, not on the loop
        self.upstreams: dict[str, Upstream] = {
            name: make_upstream(cfg, self.clients) for name, cfg in config.providers.items()
        }
        self.breakers: dict[str, CircuitBreaker] = {
            name: CircuitBreaker(breaker_failures, breaker_cooldown_s) for name in self.upstreams
        }
        self.discovered: dict[str, tuple[str, ...]] = {}
        self.metrics = gateway_metrics(registry or CollectorRegistry())
        for name in self.upstreams:
            self.metrics.breaker.labels(name).set(0)
        self._discovery: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start_discovery(self) -> None:
        """List the models of providers whose file entry names none (in the background)."""
        if self._discovery is None and any(not u.config.models for u in self.upstreams.values()
                                           if u.config.kind in CHAT_KINDS):
            self._discovery = asyncio.get_running_loop().create_task(
                self._discover(), name="gateway-discovery")

    async def _discover(self) -> None:
        for name, upstream in self.upstreams.items():
            if upstream.config.models or upstream.config.kind not in CHAT_KINDS:
                continue
            try:
                models = await upstream.discover_models()
            except (UpstreamFailure, httpx.HTTPError) as exc:
                log.warning("listing models of provider %s failed: %s", name, exc)
                continue
            self.discovered[name] = tuple(models)

    async def aclose(self) -> None:
        """Stop discovery and close the HTTP client's connections."""
        if self._discovery is not None:
            self._discovery.cancel()
            with contextlib.suppress(BaseException):
                await self._discovery
        await self.clients.aclose()

    # -- resolution ----------------------------------------------------------------------

    def models_of(self, provider: str) -> tuple[str, ...]:
        """The models a provider serves: listed in the file, else discovered."""
        upstream = self.upstreams[provider]
        return upstream.config.models or self.discovered.get(provider, ())

    def _target(self, ref: str) -> Target | None:
        provider, _, model = ref.partition("/")
        upstream = self.upstreams.get(provider)
        if upstream is None or not model:
            return None
        listed = self.models_of(provider)
        # A provider that lists nothing (discovery pending or failed) takes any model id.
        if listed and model not in listed:
            return None
        return Target(upstream, model)

    def resolve(self, model: Any, capability: str = "chat") -> list[Target]:
        """The targets for a model name, in fallback order.

        Raises:
            GatewayError: 400 ``invalid_model`` for a name nothing serves; 503
                ``no_provider`` when no configured provider can serve ``capability``.
        """
        kinds = CAPABILITY_KINDS.get(capability, CHAT_KINDS)
        if not any(u.config.kind in kinds for u in self.upstreams.values()):
            raise GatewayError(
                503, "no_provider",
                f"No provider serves {capability.replace('_', ' ')} here: add one of kind "
                f"{', '.join(kinds)} to the providers file (omnistream serve --providers FILE "
                "or OMNISTREAM_PROVIDERS_FILE).")
        if not isinstance(model, str) or not model.strip():
            raise GatewayError(400, "invalid_model", "'model' is required; see GET /v1/models",
                               param="model")
        refs: list[str]
        if model in self.config.combos:
            refs = list(self.config.combos[model])
        elif model in self.config.aliases:
            refs = [self.config.aliases[model]]
        elif "/" in model and model.partition("/")[0] in self.upstreams:
            refs = [model]
        else:
            refs = [f"{name}/{model}" for name in self.upstreams
                    if model in self.models_of(name)]
        targets = [t for t in (self._target(r) for r in refs)
                   if t is not None and t.upstream.config.kind in kinds]
        if not targets:
            raise GatewayError(
                400, "invalid_model",
                f"Model '{model[:200]}' is not a {capability.replace('_', ' ')} model this "
                "gateway routes; see GET /v1/models", param="model")
        return targets

    def has_model(self, model: str) -> bool:
        """Whether ``model`` resolves to at least one chat target."""
        try:
            return bool(self.resolve(model, "chat"))
        except GatewayError:
            return False

    # -- the fallback walk ---------------------------------------------------------------

    def _update_breaker_gauge(self, name: str) -> None:
        self.metrics.breaker.labels(name).set(BREAKER_VALUE[str(self.breakers[name].state)])

    def _exhausted(self, outcomes: list[tuple[Target, str, float | None, str]]) -> GatewayError:
        if not outcomes:
            return GatewayError(504, "deadline_exceeded",
                                f"No target could be tried within {self.deadline_s:.0f} s")
        kinds = {kind for _, kind, _, _ in outcomes}
        detail = "; ".join(f"{t.id}: {msg}" for t, _, _, msg in outcomes)
        if kinds == {"open"}:
            wait = min(w or 0.0 for _, _, w, _ in outcomes)
            return GatewayError(503, "circuit_open",
                                f"Every target's circuit breaker is open ({detail}); retry "
                                "later or use a combo", retry_after=wait)
        if kinds <= {"open", "limited"}:
            wait = min(w or 1.0 for _, _, w, _ in outcomes)
            return GatewayError(429, "rate_limited", f"Every target is rate limited ({detail})",
                                retry_after=wait)
        if kinds <= {"timeout", "open", "limited"}:
            return GatewayError(504, "upstream_timeout", f"Every target timed out ({detail})")
        return GatewayError(502, "upstream_error", f"No target answered ({detail})")

    def _admit(self, target: Target) -> tuple[str, float | None, str] | None:
        """``None`` when the target may be called now, else why it is skipped."""
        breaker = self.breakers[target.upstream.name]
        limited = breaker.limited_for()
        if limited > 0:
            return "limited", limited, f"rate limited for {limited:.1f} s"
        if not breaker.try_acquire():
            wait = breaker.retry_in()
            return "open", wait, f"circuit open for {wait:.1f} s"
        return None

    def _failed(self, target: Target, operation: str, exc: UpstreamFailure) -> tuple[
            str, float | None, str]:
        """Record a failed call on the breaker and metrics; the outcome for the error."""
        name = target.upstream.name
        breaker = self.breakers[name]
        if exc.kind == "rate_limited":
            breaker.record_rate_limit(exc.retry_after)
            outcome: tuple[str, float | None, str] = (
                "limited", breaker.limited_for(), exc.message)
        else:
            breaker.record_failure()
            outcome = ("timeout" if exc.kind == "timeout" else "error", None, exc.message)
        self._update_breaker_gauge(name)
        self.metrics.requests.labels(name, operation, exc.kind).inc()
        self.metrics.fallbacks.labels(name, exc.kind).inc()
        return outcome

    def _caller_error(self, target: Target, operation: str, exc: UpstreamFailure) -> GatewayError:
        """A non-retryable upstream 4xx: the provider is healthy, the request is not."""
        name = target.upstream.name
        self.breakers[name].record_success()
        self._update_breaker_gauge(name)
        self.metrics.requests.labels(name, operation, "rejected").inc()
        if exc.status == 404:
            return GatewayError(400, "invalid_model", exc.message, param="model")
        status = exc.status if 400 <= exc.status < 500 else 400
        return GatewayError(status, "upstream_rejected", exc.message)

    def _succeeded(self, target: Target, operation: str, started: float) -> None:
        name = target.upstream.name
        self.breakers[name].record_success()
        self._update_breaker_gauge(name)
        self.metrics.requests.labels(name, operation, "ok").inc()
        self.metrics.latency.labels(name, operation).observe(time.monotonic() - started)

    def _count_usage(self, target: Target, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        name = target.upstream.name
        with contextlib.suppress(TypeError, ValueError):
            self.metrics.tokens.labels(name, "prompt").inc(int(usage.get("prompt_tokens") or 0))
            self.metrics.tokens.labels(name, "completion").inc(
                int(usage.get("completion_tokens") or 0))

    async def call(self, targets: list[Target], operation: str,
                   fn: Callable[[Target], Awaitable[T]]) -> T:
        """Run ``fn`` on each target in turn until one succeeds (non-streaming calls).

        Raises:
            GatewayError: the caller's own 4xx at once, else why every target failed.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline_s
        outcomes: list[tuple[Target, str, float | None, str]] = []
        for target in targets:
            skipped = self._admit(target)
            if skipped is not None:
                outcomes.append((target, *skipped))
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.breakers[target.upstream.name].release_probe()
                break
            started = time.monotonic()
            try:
                async with asyncio.timeout(remaining):
                    result = await fn(target)
            except UpstreamFailure as exc:
                if not exc.retryable:
                    raise self._caller_error(target, operation, exc) from None
                outcomes.append((target, *self._failed(target, operation, exc)))
                continue
            except TimeoutError:
                self._failed(target, operation, UpstreamFailure(
                    "deadline", retryable=True, kind="timeout"))
                raise GatewayError(504, "deadline_exceeded",
                                   f"The request took longer than {self.deadline_s:.0f} s "
                                   "(OMNISTREAM_GATEWAY_DEADLINE_S)") from None
            except BaseException:
                self.breakers[target.upstream.name].release_probe()
                raise
            self._succeeded(target, operation, started)
            if isinstance(result, dict):
                self._count_usage(target, result.get("usage"))
            return result
        raise self._exhausted(outcomes)

    # -- chat ------------------------------------------------------------------------------

    async def chat(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streaming ``chat.completion``, with fallback along the model's targets.

        The answer's ``model`` is the target that served it (``provider/model``).
        """
        check_openai_request(body)
        targets = self.resolve(model, "chat")
        served: list[Target] = []

        async def run(target: Target) -> dict[str, Any]:
            served.append(target)
            return await target.upstream.chat(target.model, body)

        result = await self.call(targets, "chat", run)
        result["model"] = served[-1].id
        return result

    async def chat_stream(self, model: str, body: dict[str, Any]) -> AsyncIterator[
            dict[str, Any]]:
        """``chat.completion.chunk`` dicts as they arrive, failing over before the first.

        Raises:
            GatewayError: before the first chunk, as :meth:`call`; after it, 502
                ``upstream_stream_error`` (the upstream cut or garbled its stream) or 504
                ``deadline_exceeded``.
        """
        check_openai_request(body)
        targets = self.resolve(model, "chat")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline_s
        outcomes: list[tuple[Target, str, float | None, str]] = []
        for target in targets:
            skipped = self._admit(target)
            if skipped is not None:
                outcomes.append((target, *skipped))
                continue
            started = time.monotonic()
            stream = cast(AsyncGenerator[dict[str, Any], None],
                          target.upstream.chat_stream(target.model, body))
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    first = await anext(stream)
            except (UpstreamFailure, UpstreamStreamError, StopAsyncIteration) as exc:
                await stream.aclose()
                failure = exc if isinstance(exc, UpstreamFailure) else UpstreamFailure(
                    f"{target.upstream.name} ended its stream before any output"
                    if isinstance(exc, StopAsyncIteration) else f"{target.upstream.name}: {exc}",
                    retryable=True, kind="invalid_response")
                if not failure.retryable:
                    raise self._caller_error(target, "chat_stream", failure) from None
                outcomes.append((target, *self._failed(target, "chat_stream", failure)))
                continue
            except TimeoutError:
                await stream.aclose()
                self._failed(target, "chat_stream", UpstreamFailure(
                    "deadline", retryable=True, kind="timeout"))
                raise GatewayError(504, "deadline_exceeded",
                                   f"No output within {self.deadline_s:.0f} s") from None
            except BaseException:
                self.breakers[target.upstream.name].release_probe()
                await stream.aclose()
                raise
            name = target.upstream.name
            self.metrics.ttft.labels(name).observe(time.monotonic() - started)
            self.breakers[name].record_success()
            self._update_breaker_gauge(name)
            async for item in self._relay(target, stream, first, started, deadline):
                yield item
            return
        raise self._exhausted(outcomes)

    async def _relay(self, target: Target, stream: AsyncGenerator[dict[str, Any], None],
                     first: dict[str, Any], started: float, deadline: float,
                     ) -> AsyncIterator[dict[str, Any]]:
        """Yield the rest of a stream that has started; errors are no longer failed over."""
        loop = asyncio.get_running_loop()
        name = target.upstream.name
        outcome = "ok"
        try:
            first["model"] = target.id
            yield first
            while True:
                # Each read is bounded by the provider's timeout_s (httpx); the request's
                # deadline is checked between chunks rather than with a timer per chunk,
                # which cost ~5% of the gateway's CPU per streamed token.
                if loop.time() > deadline:
                    raise TimeoutError
                try:
                    item = await anext(stream)
                except StopAsyncIteration:
                    break
                if item.get("usage"):
                    self._count_usage(target, item["usage"])
                item["model"] = target.id
                yield item
        except (UpstreamFailure, UpstreamStreamError) as exc:
            outcome = "cut"
            self.breakers[name].record_failure()
            self._update_breaker_gauge(name)
            raise GatewayError(502, "upstream_stream_error",
                               f"{target.id} failed mid-stream: {exc}") from None
        except TimeoutError:
            outcome = "deadline"
            raise GatewayError(504, "deadline_exceeded",
                               f"The stream ran past {self.deadline_s:.0f} s") from None
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "abandoned"
            raise
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(_aclose(stream))
            self.metrics.requests.labels(name, "chat_stream", outcome).inc()
            self.metrics.latency.labels(name, "chat_stream").observe(time.monotonic() - started)

    # -- other operations ----------------------------------------------------------------

    async def embeddings(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """Embeddings from an upstream provider (the local model is served by the route)."""
        targets = self.resolve(model, "embeddings")
        served: list[Target] = []

        async def run(target: Target) -> dict[str, Any]:
            served.append(target)
            return await target.upstream.embeddings(target.model, body)

        result = await self.call(targets, "embeddings", run)
        result["model"] = served[-1].id
        return result

    async def moderations(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """A moderation verdict from an OpenAI-kind provider."""
        targets = self.resolve(model, "moderations")
        return await self.call(targets, "moderations",
                               lambda t: t.upstream.moderations(t.model, body))

    async def images(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """Images from an OpenAI-kind provider (the local diffusion models have their route)."""
        targets = self.resolve(model, "images")
        return await self.call(targets, "images", lambda t: t.upstream.images(t.model, body))

    async def web_search(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """A web search on a search provider."""
        targets = self.resolve(model, "web_search")

        async def run(target: Target) -> dict[str, Any]:
            assert isinstance(target.upstream, WebToolUpstream)
            return await target.upstream.search(target.model, body)

        return await self.call(targets, "web_search", run)

    async def web_fetch(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """A page fetched through a provider (the local fetcher is served by the route)."""
        targets = self.resolve(model, "web_fetch")

        async def run(target: Target) -> dict[str, Any]:
            assert isinstance(target.upstream, WebToolUpstream)
            return await target.upstream.fetch(target.model, body)

        return await self.call(targets, "web_fetch", run)

    async def count_tokens(self, model: str, body: dict[str, Any]) -> int | None:
        """Anthropic's own token count when ``model`` routes first to an Anthropic provider."""
        targets = self.resolve(model, "chat")
        first = targets[0]
        if not isinstance(first.upstream, AnthropicUpstream):
            return None
        upstream = first.upstream
        return await self.call([first], "count_tokens",
                               lambda t: upstream.count_tokens(t.model, body))

    # -- listing -------------------------------------------------------------------------

    def provider_kinds(self) -> dict[str, str]:
        """Provider name → kind."""
        return {name: u.config.kind for name, u in self.upstreams.items()}

    def breaker_states(self) -> dict[str, dict[str, Any]]:
        """Per provider: circuit state, consecutive failures, rate-limit wait."""
        return {name: {"state": str(b.state), "failures": b.failures,
                       "retry_in_s": round(b.retry_in(), 3),
                       "rate_limited_for_s": round(b.limited_for(), 3)}
                for name, b in self.breakers.items()}

    def model_entries(self) -> list[dict[str, Any]]:
        """Every routable upstream model, alias and combo, OpenAI-list shaped."""
        entries: list[dict[str, Any]] = []

        def entry(model_id: str, owned_by: str, task: str, **extra: Any) -> dict[str, Any]:
            return {"id": model_id, "object": "model", "created": 0, "owned_by": owned_by,
                    "task": task, "tier": "external", "maturity": "stable",
                    "summary": "", "available": True, "reason": "", **extra}

        for name, upstream in self.upstreams.items():
            kind = upstream.config.kind
            for model in self.models_of(name):
                if kind in WEB_KINDS:
                    task = "web_fetch" if model in ("reader", "scrape", "fetch") else "web_search"
                elif "embed" in model:
                    task = "embeddings"
                elif "moderation" in model:
                    task = "moderations"
                else:
                    task = "chat"
                entries.append(entry(f"{name}/{model}", name, task, provider=name,
                                     provider_kind=kind))
        for alias, target in self.config.aliases.items():
            entries.append(entry(alias, "alias", "chat", alias_of=target))
        for combo, targets in self.config.combos.items():
            entries.append(entry(combo, "combo", "chat", combo=list(targets)))
        return entries


async def _aclose(stream: AsyncIterator[Any]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()
