"""Fake upstream LLM servers for gateway tests: real HTTP on loopback, three dialects.

One Starlette app answers in the OpenAI (``/v1/chat/completions``…), Anthropic
(``/v1/messages``) and Ollama (``/api/chat``) formats. The reply echoes the last user
text prefixed with the fake's name, so a test can tell which upstream served it; given
tools and a user turn it calls the first tool with ``{"city": "Paris"}`` instead.
:class:`Faults` switches failure modes on for the next calls: an error status (with
``Retry-After``), a hang, a garbage body, a stream cut midway, a slow endless stream
(whose cancellation is counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.server import free_port


@dataclass
class Faults:
    """Failure switches; ``fail_count`` calls fail with ``status`` (-1: every call)."""

    status: int = 500
    fail_count: int = 0
    retry_after: str | None = None
    hang_s: float = 0.0
    garbage: bool = False
    cut_stream: bool = False
    slow_stream: bool = False  # many chunks, 50 ms apart (abandonment tests)

    def take_failure(self) -> bool:
        if self.fail_count == 0:
            return False
        if self.fail_count > 0:
            self.fail_count -= 1
        return True


@dataclass
class FakeUpstream:
    """State a test inspects: calls per route, bodies seen, streams cancelled."""

    name: str
    faults: Faults = field(default_factory=Faults)
    calls: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    streams_cancelled: int = 0
    streams_finished: int = 0
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        self.faults = Faults()
        self.calls = 0
        self.bodies.clear()
        self.headers.clear()
        self.streams_cancelled = 0
        self.streams_finished = 0


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(str(p.get("text", "")) for p in content
                                if isinstance(p, dict) and p.get("type") in ("text",))
    return ""


def _wants_tool(body: dict[str, Any]) -> str | None:
    tools = body.get("tools") or []
    messages = body.get("messages") or []
    if not tools or not messages or messages[-1].get("role") != "user":
        return None
    last = messages[-1].get("content")
    if isinstance(last, list) and any(isinstance(b, dict) and b.get("type") == "tool_result"
                                      for b in last):
        return None
    tool = tools[0]
    return str(tool.get("name") or (tool.get("function") or {}).get("name"))


def build_app(fake: FakeUpstream) -> Starlette:
    """The fake's Starlette app."""

    async def gate(request: Request) -> tuple[dict[str, Any] | None, Response | None]:
        fake.calls += 1
        fake.headers.append(dict(request.headers))
        try:
            body = await request.json()
        except ValueError:
            body = {}
        fake.bodies.append(body)
        faults = fake.faults
        if faults.hang_s:
            await asyncio.sleep(faults.hang_s)
        if faults.take_failure():
            headers = {"retry-after": faults.retry_after} if faults.retry_after else None
            return None, JSONResponse({"error": {"message": f"{fake.name} failing",
                                                 "type": "server_error"}},
                                      status_code=faults.status, headers=headers)
        if faults.garbage:
            return None, Response(b"<html>not json", media_type="application/json")
        return body, None

    def reply_text(body: dict[str, Any]) -> str:
        return f"{fake.name}: {_last_user_text(body.get('messages') or [])}"

    async def slow_tokens(prefix: bytes, make: Any) -> AsyncIterator[bytes]:
        try:
            for i in range(400):
                yield make(i)
                await asyncio.sleep(0.05)
            fake.streams_finished += 1
        except BaseException:
            fake.streams_cancelled += 1
            raise

    # -- OpenAI ------------------------------------------------------------------------------

    async def openai_chat(request: Request) -> Response:
        body, error = await gate(request)
        if error is not None:
            return error
        assert body is not None
        model = body.get("model", "")
        tool = _wants_tool({**body, "tools": [t.get("function", t)
                                              for t in body.get("tools") or []]})
        text = reply_text(body)
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": None if tool else text}
            if tool:
                message["tool_calls"] = [{"id": "call_1", "type": "function", "function": {
                    "name": tool, "arguments": json.dumps({"city": "Paris"})}}]
            return JSONResponse({
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 1,
                "model": model,
                "choices": [{"index": 0, "message": message,
                             "finish_reason": "tool_calls" if tool else "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}})

        def chunk(delta: dict[str, Any], finish: str | None = None,
                  usage: dict[str, Any] | None = None) -> bytes:
            data: dict[str, Any] = {"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                                    "created": 1, "model": model,
                                    "choices": [{"index": 0, "delta": delta,
                                                 "finish_reason": finish}]}
            if usage is not None:
                data = {**data, "choices": [], "usage": usage}
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        if fake.faults.slow_stream:
            return StreamingResponse(slow_tokens(b"", lambda i: chunk({"content": f"t{i} "})),
                                     media_type="text/event-stream")

        async def events() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant", "content": ""})
            if tool:
                yield chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                             "function": {"name": tool, "arguments": ""}}]})
                for part in ('{"city": ', '"Paris"}'):
                    yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
                yield chunk({}, "tool_calls")
            else:
                words = text.split(" ")
                for i, word in enumerate(words):
                    if fake.faults.cut_stream and i == 1:
                        raise RuntimeError("cut")  # the connection drops mid-stream
                    yield chunk({"content": word if i == 0 else " " + word})
                yield chunk({}, "stop")
            yield chunk({}, usage={"prompt_tokens": 5, "completion_tokens": 3,
                                   "total_tokens": 8})
            yield b"data: [DONE]\n\n"
            fake.streams_finished += 1

        return StreamingResponse(events(), media_type="text/event-stream")

    async def openai_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": "fake-chat", "object": "model"}, {"id": "fake-embed", "object": "model"}]})

    async def openai_embeddings(request: Request) -> Response:
        body, error = await gate(request)
        if error is not None:
            return error
        assert body is not None
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        return JSONResponse({"object": "list", "model": body.get("model"), "data": [
            {"object": "embedding", "index": i, "embedding": [float(len(t)), 1.0, 0.0]}
            for i, t in enumerate(texts)], "usage": {"prompt_tokens": 2, "total_tokens": 2}})

    async def openai_images(request: Request) -> Response:
        body, error = await gate(request)
        if error is not None:
            return error
        assert body is not None
        return JSONResponse({"created": 1, "data": [{"b64_json": "aW1n",
                                                     "revised_prompt": body.get("prompt")}]})

    async def openai_moderations(request: Request) -> Response:
        _body, error = await gate(request)
        if error is not None:
            return error
        return JSONResponse({"id": "modr-fake", "model": "omni-moderation-latest",
                             "results": [{"flagged": False, "categories": {},
                                          "category_scores": {}}]})

    # -- Anthropic ---------------------------------------------------------------------------

    async def anthropic_messages(request: Request) -> Response:
        body, error = await gate(request)
        if error is not None:
            return error
        assert body is not None
        model = body.get("model", "")
        tool = _wants_tool(body)
        text = reply_text(body)
        if not body.get("stream"):
            content: list[dict[str, Any]] = [{"type": "thinking", "thinking": "hmm",
                                              "signature": "sig"}]
            if tool:
                content.append({"type": "tool_use", "id": "toolu_1", "name": tool,
                                "input": {"city": "Paris"}})
            else:
                content.append({"type": "text", "text": text})
            return JSONResponse({"id": "msg_fake", "type": "message", "role": "assistant",
                                 "model": model, "content": content,
                                 "stop_reason": "tool_use" if tool else "end_turn",
                                 "stop_sequence": None,
                                 "usage": {"input_tokens": 7, "output_tokens": 4}})

        def event(name: str, data: dict[str, Any]) -> bytes:
            return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

        if fake.faults.slow_stream:
            return StreamingResponse(slow_tokens(b"", lambda i: event(
                "content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": f"t{i} "}})),
                media_type="text/event-stream")

        async def events() -> AsyncIterator[bytes]:
            yield event("message_start", {"type": "message_start", "message": {
                "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": None, "usage": {"input_tokens": 7,
                                                              "output_tokens": 0}}})
            yield event("content_block_start", {"type": "content_block_start", "index": 0,
                                                "content_block": {"type": "thinking",
                                                                  "thinking": ""}})
            yield event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                "delta": {"type": "thinking_delta",
                                                          "thinking": "hmm"}})
            yield event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                "delta": {"type": "signature_delta",
                                                          "signature": "sig"}})
            yield event("content_block_stop", {"type": "content_block_stop", "index": 0})
            if tool:
                yield event("content_block_start", {"type": "content_block_start", "index": 1,
                                                    "content_block": {"type": "tool_use",
                                                                      "id": "toolu_1",
                                                                      "name": tool,
                                                                      "input": {}}})
                for part in ('{"city": ', '"Paris"}'):
                    yield event("content_block_delta", {
                        "type": "content_block_delta", "index": 1,
                        "delta": {"type": "input_json_delta", "partial_json": part}})
            else:
                yield event("content_block_start", {"type": "content_block_start", "index": 1,
                                                    "content_block": {"type": "text",
                                                                      "text": ""}})
                for i, word in enumerate(text.split(" ")):
                    yield event("content_block_delta", {
                        "type": "content_block_delta", "index": 1,
                        "delta": {"type": "text_delta", "text": word if i == 0 else " " + word}})
            yield event("content_block_stop", {"type": "content_block_stop", "index": 1})
            yield event("message_delta", {"type": "message_delta", "delta": {
                "stop_reason": "tool_use" if tool else "end_turn"},
                "usage": {"output_tokens": 4}})
            yield event("message_stop", {"type": "message_stop"})
            fake.streams_finished += 1

        return StreamingResponse(events(), media_type="text/event-stream")

    async def anthropic_count(request: Request) -> Response:
        _body, error = await gate(request)
        if error is not None:
            return error
        return JSONResponse({"input_tokens": 42})

    # -- Ollama ------------------------------------------------------------------------------

    async def ollama_chat(request: Request) -> Response:
        body, error = await gate(request)
        if error is not None:
            return error
        assert body is not None
        model = body.get("model", "")
        text = reply_text(body)
        tool = _wants_tool({**body, "tools": [t.get("function", t)
                                              for t in body.get("tools") or []]})
        done = {"model": model, "created_at": "2026-01-01T00:00:00Z", "done": True,
                "done_reason": "stop", "prompt_eval_count": 6, "eval_count": 2}
        message: dict[str, Any] = {"role": "assistant", "content": "" if tool else text}
        if tool:
            message["tool_calls"] = [{"function": {"name": tool,
                                                   "arguments": {"city": "Paris"}}}]
        if not body.get("stream", True):
            return JSONResponse({**done, "message": message})

        async def lines() -> AsyncIterator[bytes]:
            if tool:
                yield json.dumps({**done, "done": False, "message": message}).encode() + b"\n"
            else:
                for i, word in enumerate(text.split(" ")):
                    yield json.dumps({"model": model, "created_at": "2026-01-01T00:00:00Z",
                                      "message": {"role": "assistant",
                                                  "content": word if i == 0 else " " + word},
                                      "done": False}).encode() + b"\n"
            yield json.dumps({**done, "message": {"role": "assistant", "content": ""}}
                             ).encode() + b"\n"
            fake.streams_finished += 1

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def tavily_search(request: Request) -> Response:
        body, error = await gate(request)
        if error is not None:
            return error
        assert body is not None
        return JSONResponse({"answer": f"{fake.name} knows", "results": [
            {"url": "https://example.com/a", "title": "A", "content": body.get("query"),
             "score": 0.9}]})

    async def ollama_tags(request: Request) -> Response:
        return JSONResponse({"models": [{"name": "llama3"}]})

    # -- web pages (web fetch tests) ---------------------------------------------------------

    async def page(request: Request) -> Response:
        fake.calls += 1
        fake.headers.append(dict(request.headers))
        return Response(
            "<html><head><title>Fake page</title><script>var x=1;</script></head><body>"
            "<h1>Cats</h1><p>A <b>cat</b> sat on the <a href='/mat'>mat</a>.</p>"
            "<ul><li>one</li><li>two</li></ul></body></html>", media_type="text/html")

    async def redirect(request: Request) -> Response:
        fake.calls += 1
        return Response(status_code=302, headers={"location": request.query_params["to"]})

    return Starlette(routes=[
        Route("/page", page, methods=["GET"]),
        Route("/redirect", redirect, methods=["GET"]),
        Route("/v1/chat/completions", openai_chat, methods=["POST"]),
        Route("/v1/models", openai_models, methods=["GET"]),
        Route("/v1/embeddings", openai_embeddings, methods=["POST"]),
        Route("/v1/moderations", openai_moderations, methods=["POST"]),
        Route("/v1/images/generations", openai_images, methods=["POST"]),
        Route("/v1/messages", anthropic_messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", anthropic_count, methods=["POST"]),
        Route("/api/chat", ollama_chat, methods=["POST"]),
        Route("/api/tags", ollama_tags, methods=["GET"]),
        Route("/search", tavily_search, methods=["POST"]),
    ])


@contextlib.contextmanager
def run_fake(name: str) -> Iterator[FakeUpstream]:
    """Serve a fake upstream on an ephemeral loopback port in a thread."""
    fake = FakeUpstream(name, port=free_port())
    config = uvicorn.Config(build_app(fake), host="127.0.0.1", port=fake.port,
                            log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("fake upstream did not start")
        time.sleep(0.01)
    try:
        yield fake
    finally:
        server.should_exit = True
        thread.join(timeout=10)
