"""Format translation: OpenAI chat ⇄ Anthropic messages ⇄ Responses ⇄ Ollama chat.

Everything meets in the middle as OpenAI chat completions: a request in any format is
turned into a chat-completions body, every upstream adapter answers with a chat
completion (or ``chat.completion.chunk`` dicts while streaming), and the route turns
that back into the caller's format. N formats then need 2·N translations instead of N².

Reasoning travels as ``reasoning_content`` on the message or delta (the convention
DeepSeek, vLLM and llama.cpp use on OpenAI-compatible servers); it becomes Anthropic
``thinking`` blocks, Responses ``reasoning`` items and Ollama's ``thinking`` field.

Written here rather than taken from a library: the candidates (litellm) bring hundreds
of dependencies and their own HTTP stack, and the mapping itself is small, pure dict
work that costs microseconds per request (``bench/gateway_bench.py``).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from omnistream.gateway.errors import invalid_request

# -- shared helpers ----------------------------------------------------------------------

FINISH_FROM_ANTHROPIC = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "pause_turn": "stop",
    "refusal": "content_filter",
}
FINISH_TO_ANTHROPIC = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
DEFAULT_ANTHROPIC_MAX_TOKENS = 4096


def new_id(prefix: str) -> str:
    """A fresh random id such as ``chatcmpl-…`` or ``msg_…``."""
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def _require_list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise invalid_request(f"'{name}' must be a list", name, "invalid_messages")
    return value


def _text_of(content: Any) -> str:
    """Plain text of an OpenAI/Anthropic content value (string or list of parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    return str(content)


def _json_args(arguments: Any) -> dict[str, Any]:
    """A tool call's arguments as an object (OpenAI sends a JSON string)."""
    if isinstance(arguments, dict):
        return arguments
    if not arguments:
        return {}
    try:
        value = json.loads(arguments)
    except (TypeError, ValueError):
        return {"_raw": str(arguments)}
    return value if isinstance(value, dict) else {"value": value}


def _data_url_parts(url: str) -> tuple[str, str] | None:
    """``(media_type, base64)`` of a ``data:`` URL, else None."""
    if not url.startswith("data:") or ";base64," not in url:
        return None
    head, data = url[5:].split(";base64,", 1)
    return head or "application/octet-stream", data


def usage_openai(prompt: int, completion: int) -> dict[str, int]:
    """OpenAI's usage object."""
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def chunk(model: str, cid: str, created: int, delta: dict[str, Any],
          finish: str | None = None, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk`` dict."""
    out: dict[str, Any] = {
        "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        out["usage"] = usage
    return out


def completion(model: str, message: dict[str, Any], finish: str | None,
               usage: dict[str, Any] | None, cid: str | None = None) -> dict[str, Any]:
    """One ``chat.completion`` dict."""
    return {
        "id": cid or new_id("chatcmpl-"), "object": "chat.completion",
        "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish or "stop",
                     "logprobs": None}],
        "usage": usage or usage_openai(0, 0),
    }


class ChunkAccumulator:
    """Builds a ``chat.completion`` from chunks (non-streaming answers over a stream)."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.model = ""
        self.id = ""

    def add(self, item: dict[str, Any]) -> None:
        """Fold one chunk in."""
        self.model = self.model or str(item.get("model", ""))
        self.id = self.id or str(item.get("id", ""))
        if item.get("usage"):
            self.usage = item["usage"]
        for choice in item.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.text.append(delta["content"])
            if delta.get("reasoning_content"):
                self.reasoning.append(delta["reasoning_content"])
            for call in delta.get("tool_calls") or []:
                slot = self.tool_calls.setdefault(
                    int(call.get("index", 0)),
                    {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
                )
                if call.get("id"):
                    slot["id"] = call["id"]
                fn = call.get("function") or {}
                if fn.get("name"):
                    slot["function"]["name"] = fn["name"]
                if fn.get("arguments"):
                    slot["function"]["arguments"] += fn["arguments"]
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]

    def result(self) -> dict[str, Any]:
        """The folded ``chat.completion``."""
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.text) or None}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return completion(self.model, message, self.finish, self.usage, self.id or None)


# -- OpenAI request checks -----------------------------------------------------------------


def _bad(message: str, param: str) -> Exception:
    return invalid_request(message, param, "invalid_messages" if param.startswith("messages")
                           else "invalid_request")


def _check_part(part: Any, where: str) -> None:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise _bad(f"{where} must be an object with a 'type'", where)
    if part["type"] == "text" and not isinstance(part.get("text"), str):
        raise _bad(f"{where}.text must be a string", where)
    if part["type"] == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str):
            raise _bad(f"{where}.image_url.url must be a string", where)


def _check_tool_call(call: Any, where: str) -> None:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise _bad(f"{where} must be {{id, type: function, function: {{name, arguments}}}}",
                   where)
    if fn.get("arguments") is not None and not isinstance(fn["arguments"], str | dict):
        raise _bad(f"{where}.function.arguments must be a JSON string", where)
    if call.get("id") is not None and not isinstance(call["id"], str):
        raise _bad(f"{where}.id must be a string", where)


