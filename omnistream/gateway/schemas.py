"""Request bodies of the gateway routes, declared for ``/openapi.json``.

The gateway routes read their own body (each answers in its surface's error shape, and a
chat body passes through to upstreams with fields this server does not know), so these
models document; the handlers and :func:`omnistream.gateway.translate.check_openai_request`
validate. Every model allows extra fields, as the upstream APIs do.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatMessage(_Body):
    """One OpenAI chat message."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionBody(_Body):
    """OpenAI ``POST /v1/chat/completions``."""

    model: str = Field(description="provider/model, an alias or a combo (GET /v1/models)")
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = Field(None, description="{include_usage}")
    tools: list[dict[str, Any]] | None = Field(None, description="[{type: function, function}]")
    tool_choice: str | dict[str, Any] | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None


class MessagesBody(_Body):
    """Anthropic ``POST /v1/messages`` (and ``/count_tokens``, where max_tokens may go)."""

    model: str
    max_tokens: int = Field(ge=1)
    messages: list[dict[str, Any]] = Field(min_length=1, description="{role, content}")
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="[{name, input_schema}]")
    tool_choice: dict[str, Any] | None = None
    stream: bool = False
    temperature: float | None = None
    stop_sequences: list[str] | None = None
    thinking: dict[str, Any] | None = None


class CountTokensBody(_Body):
    """Anthropic ``POST /v1/messages/count_tokens``."""

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None


class ResponsesBody(_Body):
    """OpenAI ``POST /v1/responses`` (stateless: no ``previous_response_id``)."""

    model: str
    input: str | list[dict[str, Any]] = Field(description="text, or message/function items")
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="[{type: function, name}]")
    stream: bool = False
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None


class OllamaChatBody(_Body):
    """Ollama ``POST /api/chat`` (streams NDJSON unless ``stream`` is false)."""

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1, description="{role, content, images}")
    stream: bool = True
    tools: list[dict[str, Any]] | None = None
    options: dict[str, Any] | None = Field(None, description="{temperature, num_predict, stop}")


class EmbeddingsBody(_Body):
    """OpenAI ``POST /v1/embeddings``."""

    model: str = Field("local/all-minilm-l6-v2", description="local/all-minilm-l6-v2 or a "
                       "provider's embedding model")
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


class RerankBody(_Body):
    """Cohere/Jina-style ``POST /v1/rerank`` (scores: MiniLM cosine similarity)."""

    model: str = "local/all-minilm-l6-v2"
    query: str = Field(min_length=1)
    documents: list[str | dict[str, Any]] = Field(min_length=1, description="texts or {text}")
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False


class ModerationsBody(_Body):
    """OpenAI ``POST /v1/moderations`` (an ``openai`` provider answers)."""

    input: str | list[str] | list[dict[str, Any]]
    model: str = "omni-moderation-latest"


class WebSearchBody(_Body):
    """``POST /v1/web/search``: ``{answer?, results: [{url, title, content, score}]}``."""

    query: str = Field(min_length=1, max_length=2000)
    model: str | None = Field(None, description="e.g. tavily/search (GET /v1/models/web)")
    max_results: int = Field(5, ge=1, le=50)
    include_answer: bool = False
    search_depth: Literal["basic", "advanced"] | None = None


class WebFetchBody(_Body):
    """``POST /v1/web/fetch``: ``{url, title, markdown | html | text, links, images}``."""

    url: str = Field(description="http(s) URL; private addresses answer 403 blocked")
    model: str = Field("local/fetch", description="local/fetch, jina/reader, firecrawl/scrape")
    format: Literal["markdown", "html", "text"] = "markdown"


class ProviderImagesBody(_Body):
    """OpenAI ``POST /v1/providers/{provider}/images/generations`` for an openai provider."""

    model: str
    prompt: str
    n: int | None = Field(None, ge=1)
    size: str | None = None
    response_format: Literal["url", "b64_json"] | None = None


class VariationsForm(_Body):
    """OpenAI ``POST /v1/images/variations`` (multipart)."""

    image: bytes = Field(json_schema_extra={"format": "binary"})
    model: str | None = None
    prompt: str | None = Field(None, description="default: a neutral 'variation' prompt")
    n: int | None = Field(None, ge=1)
    size: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
