"""The work items of a diffusion request, importable without torch.

The event loop builds these and hands them to the runner; only the runner thread (and a
pipeline's driver thread) fills the state fields. Keeping them apart from
:mod:`omnistream.models.diffusion.pipeline` means a route never imports torch on the loop.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt


class AdapterError(ValueError):
    """A LoRA file that this pipeline cannot load (wrong architecture, bad tensors)."""


class DriverAborted(Exception):
    """Raised inside a pipeline's step callback to stop a cancelled ``__call__``."""


@dataclass
class DiffusionJob:
    """One request's parameters and denoising state.

    Created on the event loop; after that only the runner thread (and, for pipelines run
    through their own ``__call__``, its driver thread) touches the state fields. The task
    sets :attr:`closed` when it ends, which releases the driver and tells the model not
    to wait for this request's next step.
    """

    task: str
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    num_images: int = 1
    scheduler: str | None = None
    strength: float = 0.8
    image: npt.NDArray[np.uint8] | None = None
    mask: npt.NDArray[np.uint8] | None = None
    adapters: tuple[tuple[str, float], ...] = ()
    num_frames: int = 0
    fps: int = 8
    extra: dict[str, Any] = field(default_factory=dict)
    # -- state (runner thread) --
    closed: bool = False
    total_steps: int = 0
    index: int = 0
    key: Hashable = None
    rows: int = 1
    latents: Any = None
    embeds: Any = None
    text_embeds: Any = None
    time_ids: Any = None
    sched: Any = None
    timesteps: Any = None
    generator: Any = None
    cfg: bool = False
    init_latents: Any = None
    noise: Any = None
    mask_latents: Any = None
    masked_image_latents: Any = None
    driver: Any = None
    output: Any = None
    cache_hits: list[str] = field(default_factory=list)

    def close(self) -> None:
        """The request ended (any thread): release its driver, stop expecting its steps."""
        self.closed = True
        driver = self.driver
        if driver is not None:
            driver.abort()


@dataclass
class StartItem:
    """Encode the prompt and prepare latents, scheduler and generator."""

    job: DiffusionJob


@dataclass
class StepItem:
    """Advance one request by one denoising step."""

    job: DiffusionJob


@dataclass
class FinishItem:
    """Decode the final latents to uint8 pixels (``(n, H, W, 3)`` or ``(F, H, W, 3)``)."""

    job: DiffusionJob


@dataclass
class StepDone:
    """What one step reports back: how far the request is and whether it is done."""

    index: int
    total: int
    done: bool
