"""Server settings, from flags and ``OMNISTREAM_*`` environment variables.

Every limit the house rules call for (message size, image size, sessions, text length)
is an explicit setting here with a default, so operators can see and change it.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """All server settings. ``OMNISTREAM_MAX_SESSIONS=32`` sets ``max_sessions``."""

    model_config = SettingsConfigDict(env_prefix="OMNISTREAM_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"

    # Models and tiers
    avatar_model: str = "omni-avatar-lite"
    model_tiers: list[str] = Field(default_factory=lambda: ["core", "adjacent", "experimental"])
    avatar_model_aliases: list[str] = Field(
        default_factory=lambda: ["flashtalk", "default"],
        description="Model names on the FlashTalk routes that mean 'the default avatar model'.",
    )
    avatar_replicas: int = Field(0, description="Render threads for CPU avatar models; 0 = cores")

    # Sessions and admission
    max_sessions: int = Field(64, ge=1, description="Hard cap on live realtime sessions")
    capacity_target: float = Field(
        0.85, gt=0, le=1.0, description="Fraction of CPU live sessions may use (admission)"
    )
    idle_timeout_s: float = Field(300.0, gt=0, description="Close a session idle this long")
    send_timeout_s: float = Field(
        30.0, gt=0, description="Drop a client that does not read a message for this long"
    )

    # Input limits
    max_message_bytes: int = Field(8 * 1024 * 1024, description="Largest WS message accepted")
    max_image_bytes: int = Field(6 * 1024 * 1024, description="Largest decoded reference image")
    max_image_pixels: int = Field(4096 * 4096, description="Largest reference image area")
    max_dimension: int = Field(1920, description="Largest output width or height")
    max_fps: int = 60
    max_chunk_samples: int = Field(16000 * 10, description="Longest AUDI chunk (samples)")
    max_text_chars: int = 4096

    # Encoding
    jpeg_quality: int = Field(80, ge=1, le=100)
    jpeg_threads: int = Field(0, description="JPEG encoder threads; 0 = cores")
    jpeg_backend: str = "simplejpeg"

    # Jobs and artifacts (offline generation)
    artifacts_dir: str = "./artifacts"
