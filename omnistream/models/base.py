"""The interface every model offers the engine's runners.

A runner owns one loaded model per replica and calls :meth:`BatchModel.run_batch` from its
own thread with work gathered from every live session. The model says how much work fits
in one call (``max_batch_cost``), how much one item costs (frames for a video model,
characters for TTS) and which items may share a call (``batch_key``): a Wav2Lip batch can
mix sessions freely, a TTS batch cannot mix voices.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from typing import Generic, TypeVar

P = TypeVar("P")
R = TypeVar("R")


class BatchModel(ABC, Generic[P, R]):
    """A loaded model that turns a batch of payloads into a list of results, in order."""

    #: Upper bound on the summed :meth:`cost` of one batch (at least one item always runs).
    max_batch_cost: float = 1.0

    #: CPU threads one call keeps busy. The runner meters the calling thread's CPU time;
    #: a model whose library computes on worker threads of its own (torch intra-op) says
    #: how many, and the runner charges ``wall time × threads`` instead.
    cpu_threads: int = 1

    #: How long a runner may hold a batch open for peers the model expects (see
    #: :meth:`expected_batch`); 0 = never wait. Diffusion steps use it: every request in
    #: the denoise loop resubmits its next step the moment the shared call returns, so a
    #: few milliseconds let them all ride the next call instead of racing into separate
    #: ones.
    batch_linger_s: float = 0.0

    def expected_batch(self, key: Hashable) -> int:
        """How many items with ``key`` the model expects to be queued soon (1: no peers)."""
        return 1

    def cost(self, payload: P) -> float:
        """Work units of one payload (frames, characters…); 1 by default."""
        return 1.0

    def batch_key(self, payload: P) -> Hashable:
        """Payloads with equal keys may share a batch. Everything shares by default."""
        return None

    @abstractmethod
    def run_batch(self, payloads: Sequence[P]) -> list[R]:
        """Run one batch. Called from a runner thread, never from the event loop.

        An exception fails every item of the batch; per-item failures should be returned
        as exceptions in the result list instead so that other sessions are unaffected.
        """

    def close(self) -> None:
        """Release device memory or native handles (optional)."""
