"""Server settings, from flags and ``OMNISTREAM_*`` environment variables.

Every limit the house rules call for (message size, image size, sessions, text length)
is an explicit setting here with a default, so operators can see and change it.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """All server settings. ``OMNISTREAM_MAX_SESSIONS=32`` sets ``max_sessions``."""

    model_config = SettingsConfigDict(env_prefix="OMNISTREAM_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: str = "info"

    # Models and tiers
    avatar_model: str = "omni-avatar-lite"
    model_tiers: list[str] = Field(default_factory=lambda: ["core", "adjacent", "experimental"])
    avatar_model_aliases: list[str] = Field(
        default_factory=lambda: ["flashtalk", "default"],
        description="Model names on the FlashTalk routes that mean 'the default avatar model'.",
    )
    avatar_replicas: int = Field(0, description="Render threads for CPU avatar models; 0 = cores")
    wav2lip_96_path: str | None = Field(None, description="Local wav2lip-96 checkpoint (.pth)")
    wav2lip_256_path: str | None = Field(None, description="Local wav2lip-256 checkpoint")
    wav2lip_384_path: str | None = Field(None, description="Local wav2lip-384 checkpoint")
    checkpoint_roots: list[str] = Field(
        default_factory=list,
        description="Directories a request's config.model_path may load checkpoints from "
        "(none = per-request checkpoints refused)",
    )
    max_request_checkpoints: int = Field(
        2, ge=0, description="Per-request checkpoints kept resident per model beside the default"
    )
    request_checkpoint_idle_s: float = Field(
        600.0,
        gt=0,
        description="A per-request checkpoint unused this long may be unloaded for another "
        "(kept at least idle_timeout_s, so no live session loses its model)",
    )
    wav2lip_license: str | None = Field(
        None, description="License of the configured Wav2Lip checkpoints (model manifest)"
    )

    # Keys and the edge (omnistream/auth)
    api_key_file: str | None = Field(
        None,
        description="Key file: one key per line (full access) or YAML with per-key name, "
        "key or sha256, scopes, tiers, max_sessions, requests_per_minute, max_queued_jobs. "
        "None = no keys (allowed only on loopback unless no_auth)",
    )
    no_auth: bool = Field(
        False, description="Serve a non-loopback address with no keys (you take the risk)"
    )
    public_metrics: bool = Field(False, description="/metrics answers without a key")
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="Browser Origins allowed to open WebSockets and send requests besides "
        "the server's own host ('*' = any)",
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins given CORS access (none = CORS off)"
    )
    client_secret_ttl_s: float = Field(
        600.0, gt=0, le=7200, description="Default life of a minted browser client secret"
    )
    max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest HTTP body outside the upload routes"
    )
    max_json_depth: int = Field(64, ge=4, description="Deepest JSON nesting accepted")

    # Sessions and admission
    max_sessions: int = Field(64, ge=1, description="Hard cap on live realtime sessions")
    capacity_target: float = Field(
        0.85, gt=0, le=1.0, description="Fraction of the CPU and of a GPU's time sessions may use"
    )
    idle_timeout_s: float = Field(300.0, gt=0, description="Close a session idle this long")
    send_timeout_s: float = Field(
        30.0, gt=0, description="Drop a client that does not read a message for this long"
    )
    max_concurrent_setups: int = Field(
        2,
        ge=1,
        description="New reference images decoded and prepared at once; more wait their turn "
        "(so a storm of new connections cannot starve live sessions)",
    )

    # Input limits
    max_message_bytes: int = Field(8 * 1024 * 1024, description="Largest WS message accepted")
    max_image_bytes: int = Field(6 * 1024 * 1024, description="Largest decoded reference image")
    max_image_pixels: int = Field(4096 * 4096, description="Largest reference image area")
    max_dimension: int = Field(1920, description="Largest output width or height")
    max_fps: int = 60
    max_chunk_samples: int = Field(16000 * 10, description="Longest AUDI chunk (samples)")
    max_text_chars: int = 4096
    # Streaming TTS
    tts_model: str = Field("hibari", description="Voice model used when a request names none")
    tts_model_aliases: list[str] = Field(
        default_factory=lambda: ["default", "tts-1", "tts-1-hd", "gpt-4o-mini-tts"],
        description="Model names (OpenAI's included) that mean the default TTS model.",
    )
    voice_aliases: dict[str, str] = Field(
        default_factory=dict,
        description="Voice names clients send mapped to a voice of the model, e.g. "
        '{"local-default": "heart"} (OpenTalking\'s OmniRT TTS client); an empty value '
        "or 'default' means the model's default voice",
    )
    tts_replicas: int = Field(0, ge=0, description="hibari runner threads; 0 = cores")
    tts_chunk_ms: int = Field(20, ge=20, le=40, description="PCM chunk length sent to clients")
    tts_buffer_ms: int = Field(
        2000, ge=100, description="Audio a stream may synthesise ahead of its reader"
    )
    tts_first_segment_words: int = Field(
        6, ge=1, description="Words in a stream's first segment when no clause ends sooner"
    )

    # WebRTC avatar (POST /v1/webrtc/offer, /demo)
    webrtc_ice_servers: list[dict[str, Any]] = Field(
        default_factory=list,
        description='STUN/TURN servers, e.g. [{"urls":"stun:stun.example.org:3478"}] or '
        '[{"urls":"turn:host:3478","username":"u","credential":"p"}]; empty = host only',
    )
    webrtc_codec: str = Field("vp8", description="Preferred video codec: vp8 or h264")
    webrtc_fps: int = Field(25, ge=1, le=60, description="Default avatar frame rate")
    webrtc_width: int = Field(416, description="Default avatar width (even)")
    webrtc_height: int = Field(704, description="Default avatar height (even)")
    webrtc_connect_timeout_s: float = Field(
        20.0, gt=0, description="Free a peer connection that has not connected by then"
    )
    webrtc_peer_timeout_s: float = Field(
        10.0, gt=0, description="Free a session whose browser sent no RTCP for this long"
    )
    webrtc_speech_buffer_ms: int = Field(
        10000, ge=500, description="Speech audio written ahead of playback (bounded)"
    )
    webrtc_render_ahead_ms: int = Field(
        200, ge=40, description="Video rendered ahead of playback (bounded frame queue)"
    )
    webrtc_speech_lead_ms: int = Field(
        100, ge=0, description="Speech starts this far ahead of the play position"
    )
    webrtc_mic_delay_ms: int = Field(
        160, ge=20, description="Mic audio drives frames this long after it arrives"
    )
    webrtc_max_message_bytes: int = Field(32768, description="Largest data-channel message")
    webrtc_messages_per_s: float = Field(
        20.0, gt=0, description="Sustained data-channel messages per second (burst 2x)"
    )
    webrtc_max_sdp_bytes: int = Field(65536, description="Largest SDP offer accepted")

    # Encoding
    jpeg_quality: int = Field(80, ge=1, le=100)
    jpeg_threads: int = Field(0, description="JPEG encoder threads; 0 = cores")
    jpeg_backend: str = "simplejpeg"
    jpeg_splice: bool = Field(
        True,
        description="Encode only the rows an avatar model changed and splice them into the "
        "reference's cached JPEG (restart markers keep it baseline JPEG); false encodes "
        "every frame whole with jpeg_backend",
    )

    # Jobs and artifacts (offline generation)
    artifacts_dir: str = "./artifacts"
    artifacts_max_files: int = Field(1000, ge=1, description="Artifacts kept before the oldest go")
    artifacts_ttl_s: float = Field(24 * 3600.0, gt=0, description="Artifacts older than this go")
    input_roots: list[str] = Field(
        default_factory=list,
        description="Server-local directories generate inputs may name by path (none = no paths)",
    )
    max_upload_bytes: int = Field(64 * 1024 * 1024, description="Largest generate input file")
    max_input_audio_s: float = Field(600.0, gt=0, description="Longest generate input audio")
    max_jobs: int = Field(256, ge=1, description="Finished jobs kept for GET /v1/jobs/{id}")
    job_ttl_s: float = Field(3600.0, gt=0, description="Finished jobs older than this go")
    max_running_jobs: int = Field(2, ge=1, description="Offline jobs that run at once")
    max_queued_jobs: int = Field(64, ge=1, description="Offline jobs waiting before 429")
    stt_model: str = "whisper-tiny.en"

    # Hosted task API (omnistream/omni_api, /api/omni)
    omni_signing_secret: str | None = Field(
        None,
        description="Key signing upload and output URLs; unset = random per process (URLs "
        "then die with a restart; set the same one on every cluster node)",
    )
    omni_upload_ttl_s: float = Field(
        900.0, gt=0, description="Upload slots expire after this; the task fails upload_expired"
    )
    omni_output_url_ttl_s: float = Field(
        3600.0, gt=0, description="Output URLs handed out by a status call stop working after this"
    )
    omni_groups_file: str | None = Field(
        None, description="YAML file defining, renaming or hiding model groups (--omni-groups)"
    )
    omni_max_tasks: int = Field(4096, ge=1, description="Finished tasks kept for status calls")
    omni_max_awaiting_upload: int = Field(
        256, ge=1, description="Tasks that may wait for their uploads at once before 429"
    )

    # Voice agent (WS /v1/realtime, the demo's talk mode)
    realtime_output_lead_ms: int = Field(
        300, ge=0, le=5000, description="Agent audio is sent this far ahead of real time"
    )
    realtime_llm_timeout_s: float = Field(
        30.0, gt=0, description="An LLM stream silent this long fails the agent's response"
    )
    realtime_tool_timeout_s: float = Field(
        60.0, gt=0, description="A function call with no output after this long is reported"
    )
    realtime_max_buffer_s: float = Field(
        120.0, gt=0, description="Longest uncommitted input audio a realtime session holds"
    )
    realtime_max_queued_events: int = Field(
        2048, ge=16, description="Server events waiting for a slow client before it is dropped"
    )

    # Image and video diffusion (omnistream/models/diffusion)
    models_dir: str | list[str] | None = Field(
        None,
        description="Directories whose subdirectories hold diffusers pipelines "
        "(model_index.json), each registered under its name: a path or a JSON list",
    )
    diffusion_dtype: str = Field(
        "auto", description="Weights dtype: auto (bf16/fp16 on CUDA, fp32 on CPU), float32, "
        "float16, bfloat16"
    )
    diffusion_max_batch_rows: int = Field(
        16, ge=1, description="Latent rows one shared UNet call may carry (CFG counts 2)"
    )
    diffusion_max_pixels: int = Field(
        1024 * 1024, ge=64 * 64, description="Largest generated image or video frame (w*h)"
    )
    diffusion_max_steps: int = Field(100, ge=1, description="Most denoising steps a request runs")
    diffusion_max_images: int = Field(8, ge=1, description="Most images one request makes (n)")
    diffusion_max_frames: int = Field(128, ge=1, description="Most frames one video request makes")
    diffusion_max_prompt_chars: int = Field(2000, ge=1, description="Longest prompt accepted")
    diffusion_cpu_threads: int = Field(
        1,
        ge=0,
        description="torch threads one diffusion call uses on CPU (0 = torch's default); "
        "batching across requests gives the throughput, the other cores stay with live sessions",
    )
    diffusion_thread_nice: int = Field(
        10, ge=0, le=19, description="Niceness of diffusion threads: live sessions' come first"
    )

    # Cluster (omnistream/cluster): N nodes share jobs through Redis, HAProxy places sessions
    redis_url: str | None = Field(
        None, description="redis://HOST:PORT/DB; set = cluster mode (None = embedded, no Redis)"
    )
    node_id: str | None = Field(None, description="This node's id (default: host:port)")
    advertise_url: str | None = Field(
        None, description="How other nodes reach this one (default http://host:port)"
    )
    agent_port: int | None = Field(
        None, description="TCP port answering HAProxy agent checks (None = no agent)"
    )
    cluster_secret: str | None = Field(
        None, description="Shared secret authenticating node-to-node calls (internal routes)"
    )
    cluster_lease_s: float = Field(
        5.0, gt=0, description="A claimed job whose node stopped renewing this long runs elsewhere"
    )
    cluster_max_deliveries: int = Field(
        3, ge=1, description="Starts a job gets (crashes, hangs, releases) before it fails"
    )
    cluster_node_ttl_s: float = Field(
        5.0, gt=0, description="A node missing this long drops out of the registry"
    )
    drain_grace_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long live sessions and running jobs may finish"
    )
    cluster_shared_artifacts: bool = Field(
        False, description="Every node mounts the same artifacts_dir (no node-to-node fetch)"
    )

    # Inference gateway (omnistream/gateway): upstream providers, fallback, web fetch
    providers_file: str | None = Field(
        None, description="YAML file of upstream providers, aliases and combos (--providers)"
    )
    gateway_breaker_failures: int = Field(
        5, ge=1, le=15, description="Consecutive failures of a provider that open its circuit"
    )
    gateway_breaker_cooldown_s: float = Field(
        30.0, gt=0, description="An open circuit refuses calls this long before a probe"
    )
    gateway_deadline_s: float = Field(
        300.0, gt=0, description="Longest a gateway request may take, all fallbacks included"
    )
    web_fetch_allow: list[str] = Field(
        default_factory=list,
        description="Hosts or CIDRs local/fetch may reach although private/loopback "
        '(e.g. ["10.0.0.0/8", "intranet.example"]); none = only public addresses',
    )
    web_fetch_max_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="Largest fetched page")
    web_fetch_timeout_s: float = Field(15.0, gt=0, description="Longest a page fetch may take")
    embedding_max_batch: int = Field(
        64, ge=1, description="Texts one local embedding model call may carry"
    )