def check_openai_request(body: dict[str, Any]) -> None:
    """Reject a malformed chat body with a 400 before any upstream (or translator) sees it.

    Every translator may then rely on the shapes checked here, so a caller's odd value
    is a 400 naming the field, never a 500 from deep inside a translation.
    """
    messages = _require_list(body.get("messages"), "messages")
    if not messages:
        raise invalid_request("'messages' must not be empty", "messages", "invalid_messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in (
            "system", "developer", "user", "assistant", "tool", "function"
        ):
            raise _bad(f"{where} must be an object with a role of system, developer, user, "
                       "assistant or tool", where)
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _bad(f"{where}.content must be a string or a list of parts",
                       f"{where}.content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                _check_part(part, f"{where}.content[{j}]")
        calls = message.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise _bad(f"{where}.tool_calls must be a list", f"{where}.tool_calls")
            for j, call in enumerate(calls):
                _check_tool_call(call, f"{where}.tool_calls[{j}]")
        for key in ("tool_call_id", "name", "reasoning_content", "reasoning_signature"):
            if message.get(key) is not None and not isinstance(message[key], str):
                raise _bad(f"{where}.{key} must be a string", f"{where}.{key}")
    tools = body.get("tools")
    if tools is not None:
        for i, tool in enumerate(_require_list(tools, "tools")):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
                    not isinstance(fn.get("parameters") or {}, dict):
                raise _bad(f"tools[{i}] must be {{type: function, function: {{name, "
                           "parameters}}}}", f"tools[{i}]")
    choice = body.get("tool_choice")
    if choice is not None and not isinstance(choice, str | dict):
        raise _bad("'tool_choice' must be a string or an object", "tool_choice")
    if isinstance(choice, dict) and choice.get("function") is not None and \
            not isinstance(choice["function"], dict):
        raise _bad("'tool_choice.function' must be an object", "tool_choice")
    for key in ("stream",):
        if body.get(key) is not None and not isinstance(body[key], bool):
            raise _bad(f"'{key}' must be true or false", key)
    for key in ("stream_options", "thinking"):
        if body.get(key) is not None and not isinstance(body[key], dict):
            raise _bad(f"'{key}' must be an object", key)
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not 0 < value <= 10_000_000):
            raise _bad(f"'{key}' must be a positive integer", key)
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)
                                  or not -1e6 < value < 1e6):
            raise _bad(f"'{key}' must be a number", key)
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(x, str) for x in stop)):
        raise _bad("'stop' must be a string or a list of strings", "stop")


# -- OpenAI ⇄ Anthropic ------------------------------------------------------------------


