"""Upstream adapters: one per provider kind, each speaking OpenAI chat completions inward.

An adapter turns a chat-completions body into its upstream's wire format, sends it with
the gateway's shared :class:`httpx.AsyncClient` (async I/O on the event loop, never a
runner thread; ``trust_env`` so ``HTTP(S)_PROXY``/``NO_PROXY`` apply), and turns the
answer back into a ``chat.completion`` or a stream of ``chat.completion.chunk`` dicts.

Failures are sorted once, here, into what the router needs to decide on fallback:
:class:`UpstreamFailure` with ``retryable`` set for connection errors, timeouts, 5xx,
429 and unusable answers (another target may do better), unset for the caller's own
4xx (every target would refuse it too).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx

from omnistream.gateway.config import ProviderConfig
from omnistream.gateway.translate import (
    AnthropicToOpenAIStream,
    OllamaToOpenAIStream,
    UpstreamStreamError,
    anthropic_to_openai_response,
    ollama_to_openai_response,
    openai_to_anthropic_request,
    openai_to_ollama_request,
)

log = logging.getLogger(__name__)

ANTHROPIC_VERSION = "2023-06-01"
ERROR_SNIPPET_CHARS = 300


class UpstreamFailure(Exception):
    """An upstream call failed.

    Attributes:
        retryable: another target may succeed (connection, timeout, 5xx, 429, garbage).
        status: the upstream's HTTP status (0 when none came back).
        kind: ``timeout``, ``connect``, ``http``, ``rate_limited``, ``invalid_response``.
        retry_after: the upstream's ``Retry-After`` in seconds, on 429.
    """

    def __init__(self, message: str, *, retryable: bool, status: int = 0, kind: str = "http",
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status = status
        self.kind = kind
        self.retry_after = retry_after


def _retry_after(response: httpx.Response) -> float | None:
    raw = response.headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None


class ClientShards:
    """Several pooled :class:`httpx.AsyncClient` s, handed out round robin.

    httpcore's pool matches every queued request against every connection on each
    change, so one client's cost per request grows with the requests in flight: measured
    here at 64 concurrent requests, one client did 45 requests/s where 32 shards did 154
    (the rate of one request at a time). Sharding keeps each pool small. The shards share
    one TLS context (building one reads the CA bundle: a quarter second) and all honour
    ``HTTP(S)_PROXY``/``NO_PROXY`` (``trust_env``).
    """

    def __init__(self, shards: int = 32, *, max_connections: int = 1024) -> None:
        self.shards = max(1, shards)
        self.max_connections = max_connections
        self.clients: list[httpx.AsyncClient] = []
        self._next: Iterator[httpx.AsyncClient] = iter(())

    def prepare(self) -> None:
        """Build the clients now (blocking: call it off the loop). A server with no
        providers never needs them, so nothing is built until this or :meth:`pick`."""
        if self.clients:
            return
        verify = httpx.create_ssl_context()
        per_shard = max(4, self.max_connections // self.shards)
        self.clients = [
            httpx.AsyncClient(
                trust_env=True, verify=verify, follow_redirects=False,
                limits=httpx.Limits(max_connections=per_shard,
                                    max_keepalive_connections=min(per_shard, 16)))
            for _ in range(self.shards)
        ]
        self._next = itertools.cycle(self.clients)

    def pick(self) -> httpx.AsyncClient:
        """The next client (a whole request, stream included, stays on one)."""
        if not self.clients:
            self.prepare()
        return next(self._next)

    async def aclose(self) -> None:
        """Close every shard's connections."""
        for client in self.clients:
            await client.aclose()


