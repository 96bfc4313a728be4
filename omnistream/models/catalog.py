"""Every model omnistream knows, registered in one place.

Each model family exposes ``specs(settings) -> list[ModelSpec]``; this module collects
them into the registry the server uses. A family whose optional packages are missing
still registers its specs, marked unavailable with the reason.
"""

from __future__ import annotations

from omnistream.engine.registry import ModelRegistry
from omnistream.settings import Settings


def build_registry(settings: Settings) -> ModelRegistry:
    """The registry for a server, narrowed to ``settings.model_tiers``."""
    from omnistream.gateway.minilm import specs as minilm_specs
    from omnistream.models.avatar_lite import specs as avatar_lite_specs
    from omnistream.models.stt import specs as stt_specs
    from omnistream.models.tts import specs as tts_specs
    from omnistream.models.wav2lip import specs as wav2lip_specs

    registry = ModelRegistry(settings.model_tiers)
    for family in (avatar_lite_specs, stt_specs, wav2lip_specs, tts_specs, minilm_specs):
        for spec in family(settings):
            registry.register(spec)
    from omnistream.models.diffusion import specs as diffusion_specs

    for spec in diffusion_specs(settings):  # the operator's directories: names may clash
        if registry.get(spec.id) is None:
            registry.register(spec)
    return registry
