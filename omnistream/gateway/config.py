"""The providers file: which upstreams the gateway routes to, and the combos over them.

```yaml
providers:
  openai:
    kind: openai                      # openai | anthropic | ollama | tavily | jina | firecrawl
    base_url: https://api.openai.com/v1
    api_key_env: OPENAI_API_KEY       # the key's environment variable, never the key
    models: [gpt-4o-mini, text-embedding-3-small]
    timeout_s: 60
aliases:
  fast: openai/gpt-4o-mini
combos:
  auto: [claude/claude-sonnet-4-5, openai/gpt-4o-mini]
```

The file is checked as a whole before the server starts: a mistake raises
:class:`ProvidersFileError` naming the file and line, so an operator never finds out
from a failing request. The YAML node tree (not the parsed dict) is walked because
only nodes remember their line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CHAT_KINDS = ("openai", "anthropic", "ollama")
WEB_KINDS = ("tavily", "jina", "firecrawl")
KINDS = CHAT_KINDS + WEB_KINDS

#: Provider names that the gateway itself owns.
RESERVED = frozenset({"local"})

DEFAULT_BASE_URLS = {
    "tavily": "https://api.tavily.com",
    "jina": "https://r.jina.ai",
    "firecrawl": "https://api.firecrawl.dev",
}

#: The model ids a web tool provider serves when the file lists none.
DEFAULT_WEB_MODELS = {"tavily": ["search"], "jina": ["reader", "search"],
                      "firecrawl": ["scrape", "search"]}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PROVIDER_KEYS = {"kind", "base_url", "api_key_env", "models", "timeout_s", "headers"}


class ProvidersFileError(ValueError):
    """The providers file cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class ProviderConfig:
    """One upstream: its kind, where it is, which env var holds its key, its models."""

    name: str
    kind: str
    base_url: str
    api_key_env: str | None = None
    models: tuple[str, ...] = ()
    timeout_s: float = 60.0
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def api_key(self) -> str | None:
        """The key, read from the environment at call time (rotating it needs no restart)."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the providers file declares."""

    providers: dict[str, ProviderConfig] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    combos: dict[str, tuple[str, ...]] = field(default_factory=dict)
    source: str = ""


def _fail(path: str, node: yaml.Node | None, message: str) -> ProvidersFileError:
    line = f":{node.start_mark.line + 1}" if node is not None else ""
    return ProvidersFileError(f"{path}{line}: {message}")