def _anthropic_image(part: dict[str, Any]) -> dict[str, Any]:
    image = part.get("image_url") or {}
    url = image.get("url", "") if isinstance(image, dict) else str(image)
    parsed = _data_url_parts(url)
    if parsed:
        return {"type": "image", "source": {"type": "base64", "media_type": parsed[0],
                                            "data": parsed[1]}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _anthropic_content(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text":
            blocks.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "image_url":
            blocks.append(_anthropic_image(part))
    return blocks


def openai_to_anthropic_request(body: dict[str, Any], model: str) -> dict[str, Any]:
    """A chat-completions body as an Anthropic Messages body for ``model``."""
    system_parts: list[str] = []
    messages: list[dict[str, Any]] = []

    def push(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if messages and messages[-1]["role"] == role:  # Anthropic wants alternation
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})

    for message in body.get("messages") or []:
        role = message.get("role")
        if role in ("system", "developer"):
            system_parts.append(_text_of(message.get("content")))
        elif role == "user":
            push("user", _anthropic_content(message.get("content")))
        elif role == "assistant":
            blocks: list[dict[str, Any]] = []
            if message.get("reasoning_content") and message.get("reasoning_signature"):
                blocks.append({"type": "thinking", "thinking": message["reasoning_content"],
                               "signature": message["reasoning_signature"]})
            blocks.extend(_anthropic_content(message.get("content")))
            for call in message.get("tool_calls") or []:
                fn = call.get("function") or {}
                blocks.append({"type": "tool_use", "id": call.get("id") or new_id("toolu_"),
                               "name": fn.get("name", ""),
                               "input": _json_args(fn.get("arguments"))})
            push("assistant", blocks)
        elif role in ("tool", "function"):
            push("user", [{"type": "tool_result",
                           "tool_use_id": message.get("tool_call_id", ""),
                           "content": _text_of(message.get("content"))}])
    out: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": int(body.get("max_completion_tokens") or body.get("max_tokens")
                          or DEFAULT_ANTHROPIC_MAX_TOKENS),
    }
    if system_parts:
        out["system"] = "\n\n".join(p for p in system_parts if p)
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("tools"):
        out["tools"] = [
            {"name": t["function"]["name"],
             "description": t["function"].get("description", ""),
             "input_schema": t["function"].get("parameters") or {"type": "object"}}
            for t in body["tools"] if isinstance(t, dict) and isinstance(t.get("function"), dict)
        ]
    choice = body.get("tool_choice")
    if choice == "auto":
        out["tool_choice"] = {"type": "auto"}
    elif choice == "required":
        out["tool_choice"] = {"type": "any"}
    elif choice == "none":
        out["tool_choice"] = {"type": "none"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out["tool_choice"] = {"type": "tool", "name": choice["function"].get("name", "")}
    if isinstance(body.get("thinking"), dict):
        out["thinking"] = body["thinking"]
    if body.get("stream"):
        out["stream"] = True
    return out


def anthropic_to_openai_request(body: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic Messages body as a chat-completions body (model left as given)."""
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        raise invalid_request("'messages' must be a non-empty list", "messages",
                              "invalid_messages")
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": _text_of(system)})
    for i, message in enumerate(body["messages"]):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise invalid_request(f"messages[{i}] must have role 'user' or 'assistant'",
                                  f"messages.{i}", "invalid_messages")
        content = message.get("content")
        if isinstance(content, str):
            messages.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise invalid_request(f"messages[{i}].content must be a string or a list of "
                                  "blocks", f"messages.{i}.content", "invalid_messages")
        parts: list[dict[str, Any]] = []
        tool_calls: list[dict[str, Any]] = []
        tool_results: list[dict[str, Any]] = []
        reasoning: list[str] = []
        signature = None
        for block in content:
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": str(block.get("text", ""))})
            elif kind == "image":
                source = block.get("source") or {}
                if source.get("type") == "base64":
                    media = source.get("media_type", "image/png")
                    url = f"data:{media};base64,{source.get('data', '')}"
                else:
                    url = str(source.get("url", ""))
                parts.append({"type": "image_url", "image_url": {"url": url}})
            elif kind == "tool_use":
                tool_calls.append({"id": block.get("id") or new_id("call_"), "type": "function",
                                   "function": {"name": block.get("name", ""),
                                                "arguments": json.dumps(block.get("input", {}))}})
            elif kind == "tool_result":
                tool_results.append({"role": "tool", "tool_call_id": block.get("tool_use_id", ""),
                                     "content": _text_of(block.get("content"))})
            elif kind == "thinking":
                reasoning.append(str(block.get("thinking", "")))
                signature = block.get("signature")
        messages.extend(tool_results)
        if message["role"] == "assistant":
            out: dict[str, Any] = {"role": "assistant",
                                   "content": _text_of(parts) if parts else None}
            if tool_calls:
                out["tool_calls"] = tool_calls
            if reasoning:
                out["reasoning_content"] = "".join(reasoning)
                if signature:
                    out["reasoning_signature"] = signature
            messages.append(out)
        elif parts:
            only_text = all(p["type"] == "text" for p in parts)
            messages.append({"role": "user",
                             "content": _text_of(parts) if only_text else parts})
    out_body: dict[str, Any] = {"messages": messages}
    if body.get("max_tokens") is not None:
        out_body["max_tokens"] = body["max_tokens"]
    for key in ("temperature", "top_p", "stream", "thinking"):
        if body.get(key) is not None:
            out_body[key] = body[key]
    if body.get("stop_sequences"):
        out_body["stop"] = body["stop_sequences"]
    if body.get("tools"):
        out_body["tools"] = [
            {"type": "function", "function": {
                "name": t.get("name", ""), "description": t.get("description", ""),
                "parameters": t.get("input_schema") or {"type": "object"}}}
            for t in body["tools"] if isinstance(t, dict)
        ]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "auto":
            out_body["tool_choice"] = "auto"
        elif kind == "any":
            out_body["tool_choice"] = "required"
        elif kind == "none":
            out_body["tool_choice"] = "none"
        elif kind == "tool":
            out_body["tool_choice"] = {"type": "function",
                                       "function": {"name": choice.get("name", "")}}
    return out_body


def anthropic_to_openai_response(resp: dict[str, Any], model: str) -> dict[str, Any]:
    """An Anthropic message as a ``chat.completion``."""
    text: list[str] = []
    reasoning: list[str] = []
    signature = ""
    calls: list[dict[str, Any]] = []
    for block in resp.get("content") or []:
        kind = block.get("type")
        if kind == "text":
            text.append(block.get("text", ""))
        elif kind == "thinking":
            reasoning.append(block.get("thinking", ""))
            signature = block.get("signature") or signature
        elif kind == "tool_use":
            calls.append({"id": block.get("id", ""), "type": "function",
                          "function": {"name": block.get("name", ""),
                                       "arguments": json.dumps(block.get("input", {}))}})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
        if signature:
            message["reasoning_signature"] = signature
    if calls:
        message["tool_calls"] = calls
    usage = resp.get("usage") or {}
    return completion(
        model, message, FINISH_FROM_ANTHROPIC.get(resp.get("stop_reason") or "", "stop"),
        usage_openai(int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))),
    )


def openai_to_anthropic_response(resp: dict[str, Any], model: str) -> dict[str, Any]:
    """A ``chat.completion`` as an Anthropic message."""
    choice = (resp.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        content.append({"type": "thinking", "thinking": message["reasoning_content"],
                        "signature": message.get("reasoning_signature", "")})
    if message.get("content"):
        content.append({"type": "text", "text": _text_of(message["content"])})
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id") or new_id("toolu_"),
                        "name": fn.get("name", ""), "input": _json_args(fn.get("arguments"))})
    usage = resp.get("usage") or {}
    return {
        "id": new_id("msg_"), "type": "message", "role": "assistant", "model": model,
        "content": content,
        "stop_reason": FINISH_TO_ANTHROPIC.get(choice.get("finish_reason") or "stop",
                                               "end_turn"),
        "stop_sequence": None,
        "usage": {"input_tokens": int(usage.get("prompt_tokens", 0)),
                  "output_tokens": int(usage.get("completion_tokens", 0))},
    }


class AnthropicToOpenAIStream:
    """Anthropic SSE events in, ``chat.completion.chunk`` dicts out (an upstream adapter)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = new_id("chatcmpl-")
        self.created = int(time.time())
        self.input_tokens = 0
        self.output_tokens = 0
        self._tool_index: dict[int, int] = {}  # Anthropic block index → OpenAI tool index
        self._sent_role = False

    def _chunk(self, delta: dict[str, Any], finish: str | None = None,
               usage: dict[str, Any] | None = None) -> dict[str, Any]:
        if not self._sent_role:
            delta = {"role": "assistant", **delta}
            self._sent_role = True
        return chunk(self.model, self.id, self.created, delta, finish, usage)

    def feed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Chunks for one decoded Anthropic event (its ``data`` object)."""
        kind = event.get("type")
        if kind == "message_start":
            usage = (event.get("message") or {}).get("usage") or {}
            self.input_tokens = int(usage.get("input_tokens", 0))
            return [self._chunk({"content": ""})]
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = len(self._tool_index)
                self._tool_index[int(event.get("index", 0))] = index
                return [self._chunk({"tool_calls": [{
                    "index": index, "id": block.get("id", ""), "type": "function",
                    "function": {"name": block.get("name", ""), "arguments": ""}}]})]
            if block.get("type") == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            return []
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            dkind = delta.get("type")
            if dkind == "text_delta":
                return [self._chunk({"content": delta.get("text", "")})]
            if dkind == "thinking_delta":
                return [self._chunk({"reasoning_content": delta.get("thinking", "")})]
            if dkind == "signature_delta":
                return [self._chunk({"reasoning_signature": delta.get("signature", "")})]
            if dkind == "input_json_delta":
                index = self._tool_index.get(int(event.get("index", 0)), 0)
                return [self._chunk({"tool_calls": [{
                    "index": index, "function": {"arguments": delta.get("partial_json", "")}}]})]
            return []
        if kind == "message_delta":
            usage = event.get("usage") or {}
            self.output_tokens = int(usage.get("output_tokens", self.output_tokens))
            reason = (event.get("delta") or {}).get("stop_reason")
            return [self._chunk({}, FINISH_FROM_ANTHROPIC.get(reason or "", "stop"),
                                usage_openai(self.input_tokens, self.output_tokens))]
        if kind == "error":
            err = event.get("error") or {}
            raise UpstreamStreamError(str(err.get("message", "upstream stream error")))
        return []


class UpstreamStreamError(Exception):
    """An upstream reported an error inside its stream."""


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class OpenAIToAnthropicStream:
    """``chat.completion.chunk`` dicts in, Anthropic SSE bytes out (the ``/v1/messages`` edge)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = new_id("msg_")
        self._block = -1
        self._block_kind: str | None = None
        self._tools: dict[int, int] = {}  # OpenAI tool index → block index
        self._finish: str | None = None
        self._usage: dict[str, Any] = {}
        self._started = False

    def start(self, input_tokens: int = 0) -> bytes:
        """``message_start`` (sent before the first chunk so clients see the stream open)."""
        self._started = True
        return _sse("message_start", {"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 0}}})

    def _close_block(self) -> list[bytes]:
        if self._block_kind is None:
            return []
        self._block_kind = None
        return [_sse("content_block_stop", {"type": "content_block_stop", "index": self._block})]

    def _open(self, kind: str, block: dict[str, Any]) -> list[bytes]:
        out = self._close_block()
        self._block += 1
        self._block_kind = kind
        out.append(_sse("content_block_start", {"type": "content_block_start",
                                                "index": self._block, "content_block": block}))
        return out

    def feed(self, item: dict[str, Any]) -> list[bytes]:
        """SSE events for one chunk."""
        out: list[bytes] = []
        if item.get("usage"):
            self._usage = item["usage"]
        for choice in item.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                if self._block_kind != "thinking":
                    out += self._open("thinking", {"type": "thinking", "thinking": ""})
                out.append(_sse("content_block_delta", {
                    "type": "content_block_delta", "index": self._block,
                    "delta": {"type": "thinking_delta", "thinking": delta["reasoning_content"]}}))
            if delta.get("reasoning_signature") and self._block_kind == "thinking":
                out.append(_sse("content_block_delta", {
                    "type": "content_block_delta", "index": self._block,
                    "delta": {"type": "signature_delta",
                              "signature": delta["reasoning_signature"]}}))
            if delta.get("content"):
                if self._block_kind != "text":
                    out += self._open("text", {"type": "text", "text": ""})
                out.append(_sse("content_block_delta", {
                    "type": "content_block_delta", "index": self._block,
                    "delta": {"type": "text_delta", "text": delta["content"]}}))
            for call in delta.get("tool_calls") or []:
                tindex = int(call.get("index", 0))
                fn = call.get("function") or {}
                if tindex not in self._tools:
                    out += self._open("tool", {"type": "tool_use",
                                               "id": call.get("id") or new_id("toolu_"),
                                               "name": fn.get("name", ""), "input": {}})
                    self._tools[tindex] = self._block
                if fn.get("arguments"):
                    out.append(_sse("content_block_delta", {
                        "type": "content_block_delta", "index": self._tools[tindex],
                        "delta": {"type": "input_json_delta",
                                  "partial_json": fn["arguments"]}}))
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        return out

    def finish(self) -> list[bytes]:
        """``content_block_stop``, ``message_delta`` and ``message_stop``."""
        out = self._close_block()
        out.append(_sse("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": FINISH_TO_ANTHROPIC.get(self._finish or "stop", "end_turn"),
                      "stop_sequence": None},
            "usage": {"output_tokens": int(self._usage.get("completion_tokens", 0)),
                      "input_tokens": int(self._usage.get("prompt_tokens", 0))}}))
        out.append(_sse("message_stop", {"type": "message_stop"}))
        return out

    @staticmethod
    def error(code: str, message: str) -> bytes:
        """An ``error`` event (a stream that fails after it started)."""
        return _sse("error", {"type": "error", "error": {"type": "api_error",
                                                         "message": message, "code": code}})


# -- Responses API -----------------------------------------------------------------------


def responses_to_openai_request(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses body (``input``, ``instructions``, tools…) as a chat-completions body."""
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": str(body["instructions"])})
    source = body.get("input")
    if isinstance(source, str):
        messages.append({"role": "user", "content": source})
    elif isinstance(source, list):
        for i, item in enumerate(source):
            if not isinstance(item, dict):
                raise invalid_request(f"input[{i}] must be an object", f"input[{i}]",
                                      "invalid_messages")
            kind = item.get("type", "message")
            if kind == "message":
                role = item.get("role", "user")
                content = item.get("content")
                if isinstance(content, list):
                    parts: list[dict[str, Any]] = []
                    for part in content:
                        if not isinstance(part, dict):
                            continue
                        ptype = part.get("type")
                        if ptype in ("input_text", "output_text", "text"):
                            parts.append({"type": "text", "text": str(part.get("text", ""))})
                        elif ptype == "input_image":
                            url = part.get("image_url") or ""
                            parts.append({"type": "image_url", "image_url": {"url": url}})
                    only_text = all(p["type"] == "text" for p in parts)
                    value: Any = _text_of(parts) if only_text else parts
                else:
                    value = _text_of(content)
                if role == "developer":
                    role = "system"
                messages.append({"role": role, "content": value})
            elif kind == "function_call":
                call = {"id": item.get("call_id", ""), "type": "function",
                        "function": {"name": item.get("name", ""),
                                     "arguments": item.get("arguments", "{}")}}
                if messages and messages[-1]["role"] == "assistant" and \
                        messages[-1].get("tool_calls") is not None:
                    messages[-1]["tool_calls"].append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif kind == "function_call_output":
                output = item.get("output")
                messages.append({"role": "tool", "tool_call_id": item.get("call_id", ""),
                                 "content": output if isinstance(output, str)
                                 else json.dumps(output)})
            elif kind == "reasoning":
                continue
    else:
        raise invalid_request("'input' must be a string or a list of items", "input",
                              "invalid_messages")
    if not messages:
        raise invalid_request("'input' must not be empty", "input", "invalid_messages")
    out: dict[str, Any] = {"messages": messages}
    if body.get("max_output_tokens") is not None:
        out["max_tokens"] = body["max_output_tokens"]
    for key in ("temperature", "top_p", "stream"):
        if body.get(key) is not None:
            out[key] = body[key]
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict)
             and t.get("type") == "function"]
    if tools:
        out["tools"] = [{"type": "function", "function": {
            "name": t.get("name", ""), "description": t.get("description", ""),
            "parameters": t.get("parameters") or {"type": "object"}}} for t in tools]
    choice = body.get("tool_choice")
    if isinstance(choice, str):
        out["tool_choice"] = choice
    elif isinstance(choice, dict) and choice.get("name"):
        out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    return out


def _responses_usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    usage = usage or {}
    prompt = int(usage.get("prompt_tokens", 0))
    done = int(usage.get("completion_tokens", 0))
    return {"input_tokens": prompt, "output_tokens": done, "total_tokens": prompt + done,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0}}


def _response_envelope(rid: str, model: str, status: str, output: list[dict[str, Any]],
                       usage: dict[str, Any] | None, created: int) -> dict[str, Any]:
    return {
        "id": rid, "object": "response", "created_at": created, "status": status,
        "model": model, "output": output, "parallel_tool_calls": True, "tool_choice": "auto",
        "tools": [], "error": None, "incomplete_details": None, "instructions": None,
        "metadata": {}, "temperature": None, "top_p": None,
        "usage": _responses_usage(usage) if usage is not None else None,
    }


def openai_to_responses_response(resp: dict[str, Any], model: str) -> dict[str, Any]:
    """A ``chat.completion`` as a Responses ``response`` object."""
    choice = (resp.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    output: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        output.append({"type": "reasoning", "id": new_id("rs_"), "summary": [
            {"type": "summary_text", "text": message["reasoning_content"]}]})
    if message.get("content"):
        output.append({"type": "message", "id": new_id("msg_"), "status": "completed",
                       "role": "assistant", "content": [
                           {"type": "output_text", "text": _text_of(message["content"]),
                            "annotations": []}]})
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        output.append({"type": "function_call", "id": new_id("fc_"),
                       "call_id": call.get("id", ""), "name": fn.get("name", ""),
                       "arguments": fn.get("arguments", "{}"), "status": "completed"})
    status = "incomplete" if choice.get("finish_reason") == "length" else "completed"
    return _response_envelope(new_id("resp_"), model, status, output,
                              resp.get("usage") or {}, int(time.time()))


class OpenAIToResponsesStream:
    """``chat.completion.chunk`` dicts in, Responses SSE events out."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = new_id("resp_")
        self.created = int(time.time())
        self._seq = 0
        self._output: list[dict[str, Any]] = []
        self._text_item: dict[str, Any] | None = None
        self._text: list[str] = []
        self._reason_item: dict[str, Any] | None = None
        self._reason: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}
        self._usage: dict[str, Any] | None = None
        self._finish: str | None = None

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()

    def start(self) -> list[bytes]:
        """``response.created`` and ``response.in_progress``."""
        envelope = _response_envelope(self.id, self.model, "in_progress", [], None,
                                      self.created)
        return [self._event("response.created", response=envelope),
                self._event("response.in_progress", response=envelope)]

    def feed(self, item: dict[str, Any]) -> list[bytes]:
        """Events for one chunk."""
        out: list[bytes] = []
        if item.get("usage"):
            self._usage = item["usage"]
        for choice in item.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                if self._reason_item is None:
                    self._reason_item = {"type": "reasoning", "id": new_id("rs_"),
                                         "summary": []}
                    self._output.append(self._reason_item)
                    out.append(self._event("response.output_item.added",
                                           output_index=len(self._output) - 1,
                                           item=self._reason_item))
                self._reason.append(delta["reasoning_content"])
                out.append(self._event(
                    "response.reasoning_summary_text.delta", item_id=self._reason_item["id"],
                    output_index=self._output.index(self._reason_item), summary_index=0,
                    delta=delta["reasoning_content"]))
            if delta.get("content"):
                if self._text_item is None:
                    self._text_item = {"type": "message", "id": new_id("msg_"),
                                       "status": "in_progress", "role": "assistant",
                                       "content": []}
                    self._output.append(self._text_item)
                    index = len(self._output) - 1
                    out.append(self._event("response.output_item.added", output_index=index,
                                           item=self._text_item))
                    out.append(self._event(
                        "response.content_part.added", item_id=self._text_item["id"],
                        output_index=index, content_index=0,
                        part={"type": "output_text", "text": "", "annotations": []}))
                self._text.append(delta["content"])
                out.append(self._event(
                    "response.output_text.delta", item_id=self._text_item["id"],
                    output_index=self._output.index(self._text_item), content_index=0,
                    delta=delta["content"], logprobs=[]))
            for call in delta.get("tool_calls") or []:
                tindex = int(call.get("index", 0))
                fn = call.get("function") or {}
                entry = self._calls.get(tindex)
                if entry is None:
                    entry = {"type": "function_call", "id": new_id("fc_"),
                             "call_id": call.get("id") or new_id("call_"),
                             "name": fn.get("name", ""), "arguments": "",
                             "status": "in_progress"}
                    self._calls[tindex] = entry
                    self._output.append(entry)
                    out.append(self._event("response.output_item.added",
                                           output_index=len(self._output) - 1, item=entry))
                if fn.get("arguments"):
                    entry["arguments"] += fn["arguments"]
                    out.append(self._event(
                        "response.function_call_arguments.delta", item_id=entry["id"],
                        output_index=self._output.index(entry), delta=fn["arguments"]))
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        return out

    def finish(self) -> list[bytes]:
        """Close every item, then ``response.completed`` with the full response."""
        out: list[bytes] = []
        if self._reason_item is not None:
            text = "".join(self._reason)
            self._reason_item["summary"] = [{"type": "summary_text", "text": text}]
            out.append(self._event("response.output_item.done",
                                   output_index=self._output.index(self._reason_item),
                                   item=self._reason_item))
        if self._text_item is not None:
            index = self._output.index(self._text_item)
            text = "".join(self._text)
            part = {"type": "output_text", "text": text, "annotations": []}
            out.append(self._event("response.output_text.done", item_id=self._text_item["id"],
                                   output_index=index, content_index=0, text=text,
                                   logprobs=[]))
            out.append(self._event("response.content_part.done", item_id=self._text_item["id"],
                                   output_index=index, content_index=0, part=part))
            self._text_item["content"] = [part]
            self._text_item["status"] = "completed"
            out.append(self._event("response.output_item.done", output_index=index,
                                   item=self._text_item))
        for entry in self._calls.values():
            index = self._output.index(entry)
            entry["status"] = "completed"
            out.append(self._event("response.function_call_arguments.done", item_id=entry["id"],
                                   output_index=index, arguments=entry["arguments"]))
            out.append(self._event("response.output_item.done", output_index=index, item=entry))
        status = "incomplete" if self._finish == "length" else "completed"
        envelope = _response_envelope(self.id, self.model, status, self._output,
                                      self._usage or {}, self.created)
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        out.append(self._event(kind, response=envelope))
        return out

    def error(self, code: str, message: str) -> bytes:
        """An ``error`` event (a stream that fails after it started)."""
        return self._event("error", code=code, message=message, param=None)


# -- Ollama ------------------------------------------------------------------------------


def ollama_to_openai_request(body: dict[str, Any]) -> dict[str, Any]:
    """An Ollama ``/api/chat`` body as a chat-completions body."""
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise invalid_request("'messages' must be a non-empty list", "messages",
                              "invalid_messages")
    messages: list[dict[str, Any]] = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict) or message.get("role") not in (
                "system", "user", "assistant", "tool"):
            raise invalid_request(f"messages[{i}] needs a role of system, user, assistant "
                                  "or tool", f"messages[{i}]", "invalid_messages")
        out: dict[str, Any] = {"role": message["role"]}
        text = str(message.get("content") or "")
        images = message.get("images") or []
        if images:
            parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
            parts += [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{im}"}}
                      for im in images if isinstance(im, str)]
            out["content"] = parts
        else:
            out["content"] = text
        if message.get("tool_calls"):
            out["tool_calls"] = [
                {"id": call.get("id") or new_id("call_"), "type": "function",
                 "function": {"name": (call.get("function") or {}).get("name", ""),
                              "arguments": json.dumps((call.get("function") or {})
                                                      .get("arguments", {}))}}
                for call in message["tool_calls"] if isinstance(call, dict)]
        if message["role"] == "tool":
            out["tool_call_id"] = message.get("tool_call_id") or message.get("tool_name", "")
        if message.get("thinking"):
            out["reasoning_content"] = message["thinking"]
        messages.append(out)
    result: dict[str, Any] = {"messages": messages, "stream": body.get("stream", True)}
    options = body.get("options") or {}
    if isinstance(options, dict):
        if options.get("temperature") is not None:
            result["temperature"] = options["temperature"]
        if options.get("top_p") is not None:
            result["top_p"] = options["top_p"]
        if options.get("num_predict") is not None:
            result["max_tokens"] = options["num_predict"]
        if options.get("stop"):
            result["stop"] = options["stop"]
    if body.get("tools"):
        result["tools"] = body["tools"]
    return result


def openai_to_ollama_request(body: dict[str, Any], model: str) -> dict[str, Any]:
    """A chat-completions body as an Ollama ``/api/chat`` body for ``model``."""
    messages = []
    for message in body.get("messages") or []:
        role = message.get("role")
        if role == "developer":
            role = "system"
        out: dict[str, Any] = {"role": role, "content": ""}
        content = message.get("content")
        if isinstance(content, list):
            texts, images = [], []
            for part in content:
                if not isinstance(part, dict):
                    continue
                if part.get("type") == "text":
                    texts.append(str(part.get("text", "")))
                elif part.get("type") == "image_url":
                    url = (part.get("image_url") or {}).get("url", "")
                    parsed = _data_url_parts(url)
                    if parsed:
                        images.append(parsed[1])
            out["content"] = "".join(texts)
            if images:
                out["images"] = images
        else:
            out["content"] = content or ""
        if message.get("tool_calls"):
            out["tool_calls"] = [{"function": {
                "name": (c.get("function") or {}).get("name", ""),
                "arguments": _json_args((c.get("function") or {}).get("arguments"))}}
                for c in message["tool_calls"]]
        if role == "tool" and message.get("tool_call_id"):
            out["tool_call_id"] = message["tool_call_id"]
        messages.append(out)
    result: dict[str, Any] = {"model": model, "messages": messages,
                              "stream": bool(body.get("stream"))}
    options: dict[str, Any] = {}
    if body.get("temperature") is not None:
        options["temperature"] = body["temperature"]
    if body.get("top_p") is not None:
        options["top_p"] = body["top_p"]
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if limit:
        options["num_predict"] = limit
    if body.get("stop"):
        options["stop"] = [body["stop"]] if isinstance(body["stop"], str) else body["stop"]
    if options:
        result["options"] = options
    if body.get("tools"):
        result["tools"] = body["tools"]
    return result


def _ollama_calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"id": call.get("id") or new_id("call_"), "type": "function",
             "function": {"name": (call.get("function") or {}).get("name", ""),
                          "arguments": json.dumps((call.get("function") or {})
                                                  .get("arguments", {}))}}
            for call in message.get("tool_calls") or [] if isinstance(call, dict)]


