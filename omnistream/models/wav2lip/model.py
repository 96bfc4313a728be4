"""Wav2Lip as an engine avatar model: one resident generator, frames from every session.

The runner hands :meth:`Wav2LipModel.render` chunks from any number of live sessions.
Every frame is independent (a 200 ms mel window plus the avatar's face), so the model
flattens all chunks into one list of frames, runs them through the generator in batches
of up to ``max_batch`` and pastes each result back into its own session's frame.

What makes that cheap:

* The face half of the generator depends only on the reference image, so its encoder
  features are computed once per avatar (at prepare time, on the model's device) and
  gathered per frame; each frame runs only the audio encoder and the decoder.
* BatchNorm is folded into the convolutions at load.
* Channels-last activations on both devices.
* On CUDA: weights and activations in bf16 (fp16 on GPUs without native bf16),
  batches padded to a few fixed sizes and each size captured once as a CUDA graph, and
  paste-back, colour match and blending on the GPU; only finished uint8 frames cross to
  the host, in one synchronisation per call.

Only the capture and replay of the graphs is CUDA-only. The padded path that feeds them
(:class:`_StaticBatch`: preallocated buffers of each padded size, rows copied in, output
sliced) also runs eagerly on any device (``static_batches=True``), and every precision
runs on the CPU, so the tests drive that code without a GPU. Failures stay local: a
graph that cannot be captured turns graphs off for this model (warning, eager padded
batches from then on), and a batch that runs out of memory is retried in halves.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from omnistream.models.avatar_base import (
    AvatarModel,
    ChunkRequest,
    ChunkResult,
    PrepareRequest,
    RGBFrame,
)
from omnistream.models.wav2lip.audio import MEL_STEP, N_MELS, frame_windows
from omnistream.models.wav2lip.avatar import Wav2LipAvatar, model_face_input, prepare_avatar
from omnistream.models.wav2lip.checkpoint import load_generator
from omnistream.models.wav2lip.network import LAYOUTS, Wav2Lip

log = logging.getLogger(__name__)

#: Padded batch sizes on CUDA: one captured graph each.
CUDA_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
#: Frames per generator call on the CPU, by variant: bounds the gathered skip features
#: (a 384 frame carries ~9 MB of them in float32).
CPU_MAX_BATCH = {"96": 64, "256": 16, "384": 8}
AVATAR_CACHE = 16
#: Eager runs of a padded size before its capture: cuDNN autotuning and the library
#: handles and workspaces of the capture stream must all exist before capture begins.
GRAPH_WARMUP_RUNS = 3
_TOKENS = itertools.count(1)  # unique per loaded model, unlike id() which is reused
_CHANNELS_LAST = torch.channels_last


@dataclass
class DeviceAvatar:
    """What a loaded model keeps on its device for one prepared avatar."""

    feats: list[torch.Tensor]  # encoder skip features, each (1, C, h, w), model dtype
    frame: torch.Tensor  # (H, W, 3) uint8
    ref_box: torch.Tensor  # (1, 3, bh, bw) float32, 0..255, RGB
    blend: torch.Tensor  # (1, 1, bh, bw) float32
    ref_mean: torch.Tensor  # (1, 3, 1, 1) masked mean colour of the reference box
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in ``frame``


class _StaticBatch:
    """Preallocated generator inputs of one padded batch size; graph replay or eager.

    A call copies its ``n`` frames into rows ``0..n-1`` of the buffers and runs all
    ``batch`` rows; the output is sliced to ``[:n]``. Rows ``n..`` keep whatever an earlier
    (bigger) call left there: every row is computed independently (convolutions only,
    BatchNorm folded), so those rows cost compute but never reach anyone's output.

    Without a captured graph the net runs eagerly on the buffers (any device); after
    :meth:`capture` (CUDA only) the same computation is replayed from the graph, whose
    kernels read the buffers' fixed addresses.
    """

    def __init__(self, net: Wav2Lip, batch: int, feat_shapes: list[tuple[int, ...]],
                 dtype: torch.dtype, device: torch.device) -> None:
        self.net = net
        self.batch = batch
        self.mel = torch.zeros((batch, 1, N_MELS, MEL_STEP), dtype=dtype, device=device)
        self.feats = [
            torch.empty((batch, *shape), dtype=dtype, device=device,
                        memory_format=_CHANNELS_LAST).zero_()
            for shape in feat_shapes
        ]
        self.graph: Any = None  # torch.cuda.CUDAGraph once captured
        self.out: torch.Tensor | None = None  # the graph's static output

    def load(self, mel: torch.Tensor, levels: list[torch.Tensor], idx: torch.Tensor) -> int:
        """Copy ``n`` frames into the first rows: mel, and each level gathered by ``idx``."""
        n = int(mel.shape[0])
        if not 0 < n <= self.batch:
            raise ValueError(f"{n} frames do not fit a static batch of {self.batch}")
        self.mel[:n].copy_(mel)
        for buf, level in zip(self.feats, levels, strict=True):
            buf[:n].copy_(level.index_select(0, idx))
        return n

    def eager(self) -> torch.Tensor:
        """The generator on the whole buffers, (batch, 3, S, S) in the model dtype."""
        return self.net.decode(self.net.encode_audio(self.mel), self.feats)

    def run(self, n: int) -> torch.Tensor:
        """Output rows ``[:n]`` after :meth:`load`; replays the graph when there is one."""
        if self.graph is None:
            return self.eager()[:n]
        self.graph.replay()
        assert self.out is not None
        # Clone before anything else replays: graphs share one memory pool (see
        # ``Wav2LipModel._capture``), so another size's replay may reuse this memory.
        return self.out[:n].clone()

    def capture(self, stream: Any, pool: Any) -> None:
        """Warm up on ``stream`` and capture one decode of the buffers into a CUDA graph.

        The caller (:meth:`Wav2LipModel._capture`) checks the device is CUDA.

        Raises:
            RuntimeError: capture failed.
        """
        device = self.mel.device
        # Warm-up and capture share one side stream: cuBLAS/cuDNN handles and workspaces
        # are per stream, and creating one while capturing is illegal.
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(GRAPH_WARMUP_RUNS):
                self.eager()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: in "global" mode an unsafe call (cudaMalloc, a sync) made by any
        # other thread of the server — another model's runner — during this capture
        # would fail in that thread; other threads' work is none of this graph's business.
        with torch.cuda.graph(graph, pool=pool, stream=stream,
                              capture_error_mode="thread_local"):
            out = self.eager()
        self.graph, self.out = graph, out


class Wav2LipModel(AvatarModel):
    """A loaded Wav2Lip generator serving avatar chunks from every session.

    Args:
        net: a generator in eval mode with BatchNorm folded (see
            :func:`~omnistream.models.wav2lip.checkpoint.load_generator`).
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:N"``).
        precision: ``auto`` (bf16, or fp16 before Ampere, on CUDA; fp32 on CPU),
            ``fp32``, ``bf16``, ``fp16``. Every precision runs on both devices.
        cuda_graphs: capture a graph per padded batch size. ``None`` (default): on CUDA.
            ``True`` on a device that cannot capture behaves like a failed capture:
            one warning, then eager padded batches.
        max_batch: frames per generator call (defaults by device and variant).
        static_batches: pad each call to the next of a few fixed sizes through
            preallocated buffers — the path the graphs replay. Default: wherever graphs
            are used, and on CUDA (cuDNN autotunes per shape). Graphs need it.
        size: the crop size served (``wav2lip-<size>``); default the layout's own. The
            spatial-attention layout is fully convolutional and circulates trained on
            256 crops too (LiveTalking's ``wav2lip256``).
    """

    #: Audio before a frame's instant its window and FFT reach (see ``audio.CONTEXT_S``).
    context_s = 0.12
    #: The window ends 120 ms after the frame's instant.
    lookahead_s = 0.12

    def __init__(
        self,
        net: Wav2Lip,
        device: str = "cpu",
        *,
        precision: str = "auto",
        cuda_graphs: bool | None = None,
        max_batch: int | None = None,
        static_batches: bool | None = None,
        size: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        if self.is_cuda and self.device.index is None:
            # Pin the index: graphs, streams and syncs must stay on the device the
            # weights are on even if the thread's current device changes later.
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.size = int(size or net.layout.size)
        self.variant = str(self.size)
        self.layout = net.layout.name
        self.dtype = _pick_dtype(precision, self.device)
        # All of this model's GPU work runs on a stream of its own (see _on_device).
        self._stream: Any = None
        if self.is_cuda:
            self._stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        # Channels-last suits both oneDNN (CPU) and cuDNN tensor cores (measured ~1.5–2×
        # on this CPU for wav2lip-96, see bench/wav2lip_bench.py).
        with self._on_device():
            net = net.to(self.device, dtype=self.dtype)
            net = net.to(memory_format=_CHANNELS_LAST)  # type: ignore[call-overload]
        self.net = net.eval()
        # torch computes on its own intra-op threads: admission must charge all of them.
        self.cpu_threads = 1 if self.is_cuda else max(1, torch.get_num_threads())
        if max_batch is None:
            max_batch = CUDA_BUCKETS[-1] if self.is_cuda else CPU_MAX_BATCH.get(self.variant, 8)
        self.max_batch = max(1, int(max_batch))
        self.max_batch_cost = float(self.max_batch)
        self.buckets = (*(b for b in CUDA_BUCKETS if b < self.max_batch), self.max_batch)
        want_graphs = self.is_cuda if cuda_graphs is None else bool(cuda_graphs)
        if static_batches is None:
            static_batches = want_graphs or self.is_cuda
        self.static_batches = bool(static_batches)
        self.use_graphs = want_graphs and self.static_batches
        self.graph_error: str | None = None
        self.oom_splits = 0
        self._statics: dict[int, _StaticBatch] = {}
        self._feat_shapes: list[tuple[int, ...]] | None = None
        self._capture_stream: Any = None
        self._graph_pool: Any = None
        self._avatars: OrderedDict[tuple[str, int, int], Wav2LipAvatar] = OrderedDict()
        # Every avatar holding tensors of this model, so close() can drop them even
        # where a session still holds the avatar.
        self._holders: weakref.WeakValueDictionary[int, Wav2LipAvatar] = (
            weakref.WeakValueDictionary()
        )
        self._lock = threading.Lock()
        self._token = next(_TOKENS)
        self.last_batch_frames = 0

    def info(self) -> dict[str, Any]:
        """How this model runs now: precision, padding, graphs and any fallback taken."""
        return {
            "variant": f"wav2lip-{self.variant}",
            "layout": self.layout,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_batch": self.max_batch,
            "static_batches": self.static_batches,
            "buckets": list(self.buckets) if self.static_batches else [],
            "cuda_graphs": self.use_graphs,
            "graphs_captured": sorted(b for b, s in self._statics.items()
                                      if s.graph is not None),
            "graph_error": self.graph_error,
            "oom_splits": self.oom_splits,
        }

    @contextlib.contextmanager
    def _on_device(self) -> Iterator[None]:
        """Make the model's GPU and its own stream current (no-op on the CPU).

        Every entry point runs inside this, so each tensor of the model is made and used
        on one stream: nothing needs cross-stream ordering, a sync waits for this model's
        work only, and other models of the server (on the default stream) neither queue
        behind these kernels nor get waited for. Re-entering is cheap.
        """
        if not self.is_cuda:
            yield
            return
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            yield

    @contextlib.contextmanager
    def _autotune(self) -> Iterator[None]:
        """cuDNN autotuning on, for the fixed padded shapes only.

        ``cudnn.benchmark`` is process-wide: switching it on for good at load would make
        every other model of the server autotune each new input shape it sees (a TTS
        model with variable lengths would stall on every one). Graph replays need no
        autotuning at all: the algorithms were chosen at capture.
        """
        if not self.is_cuda:
            yield
            return
        previous = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = previous

    # -- preparation -----------------------------------------------------------------

    def prepare(self, request: PrepareRequest) -> Wav2LipAvatar:
        """Find the face and cache the avatar's encoder features on this model's device."""
        key = (request.content_hash, request.width, request.height)
        with self._lock:
            cached = self._avatars.get(key)
            if cached is not None and request.content_hash:
                self._avatars.move_to_end(key)
                return cached
        avatar = prepare_avatar(request, self.size)
        self._device_avatar(avatar)
        with self._lock:
            self._avatars[key] = avatar
            while len(self._avatars) > AVATAR_CACHE:
                self._avatars.popitem(last=False)
        return avatar

    def _device_avatar(self, avatar: Wav2LipAvatar) -> DeviceAvatar:
        cached = avatar.device_cache.get(self._token)
        if isinstance(cached, DeviceAvatar):
            return cached
        with self._on_device(), torch.inference_mode():
            return self._upload_avatar(avatar)

    def _upload_avatar(self, avatar: Wav2LipAvatar) -> DeviceAvatar:
        face = torch.from_numpy(model_face_input(avatar.crop))[None].to(self.device, self.dtype)
        face = face.contiguous(memory_format=_CHANNELS_LAST)
        feats = [f.contiguous(memory_format=_CHANNELS_LAST) for f in self.net.encode_face(face)]
        x1, y1, x2, y2 = avatar.box
        frame = torch.from_numpy(avatar.frame).to(self.device)
        ref_box = frame[y1:y2, x1:x2].permute(2, 0, 1)[None].float()
        blend = torch.from_numpy(avatar.blend)[None, None].to(self.device)
        weight = blend.sum().clamp_min(1e-6)
        ref_mean = (ref_box * blend).sum(dim=(2, 3), keepdim=True) / weight
        dev = DeviceAvatar(feats, frame, ref_box, blend, ref_mean, avatar.box)
        avatar.device_cache[self._token] = dev
        with self._lock:
            self._holders[id(avatar)] = avatar
        return dev

    # -- rendering -------------------------------------------------------------------

    def render(self, chunks: list[ChunkRequest]) -> list[ChunkResult | BaseException]:
        """Render every frame of every chunk; a bad chunk fails alone."""
        with self._on_device():
            return self._render(chunks)

    def _render(self, chunks: list[ChunkRequest]) -> list[ChunkResult | BaseException]:
        results: list[ChunkResult | BaseException | None] = [None] * len(chunks)
        mels: list[np.ndarray] = []
        owners: list[tuple[int, DeviceAvatar, int]] = []  # (chunk index, avatar, frames)
        for i, chunk in enumerate(chunks):
            try:
                avatar = self._check_avatar(chunk.avatar)
                if chunk.frame_count <= 0:
                    results[i] = ChunkResult(frames=[], info={"frames": 0})
                    continue
                times = (chunk.first_frame_index + np.arange(chunk.frame_count)) / chunk.fps
                mel = frame_windows(
                    chunk.audio,
                    chunk.start_sample - chunk.audio_offset,
                    times,
                    sample_rate=chunk.sample_rate,
                )
                dev = self._device_avatar(avatar)
            except Exception as exc:
                results[i] = exc
                continue
            mels.append(mel)
            owners.append((i, dev, chunk.frame_count))
        if owners:
            rendered = self.infer(np.concatenate(mels), [dev for _, dev, n in owners
                                                         for _ in range(n)])
            total = int(rendered.shape[0])
            composed: list[torch.Tensor] = []
            offset = 0
            for _, dev, n in owners:
                composed.append(self._compose(dev, rendered[offset : offset + n]))
                offset += n
            for (i, _, n), frames in zip(owners, self._to_host(composed), strict=True):
                results[i] = ChunkResult(
                    frames=[frames[k] for k in range(n)],
                    info={"frames": n, "batch_frames": total, "sessions_in_batch": len(owners)},
                )
            self.last_batch_frames = total
        return [r if r is not None else RuntimeError("chunk was not rendered") for r in results]

    def _check_avatar(self, avatar: Any) -> Wav2LipAvatar:
        if not isinstance(avatar, Wav2LipAvatar):
            raise ValueError("the session's avatar was not prepared by a Wav2Lip model")
        if avatar.size != self.size:
            raise ValueError(
                f"avatar was prepared for wav2lip-{avatar.size}, not wav2lip-{self.variant}"
            )
        return avatar

    def infer(self, mel: np.ndarray, avatars: list[DeviceAvatar]) -> torch.Tensor:
        """Generator output (N, 3, S, S) float32 RGB in [0, 1] for N frames.

        ``mel`` is (N, 1, 80, 16); ``avatars[i]`` is frame i's prepared avatar. On CUDA the
        result is on this model's stream: sync it (or read it through this model) first.
        """
        with self._on_device(), torch.inference_mode():
            return self._infer(mel, avatars)

    def _infer(self, mel: np.ndarray, avatars: list[DeviceAvatar]) -> torch.Tensor:
        n_total = mel.shape[0]
        # Convert on the host, then one plain copy: a non_blocking copy from pageable
        # memory is synchronous anyway, and this one is small (40 KB a frame in fp32).
        mel_t = torch.from_numpy(mel).to(self.dtype).to(self.device)
        # One stacked feature tensor per level over the distinct avatars, then a gather.
        unique: dict[int, int] = {}
        order: list[DeviceAvatar] = []
        index: list[int] = []
        for dev in avatars:
            slot = unique.setdefault(id(dev), len(order))
            if slot == len(order):
                order.append(dev)
            index.append(slot)
        levels = [torch.cat([d.feats[k] for d in order]) for k in range(len(order[0].feats))]
        idx = torch.tensor(index, dtype=torch.long).to(self.device)
        outs: list[torch.Tensor] = []
        for start in range(0, n_total, self.max_batch):
            stop = min(n_total, start + self.max_batch)
            outs.append(self._decode(mel_t[start:stop], levels, idx[start:stop]))
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return out.float().flip(1)  # BGR → RGB

    def _decode(self, mel: torch.Tensor, levels: list[torch.Tensor], idx: torch.Tensor
                ) -> torch.Tensor:
        """Run one call; out of memory, run it again in two halves (down to one frame).

        Failing the call would fail every session's chunk in it, while the same frames
        usually fit in two smaller calls (smaller activations, smaller padded sizes).
        """
        n = int(mel.shape[0])
        try:
            return self._run(mel, levels, idx)
        except torch.OutOfMemoryError:
            if n <= 1:
                raise
        # Retried outside the ``except`` block: the traceback holds the failed call's
        # frames, and with them the activations that just ran out of memory.
        if self.oom_splits == 0:
            log.warning("wav2lip-%s: out of memory on a batch of %d frames on %s; "
                        "retrying such batches in halves", self.variant, n, self.device)
        self.oom_splits += 1
        half = (n + 1) // 2
        first = self._decode(mel[:half], levels, idx[:half])
        second = self._decode(mel[half:], levels, idx[half:])
        return torch.cat([first, second])

    def _run(self, mel: torch.Tensor, levels: list[torch.Tensor], idx: torch.Tensor
             ) -> torch.Tensor:
        n = int(mel.shape[0])
        if not self.static_batches:
            feats = [level.index_select(0, idx).contiguous(memory_format=_CHANNELS_LAST)
                     for level in levels]
            return self.net.decode(self.net.encode_audio(mel), feats)
        static = self._static_batch(next(b for b in self.buckets if b >= n))
        static.load(mel, levels, idx)
        if static.graph is not None:
            return static.run(n)
        with self._autotune():
            return static.run(n)

    def _feature_shapes(self) -> list[tuple[int, ...]]:
        """Per-frame shape of each encoder level (fixed by the layout)."""
        if self._feat_shapes is None:
            face = torch.zeros((1, 6, self.size, self.size), dtype=self.dtype,
                               device=self.device).contiguous(memory_format=_CHANNELS_LAST)
            with torch.inference_mode():
                self._feat_shapes = [tuple(f.shape[1:]) for f in self.net.encode_face(face)]
        return self._feat_shapes

    def _static_batch(self, bucket: int) -> _StaticBatch:
        """The buffers of one padded size, created (and captured) on first use."""
        static = self._statics.get(bucket)
        if static is None:
            static = _StaticBatch(self.net, bucket, self._feature_shapes(), self.dtype,
                                  self.device)
            self._statics[bucket] = static
        if self.use_graphs and static.graph is None:
            self._capture(static)
        return static

    def _capture(self, static: _StaticBatch) -> None:
        """Capture ``static``'s graph; on any failure turn graphs off and carry on eagerly.

        All sizes share one memory pool and one capture stream. Sharing is safe here in
        any replay order because replays never overlap (one runner thread, one stream)
        and each output is cloned before the next replay; inputs live outside the pool.
        """
        current = torch.cuda.current_stream(self.device) if self.is_cuda else None
        try:
            if not self.is_cuda:
                raise RuntimeError(f"CUDA graphs need a CUDA device, not {self.device}")
            if self._capture_stream is None:
                self._capture_stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            with self._autotune():
                static.capture(self._capture_stream, self._graph_pool)
        except Exception as exc:
            if current is not None:
                # torch.cuda.graph leaves its stream current when capture_end raises.
                torch.cuda.set_stream(current)
            self._disable_graphs(static.batch, exc)

    def _disable_graphs(self, bucket: int, exc: BaseException) -> None:
        self.use_graphs = False
        self.graph_error = f"capturing batch size {bucket} failed: {type(exc).__name__}: {exc}"
        log.warning("wav2lip-%s on %s: CUDA graph capture failed (%s); continuing on "
                    "eager padded batches", self.variant, self.device, self.graph_error)
        for static in self._statics.values():
            static.graph = None
            static.out = None
        self._graph_pool = None

    def warmup(self) -> None:
        """Allocate every padded size now and capture its graph, not on a live batch.

        A capture takes a device sync and a few eager runs; doing it at load keeps that
        stall off the first sessions. Nothing here may fail the load: a failed capture
        already fell back to eager batches, and after any other error (out of memory;
        an error a failed capture left behind) the remaining sizes are created on first
        use instead, where running out of memory splits the batch.
        """
        if not self.static_batches:
            return
        with self._on_device(), torch.inference_mode():
            for bucket in self.buckets:
                try:
                    static = self._static_batch(bucket)
                    if static.graph is None:  # eager: still let cuDNN pick its algorithms
                        with self._autotune():
                            static.eager()
                except Exception as exc:
                    log.warning("wav2lip-%s: preparing batch size %d on %s failed (%s: %s); "
                                "larger sizes are left to first use", self.variant, bucket,
                                self.device, type(exc).__name__, exc)
                    break

    @torch.inference_mode()
    def _compose(self, dev: DeviceAvatar, pred: torch.Tensor) -> torch.Tensor:
        """Blend generated crops into copies of the avatar frame, on the model's device.

        Returns (n, H, W, 3) uint8 on the device.
        """
        n = pred.shape[0]
        bh, bw = dev.ref_box.shape[2], dev.ref_box.shape[3]
        gen = F.interpolate(pred, size=(bh, bw), mode="bilinear", align_corners=False) * 255.0
        weight = dev.blend.sum().clamp_min(1e-6)
        gen_mean = (gen * dev.blend).sum(dim=(2, 3), keepdim=True) / weight
        gen = gen + (dev.ref_mean - gen_mean)  # colour match on the blended region
        box = dev.ref_box * (1.0 - dev.blend) + gen * dev.blend
        box_u8 = box.clamp_(0, 255).round_().to(torch.uint8).permute(0, 2, 3, 1)
        frames = dev.frame.unsqueeze(0).repeat(n, 1, 1, 1)
        x1, y1, x2, y2 = dev.box
        frames[:, y1:y2, x1:x2] = box_u8
        return frames

    def _to_host(self, frames: list[torch.Tensor]) -> list[RGBFrame]:
        """Device frames to numpy, with one synchronisation for the whole call.

        A blocking ``.cpu()`` per chunk would stall the host (and leave the GPU idle)
        once per session; non-blocking copies land in pinned memory, which is only
        safe to read after the stream has been synchronised.
        """
        if not self.is_cuda:
            return [f.numpy() for f in frames]
        staged = [f.to("cpu", non_blocking=True) for f in frames]
        torch.cuda.current_stream(self.device).synchronize()
        return [s.numpy() for s in staged]

    def close(self) -> None:
        """Drop graphs, buffers and every avatar's tensors so device memory is returned."""
        self._statics.clear()
        self._graph_pool = None
        self._capture_stream = None
        with self._lock:
            self._avatars.clear()
            holders = list(self._holders.values())
            self._holders.clear()
        for avatar in holders:
            avatar.device_cache.pop(self._token, None)
        if self.is_cuda:
            torch.cuda.empty_cache()


def _pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r}; use auto, fp32, bf16 or fp16")
    # Native bf16 tensor cores start with Ampere (8.x). torch.cuda.is_bf16_supported()
    # also says yes for older GPUs that only emulate it, and asks the current device
    # rather than this one.
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def load_model(variant: str, path: str, device: str = "cpu",
               options: dict[str, Any] | None = None) -> Wav2LipModel:
    """Load ``path`` as ``wav2lip-<variant>`` onto ``device`` (runner factory).

    On CUDA every padded size is allocated and captured here, on the runner's thread,
    before the first session's batch.
    """
    if variant not in LAYOUTS:
        raise ValueError(f"unknown Wav2Lip variant {variant!r}")
    options = options or {}
    net = load_generator(path, variant)
    graphs = options.get("cuda_graphs")
    static = options.get("static_batches")
    model = Wav2LipModel(
        net,
        device,
        precision=str(options.get("precision", "auto")),
        cuda_graphs=None if graphs is None else bool(graphs),
        max_batch=options.get("max_batch"),
        static_batches=None if static is None else bool(static),
        size=int(variant),
    )
    if model.is_cuda:
        model.warmup()
    return model
