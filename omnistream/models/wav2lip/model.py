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
* On CUDA: weights and activations in bf16 (fp16 where bf16 is missing),
  batches padded to a few fixed sizes and each size captured once as a CUDA graph, and
  paste-back, colour match and blending on the GPU; only finished uint8 frames cross to
  the host. None of this runs without CUDA; the CPU path is the same code in float32
  without padding (padding only pays for itself when graphs need static shapes).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
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
from omnistream.models.wav2lip.audio import frame_windows
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
_TOKENS = itertools.count(1)  # unique per loaded model, unlike id() which is reused


@dataclass
class DeviceAvatar:
    """What a loaded model keeps on its device for one prepared avatar."""

    feats: list[torch.Tensor]  # encoder skip features, each (1, C, h, w), model dtype
    frame: torch.Tensor  # (H, W, 3) uint8
    ref_box: torch.Tensor  # (1, 3, bh, bw) float32, 0..255, RGB
    blend: torch.Tensor  # (1, 1, bh, bw) float32
    ref_mean: torch.Tensor  # (1, 3, 1, 1) masked mean colour of the reference box
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in ``frame``


class _CudaGraph:
    """One captured decode for a fixed batch size; inputs are copied into static buffers."""

    def __init__(self, net: Wav2Lip, batch: int, feats: list[torch.Tensor],
                 dtype: torch.dtype, device: torch.device, pool: Any) -> None:
        self.batch = batch
        self.mel = torch.zeros((batch, 1, 80, 16), dtype=dtype, device=device)
        self.feats = [
            torch.zeros((batch, *f.shape[1:]), dtype=dtype, device=device).contiguous(
                memory_format=torch.channels_last
            )
            for f in feats
        ]
        stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):  # warm up cuDNN autotuning outside the capture
                net.decode(net.encode_audio(self.mel), self.feats)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # All sizes share one memory pool: they replay one at a time from one thread and
        # each output is cloned before the next replay, so their activations can overlap.
        with torch.cuda.graph(self.graph, pool=pool), torch.inference_mode():
            self.out = net.decode(net.encode_audio(self.mel), self.feats)

    def run(self, n: int) -> torch.Tensor:
        """Replay after the caller filled ``mel[:n]`` and ``feats[i][:n]``."""
        self.graph.replay()
        return self.out[:n].clone()


