"""The inference gateway through the official SDKs, against fake upstreams on loopback.

Four fake providers speak OpenAI, Anthropic and Ollama; the server routes to them from a
providers file. What a user would notice: answers arrive in the caller's own format
whatever the upstream speaks, fallback hides a failing provider, an open circuit answers
at once without calling the upstream, and the web fetcher refuses private addresses.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import numpy as np
import openai
import pytest

from tests.gateway_fakes import FakeUpstream, run_fake
from tests.server import RunningServer, free_port, run_server

ALPHA_KEY = "sk-alpha-secret-123"


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeUpstream]]:
    names = ("alpha", "beta", "claude", "llama", "flaky", "limited")
    with run_fake("alpha") as a, run_fake("beta") as b, run_fake("claude") as c, \
            run_fake("llama") as ll, run_fake("flaky") as f, run_fake("limited") as lim:
        yield dict(zip(names, (a, b, c, ll, f, lim), strict=True))


@pytest.fixture(autouse=True)
def _reset(fakes: dict[str, FakeUpstream]) -> None:
    for fake in fakes.values():
        fake.reset()


def providers_yaml(f: dict[str, FakeUpstream]) -> str:
    return f"""\
providers:
  alpha:
    kind: openai
    base_url: {f['alpha'].url}/v1
    api_key_env: GW_TEST_ALPHA_KEY
    models: [fake-chat, fake-embed, omni-moderation-latest]
    timeout_s: 1.5
  beta:
    kind: openai
    base_url: {f['beta'].url}/v1
    models: [fake-chat]
  claude:
    kind: anthropic
    base_url: {f['claude'].url}
    api_key_env: GW_TEST_CLAUDE_KEY
    models: [claude-fake]
  llama:
    kind: ollama
    base_url: {f['llama'].url}
    models: [llama3]
  flaky:
    kind: openai
    base_url: {f['flaky'].url}/v1
    models: [fake-chat]
  lim:
    kind: openai
    base_url: {f['limited'].url}/v1
    models: [fake-chat]
  lim2:
    kind: openai
    base_url: {f['limited'].url}/v1
    models: [fake-chat]
  disc:
    kind: openai
    base_url: {f['beta'].url}/v1
  tav:
    kind: tavily
    base_url: {f['beta'].url}
    api_key_env: GW_TEST_TAVILY_KEY
aliases:
  fast: alpha/fake-chat
combos:
  auto: [alpha/fake-chat, beta/fake-chat]
  limits: [lim/fake-chat, lim2/fake-chat]
