"""Device discovery without importing torch unless it is installed and needed."""

from __future__ import annotations

import importlib.util
from functools import lru_cache


@lru_cache(maxsize=1)
def cuda_available() -> bool:
    """True when torch is installed and sees a CUDA device."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def pick_device(backend: str, supported: tuple[str, ...]) -> str:
    """Resolve a request's ``backend`` (auto | cuda | cpu | cpu-stub) to a device.

    Raises:
        ValueError: the backend is unknown, or asks for a device the model or machine
            does not have.
    """
    backend = "cpu" if backend == "cpu-stub" else backend
    if backend == "auto":
        if "cuda" in supported and cuda_available():
            return "cuda"
        if "cpu" in supported:
            return "cpu"
        return supported[0]
    if backend not in ("cuda", "cpu"):
        raise ValueError(f"unknown backend {backend!r}; use auto, cuda or cpu")
    if backend not in supported:
        raise ValueError(f"model does not run on {backend}; it supports {', '.join(supported)}")
    if backend == "cuda" and not cuda_available():
        raise ValueError("backend 'cuda' requested but no CUDA device is available")
    return backend
