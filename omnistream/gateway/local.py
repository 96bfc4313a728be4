"""The built-in ``local`` provider: what omnistream serves itself, beside the upstreams.

Embeddings and rerank run on the MiniLM model through the engine's shared runner (so
concurrent requests batch together and the loop never runs model code); ``local/fetch``
is the SSRF-safe page fetcher. Speech, transcription and images are served by their
own routes (``tts_http``, ``generate_http``, ``images_http``) under the gateway's paths.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from omnistream.engine.registry import ModelUnavailable
from omnistream.engine.runner import RunnerClosed, RunnerFull
from omnistream.gateway.errors import GatewayError
from omnistream.gateway.minilm import (
    DIMENSIONS,
    MAX_INPUT_TOKENS,
    MODEL_ID,
    EmbedRequest,
    EmbedResult,
    InputTooLong,
)
from omnistream.transports.state import AppState

#: Names the local embedding model answers to.
EMBEDDING_NAMES = frozenset({MODEL_ID, f"local/{MODEL_ID}", "local/minilm", "minilm",
                             "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})
FETCH_MODEL = "local/fetch"
MAX_EMBED_INPUTS = 2048
MAX_RERANK_DOCUMENTS = 1000
MAX_TEXT_CHARS = 32768


def is_local_embedding(model: Any) -> bool:
    """Whether ``model`` names the built-in embedding model (or is left out)."""
    # A non-string model (a fuzzer's dict or list) is not ours: the caller's model check
    # answers it with a 400, where a set lookup would raise TypeError (a 500).
    return model is None or model == "" or (isinstance(model, str) and model in EMBEDDING_NAMES)


def _texts(value: Any, name: str, limit: int) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise GatewayError(400, "invalid_input",
                           f"'{name}' must be a string or a non-empty list of strings",
                           param=name)
    if len(value) > limit:
        raise GatewayError(400, "invalid_input", f"'{name}' has {len(value)} items; at most "
                           f"{limit} per request", param=name)
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise GatewayError(400, "invalid_input",
                               f"{name}[{i}] must be a string (token arrays are not accepted "
                               "by the local model)", param=name)
        if len(item) > MAX_TEXT_CHARS:
            raise GatewayError(400, "input_too_long", f"{name}[{i}] is longer than "
                               f"{MAX_TEXT_CHARS} characters", param=name)
        out.append(item)
    return out


async def embed_texts(state: AppState, texts: list[str]) -> EmbedResult:
    """Vectors for ``texts`` from the shared MiniLM runner (one work item, batched).

    Raises:
        GatewayError: 400 ``input_too_long``, 503 when the model cannot run here or its
            queue is full.
    """
    try:
        runner = state.engine.runner(MODEL_ID)
    except (KeyError, ModelUnavailable) as exc:
        raise GatewayError(503, "model_unavailable",
                           f"The local embedding model is unavailable: {exc}") from None
    try:
        future = runner.submit(EmbedRequest(tuple(texts)))
    except (RunnerFull, RunnerClosed) as exc:
        raise GatewayError(503, "overloaded", f"The embedding model is busy: {exc}",
                           retry_after=1.0) from None
    except RuntimeError as exc:
        raise GatewayError(503, "model_unavailable", str(exc)) from None
    try:
        result = await future
    except InputTooLong as exc:
        raise GatewayError(400, "input_too_long", str(exc), param="input") from None
    value = result.value
    assert isinstance(value, EmbedResult)
    return value


async def embeddings(state: AppState, body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI embeddings answer from the local model."""
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise GatewayError(400, "invalid_encoding_format",
                           "encoding_format must be 'float' or 'base64'",
                           param="encoding_format")
    dims = body.get("dimensions")
    if dims is not None and dims != DIMENSIONS:
        raise GatewayError(400, "invalid_dimensions",
                           f"{MODEL_ID} gives {DIMENSIONS}-dimensional vectors only",
                           param="dimensions")
    texts = _texts(body.get("input"), "input", MAX_EMBED_INPUTS)
    result = await embed_texts(state, texts)
    data = []
    for i, vector in enumerate(result.vectors):
        value: Any = (base64.b64encode(vector.astype("<f4").tobytes()).decode()
                      if fmt == "base64" else vector.tolist())
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": f"local/{MODEL_ID}",
            "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens}}


async def rerank(state: AppState, body: dict[str, Any]) -> dict[str, Any]:
    """Cohere/Jina-style rerank: documents ordered by cosine similarity to the query."""
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise GatewayError(400, "invalid_input", "'query' must be a non-empty string",
                           param="query")
    raw_docs = body.get("documents")
    if isinstance(raw_docs, list):
        raw_docs = [d.get("text") if isinstance(d, dict) else d for d in raw_docs]
    documents = _texts(raw_docs, "documents", MAX_RERANK_DOCUMENTS)
    top_n = body.get("top_n")
    if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool)
                              or top_n < 1):
        raise GatewayError(400, "invalid_input", "'top_n' must be a positive integer",
                           param="top_n")
    result = await embed_texts(state, [query, *documents])
    scores = result.vectors[1:] @ result.vectors[0]
    order = np.argsort(-scores, kind="stable")[: top_n or len(documents)]
    results = []
    for index in order:
        entry: dict[str, Any] = {"index": int(index), "relevance_score": float(scores[index])}
        if body.get("return_documents"):
            entry["document"] = {"text": documents[int(index)]}
        results.append(entry)
    return {"id": f"rerank-{id(result):x}", "model": f"local/{MODEL_ID}", "results": results,
            "usage": {"total_tokens": result.tokens}}


def embedding_model_entry(state: AppState) -> dict[str, Any]:
    """The local model's row in ``/v1/models/embedding``."""
    spec = state.registry.get(MODEL_ID)
    reason = spec.unavailable_reason() if spec is not None else "not registered"
    return {"id": f"local/{MODEL_ID}", "object": "model", "owned_by": "local",
            "dimensions": DIMENSIONS, "max_input_tokens": MAX_INPUT_TOKENS,
            "available": reason is None, "reason": reason or "",
            "capabilities": ["embeddings", "rerank"]}
