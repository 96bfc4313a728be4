"""The OpenAI-compatible gateway surface: ``/v1/…`` and the same paths under ``/api/v1/…``.

Thin edges over :mod:`omnistream.gateway`: each route parses its format (OpenAI chat,
Anthropic messages, Responses, Ollama chat), translates to chat completions, asks the
gateway, and answers in the caller's format and SSE grammar. A stream's first chunk is
awaited before the response starts, so every failure that happens before any output
(unknown model, open circuits, rate limits, fallback exhausted) is a real HTTP status;
after that a failure is an error event in the stream.

The media routes that already exist (speech, transcription, images) are mounted again
under ``/api/v1/…`` here rather than duplicated.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel

from omnistream import __version__
from omnistream.gateway import fetcher_of, gateway_of
from omnistream.gateway import local as local_models
from omnistream.gateway.errors import GatewayError
from omnistream.gateway.minilm import MODEL_ID
from omnistream.gateway.schemas import (
    ChatCompletionBody,
    CountTokensBody,
    EmbeddingsBody,
    MessagesBody,
    ModerationsBody,
    OllamaChatBody,
    ProviderImagesBody,
    RerankBody,
    ResponsesBody,
    VariationsForm,
    WebFetchBody,
    WebSearchBody,
)
from omnistream.gateway.translate import (
    OpenAIToAnthropicStream,
    OpenAIToOllamaStream,
    OpenAIToResponsesStream,
    anthropic_to_openai_request,
    ollama_to_openai_request,
    openai_to_anthropic_response,
    openai_to_ollama_response,
    openai_to_responses_response,
    responses_to_openai_request,
)
from omnistream.transports.request_schemas import TranscriptionForm, body_of, json_body
from omnistream.transports.state import AppState, get_state
from omnistream.transports.ws_common import off_loop

log = logging.getLogger(__name__)

router = APIRouter()

PREFIXES = ("/v1", "/api/v1")
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
MAX_QUERY_CHARS = 2000

Handler = Callable[[Request], Awaitable[Response]]


def _both(path: str, method: str = "POST",
          body: type[BaseModel] | None = None) -> Callable[[Handler], Handler]:
    """Register a handler under ``/v1{path}`` and ``/api/v1{path}`` (with its documented
    JSON body, if any)."""

    def register(func: Handler) -> Handler:
        extra = json_body(body) if body is not None else None
        for prefix in PREFIXES:
            router.add_api_route(prefix + path, func, methods=[method], openapi_extra=extra)
        return func

    return register


def _alias(path: str, endpoint: Any, source: APIRouter, method: str = "POST") -> None:
    """Serve another router's handler under ``path`` too, with its documented body."""
    extra = next((r.openapi_extra for r in source.routes
                  if isinstance(r, APIRoute) and r.endpoint is endpoint), None)
    router.add_api_route(path, endpoint, methods=[method], openapi_extra=extra)


# -- request and error plumbing -------------------------------------------------------------


