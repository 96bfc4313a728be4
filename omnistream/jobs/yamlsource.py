"""Load YAML or JSON documents while remembering where each value was written.

Validation errors in a request or profile file are only useful with a line number, so the
document is composed into YAML nodes (JSON is YAML) and pydantic's error locations are
mapped back onto those nodes' start marks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


@dataclass(frozen=True)
class SourceError:
    """One problem in a document: where it is and what is wrong."""

    path: str
    line: int
    column: int
    location: str
    message: str

    def __str__(self) -> str:
        where = f" ({self.location})" if self.location else ""
        return f"{self.path}:{self.line}:{self.column}: {self.message}{where}"


class SourceDocument:
    """A parsed document plus its node tree for locating values."""

    def __init__(self, text: str, path: str = "<input>") -> None:
        self.path = path
        self.text = text
        self.node: yaml.Node | None = yaml.compose(text, Loader=yaml.SafeLoader)
        self.data: Any = yaml.safe_load(text) if self.node is not None else None

    @classmethod
    def read(cls, path: str | Path) -> SourceDocument:
        """Read a file (``-`` for stdin)."""
        if str(path) == "-":
            import sys

            return cls(sys.stdin.read(), "<stdin>")
        return cls(Path(path).read_text(encoding="utf-8"), str(path))

    def locate(self, loc: tuple[Any, ...]) -> tuple[int, int]:
        """1-based (line, column) of the deepest node on ``loc`` that exists."""
        node = self.node
        if node is None:
            return 1, 1
        best = node
        for part in loc:
            nxt: yaml.Node | None = None
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                        nxt = value
                        break
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                if 0 <= part < len(node.value):
                    nxt = node.value[part]
            if nxt is None:
                break
            node = best = nxt
        return best.start_mark.line + 1, best.start_mark.column + 1

    def error(self, loc: tuple[Any, ...], message: str) -> SourceError:
        """A :class:`SourceError` at the node for ``loc``."""
        line, column = self.locate(loc)
        return SourceError(self.path, line, column, ".".join(str(p) for p in loc), message)

    def validate(self, model: type[BaseModel]) -> tuple[BaseModel | None, list[SourceError]]:
        """Validate the document against a pydantic model, with located errors."""
        try:
            return model.model_validate(self.data if self.data is not None else {}), []
        except ValidationError as exc:
            errors = []
            for err in exc.errors():
                loc = tuple(
                    p
                    for p in err.get("loc", ())
                    if not (isinstance(p, str) and p.startswith("function-"))
                )
                errors.append(self.error(loc, str(err.get("msg", "invalid"))))
            return None, errors


def parse_error(exc: yaml.YAMLError, path: str) -> SourceError:
    """A YAML syntax error as a located :class:`SourceError`."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = mark.line + 1 if mark is not None else 1
    column = mark.column + 1 if mark is not None else 1
    problem = getattr(exc, "problem", None) or str(exc)
    return SourceError(path, line, column, "", f"YAML syntax error: {problem}")