def _mapping(path: str, node: yaml.Node, what: str) -> list[tuple[yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise _fail(path, node, f"{what} must be a mapping")
    pairs: list[tuple[yaml.Node, yaml.Node]] = list(node.value)
    seen: set[str] = set()
    for key, _ in pairs:
        if not isinstance(key, yaml.ScalarNode):
            raise _fail(path, key, f"keys of {what} must be plain names")
        if key.value in seen:
            raise _fail(path, key, f"{what}.{key.value} is given twice")
        seen.add(key.value)
    return pairs


def _string(path: str, node: yaml.Node, what: str) -> str:
    if not isinstance(node, yaml.ScalarNode) or node.tag.endswith((":null", ":map", ":seq")):
        raise _fail(path, node, f"{what} must be a string")
    value = str(node.value).strip()
    if not value:
        raise _fail(path, node, f"{what} must not be empty")
    return value


def _string_list(path: str, node: yaml.Node, what: str) -> tuple[str, ...]:
    if not isinstance(node, yaml.SequenceNode):
        raise _fail(path, node, f"{what} must be a list")
    return tuple(_string(path, item, f"{what}[{i}]") for i, item in enumerate(node.value))


def _provider(path: str, name: str, key_node: yaml.Node, node: yaml.Node) -> ProviderConfig:
    what = f"providers.{name}"
    values: dict[str, yaml.Node] = {}
    for key, value in _mapping(path, node, what):
        if key.value not in _PROVIDER_KEYS:
            allowed = ", ".join(sorted(_PROVIDER_KEYS))
            raise _fail(path, key, f"{what}: unknown key '{key.value}' (allowed: {allowed})")
        values[key.value] = value
    if "kind" not in values:
        raise _fail(path, key_node,
                    f"{what}: 'kind' is required (one of {', '.join(KINDS)})")
    kind = _string(path, values["kind"], f"{what}.kind")
    if kind not in KINDS:
        raise _fail(path, values["kind"],
                    f"{what}.kind: unknown kind '{kind}' (one of {', '.join(KINDS)})")
    if "base_url" in values:
        base_url = _string(path, values["base_url"], f"{what}.base_url")
    elif kind in DEFAULT_BASE_URLS:
        base_url = DEFAULT_BASE_URLS[kind]
    else:
        raise _fail(path, key_node, f"{what}: 'base_url' is required for kind '{kind}'")
    if not re.match(r"^https?://[^/\s]+", base_url):
        raise _fail(path, values.get("base_url", node),
                    f"{what}.base_url must be an http(s) URL, got '{base_url}'")
    api_key_env = None
    if "api_key_env" in values:
        api_key_env = _string(path, values["api_key_env"], f"{what}.api_key_env")
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", api_key_env):
            raise _fail(path, values["api_key_env"],
                        f"{what}.api_key_env must name an environment variable (the key "
                        "itself never goes in this file)")
    models: tuple[str, ...] = ()
    if "models" in values:
        models = _string_list(path, values["models"], f"{what}.models")
    elif kind in DEFAULT_WEB_MODELS:
        models = tuple(DEFAULT_WEB_MODELS[kind])
    timeout_s = 60.0
    if "timeout_s" in values:
        raw = values["timeout_s"]
        try:
            timeout_s = float(_string(path, raw, f"{what}.timeout_s"))
        except ValueError:
            raise _fail(path, raw, f"{what}.timeout_s must be a number of seconds") from None
        if not 0 < timeout_s <= 3600:
            raise _fail(path, raw, f"{what}.timeout_s must be in (0, 3600]")
    headers: dict[str, str] = {}
    if "headers" in values:
        for key, value in _mapping(path, values["headers"], f"{what}.headers"):
            headers[key.value] = _string(path, value, f"{what}.headers.{key.value}")
    return ProviderConfig(name, kind, base_url.rstrip("/"), api_key_env, models, timeout_s,
                          headers)


def parse_providers(text: str, path: str = "<providers>") -> GatewayConfig:
    """Parse and check a providers file's text.

    Raises:
        ProvidersFileError: the first mistake, as ``path:line: what is wrong``.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ProvidersFileError(f"{path}{line}: not valid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ProvidersFileError(f"{path}: not valid YAML: {exc}") from None
    if root is None:
        return GatewayConfig(source=path)
    sections: dict[str, yaml.Node] = {}
    for key, value in _mapping(path, root, "the file"):
        if key.value not in ("providers", "aliases", "combos"):
            raise _fail(path, key, f"unknown section '{key.value}' "
                        "(allowed: providers, aliases, combos)")
        sections[key.value] = value
    providers: dict[str, ProviderConfig] = {}
    if "providers" in sections and not (
        isinstance(sections["providers"], yaml.ScalarNode)
        and sections["providers"].tag.endswith(":null")
    ):
        for key, value in _mapping(path, sections["providers"], "providers"):
            name = key.value
            if not _NAME.match(name):
                raise _fail(path, key, f"provider name '{name}' must be letters, digits, "
                            "'-', '_' or '.'")
            if name in RESERVED:
                raise _fail(path, key, f"provider name '{name}' is reserved (built in)")
            providers[name] = _provider(path, name, key, value)

    def check_target(node: yaml.Node, what: str) -> str:
        target = _string(path, node, what)
        provider, sep, model = target.partition("/")
        if not sep or not model:
            raise _fail(path, node, f"{what}: '{target}' must be 'provider/model'")
        if provider not in providers and provider not in RESERVED:
            known = ", ".join(sorted(providers)) or "none"
            raise _fail(path, node, f"{what}: unknown provider '{provider}' (known: {known})")
        config = providers.get(provider)
        if config is not None and config.models and model not in config.models:
            raise _fail(path, node, f"{what}: provider '{provider}' does not list model "
                        f"'{model}' (its models: {', '.join(config.models)})")
        return target

    aliases: dict[str, str] = {}
    if "aliases" in sections:
        for key, value in _mapping(path, sections["aliases"], "aliases"):
            aliases[key.value] = check_target(value, f"aliases.{key.value}")
    combos: dict[str, tuple[str, ...]] = {}
    if "combos" in sections:
        for key, value in _mapping(path, sections["combos"], "combos"):
            if key.value in aliases:
                raise _fail(path, key, f"combos.{key.value}: also defined as an alias")
            if not isinstance(value, yaml.SequenceNode) or not value.value:
                raise _fail(path, value, f"combos.{key.value} must be a non-empty list of "
                            "'provider/model' targets")
            combos[key.value] = tuple(
                check_target(item, f"combos.{key.value}[{i}]")
                for i, item in enumerate(value.value)
            )
    return GatewayConfig(providers, aliases, combos, path)


def load_providers(path: str | os.PathLike[str] | None) -> GatewayConfig:
    """Read and check the providers file (no file: no upstream providers, only ``local``).

    Raises:
        ProvidersFileError: unreadable or invalid, naming the line.
    """
    if path is None or str(path) == "":
        return GatewayConfig()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProvidersFileError(f"{path}: cannot read the providers file: {exc}") from None
    return parse_providers(text, str(path))