async def _json(request: Request) -> dict[str, Any]:
    """The body as a JSON object (parsed off the loop when large), else 400."""
    raw = await request.body()
    try:
        value = await off_loop(json.loads, raw or b"null", size=len(raw))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise GatewayError(400, "invalid_json", f"Request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise GatewayError(400, "invalid_json", "Request body must be a JSON object")
    return value


def _openai_error(exc: GatewayError) -> JSONResponse:
    return JSONResponse(exc.openai_body(), status_code=exc.status, headers=exc.headers())


def _anthropic_error(exc: GatewayError) -> JSONResponse:
    return JSONResponse(exc.anthropic_body(), status_code=exc.status, headers=exc.headers())


def _ollama_error(exc: GatewayError) -> JSONResponse:
    return JSONResponse({"error": exc.message, "code": exc.code}, status_code=exc.status,
                        headers=exc.headers())


def _count_error(request: Request, route: str, exc: GatewayError) -> None:
    get_state(request).metrics.protocol_errors.labels(route, exc.code).inc()


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise GatewayError(400, "invalid_model", "'model' is required; see GET /v1/models",
                           param="model")
    return model.strip()


def _translated(convert: Callable[[dict[str, Any]], dict[str, Any]],
                body: dict[str, Any]) -> dict[str, Any]:
    """A caller's body in chat-completions form; a shape the translator cannot read is a
    400 (the chat checks then judge the result field by field)."""
    try:
        return convert(body)
    except GatewayError:
        raise
    except (TypeError, AttributeError, ValueError, KeyError) as exc:
        raise GatewayError(400, "invalid_request",
                           f"Malformed request body: {type(exc).__name__}: {exc}") from None


def _sse_data(data: Any) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


async def _first(stream: AsyncIterator[dict[str, Any]]) -> dict[str, Any] | None:
    """Await a stream's first chunk (GatewayError propagates; None: empty stream)."""
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None


async def _with_first(first: dict[str, Any] | None,
                      stream: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    if first is not None:
        yield first
    async for item in stream:
        yield item


def _stream_response(body: AsyncIterator[bytes], media_type: str) -> StreamingResponse:
    return StreamingResponse(body, media_type=media_type, headers=SSE_HEADERS)


# -- OpenAI chat completions ------------------------------------------------------------------


async def _chat(request: Request, provider: str | None) -> Response:
    route = "gateway.chat"
    try:
        body = await _json(request)
        model = _model(body)
        if provider is not None and not model.startswith(f"{provider}/"):
            model = f"{provider}/{model}"
        gateway = gateway_of(get_state(request))
        if not body.get("stream"):
            return JSONResponse(await gateway.chat(model, body))
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        stream = gateway.chat_stream(model, body)
        first = await _first(stream)
    except GatewayError as exc:
        _count_error(request, route, exc)
        return _openai_error(exc)

    async def events() -> AsyncIterator[bytes]:
        try:
            async for item in _with_first(first, stream):
                if not include_usage:
                    item.pop("usage", None)
                    if not item.get("choices"):
                        continue
                yield _sse_data(item)
        except GatewayError as exc:
            yield _sse_data(exc.openai_body())
            return
        yield b"data: [DONE]\n\n"

    return _stream_response(events(), "text/event-stream")


@_both("/chat/completions", body=ChatCompletionBody)
async def chat_completions(request: Request) -> Response:
    """OpenAI chat completions, routed by ``model`` (combo, alias, ``provider/model``)."""
    return await _chat(request, None)


async def provider_chat_completions(request: Request) -> Response:
    """Chat completions pinned to one provider (``model`` without the prefix)."""
    return await _chat(request, request.path_params["provider"])


for _prefix in PREFIXES:
    router.add_api_route(_prefix + "/providers/{provider}/chat/completions",
                         provider_chat_completions, methods=["POST"],
                         openapi_extra=json_body(ChatCompletionBody))


# -- Anthropic messages ---------------------------------------------------------------------


@_both("/messages", body=MessagesBody)
async def messages(request: Request) -> Response:
    """Anthropic Messages, served by any chat provider (translated both ways)."""
    route = "gateway.messages"
    try:
        body = await _json(request)
        model = _model(body)
        if body.get("max_tokens") is None:
            raise GatewayError(400, "invalid_request", "'max_tokens' is required",
                               param="max_tokens")
        chat_body = _translated(anthropic_to_openai_request, body)
        gateway = gateway_of(get_state(request))
        if not body.get("stream"):
            result = await gateway.chat(model, chat_body)
            return JSONResponse(openai_to_anthropic_response(result, result.get("model", model)))
        stream = gateway.chat_stream(model, chat_body)
        first = await _first(stream)
    except GatewayError as exc:
        _count_error(request, route, exc)
        return _anthropic_error(exc)
    served = str(first.get("model", model)) if first else model
    translator = OpenAIToAnthropicStream(served)

    async def events() -> AsyncIterator[bytes]:
        yield translator.start()
        yield b'event: ping\ndata: {"type":"ping"}\n\n'
        try:
            async for item in _with_first(first, stream):
                for event in translator.feed(item):
                    yield event
        except GatewayError as exc:
            yield translator.error(exc.code, exc.message)
            return
        for event in translator.finish():
            yield event

    return _stream_response(events(), "text/event-stream")


def _estimate_tokens(body: dict[str, Any]) -> int:
    """About four characters a token over every text the request carries."""
    text = json.dumps([body.get("system"), body.get("messages"), body.get("tools")],
                      ensure_ascii=False)
    return max(1, len(text) // 4)


@_both("/messages/count_tokens", body=CountTokensBody)
async def count_tokens(request: Request) -> Response:
    """Anthropic token count: the provider's own when the model routes to Anthropic,
    else an estimate (four characters a token)."""
    try:
        body = await _json(request)
        model = _model(body)
        _translated(anthropic_to_openai_request, body)  # the same checks as /messages
        gateway = gateway_of(get_state(request))
        counted = await gateway.count_tokens(model, {k: v for k, v in body.items()
                                                      if k != "model"})
    except GatewayError as exc:
        _count_error(request, "gateway.count_tokens", exc)
        return _anthropic_error(exc)
    return JSONResponse({"input_tokens": counted if counted is not None
                         else _estimate_tokens(body)})


# -- Responses ------------------------------------------------------------------------------


@_both("/responses", body=ResponsesBody)
async def responses(request: Request) -> Response:
    """OpenAI Responses, stateless: ``previous_response_id`` is refused (nothing is stored)."""
    route = "gateway.responses"
    try:
        body = await _json(request)
        model = _model(body)
        if body.get("previous_response_id"):
            raise GatewayError(400, "unsupported_parameter",
                               "previous_response_id is not supported: this gateway stores "
                               "no responses; send the whole conversation in 'input'",
                               param="previous_response_id")
        chat_body = _translated(responses_to_openai_request, body)
        gateway = gateway_of(get_state(request))
        if not body.get("stream"):
            result = await gateway.chat(model, chat_body)
            return JSONResponse(openai_to_responses_response(result, result.get("model", model)))
        stream = gateway.chat_stream(model, chat_body)
        first = await _first(stream)
    except GatewayError as exc:
        _count_error(request, route, exc)
        return _openai_error(exc)
    served = str(first.get("model", model)) if first else model
    translator = OpenAIToResponsesStream(served)

    async def events() -> AsyncIterator[bytes]:
        for event in translator.start():
            yield event
        try:
            async for item in _with_first(first, stream):
                for event in translator.feed(item):
                    yield event
        except GatewayError as exc:
            yield translator.error(exc.code, exc.message)
            return
        for event in translator.finish():
            yield event

    return _stream_response(events(), "text/event-stream")


# -- Ollama chat ----------------------------------------------------------------------------


async def ollama_chat(request: Request) -> Response:
    """Ollama's ``/api/chat`` (streams NDJSON unless ``stream: false``)."""
    route = "gateway.ollama_chat"
    try:
        body = await _json(request)
        model = _model(body)
        chat_body = _translated(ollama_to_openai_request, body)
        gateway = gateway_of(get_state(request))
        if not chat_body.get("stream", True):
            result = await gateway.chat(model, chat_body)
            return JSONResponse(openai_to_ollama_response(result, model))
        stream = gateway.chat_stream(model, {**chat_body, "stream": True})
        first = await _first(stream)
    except GatewayError as exc:
        _count_error(request, route, exc)
        return _ollama_error(exc)
    translator = OpenAIToOllamaStream(model)

    async def lines() -> AsyncIterator[bytes]:
        try:
            async for item in _with_first(first, stream):
                for line in translator.feed(item):
                    yield line
        except GatewayError as exc:
            yield json.dumps({"error": exc.message}).encode() + b"\n"
            return
        for line in translator.finish():
            yield line

    return _stream_response(lines(), "application/x-ndjson")


for _path in ("/api/chat", "/v1/api/chat", "/api/v1/api/chat"):
    router.add_api_route(_path, ollama_chat, methods=["POST"],
                         openapi_extra=json_body(OllamaChatBody))


@router.get("/api/tags")
async def ollama_tags(request: Request) -> dict[str, Any]:
    """Ollama's model list: every chat model the gateway routes."""
    gateway = gateway_of(get_state(request))
    names = [e["id"] for e in gateway.model_entries() if e["task"] == "chat"]
    return {"models": [{"name": n, "model": n, "modified_at": "1970-01-01T00:00:00Z",
                        "size": 0, "digest": "", "details": {}} for n in names]}


# -- embeddings, rerank, moderations ------------------------------------------------------------


async def _embeddings(request: Request, provider: str | None) -> Response:
    try:
        body = await _json(request)
        model = body.get("model")
        state = get_state(request)
        if provider == "local" or (provider is None and local_models.is_local_embedding(model)):
            if model not in (None, "") and not local_models.is_local_embedding(
                    model if provider is None else f"local/{model}"):
                raise GatewayError(400, "invalid_model", f"local has no embedding model "
                                   f"'{model}'; use local/{MODEL_ID}",
                                   param="model")
            return JSONResponse(await local_models.embeddings(state, body))
        name = _model(body)
        if provider is not None and not name.startswith(f"{provider}/"):
            name = f"{provider}/{name}"
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise GatewayError(400, "invalid_encoding_format",
                               "encoding_format must be 'float' or 'base64'",
                               param="encoding_format")
        _check_embedding_input(body.get("input"))
        return JSONResponse(await gateway_of(state).embeddings(name, body))
    except GatewayError as exc:
        _count_error(request, "gateway.embeddings", exc)
        return _openai_error(exc)


def _check_embedding_input(value: Any) -> None:
    """``input``: a string, or a non-empty list of strings, of token ids, or of id lists."""
    def tokens(item: Any) -> bool:
        return isinstance(item, list) and bool(item) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in item)

    ok = (isinstance(value, str) and value != "") or (
        isinstance(value, list) and bool(value)
        and (all(isinstance(v, str) for v in value) or tokens(value)
             or all(tokens(v) for v in value)))
    if not ok:
        raise GatewayError(400, "invalid_input", "'input' must be a string or a non-empty "
                           "list of strings (or of token ids)", param="input")


@_both("/embeddings", body=EmbeddingsBody)
async def embeddings(request: Request) -> Response:
    """OpenAI embeddings: the local MiniLM (``local/all-minilm-l6-v2``) or a provider's."""
    return await _embeddings(request, None)


async def provider_embeddings(request: Request) -> Response:
    """Embeddings pinned to one provider (``local`` is the built-in model)."""
    return await _embeddings(request, request.path_params["provider"])


for _prefix in PREFIXES:
    router.add_api_route(_prefix + "/providers/{provider}/embeddings", provider_embeddings,
                         methods=["POST"], openapi_extra=json_body(EmbeddingsBody))


@_both("/rerank", body=RerankBody)
async def rerank(request: Request) -> Response:
    """Cohere/Jina-style rerank on the local model: ``results`` best first.

    Scores are the cosine similarity of MiniLM embeddings (a bi-encoder; no cross-encoder
    ships in a package).
    """
    try:
        body = await _json(request)
        model = body.get("model")
        if model not in (None, "", "rerank", "local/rerank") and \
                not local_models.is_local_embedding(model):
            raise GatewayError(400, "invalid_model",
                               f"Unknown rerank model '{model}'; use "
                               f"local/{MODEL_ID}", param="model")
        return JSONResponse(await local_models.rerank(get_state(request), body))
    except GatewayError as exc:
        _count_error(request, "gateway.rerank", exc)
        return _openai_error(exc)


@_both("/moderations", body=ModerationsBody)
async def moderations(request: Request) -> Response:
    """OpenAI moderations, from a provider of kind ``openai``."""
    try:
        body = await _json(request)
        if body.get("input") in (None, "", []):
            raise GatewayError(400, "invalid_input", "'input' is required", param="input")
        gateway = gateway_of(get_state(request))
        model = body.get("model") or "omni-moderation-latest"
        return JSONResponse(await gateway.moderations(str(model), body))
    except GatewayError as exc:
        _count_error(request, "gateway.moderations", exc)
        return _openai_error(exc)


# -- web tools --------------------------------------------------------------------------------


@_both("/web/search", body=WebSearchBody)
async def web_search(request: Request) -> Response:
    """Unified web search: ``{answer?, results: [{url, title, content, score}]}``."""
    try:
        body = await _json(request)
        query = body.get("query")
        if not isinstance(query, str) or not query.strip():
            raise GatewayError(400, "invalid_input", "'query' must be a non-empty string",
                               param="query")
        if len(query) > MAX_QUERY_CHARS:
            raise GatewayError(400, "query_too_long",
                               f"'query' is longer than {MAX_QUERY_CHARS} characters",
                               param="query")
        max_results = body.get("max_results", 5)
        if not isinstance(max_results, int) or not 1 <= max_results <= 50:
            raise GatewayError(400, "invalid_input", "'max_results' must be 1..50",
                               param="max_results")
        gateway = gateway_of(get_state(request))
        model = body.get("model")
        if not model:
            searchers = [e["id"] for e in gateway.model_entries() if e["task"] == "web_search"]
            model = searchers[0] if searchers else "search"
        return JSONResponse(await gateway.web_search(str(model), body))
    except GatewayError as exc:
        _count_error(request, "gateway.web_search", exc)
        return _openai_error(exc)


@_both("/web/fetch", body=WebFetchBody)
async def web_fetch(request: Request) -> Response:
    """Fetch a page as markdown, html or text: ``local/fetch`` (SSRF-checked) or a provider."""
    try:
        body = await _json(request)
        model = body.get("model") or local_models.FETCH_MODEL
        fmt = body.get("format") or "markdown"
        state = get_state(request)
        if model in (local_models.FETCH_MODEL, "fetch"):
            return JSONResponse(await fetcher_of(state).fetch(body.get("url"), str(fmt)))
        fetcher_of(state).check_url(body.get("url"))
        return JSONResponse(await gateway_of(state).web_fetch(str(model), body))
    except GatewayError as exc:
        _count_error(request, "gateway.web_fetch", exc)
        return _openai_error(exc)


# -- discovery ----------------------------------------------------------------------------------


def gateway_model_entries(request: Request) -> list[dict[str, Any]]:
    """Rows ``GET /v1/models`` adds for the gateway: upstream models, aliases, combos,
    and the local embedding model and fetcher under their ``local/`` ids."""
    state = get_state(request)
    entries = list(gateway_of(state).model_entries())
    local = local_models.embedding_model_entry(state)
    base = {"object": "model", "created": 0, "owned_by": "local", "tier": "core",
            "maturity": "stable", "provider": "local"}
    entries.append({**base, "id": local["id"], "task": "embeddings",
                    "summary": "all-MiniLM-L6-v2 sentence embeddings (384-d)",
                    "available": local["available"], "reason": local["reason"]})
    entries.append({**base, "id": local_models.FETCH_MODEL, "task": "web_fetch",
                    "summary": "Fetch a public web page as markdown, html or text",
                    "available": True, "reason": ""})
    return entries


async def api_models(request: Request) -> Response:
    """``/api/v1/models``: the same list as ``/v1/models``."""
    from omnistream.transports import generate_http

    return JSONResponse(await generate_http.list_models(request))


router.add_api_route("/api/v1/models", api_models, methods=["GET"])


@_both("/models/embedding", "GET")
async def embedding_models(request: Request) -> Response:
    """``{id, owned_by, dimensions, max_input_tokens}`` per embedding model."""
    state = get_state(request)
    data = [local_models.embedding_model_entry(state)]
    for entry in gateway_of(state).model_entries():
        if entry["task"] == "embeddings":
            data.append({"id": entry["id"], "object": "model", "owned_by": entry["owned_by"],
                         "dimensions": None, "max_input_tokens": None, "available": True})
    return JSONResponse({"object": "list", "data": data})


@_both("/models/web", "GET")
async def web_models(request: Request) -> Response:
    """Web tools with their ``kind`` (``webSearch`` or ``webFetch``)."""
    data = [{"id": local_models.FETCH_MODEL, "object": "model", "owned_by": "local",
             "kind": "webFetch", "formats": ["markdown", "html", "text"]}]
    for entry in gateway_of(get_state(request)).model_entries():
        if entry["task"] in ("web_search", "web_fetch"):
            data.append({"id": entry["id"], "object": "model", "owned_by": entry["owned_by"],
                         "kind": "webSearch" if entry["task"] == "web_search" else "webFetch"})
    return JSONResponse({"object": "list", "data": data})


@_both("/models/stt", "GET")
async def stt_models(request: Request) -> Response:
    """Speech-to-text models (the local Whisper) with their formats and languages."""
    state = get_state(request)
    data = []
    for spec in state.registry.specs("audio2text"):
        reason = spec.unavailable_reason()
        data.append({"id": spec.id, "object": "model", "owned_by": spec.owned_by,
                     "available": reason is None, "reason": reason or "",
                     "aliases": ["whisper-1"] if spec.id == state.settings.stt_model else [],
                     "response_formats": ["json", "text", "srt", "verbose_json", "vtt"],
                     "english_only": spec.id.endswith(".en"),
                     "capabilities": list(spec.capabilities) if isinstance(
                         spec.capabilities, dict) else []})
    return JSONResponse({"object": "list", "data": data})


OPENAI_IMAGE_SIZES = ("256x256", "512x512", "768x768", "1024x1024", "1024x1536", "1536x1024",
                      "1024x1792", "1792x1024")


def _is_image_spec(tasks: tuple[str, ...]) -> bool:
    return any("image" in t and not t.endswith("video") for t in tasks)


@_both("/models/image", "GET")
async def image_models(request: Request) -> Response:
    """Image models with ``sizes`` and ``capabilities`` (the local diffusion models)."""
    state = get_state(request)
    data = []
    for spec in state.registry.specs():
        if not _is_image_spec(spec.tasks):
            continue
        caps = spec.capabilities if isinstance(spec.capabilities, dict) else {}
        reason = spec.unavailable_reason()
        sizes = list(caps.get("sizes", []))
        if not sizes:  # the OpenAI sizes within the model's pixel limit
            limit = int((caps.get("limits") or {}).get("max_pixels", 1024 * 1024))
            sizes = [s for s in OPENAI_IMAGE_SIZES
                     if int(s.split("x")[0]) * int(s.split("x")[1]) <= limit]
        data.append({"id": spec.id, "object": "model", "owned_by": spec.owned_by,
                     "sizes": sizes,
                     "capabilities": [t for t in spec.tasks],
                     "available": reason is None, "reason": reason or ""})
    return JSONResponse({"object": "list", "data": data})


@router.get("/api/v1/providers/{provider}/models")
@router.get("/v1/providers/{provider}/models")
async def provider_models(request: Request, provider: str) -> Response:
    """One provider's models, ids without the ``provider/`` prefix."""
    state = get_state(request)
    gateway = gateway_of(state)
    if provider == "local":
        ids = [MODEL_ID, "fetch"]
        ids += [s.id for s in state.registry.specs() if s.unavailable_reason() is None
                and s.id != MODEL_ID]
    elif provider in gateway.upstreams:
        ids = list(gateway.models_of(provider))
    else:
        exc = GatewayError(404, "provider_not_found",
                           f"Unknown provider '{provider}'. Known: "
                           f"{', '.join(['local', *gateway.upstreams])}")
        return _openai_error(exc)
    kind = "local" if provider == "local" else gateway.upstreams[provider].config.kind
    return JSONResponse({"object": "list", "data": [
        {"id": i, "object": "model", "owned_by": provider, "provider_kind": kind}
        for i in ids]})


@router.get("/api/v1")
async def api_info(request: Request) -> dict[str, Any]:
    """API info and status: version, providers with their circuit state, routes."""
    state = get_state(request)
    gateway = gateway_of(state)
    kinds = gateway.provider_kinds()
    breakers = gateway.breaker_states()
    return {
        "object": "api", "name": "omnistream", "version": __version__, "status": "ok",
        "time": int(time.time()),
        "providers": {"local": {"kind": "local", "state": "closed"},
                      **{n: {"kind": k, **breakers[n]} for n, k in kinds.items()}},
        "combos": {k: list(v) for k, v in gateway.config.combos.items()},
        "aliases": dict(gateway.config.aliases),
        "endpoints": sorted({r.path for r in router.routes if hasattr(r, "path")
                             and str(getattr(r, "path", "")).startswith("/api/v1")}),
    }


# -- the media routes under /api/v1 ---------------------------------------------------------


def _mount_media_aliases() -> None:
    """Serve the existing speech, transcription and image handlers under ``/api/v1``."""
    from omnistream.transports import generate_http, tts_http

    _alias("/api/v1/audio/speech", tts_http.openai_speech, tts_http.router)
    _alias("/api/v1/models/tts", tts_http.tts_voices, tts_http.router, "GET")
    _alias("/api/v1/audio/transcriptions", generate_http.transcriptions, generate_http.router)
    if importlib.util.find_spec("omnistream.transports.images_http") is None:
        return
    from omnistream.transports import images_http

    generations = getattr(images_http, "images_generations", None)
    edits = getattr(images_http, "images_edits", None)
    variations = getattr(images_http, "images_variations", None)
    if generations is not None:
        for path in ("/api/v1/images/generations",
                     "/v1/providers/local/images/generations",
                     "/api/v1/providers/local/images/generations"):
            _alias(path, generations, images_http.router)
    if edits is not None:
        _alias("/api/v1/images/edits", edits, images_http.router)
    if variations is None:
        variations = images_variations
    for prefix in PREFIXES:
        router.add_api_route(prefix + "/images/variations", variations, methods=["POST"],
                             openapi_extra=body_of({"multipart/form-data": VariationsForm}))


async def images_variations(request: Request) -> Response:
    """OpenAI image variations on the local diffusion models: ``image2image`` of the
    uploaded ``image`` with a neutral prompt (``prompt`` may override it) at strength
    0.6, through the image routes' own job path."""
    from starlette.datastructures import UploadFile

    from omnistream.jobs.errors import GenerateError
    from omnistream.jobs.schemas import GenerateRequest
    from omnistream.transports import images_http as im

    service = im._service(request)
    try:
        form = await im._form(request, service)
        fields: dict[str, Any] = {}
        uploads = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key in ("image", "image[]") and "image" not in uploads:
                    uploads["image"] = await im._upload(value, key,
                                                        service.limits.max_upload_bytes)
            else:
                fields[key] = value
        if "image" not in uploads:
            raise GenerateError(400, "missing_image", "Field 'image' (a file) is required.")
        config, response_format, fmt = im._common_config(fields)
        config.setdefault("strength", 0.6)
        model = im._default_model(service, "image2image", fields.get("model"),
                                  im.OPENAI_IMAGE_ALIASES)
        prompt = str(fields.get("prompt") or "a variation of this image, same subject and style")
        body = GenerateRequest(task="image2image", model=model,
                               backend=str(fields.get("backend") or "auto"),
                               inputs={"prompt": prompt}, config=config)
        job = await im.submit_owned(service, body, uploads, mode="sync",
                                    owner=im._owner(request))
        await job.done.wait()
        if job.state != "succeeded" or job.result is None:
            return im._failure(job, request, "images")
        return im._images_response(job, await im._image_data(job, request, response_format),
                                   fmt)
    except GenerateError as exc:
        return im.openai_error(exc, request, "images")
    except ValueError as exc:
        return im.openai_error(GenerateError(400, "invalid_request", str(exc)), request,
                               "images")


async def provider_images(request: Request) -> Response:
    """Image generation pinned to an upstream provider of kind ``openai``."""
    provider = request.path_params["provider"]
    try:
        body = await _json(request)
        model = _model(body)
        if not model.startswith(f"{provider}/"):
            model = f"{provider}/{model}"
        return JSONResponse(await gateway_of(get_state(request)).images(model, body))
    except GatewayError as exc:
        _count_error(request, "gateway.images", exc)
        return _openai_error(exc)


async def audio_translations(request: Request) -> Response:
    """Translation to English. The local Whisper is English-only (tiny.en), so English
    speech transcribed is its translation; a multilingual model answers 400 here."""
    from omnistream.transports import generate_http

    state: AppState = get_state(request)
    if not state.settings.stt_model.endswith(".en"):
        exc = GatewayError(400, "translation_unsupported",
                           f"The speech model '{state.settings.stt_model}' is multilingual; "
                           "this server does not translate. Use /v1/audio/transcriptions.")
        return _openai_error(exc)
    return await generate_http.transcriptions(request)


for _prefix in PREFIXES:
    router.add_api_route(_prefix + "/audio/translations", audio_translations, methods=["POST"],
                         openapi_extra=body_of({"multipart/form-data": TranscriptionForm}))

_mount_media_aliases()
# After the local routes above: `providers/local/...` is matched first.
for _prefix in PREFIXES:
    router.add_api_route(_prefix + "/providers/{provider}/images/generations", provider_images,
                         methods=["POST"], openapi_extra=json_body(ProviderImagesBody))
