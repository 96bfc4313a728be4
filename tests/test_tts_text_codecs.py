"""Golden tests for the TTS text pipeline and the streaming audio containers."""

from __future__ import annotations

import io
import struct

import av
import numpy as np
import pytest

from omnistream.codecs.audio_container import (
    StreamingAudioEncoder,
    encode_all,
    encoded_rate,
    wav_header,
)
from omnistream.models.tts.text import TextSegmenter, normalise_text, segment_text


def test_first_segment_is_a_clause_then_whole_sentences() -> None:
    text = "Well, here we go. Dr. Smith met J. K. Rowling on Jan. 5th! Was it fun? Yes."
    assert segment_text(text) == [
        "Well,",
        "here we go.",
        "Dr. Smith met J. K. Rowling on Jan. 5th!",
        "Was it fun?",
        "Yes.",
    ]


def test_first_segment_without_punctuation_is_a_few_words() -> None:
    segments = segment_text("one two three four five six seven eight nine ten", first_words=4)
    assert segments == ["one two three four", "five six seven eight nine ten"]


def test_long_sentences_are_cut_at_clauses_within_the_limit() -> None:
    sentence = "This part runs on for a while, " * 12 + "and it ends here."
    segments = segment_text("Hi. " + sentence, max_chars=120)
    assert all(len(s) <= 120 for s in segments)
    assert " ".join(segments) == normalise_text("Hi. " + sentence)
    assert all(s.endswith((",", ".")) for s in segments)


def test_incremental_deltas_give_the_same_segments_as_the_whole_text() -> None:
    text = "Sure, I can help. The first step is easy. The second one, less so. Done."
    segmenter = TextSegmenter()
    pieces: list[str] = []
    for i in range(0, len(text), 3):  # an LLM's ragged token boundaries
        pieces += segmenter.push(text[i : i + 3])
    pieces += segmenter.flush()
    assert pieces == segment_text(text)


def test_sentence_end_waits_for_the_next_word() -> None:
    segmenter = TextSegmenter()
    assert segmenter.push("Hi, ") == ["Hi,"]
    assert segmenter.push("it is 3. ") == []  # "3. apples" or "3. Next"? wait and see
    assert segmenter.push("Next one") == ["it is 3."]
    assert segmenter.flush() == ["Next one"]


def test_normalise_drops_markup_and_control_characters() -> None:
    assert normalise_text("**Bold** text\x07 here\n- item one\n- item two") == (
        "Bold text here. item one. item two"
    )


def test_streamed_wav_header_marks_unknown_length() -> None:
    header = wav_header(16000)
    assert len(header) == 44
    assert struct.unpack("<I", header[4:8])[0] == 0xFFFFFFFF
    assert struct.unpack("<I", header[40:44])[0] == 0xFFFFFFFF
    assert struct.unpack("<I", header[24:28])[0] == 16000
    assert struct.unpack("<I", wav_header(16000, data_bytes=100)[40:44])[0] == 100


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav"])
def test_encoder_yields_bytes_while_audio_arrives(fmt: str) -> None:
    rate = 24000
    t = np.arange(rate * 2) / rate
    pcm = (np.sin(2 * np.pi * 220 * t) * 8000).astype("<i2").tobytes()
    encoder = StreamingAudioEncoder(fmt, rate)
    step = rate // 50 * 2  # 20 ms chunks
    outputs = [encoder.encode(pcm[i : i + step]) for i in range(0, len(pcm), step)]
    tail = encoder.flush()
    # Output starts within the first 10 chunks (200 ms), long before the end.
    assert any(outputs[:10])
    with av.open(io.BytesIO(b"".join(outputs) + tail)) as container:
        frames = list(container.decode(audio=0))
    samples = sum(f.samples for f in frames)
    assert frames[0].sample_rate == encoded_rate(fmt, rate) == encoder.output_rate
    assert samples / frames[0].sample_rate == pytest.approx(2.0, abs=0.08)


def test_encode_all_and_pcm_pass_through() -> None:
    pcm = np.zeros(1600, "<i2").tobytes()
    assert encode_all(pcm, "pcm", 16000) == pcm
    assert encode_all(pcm, "wav", 16000)[44:] == pcm
    with pytest.raises(ValueError, match="unsupported format"):
        StreamingAudioEncoder("ogg", 16000)