class Wav2LipModel(AvatarModel):
    """A loaded Wav2Lip generator serving avatar chunks from every session.

    Args:
        net: a generator in eval mode with BatchNorm folded (see
            :func:`~omnistream.models.wav2lip.checkpoint.load_generator`).
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:N"``).
        precision: ``auto`` (bf16/fp16 on CUDA, fp32 on CPU), ``fp32``, ``bf16``, ``fp16``.
        cuda_graphs: capture a graph per padded batch size on CUDA.
        max_batch: frames per generator call (defaults by device and variant).
        pad_batches: pad each call to the next of a few fixed sizes (default: on CUDA,
            where graphs and cuDNN's per-shape autotuning want static shapes).
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
        cuda_graphs: bool = True,
        max_batch: int | None = None,
        pad_batches: bool | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.variant = net.layout.name
        self.size = net.layout.size
        self.is_cuda = self.device.type == "cuda"
        self.dtype = _pick_dtype(precision, self.device)
        # Channels-last suits both oneDNN (CPU) and cuDNN tensor cores (measured ~1.5–2×
        # on this CPU for wav2lip-96, see bench/wav2lip_bench.py).
        net = net.to(self.device, dtype=self.dtype)
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if self.is_cuda:
            torch.backends.cudnn.benchmark = True
        self.net = net.eval()
        # torch computes on its own intra-op threads: admission must charge all of them.
        self.cpu_threads = 1 if self.is_cuda else max(1, torch.get_num_threads())
        if max_batch is None:
            max_batch = CUDA_BUCKETS[-1] if self.is_cuda else CPU_MAX_BATCH[self.variant]
        self.max_batch = max(1, int(max_batch))
        self.max_batch_cost = float(self.max_batch)
        self.buckets = (*(b for b in CUDA_BUCKETS if b < self.max_batch), self.max_batch)
        self.use_graphs = bool(cuda_graphs and self.is_cuda)
        self.pad_batches = self.is_cuda if pad_batches is None else bool(pad_batches)
        self._graphs: dict[int, _CudaGraph] = {}
        self._graph_pool: Any = None
        self._avatars: OrderedDict[tuple[str, int, int], Wav2LipAvatar] = OrderedDict()
        self._lock = threading.Lock()
        self._token = next(_TOKENS)
        self.last_batch_frames = 0

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

    @torch.inference_mode()
    def _device_avatar(self, avatar: Wav2LipAvatar) -> DeviceAvatar:
        cached = avatar.device_cache.get(self._token)
        if isinstance(cached, DeviceAvatar):
            return cached
        face = torch.from_numpy(model_face_input(avatar.crop))[None].to(self.device, self.dtype)
        face = face.contiguous(memory_format=torch.channels_last)
        feats = [f.contiguous(memory_format=torch.channels_last)
                 for f in self.net.encode_face(face)]
        x1, y1, x2, y2 = avatar.box
        frame = torch.from_numpy(avatar.frame).to(self.device)
        ref_box = frame[y1:y2, x1:x2].permute(2, 0, 1)[None].float()
        blend = torch.from_numpy(avatar.blend)[None, None].to(self.device)
        weight = blend.sum().clamp_min(1e-6)
        ref_mean = (ref_box * blend).sum(dim=(2, 3), keepdim=True) / weight
        dev = DeviceAvatar(feats, frame, ref_box, blend, ref_mean, avatar.box)
        avatar.device_cache[self._token] = dev
        return dev

    # -- rendering -------------------------------------------------------------------

    def render(self, chunks: list[ChunkRequest]) -> list[ChunkResult | BaseException]:
        """Render every frame of every chunk; a bad chunk fails alone."""
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
            offset = 0
            for i, dev, n in owners:
                frames = self._paste(dev, rendered[offset : offset + n])
                offset += n
                results[i] = ChunkResult(
                    frames=frames,
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

    @torch.inference_mode()
    def infer(self, mel: np.ndarray, avatars: list[DeviceAvatar]) -> torch.Tensor:
        """Generator output (N, 3, S, S) float32 RGB in [0, 1] for N frames.

        ``mel`` is (N, 1, 80, 16); ``avatars[i]`` is frame i's prepared avatar.
        """
        n_total = mel.shape[0]
        mel_t = torch.from_numpy(mel).to(self.device, self.dtype, non_blocking=True)
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
        idx = torch.tensor(index, dtype=torch.long, device=self.device)
        outs: list[torch.Tensor] = []
        for start in range(0, n_total, self.max_batch):
            stop = min(n_total, start + self.max_batch)
            outs.append(self._run(mel_t[start:stop], levels, idx[start:stop]))
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return out.float().flip(1)  # BGR → RGB

    def _run(self, mel: torch.Tensor, levels: list[torch.Tensor], idx: torch.Tensor
             ) -> torch.Tensor:
        n = mel.shape[0]
        if self.use_graphs:
            bucket = next(b for b in self.buckets if b >= n)
            graph = self._graphs.get(bucket)
            if graph is None:
                if self._graph_pool is None:
                    self._graph_pool = torch.cuda.graph_pool_handle()
                graph = _CudaGraph(self.net, bucket, levels, self.dtype, self.device,
                                   self._graph_pool)
                self._graphs[bucket] = graph
            graph.mel[:n].copy_(mel)
            for buf, level in zip(graph.feats, levels, strict=True):
                buf[:n].copy_(level.index_select(0, idx))
            return graph.run(n)
        if self.pad_batches:
            bucket = next(b for b in self.buckets if b >= n)
            if bucket > n:  # padding rows repeat the last frame; their output is dropped
                fill = bucket - n
                mel = torch.cat([mel, mel[-1:].expand(fill, -1, -1, -1)])
                idx = torch.cat([idx, idx[-1:].expand(fill)])
        feats = [level.index_select(0, idx).contiguous(memory_format=torch.channels_last)
                 for level in levels]
        return self.net.decode(self.net.encode_audio(mel), feats)[:n]

    @torch.inference_mode()
    def _paste(self, dev: DeviceAvatar, pred: torch.Tensor) -> list[RGBFrame]:
        """Blend generated crops into copies of the avatar frame (on the model's device)."""
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
        host = frames.cpu().numpy()
        return [host[i] for i in range(n)]

    def close(self) -> None:
        """Drop graphs and cached avatars so device memory is returned."""
        self._graphs.clear()
        with self._lock:
            self._avatars.clear()
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
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_model(variant: str, path: str, device: str = "cpu",
               options: dict[str, Any] | None = None) -> Wav2LipModel:
    """Load ``path`` as ``wav2lip-<variant>`` onto ``device`` (runner factory)."""
    if variant not in LAYOUTS:
        raise ValueError(f"unknown Wav2Lip variant {variant!r}")
    options = options or {}
    net = load_generator(path, variant)
    return Wav2LipModel(
        net,
        device,
        precision=str(options.get("precision", "auto")),
        cuda_graphs=bool(options.get("cuda_graphs", True)),
        max_batch=options.get("max_batch"),
        pad_batches=options.get("pad_batches"),
    )