class Upstream:
    """Base adapter: shared HTTP plumbing and error sorting for one configured provider."""

    def __init__(self, config: ProviderConfig, clients: ClientShards) -> None:
        self.config = config
        self.name = config.name
        self.clients = clients

    # -- plumbing ----------------------------------------------------------------------

    def headers(self) -> dict[str, str]:
        """Request headers: the provider's key from its env var, never the caller's."""
        headers = {"content-type": "application/json", **self.config.headers}
        key = self.config.api_key
        if key:
            headers["authorization"] = f"Bearer {key}"
        return headers

    def timeout(self) -> httpx.Timeout:
        """``timeout_s`` for reads (so also between stream chunks); connects give up sooner."""
        t = self.config.timeout_s
        return httpx.Timeout(t, connect=min(t, 10.0))

    def scrub(self, text: str) -> str:
        """An upstream message, shortened and with the provider's key removed."""
        key = self.config.api_key
        if key:
            text = text.replace(key, "***")
        text = " ".join(text.split())
        return text[:ERROR_SNIPPET_CHARS]

    def _error_message(self, body: bytes) -> str:
        try:
            data = json.loads(body)
        except ValueError:
            return self.scrub(body.decode("utf-8", "replace"))
        if isinstance(data, dict):
            err = data.get("error", data)
            if isinstance(err, dict):
                return self.scrub(str(err.get("message") or err))
            return self.scrub(str(err))
        return self.scrub(str(data))

    def _raise_for_status(self, response: httpx.Response, body: bytes) -> None:
        status = response.status_code
        if status < 400:
            return
        message = f"{self.name} answered {status}: {self._error_message(body)}"
        if status == 429:
            raise UpstreamFailure(message, retryable=True, status=status, kind="rate_limited",
                                  retry_after=_retry_after(response))
        # 401/403 here is the operator's key, not the caller's: another target may work.
        retryable = status >= 500 or status in (401, 403, 408, 409)
        raise UpstreamFailure(message, retryable=retryable, status=status)

    def _transport_failure(self, exc: httpx.HTTPError) -> UpstreamFailure:
        if isinstance(exc, httpx.TimeoutException):
            return UpstreamFailure(f"{self.name} timed out ({type(exc).__name__})",
                                   retryable=True, kind="timeout")
        return UpstreamFailure(f"{self.name} unreachable: {type(exc).__name__}",
                               retryable=True, kind="connect")

    async def post_json(self, url: str, body: dict[str, Any]) -> Any:
        """POST JSON and return the decoded JSON answer.

        Raises:
            UpstreamFailure: transport error, error status or an answer that is not JSON.
        """
        try:
            response = await self.clients.pick().post(url, json=body, headers=self.headers(),
                                              timeout=self.timeout())
        except httpx.HTTPError as exc:
            raise self._transport_failure(exc) from None
        self._raise_for_status(response, response.content)
        try:
            return response.json()
        except ValueError:
            raise UpstreamFailure(f"{self.name} answered with something that is not JSON",
                                  retryable=True, status=response.status_code,
                                  kind="invalid_response") from None

    async def get_json(self, url: str) -> Any:
        """GET and decode JSON (model discovery)."""
        try:
            response = await self.clients.pick().get(url, headers=self.headers(),
                                                     timeout=self.timeout())
        except httpx.HTTPError as exc:
            raise self._transport_failure(exc) from None
        self._raise_for_status(response, response.content)
        try:
            return response.json()
        except ValueError:
            raise UpstreamFailure(f"{self.name} model list is not JSON", retryable=True,
                                  kind="invalid_response") from None

    async def stream_lines(self, url: str, body: dict[str, Any]) -> AsyncIterator[str]:
        """POST and yield the answer's lines as they arrive.

        Closing the generator (a caller that went away) closes the upstream connection,
        which is how an abandoned client stream cancels the upstream request.
        """
        client = self.clients.pick()
        request = client.build_request("POST", url, json=body, headers=self.headers(),
                                       timeout=self.timeout())
        try:
            response = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self._transport_failure(exc) from None
        try:
            if response.status_code >= 400:
                content = await response.aread()
                self._raise_for_status(response, content)
            # Lines split here from the decoded bytes: httpx's aiter_lines stacks two more
            # generator layers and decoders per network read, a measurable share of the
            # gateway's CPU per streamed token.
            pending = b""
            try:
                async for data in response.aiter_bytes():
                    pending += data
                    if b"\n" not in data:
                        continue
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        yield line.rstrip(b"\r").decode("utf-8", "replace")
            except httpx.HTTPError as exc:
                raise self._transport_failure(exc) from None
            if pending:
                yield pending.rstrip(b"\r").decode("utf-8", "replace")
        finally:
            await response.aclose()

    async def sse_events(self, url: str, body: dict[str, Any]) -> AsyncIterator[
            tuple[str, str]]:
        """POST and yield ``(event, data)`` pairs of a ``text/event-stream`` answer."""
        event, data = "", list[str]()
        async for line in self.stream_lines(url, body):
            if not line:
                if data:
                    yield event or "message", "\n".join(data)
                event, data = "", []
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
        if data:
            yield event or "message", "\n".join(data)

    def _decode(self, data: str) -> dict[str, Any]:
        try:
            value = json.loads(data)
        except ValueError:
            raise UpstreamFailure(f"{self.name} sent a stream event that is not JSON",
                                  retryable=True, kind="invalid_response") from None
        if not isinstance(value, dict):
            raise UpstreamFailure(f"{self.name} sent a stream event that is not an object",
                                  retryable=True, kind="invalid_response")
        return value

    def _scrubbed(self, feed: Callable[[dict[str, Any]], list[dict[str, Any]]],
                  event: dict[str, Any]) -> list[dict[str, Any]]:
        """A stream translator's chunks; an error event it raises loses the provider's key."""
        try:
            return feed(event)
        except UpstreamStreamError as exc:
            raise UpstreamStreamError(self.scrub(str(exc))) from None

    # -- what adapters implement --------------------------------------------------------

    async def chat(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """One non-streaming ``chat.completion``."""
        raise UpstreamFailure(f"{self.name} ({self.config.kind}) does not serve chat",
                              retryable=False, status=400)

    def chat_stream(self, model: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """``chat.completion.chunk`` dicts as the upstream sends them."""
        raise UpstreamFailure(f"{self.name} ({self.config.kind}) does not serve chat",
                              retryable=False, status=400)

    async def embeddings(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """An OpenAI embeddings answer."""
        raise UpstreamFailure(f"{self.name} ({self.config.kind}) does not serve embeddings",
                              retryable=False, status=400)

    async def moderations(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """An OpenAI moderations answer."""
        raise UpstreamFailure(f"{self.name} ({self.config.kind}) does not serve moderations",
                              retryable=False, status=400)

    async def images(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """An OpenAI images answer (``{created, data: [{url | b64_json}]}``)."""
        raise UpstreamFailure(f"{self.name} ({self.config.kind}) does not generate images",
                              retryable=False, status=400)

    async def discover_models(self) -> list[str]:
        """Model ids the upstream lists (used when the file lists none)."""
        return []


class OpenAIUpstream(Upstream):
    """Any OpenAI-compatible server (OpenAI, vLLM, llama.cpp, LM Studio…).

    Its ``base_url`` includes ``/v1``.
    """

    def _body(self, model: str, body: dict[str, Any], stream: bool) -> dict[str, Any]:
        out = {k: v for k, v in body.items() if k not in ("reasoning_signature",)}
        out["model"] = model
        out["stream"] = stream
        if stream:
            out["stream_options"] = {"include_usage": True}
        else:
            out.pop("stream_options", None)
        return out

    async def chat(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        data = await self.post_json(f"{self.config.base_url}/chat/completions",
                                    self._body(model, body, False))
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise UpstreamFailure(f"{self.name} answered without 'choices'", retryable=True,
                                  kind="invalid_response")
        return data

    async def chat_stream(self, model: str, body: dict[str, Any]) -> AsyncIterator[
            dict[str, Any]]:
        url = f"{self.config.base_url}/chat/completions"
        async for _event, data in self.sse_events(url, self._body(model, body, True)):
            if data.strip() == "[DONE]":
                return
            item = self._decode(data)
            if "error" in item and "choices" not in item:
                err = item["error"]
                message = err.get("message") if isinstance(err, dict) else err
                raise UpstreamStreamError(self.scrub(str(message)))
            yield item

    async def embeddings(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        data = await self.post_json(f"{self.config.base_url}/embeddings", {**body, "model": model})
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise UpstreamFailure(f"{self.name} answered without 'data'", retryable=True,
                                  kind="invalid_response")
        return data

    async def images(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        data = await self.post_json(f"{self.config.base_url}/images/generations",
                                    {**body, "model": model})
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise UpstreamFailure(f"{self.name} answered without 'data'", retryable=True,
                                  kind="invalid_response")
        return data

    async def moderations(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        data = await self.post_json(f"{self.config.base_url}/moderations", {**body, "model": model})
        if not isinstance(data, dict):
            raise UpstreamFailure(f"{self.name} answered with a non-object", retryable=True,
                                  kind="invalid_response")
        return data

    async def discover_models(self) -> list[str]:
        data = await self.get_json(f"{self.config.base_url}/models")
        items = data.get("data", []) if isinstance(data, dict) else []
        return [str(m["id"]) for m in items if isinstance(m, dict) and m.get("id")]


class AnthropicUpstream(Upstream):
    """Anthropic's Messages API; ``base_url`` is the API root (``https://api.anthropic.com``)."""

    def headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json", "anthropic-version": ANTHROPIC_VERSION,
                   **self.config.headers}
        key = self.config.api_key
        if key:
            headers["x-api-key"] = key
        return headers

    async def chat(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        request = openai_to_anthropic_request({**body, "stream": False}, model)
        data = await self.post_json(f"{self.config.base_url}/v1/messages", request)
        if not isinstance(data, dict) or not isinstance(data.get("content"), list):
            raise UpstreamFailure(f"{self.name} answered without 'content'", retryable=True,
                                  kind="invalid_response")
        return anthropic_to_openai_response(data, model)

    async def chat_stream(self, model: str, body: dict[str, Any]) -> AsyncIterator[
            dict[str, Any]]:
        request = openai_to_anthropic_request({**body, "stream": True}, model)
        translator = AnthropicToOpenAIStream(model)
        async for _event, data in self.sse_events(f"{self.config.base_url}/v1/messages",
                                                  request):
            event = self._decode(data)
            for item in self._scrubbed(translator.feed, event):
                yield item
            if event.get("type") == "message_stop":
                return

    async def count_tokens(self, model: str, body: dict[str, Any]) -> int:
        """Anthropic's own count for an Anthropic-shaped body."""
        data = await self.post_json(f"{self.config.base_url}/v1/messages/count_tokens",
                                    {**body, "model": model})
        return int(data.get("input_tokens", 0)) if isinstance(data, dict) else 0

    async def discover_models(self) -> list[str]:
        data = await self.get_json(f"{self.config.base_url}/v1/models")
        items = data.get("data", []) if isinstance(data, dict) else []
        return [str(m["id"]) for m in items if isinstance(m, dict) and m.get("id")]


class OllamaUpstream(Upstream):
    """An Ollama server's native API (``/api/chat``, ``/api/embed``, ``/api/tags``)."""

    async def chat(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        request = openai_to_ollama_request({**body, "stream": False}, model)
        data = await self.post_json(f"{self.config.base_url}/api/chat", request)
        if not isinstance(data, dict) or not isinstance(data.get("message"), dict):
            raise UpstreamFailure(f"{self.name} answered without 'message'", retryable=True,
                                  kind="invalid_response")
        return ollama_to_openai_response(data, model)

    async def chat_stream(self, model: str, body: dict[str, Any]) -> AsyncIterator[
            dict[str, Any]]:
        request = openai_to_ollama_request({**body, "stream": True}, model)
        translator = OllamaToOpenAIStream(model)
        async for line in self.stream_lines(f"{self.config.base_url}/api/chat", request):
            if not line.strip():
                continue
            item = self._decode(line)
            for out in self._scrubbed(translator.feed, item):
                yield out
            if item.get("done"):
                return

    async def embeddings(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        texts = body.get("input")
        data = await self.post_json(f"{self.config.base_url}/api/embed",
                                    {"model": model, "input": texts})
        vectors = data.get("embeddings") if isinstance(data, dict) else None
        if not isinstance(vectors, list):
            raise UpstreamFailure(f"{self.name} answered without 'embeddings'", retryable=True,
                                  kind="invalid_response")
        tokens = int(data.get("prompt_eval_count", 0))
        return {"object": "list", "model": model,
                "data": [{"object": "embedding", "index": i, "embedding": v}
                         for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def discover_models(self) -> list[str]:
        data = await self.get_json(f"{self.config.base_url}/api/tags")
        items = data.get("models", []) if isinstance(data, dict) else []
        return [str(m.get("name") or m.get("model")) for m in items if isinstance(m, dict)]


class WebToolUpstream(Upstream):
    """Web search and fetch providers (Tavily, Jina, Firecrawl), answered in one shape.

    Search: ``{answer?, results: [{url, title, content, score}]}``; fetch:
    ``{url, title, markdown, links?, images?}``.
    """

    async def search(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """Run a search on this provider."""
        kind = self.config.kind
        query = body["query"]
        limit = int(body.get("max_results") or 5)
        if kind == "tavily":
            request = {"query": query, "max_results": limit,
                       "include_answer": bool(body.get("include_answer")),
                       "search_depth": body.get("search_depth") or "basic"}
            data = await self.post_json(f"{self.config.base_url}/search", request)
            results = [{"url": r.get("url", ""), "title": r.get("title", ""),
                        "content": r.get("content", ""), "score": r.get("score", 0.0)}
                       for r in (data.get("results") or []) if isinstance(r, dict)]
            out: dict[str, Any] = {"results": results[:limit]}
            if data.get("answer"):
                out["answer"] = data["answer"]
            return out
        if kind == "firecrawl":
            data = await self.post_json(f"{self.config.base_url}/v1/search",
                                        {"query": query, "limit": limit})
            items = data.get("data") or []
            return {"results": [{"url": r.get("url", ""), "title": r.get("title", ""),
                                 "content": r.get("description", "") or r.get("markdown", ""),
                                 "score": 1.0 - i / max(1, len(items))}
                                for i, r in enumerate(items) if isinstance(r, dict)][:limit]}
        # jina: s.jina.ai answers JSON with Accept: application/json
        base = self.config.base_url.replace("//r.jina.ai", "//s.jina.ai")
        data = await self.post_json(f"{base}/", {"q": query, "num": limit})
        items = data.get("data") or []
        return {"results": [{"url": r.get("url", ""), "title": r.get("title", ""),
                             "content": r.get("content", "") or r.get("description", ""),
                             "score": 1.0 - i / max(1, len(items))}
                            for i, r in enumerate(items) if isinstance(r, dict)][:limit]}

    async def fetch(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """Fetch a page through this provider (Jina reader, Firecrawl scrape)."""
        url = body["url"]
        if self.config.kind == "firecrawl":
            data = await self.post_json(f"{self.config.base_url}/v1/scrape",
                                        {"url": url, "formats": ["markdown", "links"]})
            page = data.get("data") or {}
            return {"url": url, "title": (page.get("metadata") or {}).get("title", ""),
                    "markdown": page.get("markdown", ""), "links": page.get("links", [])}
        if self.config.kind == "jina":
            data = await self.post_json(f"{self.config.base_url}/", {"url": url})
            page = data.get("data") or {}
            return {"url": page.get("url", url), "title": page.get("title", ""),
                    "markdown": page.get("content", "")}
        raise UpstreamFailure(f"{self.name} ({self.config.kind}) does not fetch pages",
                              retryable=False, status=400)

    def headers(self) -> dict[str, str]:
        headers = super().headers()
        headers["accept"] = "application/json"
        return headers


ADAPTERS: dict[str, type[Upstream]] = {
    "openai": OpenAIUpstream,
    "anthropic": AnthropicUpstream,
    "ollama": OllamaUpstream,
    "tavily": WebToolUpstream,
    "jina": WebToolUpstream,
    "firecrawl": WebToolUpstream,
}


def make_upstream(config: ProviderConfig, clients: ClientShards) -> Upstream:
    """The adapter for a configured provider."""
    return ADAPTERS[config.kind](config, clients)
