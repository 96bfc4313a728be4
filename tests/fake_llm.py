"""A fake OpenAI-compatible chat upstream: a real HTTP server on loopback streaming SSE.

It answers ``POST /v1/chat/completions`` (``stream: true``) with a fixed script chosen
by the last user or tool message, so voice-agent tests and benchmarks measure our loop,
not an LLM:

* a message mentioning *weather* → a ``get_weather`` tool call (when tools are offered);
* a tool result → a sentence quoting it;
* *story* or *long* → a long answer (for barge-in);
* *hang* → one delta, then nothing (the server holds the stream open);
* *fail* → HTTP 500;
* anything else → :data:`ANSWER`.

``GET /v1/models`` lists :data:`MODEL`. Every request body is kept in ``requests``.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MODEL = "chat"
ANSWER = "The capital of France is Paris."
STORY = (
    "Once upon a time there was a lighthouse keeper who lived on a small rocky island. "
    "Every evening he climbed the long spiral stairs to light the great lamp. "
    "Ships from every harbour knew his light and trusted it through the darkest storms. "
    "One winter night the lamp went out, and the keeper had to find a way to warn them. "
    "He gathered every candle and lantern on the island and carried them to the top. "
    "By morning the sea was calm, and every ship had come home safely."
)


@dataclass
class FakeLLM:
    """The running fake: its URL, what it was asked, and how long it waits per delta."""

    port: int
    server: ThreadingHTTPServer
    requests: list[dict[str, Any]] = field(default_factory=list)
    delay_s: float = 0.0  # between streamed deltas
    first_delay_s: float = 0.0  # before the first delta (time to first token)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def providers_file(self, directory: Path, name: str = "fake") -> Path:
        """A gateway providers file routing ``<name>/chat`` here."""
        path = directory / "providers.yaml"
        path.write_text(
            f"providers:\n  {name}:\n    kind: openai\n    base_url: {self.base_url}\n"
            f"    api_key_env: FAKE_LLM_KEY\n    models: [{MODEL}]\n"
        )
        return path


def _script(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The deltas to stream for a request."""
    messages = body.get("messages") or []
    last = next((m for m in reversed(messages) if m.get("role") in ("user", "tool")), {})
    text = str(last.get("content") or "").lower()
    if last.get("role") == "tool":
        return _words(f"It is {json.loads(last['content']).get('forecast', 'unknown')} today.")
    if "weather" in text and body.get("tools"):
        args = json.dumps({"city": "Paris"})
        return [
            {"tool_calls": [{"index": 0, "id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
                             "function": {"name": "get_weather", "arguments": ""}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": args[:8]}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": args[8:]}}]},
        ]
    if "story" in text or "long" in text:
        return _words(STORY)
    if "fail" in text:
        return [{"fail": True}]
    if "hang" in text:
        return [{"content": "Let me"}, {"hang": True}]
    return _words(ANSWER)


def _words(text: str) -> list[dict[str, Any]]:
    words = text.split(" ")
    return [{"content": w if i == 0 else " " + w} for i, w in enumerate(words)]


def _handler(fake: FakeLLM) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            body = json.dumps({"object": "list", "data": [
                {"id": MODEL, "object": "model", "owned_by": "fake"}]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            fake.requests.append(body)
            script = _script(body)
            if script and script[0].get("fail"):
                reply = json.dumps({"error": {"message": "upstream exploded",
                                              "type": "server_error"}}).encode()
                self.send_response(500)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)
                return
            if not body.get("stream"):
                text = "".join(d.get("content", "") for d in script)
                reply = json.dumps({
                    "id": "chatcmpl-fake", "object": "chat.completion", "created": 0,
                    "model": MODEL, "choices": [{"index": 0, "finish_reason": "stop",
                                                 "message": {"role": "assistant",
                                                             "content": text}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": len(script),
                              "total_tokens": 10 + len(script)},
                }).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)
                return
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("cache-control", "no-cache")
            self.send_header("connection", "close")
            self.end_headers()
            tool = any("tool_calls" in d for d in script)
            try:
                if fake.first_delay_s:
                    time.sleep(fake.first_delay_s)
                self._chunk({"role": "assistant", "content": ""}, None)
                for delta in script:
                    if delta.get("hang"):
                        time.sleep(30)
                        return
                    self._chunk(delta, None)
                    if fake.delay_s:
                        time.sleep(fake.delay_s)
                self._chunk({}, "tool_calls" if tool else "stop", usage=True,
                            n=len(script))
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True

        def _chunk(self, delta: dict[str, Any], finish: str | None, *, usage: bool = False,
                   n: int = 0) -> None:
            chunk: dict[str, Any] = {
                "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
                "model": MODEL,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if usage:
                chunk["usage"] = {"prompt_tokens": 10, "completion_tokens": n,
                                  "total_tokens": 10 + n}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

    return Handler


@contextlib.contextmanager
def run_fake_llm() -> Iterator[FakeLLM]:
    """Start the fake on an ephemeral loopback port; stop it on exit."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    server.daemon_threads = True
    fake = FakeLLM(server.server_address[1], server)
    server.RequestHandlerClass = _handler(fake)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