"""


@pytest.fixture(scope="module")
def server(fakes: dict[str, FakeUpstream], tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[RunningServer]:
    path = tmp_path_factory.mktemp("gw") / "providers.yaml"
    path.write_text(providers_yaml(fakes))
    os.environ["GW_TEST_ALPHA_KEY"] = ALPHA_KEY
    os.environ["GW_TEST_CLAUDE_KEY"] = "sk-claude"
    with run_server(providers_file=str(path), gateway_breaker_failures=3,
                    gateway_breaker_cooldown_s=1.0,
                    web_fetch_allow=[f"127.0.0.1:{fakes['alpha'].port}"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http}/v1", api_key="caller-key", max_retries=0,
                         timeout=20)


@pytest.fixture(scope="module")
def claude(server: RunningServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.http, api_key="caller-key", max_retries=0,
                               timeout=20)


@pytest.fixture(scope="module")
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http, timeout=20) as client:
        yield client


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


# -- OpenAI clients ---------------------------------------------------------------------------


def test_openai_chat_reaches_each_upstream_format(oai: openai.OpenAI,
                                                  fakes: dict[str, FakeUpstream]) -> None:
    for model, name in (("alpha/fake-chat", "alpha"), ("claude/claude-fake", "claude"),
                        ("llama/llama3", "llama"), ("fast", "alpha")):
        reply = oai.chat.completions.create(
            model=model, messages=[{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": "hello there"}])
        assert reply.choices[0].message.content == f"{name}: hello there"
        assert reply.usage is not None and reply.usage.total_tokens > 0
        stream = oai.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hello there"}], stream=True,
            stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == f"{name}: hello there"
        assert any(c.usage is not None for c in chunks)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    # The provider's key came from its env var; the caller's key stayed here.
    seen = fakes["alpha"].headers[0]["authorization"]
    assert seen == f"Bearer {ALPHA_KEY}"
    # Anthropic got its system prompt as `system`, and its own headers.
    sent = fakes["claude"].bodies[0]
    assert sent["system"] == "be brief" and sent["max_tokens"] > 0
    assert fakes["claude"].headers[0]["x-api-key"] == "sk-claude"


def test_openai_tool_calls_across_formats(oai: openai.OpenAI) -> None:
    for model in ("alpha/fake-chat", "claude/claude-fake", "llama/llama3"):
        reply = oai.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "weather?"}],
            tools=[WEATHER_TOOL])  # type: ignore[list-item]
        call = reply.choices[0].message.tool_calls[0]  # type: ignore[index]
        assert call.function.name == "get_weather"  # type: ignore[union-attr]
        assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
        assert reply.choices[0].finish_reason == "tool_calls"
        stream = oai.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "weather?"}],
            tools=[WEATHER_TOOL], stream=True)  # type: ignore[list-item]
        args, names = "", ""
        for chunk in stream:
            for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                names += (tc.function.name or "") if tc.function else ""
                args += (tc.function.arguments or "") if tc.function else ""
        assert names == "get_weather" and json.loads(args) == {"city": "Paris"}


def test_images_in_messages_become_anthropic_blocks(oai: openai.OpenAI,
                                                   fakes: dict[str, FakeUpstream]) -> None:
    reply = oai.chat.completions.create(model="claude/claude-fake", messages=[
        {"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}}]}])
    assert reply.choices[0].message.content == "claude: what is this"
    blocks = fakes["claude"].bodies[-1]["messages"][0]["content"]
    assert blocks[1] == {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                     "data": "iVBORw0K"}}


def test_tool_results_travel_to_anthropic(oai: openai.OpenAI,
                                          fakes: dict[str, FakeUpstream]) -> None:
    reply = oai.chat.completions.create(model="claude/claude-fake", messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_9", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "sunny"},
    ], tools=[WEATHER_TOOL])  # type: ignore[list-item]
    assert reply.choices[0].finish_reason == "stop"
    sent = fakes["claude"].bodies[-1]["messages"]
    assert sent[1]["content"][0] == {"type": "tool_use", "id": "call_9", "name": "get_weather",
                                     "input": {"city": "Paris"}}
    assert sent[2]["content"][0]["type"] == "tool_result"
    assert sent[2]["content"][0]["tool_use_id"] == "call_9"


# -- Anthropic clients ------------------------------------------------------------------------


def test_anthropic_sdk_on_any_upstream(claude: anthropic.Anthropic) -> None:
    for model, name in (("alpha/fake-chat", "alpha"), ("claude/claude-fake", "claude"),
                        ("llama/llama3", "llama")):
        msg = claude.messages.create(model=model, max_tokens=64, system="be brief",
                                     messages=[{"role": "user", "content": "hi"}])
        texts = [b.text for b in msg.content if b.type == "text"]
        assert texts == [f"{name}: hi"] and msg.stop_reason == "end_turn"
        assert msg.usage.output_tokens > 0
        with claude.messages.stream(model=model, max_tokens=64,
                                    messages=[{"role": "user", "content": "hi"}]) as stream:
            streamed = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert streamed == f"{name}: hi" and final.stop_reason == "end_turn"
    # Thinking blocks from an Anthropic upstream are forwarded, signature included.
    msg = claude.messages.create(model="claude/claude-fake", max_tokens=64,
                                 messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].type == "thinking" and msg.content[0].thinking == "hmm"
    assert msg.content[0].signature == "sig"
    with claude.messages.stream(model="claude/claude-fake", max_tokens=64,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "thinking" and final.content[0].signature == "sig"


def test_anthropic_tool_use_from_openai_upstream(claude: anthropic.Anthropic) -> None:
    tool = {"name": "get_weather", "description": "Weather",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    for model in ("alpha/fake-chat", "claude/claude-fake"):
        msg = claude.messages.create(model=model, max_tokens=64, tools=[tool],  # type: ignore[list-item]
                                     messages=[{"role": "user", "content": "weather?"}])
        use = next(b for b in msg.content if b.type == "tool_use")
        assert use.name == "get_weather" and use.input == {"city": "Paris"}
        assert msg.stop_reason == "tool_use"
        with claude.messages.stream(model=model, max_tokens=64, tools=[tool],  # type: ignore[list-item]
                                    messages=[{"role": "user", "content": "weather?"}]) as s:
            final = s.get_final_message()
        use = next(b for b in final.content if b.type == "tool_use")
        assert use.input == {"city": "Paris"} and final.stop_reason == "tool_use"


def test_anthropic_count_tokens_and_errors(claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(model="claude/claude-fake",
                                           messages=[{"role": "user", "content": "hi"}])
    assert counted.input_tokens == 42  # the upstream's own count
    estimated = claude.messages.count_tokens(model="alpha/fake-chat",
                                             messages=[{"role": "user", "content": "hi " * 40}])
    assert 10 < estimated.input_tokens < 100
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model="nope/nothing", max_tokens=5,
                               messages=[{"role": "user", "content": "hi"}])
    body: Any = bad.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"


# -- Responses and Ollama ---------------------------------------------------------------------


def test_responses_api(oai: openai.OpenAI, fakes: dict[str, FakeUpstream]) -> None:
    for model, name in (("alpha/fake-chat", "alpha"), ("claude/claude-fake", "claude")):
        resp = oai.responses.create(model=model, instructions="brief", input="good day")
        assert resp.output_text == f"{name}: good day" and resp.status == "completed"
        events = list(oai.responses.create(model=model, input="good day", stream=True))
        deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert deltas == f"{name}: good day"
        assert events[-1].type == "response.completed"
        assert events[-1].response.output_text == f"{name}: good day"
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    resp = oai.responses.create(model="alpha/fake-chat", input="weather?",
                                tools=[tool])  # type: ignore[list-item]
    call = next(o for o in resp.output if o.type == "function_call")
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    events = list(oai.responses.create(model="claude/claude-fake", input="weather?",
                                       tools=[tool], stream=True))  # type: ignore[list-item]
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(args) == {"city": "Paris"}
    done = events[-1].response  # type: ignore[union-attr]
    streamed = next(o for o in done.output if o.type == "function_call")
    assert streamed.name == "get_weather" and json.loads(streamed.arguments) == {"city": "Paris"}
    assert any(o.type == "reasoning" for o in done.output)  # the upstream's thinking
    follow = oai.responses.create(model="alpha/fake-chat", input=[
        {"role": "user", "content": "weather?"},
        {"type": "function_call", "call_id": call.call_id, "name": "get_weather",
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tools=[tool])  # type: ignore[list-item]
    assert follow.output_text == "alpha: weather?"
    sent = fakes["alpha"].bodies[-1]["messages"]
    assert sent[1]["tool_calls"][0]["id"] == call.call_id
    assert sent[2] == {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}


def test_ollama_chat_both_ways(http: httpx.Client) -> None:
    r = http.post("/api/chat", json={"model": "alpha/fake-chat", "stream": False,
                                     "messages": [{"role": "user", "content": "yo"}]})
    assert r.status_code == 200 and r.json()["message"]["content"] == "alpha: yo"
    assert r.json()["done"] is True
    with http.stream("POST", "/api/chat", json={
            "model": "claude/claude-fake",
            "messages": [{"role": "user", "content": "yo"}]}) as r:
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert "".join(x["message"]["content"] for x in lines) == "claude: yo"
    assert lines[-1]["done"] is True and not any(x["done"] for x in lines[:-1])
    for path in ("/v1/api/chat", "/api/v1/api/chat"):
        r = http.post(path, json={"model": "llama/llama3", "stream": False,
                                  "messages": [{"role": "user", "content": "yo"}]})
        assert r.json()["message"]["content"] == "llama: yo"
    r = http.post("/api/v1/providers/claude/chat/completions",
                  json={"model": "claude-fake", "messages": [{"role": "user", "content": "p"}]})
    assert r.json()["choices"][0]["message"]["content"] == "claude: p"
    assert r.json()["model"] == "claude/claude-fake"


# -- local embeddings and rerank --------------------------------------------------------------


def test_local_embeddings_are_semantic(oai: openai.OpenAI, http: httpx.Client) -> None:
    texts = ["a cat sat on the mat", "a kitten rested on the rug", "stock prices fell sharply"]
    result = oai.embeddings.create(model="local/all-minilm-l6-v2", input=texts)
    vectors = np.array([d.embedding for d in result.data])
    assert vectors.shape == (3, 384)
    sims = vectors @ vectors[0]
    assert sims[1] > sims[2] + 0.2
    as_b64 = oai.embeddings.create(model="local/all-minilm-l6-v2", input=texts[0],
                                   encoding_format="base64")
    raw: Any = as_b64.data[0].embedding  # asked for explicitly, the SDK leaves it encoded
    assert np.allclose(np.frombuffer(base64.b64decode(raw), "<f4"), vectors[0], atol=1e-5)
    floats = http.post("/v1/embeddings", json={"model": "local/all-minilm-l6-v2",
                                               "input": texts[0]}).json()
    assert np.allclose(floats["data"][0]["embedding"], vectors[0], atol=1e-5)
    listed = http.get("/v1/models/embedding").json()["data"]
    local = next(m for m in listed if "minilm" in m["id"])
    assert local["dimensions"] == 384 and isinstance(local["max_input_tokens"], int)
    bad = http.post("/v1/embeddings", json={"model": "local/all-minilm-l6-v2", "input": "x",
                                            "encoding_format": "int8"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_encoding_format"
    long = http.post("/v1/embeddings", json={"model": "local/all-minilm-l6-v2",
                                             "input": "word " * 600})
    assert long.status_code == 400 and long.json()["error"]["code"] == "input_too_long"
    upstream = oai.embeddings.create(model="alpha/fake-embed", input=["ab", "abcd"])
    assert [d.embedding[0] for d in upstream.data] == [2.0, 4.0]


def test_rerank_orders_best_first(http: httpx.Client) -> None:
    docs = ["The stock market dropped today.", "Kittens love to nap in the sun.",
            "A recipe for tomato soup.", "My cat sleeps on the windowsill all day."]
    r = http.post("/api/v1/rerank", json={"model": "local/all-minilm-l6-v2",
                                          "query": "where do cats like to sleep?",
                                          "documents": docs, "top_n": 3})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 3
    assert {results[0]["index"], results[1]["index"]} == {1, 3}
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True)


# -- staying up -------------------------------------------------------------------------------


def test_fallback_on_500_429_and_timeout(oai: openai.OpenAI,
                                         fakes: dict[str, FakeUpstream]) -> None:
    alpha, beta = fakes["alpha"], fakes["beta"]
    for status in (500, 429):
        alpha.faults.status, alpha.faults.fail_count = status, 1
        reply = oai.chat.completions.create(model="auto",
                                            messages=[{"role": "user", "content": "x"}])
        assert reply.choices[0].message.content == "beta: x"
        assert reply.model == "beta/fake-chat"
    time.sleep(1.05)  # alpha's 429 (no Retry-After) keeps it aside for a second
    reply = oai.chat.completions.create(model="auto", messages=[{"role": "user", "content": "x"}])
    assert reply.model == "alpha/fake-chat"  # back, and its failure count starts again
    alpha.faults.hang_s = 3.0  # past alpha's timeout_s of 1.5
    stream = oai.chat.completions.create(model="auto", stream=True,
                                         messages=[{"role": "user", "content": "x"}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "beta: x"
    alpha.faults.hang_s = 0.0
    alpha.faults.garbage = True  # an answer that is not JSON
    reply = oai.chat.completions.create(model="auto", messages=[{"role": "user", "content": "x"}])
    assert reply.choices[0].message.content == "beta: x"
    alpha.faults.garbage = False
    # The caller's own 4xx is not retried elsewhere.
    alpha.faults.status, alpha.faults.fail_count = 400, 1
    calls = beta.calls
    with pytest.raises(openai.BadRequestError) as bad:
        oai.chat.completions.create(model="auto", messages=[{"role": "user", "content": "x"}])
    assert beta.calls == calls and "alpha failing" in str(bad.value)
    assert ALPHA_KEY not in str(bad.value)


def test_breaker_opens_answers_503_then_recovers(server: RunningServer, oai: openai.OpenAI,
                                                 http: httpx.Client,
                                                 fakes: dict[str, FakeUpstream]) -> None:
    flaky = fakes["flaky"]
    flaky.faults.fail_count = -1
    for _ in range(3):
        with pytest.raises(openai.APIStatusError) as failed:
            oai.chat.completions.create(model="flaky/fake-chat",
                                        messages=[{"role": "user", "content": "x"}])
        assert failed.value.status_code == 502
    assert flaky.calls == 3
    r = http.post("/v1/chat/completions", json={"model": "flaky/fake-chat",
                                                "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "circuit_open"
    assert int(r.headers["retry-after"]) >= 1
    assert flaky.calls == 3  # answered without calling the upstream
    assert http.get("/api/v1").json()["providers"]["flaky"]["state"] == "open"
    metrics = http.get("/metrics").text
    assert 'omnistream_gateway_breaker_state{provider="flaky"} 2.0' in metrics
    time.sleep(1.1)  # the cool-down: the next call is a half-open probe
    flaky.faults.fail_count = 0
    reply = oai.chat.completions.create(model="flaky/fake-chat",
                                        messages=[{"role": "user", "content": "x"}])
    assert reply.choices[0].message.content == "flaky: x"
    assert http.get("/api/v1").json()["providers"]["flaky"]["state"] == "closed"


def test_every_target_rate_limited_gives_retry_after(http: httpx.Client,
                                                     fakes: dict[str, FakeUpstream]) -> None:
    limited = fakes["limited"]
    limited.faults.status, limited.faults.fail_count = 429, 2
    limited.faults.retry_after = "7"
    r = http.post("/v1/chat/completions", json={"model": "limits",
                                                "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert 6 <= int(r.headers["retry-after"]) <= 7
    calls = limited.calls
    again = http.post("/v1/chat/completions", json={
        "model": "limits", "messages": [{"role": "user", "content": "x"}]})
    assert again.status_code == 429 and limited.calls == calls  # skipped, not called


def test_abandoned_stream_cancels_upstream(server: RunningServer,
                                           fakes: dict[str, FakeUpstream]) -> None:
    for name, model in (("beta", "beta/fake-chat"), ("claude", "claude/claude-fake")):
        fake = fakes[name]
        fake.faults.slow_stream = True
        with httpx.Client(base_url=server.http, timeout=10) as client, client.stream(
                "POST", "/v1/chat/completions",
                json={"model": model, "stream": True,
                      "messages": [{"role": "user", "content": "x"}]}) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]
            assert any(line.startswith("data: ") for line in got)
        deadline = time.monotonic() + 5
        while fake.streams_cancelled == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fake.streams_cancelled == 1 and fake.streams_finished == 0


def test_stream_cut_midway_ends_with_an_error(http: httpx.Client,
                                              fakes: dict[str, FakeUpstream]) -> None:
    fakes["beta"].faults.cut_stream = True
    with http.stream("POST", "/v1/chat/completions", json={
            "model": "beta/fake-chat", "stream": True,
            "messages": [{"role": "user", "content": "one two three"}]}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-1])["error"]["code"] == "upstream_stream_error"


# -- discovery and errors ---------------------------------------------------------------------


def test_model_lists_and_discovery(http: httpx.Client) -> None:
    data = http.get("/v1/models").json()["data"]
    ids = {m["id"] for m in data}
    assert {"alpha/fake-chat", "claude/claude-fake", "llama/llama3", "auto", "fast",
            "local/all-minilm-l6-v2", "local/fetch", "whisper-tiny.en"} <= ids
    combo = next(m for m in data if m["id"] == "auto")
    assert combo["combo"] == ["alpha/fake-chat", "beta/fake-chat"]
    assert http.get("/api/v1/models").json()["data"] == data
    alpha = http.get("/api/v1/providers/alpha/models").json()["data"]
    assert [m["id"] for m in alpha] == ["fake-chat", "fake-embed", "omni-moderation-latest"]
    assert http.get("/api/v1/providers/nope/models").status_code == 404
    web = http.get("/v1/models/web").json()["data"]
    assert {"id": "local/fetch", "kind": "webFetch"}.items() <= web[0].items()
    info = http.get("/api/v1").json()
    assert info["status"] == "ok" and info["providers"]["claude"]["kind"] == "anthropic"
    assert http.get("/api/v1/models/tts").status_code == 200
    assert http.get("/v1/models/stt").json()["data"][0]["id"] == "whisper-tiny.en"
    assert http.get("/v1/models/image").status_code == 200


def test_web_search_and_model_discovery(http: httpx.Client,
                                        fakes: dict[str, FakeUpstream]) -> None:
    r = http.post("/v1/web/search", json={"query": "cats", "include_answer": True})
    assert r.status_code == 200, r.text
    assert r.json()["answer"] == "beta knows"
    assert r.json()["results"][0] == {"url": "https://example.com/a", "title": "A",
                                      "content": "cats", "score": 0.9}
    web = {m["id"]: m["kind"] for m in http.get("/v1/models/web").json()["data"]}
    assert web["tav/search"] == "webSearch" and web["local/fetch"] == "webFetch"
    # `disc` lists no models in the file: they come from its own /v1/models.
    listed = http.get("/api/v1/providers/disc/models").json()["data"]
    assert [m["id"] for m in listed] == ["fake-chat", "fake-embed"]


def test_moderations_and_provider_images(oai: openai.OpenAI, http: httpx.Client) -> None:
    verdict = oai.moderations.create(input="hello")  # the default model, on alpha
    assert verdict.results[0].flagged is False
    r = http.post("/api/v1/providers/alpha/images/generations",
                  json={"model": "fake-chat", "prompt": "a red bicycle"})
    assert r.status_code == 200 and r.json()["data"][0]["revised_prompt"] == "a red bicycle"
    r = http.post("/v1/images/variations", files={"n": (None, "1")})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_image"


def test_media_routes_under_api_v1(http: httpx.Client) -> None:
    garbage = {"file": ("a.wav", b"RIFF\x00\x00garbage", "audio/wav")}
    for path in ("/v1/audio/translations", "/api/v1/audio/translations",
                 "/api/v1/audio/transcriptions"):
        r = http.post(path, files=garbage)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_audio", path
    voices = http.get("/api/v1/models/tts").json()["data"]
    assert voices and all("voices" in v for v in voices)


def test_bad_requests_get_stable_codes(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"model": "nope",
                                                "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_model"
    r = http.post("/v1/chat/completions", json={"model": "alpha/fake-chat", "messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_messages"
    r = http.post("/v1/chat/completions", content=b"{not json",
                  headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = http.post("/v1/web/fetch", json={"model": "jina/reader", "url": "https://a.example/"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_provider"
    assert "jina, firecrawl" in r.json()["error"]["message"]
    r = http.post("/v1/web/search", json={"query": "x" * 3000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "query_too_long"


# -- web fetch --------------------------------------------------------------------------------


def test_web_fetch_refuses_private_addresses(http: httpx.Client,
                                             fakes: dict[str, FakeUpstream]) -> None:
    page = fakes["alpha"]
    ok = http.post("/v1/web/fetch", json={"url": f"{page.url}/page"},
                   headers={"authorization": "Bearer caller-key", "cookie": "s=1"})
    assert ok.status_code == 200, ok.text  # allow-listed
    sent = page.headers[-1]
    assert "authorization" not in sent and "cookie" not in sent
    body = ok.json()
    assert body["title"] == "Fake page" and "# Cats" in body["markdown"]
    assert "**cat**" in body["markdown"] and f"{page.url}/mat" in body["links"]
    assert "var x" not in body["markdown"]
    other = fakes["beta"]  # loopback, not allow-listed
    for url in (f"{other.url}/page", "http://169.254.169.254/latest/meta-data/",
                "http://[::1]/", "http://localhost/", "http://10.1.2.3/"):
        r = http.post("/v1/web/fetch", json={"url": url})
        assert r.status_code == 403 and r.json()["error"]["code"] == "blocked", url
    assert other.calls == 0
    for target in (f"{other.url}/page", "http://169.254.169.254/latest/meta-data/"):
        r = http.post("/v1/web/fetch", json={"url": f"{page.url}/redirect?to={target}"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "blocked"
    assert other.calls == 0
    for url in ("file:///etc/passwd", "ftp://example.com/", "http://user:pw@example.com/",
                "not a url"):
        r = http.post("/v1/web/fetch", json={"url": url})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_url", url


# -- the providers file -----------------------------------------------------------------------


def test_bad_providers_file_refuses_to_start(tmp_path: Path) -> None:
    bad = tmp_path / "providers.yaml"
    bad.write_text("providers:\n  a:\n    kind: openai\n    base_url: http://x/v1\n"
                   "  b:\n    kind: gemini\n    base_url: http://y\n")
    proc = subprocess.run(
        [sys.executable, "-m", "omnistream.cli", "serve", "--port", str(free_port()),
         "--providers", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"{bad}:6" in proc.stderr and "gemini" in proc.stderr


# -- outbound proxy ---------------------------------------------------------------------------


class _ForwardProxy:
    """A minimal HTTP forward proxy on loopback that records the requests it relays."""

    def __init__(self) -> None:
        import socket
        import threading

        self.seen: list[str] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn: Any) -> None:
        import socket
        import threading
        from urllib.parse import urlsplit

        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                conn.close()
                return
            data += chunk
        line = data.split(b"\r\n", 1)[0].decode()
        self.seen.append(line)
        method, target, version = line.split(" ")
        url = urlsplit(target)
        upstream = socket.create_connection((url.hostname, url.port or 80))
        path = url.path + (f"?{url.query}" if url.query else "")
        upstream.sendall(f"{method} {path} {version}".encode() + data[len(line):])

        def pump(src: Any, dst: Any) -> None:
            try:
                while chunk := src.recv(65536):
                    dst.sendall(chunk)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pump, args=(upstream, conn), daemon=True).start()
        pump(conn, upstream)

    def close(self) -> None:
        self.sock.close()


def test_outbound_calls_honour_http_proxy(fakes: dict[str, FakeUpstream],
                                          tmp_path: Path) -> None:
    proxy = _ForwardProxy()
    path = tmp_path / "providers.yaml"
    path.write_text(f"providers:\n  viaproxy:\n    kind: openai\n"
                    f"    base_url: http://localhost:{fakes['beta'].port}/v1\n"
                    f"    models: [fake-chat]\n")
    saved = {k: os.environ.get(k) for k in ("HTTP_PROXY", "NO_PROXY", "http_proxy", "no_proxy")}
    os.environ.update({"HTTP_PROXY": f"http://127.0.0.1:{proxy.port}",
                       "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"})
    os.environ.pop("http_proxy", None)
    try:
        with run_server(providers_file=str(path)) as srv, \
                httpx.Client(base_url=srv.http, timeout=20, trust_env=False) as client:
            r = client.post("/v1/chat/completions", json={
                "model": "viaproxy/fake-chat", "messages": [{"role": "user", "content": "p"}]})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] \
                == "beta: p"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proxy.close()
    assert proxy.seen == [f"POST http://localhost:{fakes['beta'].port}/v1/chat/completions "
                          "HTTP/1.1"]


@pytest.mark.parametrize(("text", "line", "words"), [
    ("providers:\n  a:\n    kind: openai\n    base_url: http://x/v1\n    api_key: sk-1\n",
     5, "unknown key 'api_key'"),
    ("providers:\n  a:\n    kind: openai\n    base_url: http://x/v1\n    models: [m]\n"
     "combos:\n  auto: [a/m, b/m]\n", 7, "unknown provider 'b'"),
    ("providers:\n  a:\n    kind: openai\n    base_url: http://x/v1\n    models: [m]\n"
     "aliases:\n  fast: a/other\n", 7, "does not list model 'other'"),
    ("providers:\n  a:\n    kind: openai\n", 2, "'base_url' is required"),
    ("providers:\n  a:\n    kind: openai\n    base_url: x\n    timeout_s: soon\n", 4,
     "http(s) URL"),
    ("providers:\n  local:\n    kind: openai\n    base_url: http://x\n", 2, "reserved"),
    ("providers: [\n", 2, "not valid YAML"),
])
def test_providers_file_errors_name_the_line(text: str, line: int, words: str) -> None:
    from omnistream.gateway import ProvidersFileError, parse_providers

    with pytest.raises(ProvidersFileError) as err:
        parse_providers(text, "p.yaml")
    assert f"p.yaml:{line}:" in str(err.value) and words in str(err.value)


def test_gateway_routes_need_a_key_in_their_own_error_shape(fakes: dict[str, FakeUpstream],
                                                            tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-gateway-test-key\n")
    providers = tmp_path / "providers.yaml"
    providers.write_text(providers_yaml(fakes))
    with run_server(api_key_file=str(keys), providers_file=str(providers)) as srv:
        oai = openai.OpenAI(base_url=f"{srv.http}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as denied:
            oai.chat.completions.create(model="alpha/fake-chat",
                                        messages=[{"role": "user", "content": "x"}])
        assert denied.value.code == "invalid_api_key"
        claude = anthropic.Anthropic(base_url=srv.http, api_key="wrong", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as refused:
            claude.messages.create(model="alpha/fake-chat", max_tokens=5,
                                   messages=[{"role": "user", "content": "x"}])
        body: Any = refused.value.body
        assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
        with httpx.Client(base_url=srv.http, timeout=20) as client:
            for path in ("/api/v1", "/api/v1/models", "/v1/models/web", "/api/chat",
                         "/api/v1/rerank", "/v1/web/fetch"):
                method = "GET" if "models" in path or path == "/api/v1" else "POST"
                assert client.request(method, path, json={}).status_code == 401, path
        good = openai.OpenAI(base_url=f"{srv.http}/v1", api_key="sk-gateway-test-key",
                             max_retries=0)
        reply = good.chat.completions.create(model="alpha/fake-chat",
                                             messages=[{"role": "user", "content": "k"}])
        assert reply.choices[0].message.content == "alpha: k"
    assert all(h.get("authorization") != "Bearer sk-gateway-test-key"
               for h in fakes["alpha"].headers)  # the caller's key never goes upstream


def test_request_deadline_bounds_every_fallback(fakes: dict[str, FakeUpstream],
                                                tmp_path: Path) -> None:
    providers = tmp_path / "providers.yaml"
    providers.write_text(providers_yaml(fakes).replace("timeout_s: 1.5", "timeout_s: 30"))
    fakes["alpha"].faults.hang_s = 3.0
    with run_server(providers_file=str(providers), gateway_deadline_s=1.0) as srv, \
            httpx.Client(base_url=srv.http, timeout=20) as client:
        started = time.monotonic()
        r = client.post("/v1/chat/completions", json={
            "model": "auto", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        assert time.monotonic() - started < 2.5
    assert fakes["beta"].calls == 0  # the deadline is for the whole walk
