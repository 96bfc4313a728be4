"""Text pipeline for streaming TTS: normalisation and incremental segmentation.

Why segments at all: the voice models synthesise a sentence at a time, and nothing of a
sentence can be heard before the model has finished it. So the first segment of a stream
is kept small (its first clause, or its first few words) to get the first audio out early;
after that whole sentences give the best prosody, and sentences longer than
``max_chars`` are cut at clause punctuation (or, failing that, between words) so that no
single model call holds a runner for long while other streams wait.

The segmenter is incremental because realtime callers feed text as an LLM writes it: it
releases a segment once the text after it shows the boundary is real, and holds back an
unfinished tail until more text or :meth:`TextSegmenter.flush`.
"""

from __future__ import annotations

import re
import unicodedata

#: Abbreviations whose trailing period does not end a sentence.
TITLES = frozenset(
    (
        "mr mrs ms dr prof st jr sr vs etc e.g i.e fig no vol mt ft inc ltd co corp approx "
        "jan feb mar apr jun jul aug sep sept oct nov dec"
    ).split()
)

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_MARKUP = re.compile(r"[*_`#~|<>]+")
_BULLET = re.compile(r"^\s*(?:[-•]|\d+[.)])\s+")
_SPACES = re.compile(r"[ \t\r\f\v]+")
_NEWLINES = re.compile(r"\s*\n\s*")
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s)")
_CLAUSE_END = re.compile(r"[,;:—–][\"'”’)\]]*(?=\s)")

DEFAULT_FIRST_WORDS = 6
DEFAULT_MAX_CHARS = 180
DEFAULT_RAMP_CHARS = 60


def normalise_text(text: str) -> str:
    """Clean text for a voice model: drop control characters and markup, fold spaces.

    LLM output often carries Markdown (``**bold**``, ``# headings``, backticks) that a voice
    would read out or stumble over; line breaks become sentence breaks only when they end a
    line without punctuation, which is how lists and headings are written.
    """
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub(" ", text)
    text = _MARKUP.sub(" ", text)
    lines = [_SPACES.sub(" ", _BULLET.sub("", line)).strip() for line in _NEWLINES.split(text)]
    out: list[str] = []
    for line in lines:
        if not line:
            continue
        if out and not re.search(r"[.!?…,;:]$", out[-1]):
            out[-1] += "."
        out.append(line)
    return " ".join(out)


def _is_sentence_end(text: str, end: int) -> bool:
    """Whether punctuation ending at ``end`` closes a sentence (not "Dr." or "J.")."""
    stripped = text[:end].rstrip("\"'”’)]")
    if not stripped.endswith("."):
        return True
    word = stripped[stripped.rfind(" ") + 1 : -1].lstrip("(\"“'‘").lower()
    return not (word in TITLES or (len(word) == 1 and word.isalpha()))