def ollama_to_openai_response(resp: dict[str, Any], model: str) -> dict[str, Any]:
    """An Ollama chat answer as a ``chat.completion``."""
    message = resp.get("message") or {}
    out: dict[str, Any] = {"role": "assistant", "content": message.get("content") or None}
    calls = _ollama_calls(message)
    if calls:
        out["tool_calls"] = calls
    if message.get("thinking"):
        out["reasoning_content"] = message["thinking"]
    finish = "tool_calls" if calls else ("length" if resp.get("done_reason") == "length"
                                         else "stop")
    return completion(model, out, finish, usage_openai(int(resp.get("prompt_eval_count", 0)),
                                                       int(resp.get("eval_count", 0))))


class OllamaToOpenAIStream:
    """Ollama NDJSON objects in, ``chat.completion.chunk`` dicts out."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = new_id("chatcmpl-")
        self.created = int(time.time())
        self._calls = 0
        self._first = True

    def feed(self, line: dict[str, Any]) -> list[dict[str, Any]]:
        """Chunks for one NDJSON object."""
        if line.get("error"):
            raise UpstreamStreamError(str(line["error"]))
        message = line.get("message") or {}
        delta: dict[str, Any] = {}
        if self._first:
            delta["role"] = "assistant"
            self._first = False
        if message.get("content"):
            delta["content"] = message["content"]
        if message.get("thinking"):
            delta["reasoning_content"] = message["thinking"]
        calls = _ollama_calls(message)
        if calls:
            delta["tool_calls"] = [{"index": self._calls + i, **c} for i, c in enumerate(calls)]
            self._calls += len(calls)
        out = []
        if delta:
            out.append(chunk(self.model, self.id, self.created, delta))
        if line.get("done"):
            finish = "tool_calls" if self._calls else (
                "length" if line.get("done_reason") == "length" else "stop")
            out.append(chunk(self.model, self.id, self.created, {}, finish,
                             usage_openai(int(line.get("prompt_eval_count", 0)),
                                          int(line.get("eval_count", 0)))))
        return out


def _ollama_time() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())


def openai_to_ollama_response(resp: dict[str, Any], model: str) -> dict[str, Any]:
    """A ``chat.completion`` as an Ollama chat answer (``done: true``)."""
    choice = (resp.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    out: dict[str, Any] = {"role": "assistant", "content": _text_of(message.get("content"))}
    if message.get("reasoning_content"):
        out["thinking"] = message["reasoning_content"]
    if message.get("tool_calls"):
        out["tool_calls"] = [{"function": {
            "name": (c.get("function") or {}).get("name", ""),
            "arguments": _json_args((c.get("function") or {}).get("arguments"))}}
            for c in message["tool_calls"]]
    usage = resp.get("usage") or {}
    return {"model": model, "created_at": _ollama_time(), "message": out, "done": True,
            "done_reason": "length" if choice.get("finish_reason") == "length" else "stop",
            "prompt_eval_count": int(usage.get("prompt_tokens", 0)),
            "eval_count": int(usage.get("completion_tokens", 0))}


class OpenAIToOllamaStream:
    """``chat.completion.chunk`` dicts in, Ollama NDJSON lines out."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._calls: dict[int, dict[str, Any]] = {}
        self._finish: str | None = None
        self._usage: dict[str, Any] = {}

    def feed(self, item: dict[str, Any]) -> list[bytes]:
        """NDJSON lines for one chunk (tool calls are sent whole, at the end)."""
        out = []
        if item.get("usage"):
            self._usage = item["usage"]
        for choice in item.get("choices") or []:
            delta = choice.get("delta") or {}
            message: dict[str, Any] = {"role": "assistant", "content": delta.get("content") or ""}
            if delta.get("reasoning_content"):
                message["thinking"] = delta["reasoning_content"]
            for call in delta.get("tool_calls") or []:
                slot = self._calls.setdefault(int(call.get("index", 0)),
                                              {"name": "", "arguments": ""})
                fn = call.get("function") or {}
                slot["name"] = fn.get("name") or slot["name"]
                slot["arguments"] += fn.get("arguments") or ""
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
            if message["content"] or message.get("thinking"):
                out.append(self._line({"model": self.model, "created_at": _ollama_time(),
                                       "message": message, "done": False}))
        return out

    @staticmethod
    def _line(data: dict[str, Any]) -> bytes:
        return json.dumps(data, separators=(",", ":")).encode() + b"\n"

    def finish(self) -> list[bytes]:
        """The final ``done: true`` line, carrying tool calls and counts."""
        message: dict[str, Any] = {"role": "assistant", "content": ""}
        if self._calls:
            message["tool_calls"] = [{"function": {"name": c["name"],
                                                   "arguments": _json_args(c["arguments"])}}
                                     for _, c in sorted(self._calls.items())]
        return [self._line({
            "model": self.model, "created_at": _ollama_time(), "message": message,
            "done": True, "done_reason": "length" if self._finish == "length" else "stop",
            "prompt_eval_count": int(self._usage.get("prompt_tokens", 0)),
            "eval_count": int(self._usage.get("completion_tokens", 0))})]
