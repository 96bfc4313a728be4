"""Prometheus metrics for the service, one registry per app instance.

A registry per app (instead of the global default) keeps several servers in one process,
as tests run them, from colliding, and lets ``/metrics`` show exactly this server.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


def _lingering_connections() -> float:
    from omnistream.transports.ws_protocol import lingering_connections

    return float(lingering_connections())


LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)


class Metrics:
    """Every metric the service exports, created against this app's own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.live_sessions = Gauge(
            "omnistream_live_sessions", "Live realtime sessions", ["kind"], registry=r
        )
        self.sessions_total = Counter(
            "omnistream_sessions_total", "Sessions opened", ["kind"], registry=r
        )
        self.sessions_refused = Counter(
            "omnistream_sessions_refused_total",
            "Sessions refused by admission control",
            ["kind", "reason"],
            registry=r,
        )
        self.chunk_latency = Histogram(
            "omnistream_chunk_latency_seconds",
            "Server time from a chunk's last byte received to its reply sent",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_wait = Histogram(
            "omnistream_queue_wait_seconds",
            "Time work items wait in a runner queue",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_size = Histogram(
            "omnistream_batch_size",
            "Work items per model call",
            ["model"],
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128),
            registry=r,
        )
        self.late_chunks = Counter(
            "omnistream_late_chunks_total",
            "Chunks whose reply took longer than the audio they carried",
            ["model"],
            registry=r,
        )
        self.protocol_errors = Counter(
            "omnistream_protocol_errors_total",
            "Error replies sent to clients",
            ["route", "code"],
            registry=r,
        )
        self.event_loop_lag = Histogram(
            "omnistream_event_loop_lag_seconds",
            "How late a periodic event-loop timer fires",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.frames_encoded = Counter(
            "omnistream_frames_encoded_total", "JPEG frames encoded", registry=r
        )
        # Sockets the server is done with that are not closed yet (a peer that stopped
        # reading); omnistream.transports.ws_protocol aborts them after a bounded wait.
        self.ws_lingering = Gauge(
            "omnistream_ws_lingering_connections",
            "WebSocket connections closed by the server whose TCP socket is still open",
            registry=r,
        )
        self.ws_lingering.set_function(_lingering_connections)
        self.ws_aborted = Counter(
            "omnistream_ws_aborted_total",
            "WebSocket connections aborted because the peer stopped reading",
            registry=r,
        )
        # Streaming TTS (omnistream/sessions/tts.py)
        self.tts_streams_live = Gauge(
            "omnistream_tts_streams_live", "TTS streams synthesising now", ["model"], registry=r
        )
        self.tts_first_audio = Histogram(
            "omnistream_tts_first_audio_seconds",
            "Time from a TTS stream's first text to its first PCM chunk ready to send",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.tts_rtf = Histogram(
            "omnistream_tts_rtf",
            "Real-time factor of finished TTS streams (model seconds per audio second)",
            ["model"],
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
            registry=r,
        )
        self.tts_underruns = Counter(
            "omnistream_tts_underruns_total",
            "TTS segments ready after a real-time listener would have run out of audio",
            ["model"],
            registry=r,
        )
        self.tts_cancelled = Counter(
            "omnistream_tts_cancelled_total",
            "TTS streams stopped before the end of their text",
            ["model", "reason"],
            registry=r,
        )
        self.tts_audio_seconds = Counter(
            "omnistream_tts_audio_seconds_total",
            "Seconds of speech synthesised",
            ["model"],
            registry=r,
        )
        # WebRTC avatar sessions (omnistream.transports.webrtc)
        self.webrtc_sessions = Gauge(
            "omnistream_webrtc_sessions", "Live WebRTC avatar sessions", registry=r
        )
        self.webrtc_sessions_closed = Counter(
            "omnistream_webrtc_sessions_closed_total",
            "WebRTC sessions closed, by reason",
            ["reason"],
            registry=r,
        )
        self.webrtc_av_skew = Histogram(
            "omnistream_webrtc_av_skew_seconds",
            "How far a sent video frame's content is from the audio sent with it",
            buckets=(0.002, 0.005, 0.01, 0.02, 0.03, 0.045, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5),
            registry=r,
        )
        self.webrtc_delivered_fps = Histogram(
            "omnistream_webrtc_delivered_fps",
            "Video frames a WebRTC session delivered in the last second (sampled each second)",
            buckets=(1, 5, 10, 15, 20, 23, 24, 25, 29, 30, 50, 60),
            registry=r,
        )
        self.webrtc_frames_delivered = Counter(
            "omnistream_webrtc_frames_delivered_total", "Video frames sent to browsers", registry=r
        )
        self.webrtc_frames_dropped = Counter(
            "omnistream_webrtc_frames_dropped_total",
            "Video frame slots not filled by a frame rendered for them",
            registry=r,
        )
        self.webrtc_encode_seconds = Histogram(
            "omnistream_webrtc_encode_seconds",
            "Encode time per WebRTC frame",
            ["kind", "codec"],
            buckets=(0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.012, 0.016, 0.025, 0.04, 0.1),
            registry=r,
        )
        self.webrtc_time_to_first_audio = Histogram(
            "omnistream_webrtc_time_to_first_audio_seconds",
            "From a data-channel speak to its first audio packet sent",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.voice_agent_latency = Histogram(
            "omnistream_voice_agent_latency_seconds",
            "Voice agent turn latency by stage: voice_to_voice (end of user speech to first "
            "agent audio), vad_hangover, transcription, llm_ttft, tts_first_audio, barge_in",
            ["stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.jobs_total = Counter(
            "omnistream_jobs_total", "Offline jobs finished", ["task", "state"], registry=r
        )
        self.job_seconds = Histogram(
            "omnistream_job_seconds",
            "Offline job run time (started to finished)",
            ["task"],
            buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0),
            registry=r,
        )