class TextSegmenter:
    """Cuts a growing text into speakable segments.

    Args:
        first_words: the first segment ends at the first clause or sentence boundary, or
            after this many words when neither comes sooner.
        max_chars: later segments are whole sentences up to this length; longer ones are
            split at clause punctuation, then between words.
        ramp_chars: the second segment is at most this long, the third twice that, and so
            on up to ``max_chars``. The audio already produced must cover the time the next
            segment takes to synthesise while other streams share the runner; a short
            first clause followed by a long sentence is where a busy server underruns.
    """

    def __init__(
        self,
        *,
        first_words: int = DEFAULT_FIRST_WORDS,
        max_chars: int = DEFAULT_MAX_CHARS,
        ramp_chars: int = DEFAULT_RAMP_CHARS,
    ) -> None:
        self.first_words = max(1, first_words)
        self.max_chars = max(20, max_chars)
        self.ramp_chars = max(20, min(ramp_chars, self.max_chars))
        self._buffer = ""
        self._emitted = 0

    @property
    def pending_chars(self) -> int:
        """Characters received but not yet released as a segment."""
        return len(self._buffer)

    def push(self, text: str) -> list[str]:
        """Add text (any fragment, even mid-word) and return the segments now complete."""
        self._buffer += text
        return self._drain(final=False)

    def flush(self) -> list[str]:
        """The text is complete: release everything that is left."""
        return self._drain(final=True)

    def _drain(self, *, final: bool) -> list[str]:
        segments: list[str] = []
        while True:
            cut = self._next_cut(final)
            if cut is None:
                break
            segment = normalise_text(self._buffer[:cut])
            self._buffer = self._buffer[cut:].lstrip()
            if segment:
                segments.append(segment)
                self._emitted += 1
        if final:
            rest = normalise_text(self._buffer)
            self._buffer = ""
            if rest:
                segments.append(rest)
                self._emitted += 1
        return segments

    def _next_cut(self, final: bool) -> int | None:
        """Index just past the next segment in the buffer, or None to wait for more."""
        buf = self._buffer
        if not buf.strip():
            return None
        if self._emitted == 0:
            return self._first_cut(buf, final)
        sentence = self._sentence_cut(buf, final)
        limit = sentence if sentence is not None else len(buf)
        max_chars = min(self.max_chars, self.ramp_chars << min(8, self._emitted - 1))
        if limit > max_chars:
            return self._split_long(buf, limit, final or sentence is not None, max_chars)
        return sentence

    def _first_cut(self, buf: str, final: bool) -> int | None:
        """First segment: first clause/sentence boundary, or ``first_words`` words."""
        boundary = None
        for pattern in (_CLAUSE_END, _SENTENCE_END):
            for match in pattern.finditer(buf):
                if pattern is _SENTENCE_END and not _is_sentence_end(buf, match.end()):
                    continue
                if boundary is None or match.end() < boundary:
                    boundary = match.end()
                break
        words = list(re.finditer(r"\S+(?=\s)", buf))
        if len(words) >= self.first_words:
            by_words = words[self.first_words - 1].end()
            if boundary is None or by_words < boundary:
                # Prefer a boundary that comes soon after the word limit: a clause of
                # eight words sounds better than six words cut mid-phrase.
                if boundary is not None and boundary <= by_words + 20:
                    return boundary
                return by_words
        if boundary is not None:
            return boundary
        return None

    def _sentence_cut(self, buf: str, final: bool) -> int | None:
        for match in _SENTENCE_END.finditer(buf):
            if _is_sentence_end(buf, match.end()):
                rest = buf[match.end() :].lstrip()
                if not rest and not final:
                    return None  # the next word decides (it may start lowercase)
                if rest and rest[0].islower():
                    continue
                return match.end()
        return None

    def _split_long(self, buf: str, limit: int, complete: bool, max_chars: int) -> int | None:
        """Cut an over-long sentence at its last clause boundary within ``max_chars``."""
        window = buf[: max_chars + 1]
        clauses = [m.end() for m in _CLAUSE_END.finditer(window) if m.end() >= max_chars // 3]
        if clauses:
            return clauses[-1]
        if complete and limit <= max_chars * 3 // 2:
            return limit  # a word-boundary cut would strand a short tail: keep it whole
        spaces = [m.start() for m in re.finditer(r"\s", window)]
        if spaces and spaces[-1] > 0:
            return spaces[-1]
        # One word longer than max_chars: cut at the first space after it, if any yet.
        space = re.search(r"\s", buf[max_chars:])
        if space is not None:
            return max_chars + space.start()
        return limit if complete else None


def segment_text(
    text: str, *, first_words: int = DEFAULT_FIRST_WORDS, max_chars: int = DEFAULT_MAX_CHARS
) -> list[str]:
    """All segments of a complete text (the non-incremental form of :class:`TextSegmenter`)."""
    segmenter = TextSegmenter(first_words=first_words, max_chars=max_chars)
    return [*segmenter.push(normalise_text(text)), *segmenter.flush()]
