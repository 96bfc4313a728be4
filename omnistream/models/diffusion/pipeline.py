"""A loaded diffusers pipeline as a runner model: requests advance one denoising step per item.

Importing this module imports torch and diffusers; the registry only imports it inside a
runner thread, so a core install lists diffusion models as unavailable instead of failing.

Three kinds of work item reach :meth:`DiffusionModel.run_batch`:

* :class:`StartItem` — encode the prompt, prepare latents and a scheduler of the
  request's own (one per request, so requests at different timesteps share nothing
  but the weights);
* :class:`StepItem` — one denoising step. For the Stable Diffusion UNet family, step
  items of every request with the same latent shape and adapter set share one UNet call:
  each request contributes its rows (two with classifier-free guidance: unconditional
  and conditional), each row carries its own timestep, and each request's scheduler
  steps its own slice afterwards. That is continuous batching for diffusion: a request
  joins the next call whatever step the others are at;
* :class:`FinishItem` — decode latents to pixels (VAE, tiled on a GPU).

Other pipeline classes (video, edit, Flux…) run through their own ``__call__`` on a
driver thread that stops at the step-end callback until the runner hands it the next
step, so priority, progress and cancellation act between steps for them too.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from omnistream.models.base import BatchModel
from omnistream.models.diffusion.discovery import PipelineDir
from omnistream.models.diffusion.items import (
    AdapterError,
    DiffusionJob,
    DriverAborted,
    FinishItem,
    StartItem,
    StepDone,
    StepItem,
)

log = logging.getLogger(__name__)

#: SDXL classes whose steps run batched here (the base pipeline's conditioning).
BATCHED_SDXL = frozenset({"StableDiffusionXLPipeline"})
#: Upper bound of one shared UNet call, in latent rows (a CFG request of n images is 2n).
DEFAULT_MAX_ROWS = 16
#: How long the runner holds a step batch open for requests expected to join it.
STEP_LINGER_S = 0.005
#: A driver thread that does not reach its next step within this is abandoned.
DRIVER_STEP_TIMEOUT_S = 600.0
#: Niceness added to runner and driver threads: live sessions' threads come first.
DIFFUSION_NICE = 10


def _lower_thread_priority(nice: int = DIFFUSION_NICE) -> None:
    """Lower the calling thread's CPU priority (Linux: per thread; torch's worker threads
    started from it inherit it), so denoising only takes what live sessions leave."""
    if nice <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except (AttributeError, OSError):
        pass


class _CallDriver:
    """Runs a pipeline's ``__call__`` on its own thread, one step per :meth:`advance`.

    The pipeline's step-end callback reports the step and then blocks until the next
    advance, so the runner thread (which waits in :meth:`advance`) owns the timing of
    every step exactly as if it had run the step itself.
    """

    def __init__(
        self,
        fn: Callable[[Callable[[], None]], Any],
        name: str,
        nice: int = DIFFUSION_NICE,
        threads: int = 0,
    ) -> None:
        self._fn = fn
        self._nice = nice
        self._threads = threads
        self._name = name
        self._go = threading.Semaphore(0)
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._aborted = False
        self.finished = False
        self.output: Any = None

    def _step_reached(self) -> None:
        self._events.put(("step", None))
        self._go.acquire()
        if self._aborted:
            raise DriverAborted("cancelled")

    def _main(self) -> None:
        _lower_thread_priority(self._nice)
        limit_torch_threads(self._threads)
        try:
            output = self._fn(self._step_reached)
        except BaseException as exc:
            self._events.put(("error", exc))
            return
        self._events.put(("done", output))

    def advance(self) -> bool:
        """Run up to the next step boundary; True once ``__call__`` has returned."""
        if self.finished:
            return True
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
            self._thread.start()
        else:
            self._go.release()
        kind, value = self._events.get(timeout=DRIVER_STEP_TIMEOUT_S)
        if kind == "error":
            self.finished = True
            raise value
        if kind == "done":
            self.finished = True
            self.output = value
            return True
        return False

    def abort(self) -> None:
        """Stop ``__call__`` at its next step callback (thread-safe; any thread)."""
        self._aborted = True
        self._go.release()


def limit_torch_threads(threads: int) -> None:
    """Make torch compute on ``threads`` threads in the calling thread only.

    ``torch.set_num_threads`` sets the calling thread's OpenMP team size and also the
    default that threads initialise from later; a short-lived helper thread puts that
    default back, so other runners (and the caller's own later threads) are unaffected.
    Oversubscribed OpenMP teams are also what makes small models crawl on a busy host.
    """
    if threads <= 0:
        return
    import torch

    previous = torch.get_num_threads()
    if previous == threads:
        return
    torch.set_num_threads(threads)
    restore = threading.Thread(target=torch.set_num_threads, args=(previous,), daemon=True)
    restore.start()
    restore.join()


def pick_dtype(device: str, requested: str | None) -> Any:
    """The weights' dtype: bf16 on GPUs that have it (else fp16), fp32 on CPU."""
    import torch

    if requested and requested not in ("auto", ""):
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
            requested
        ]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class DiffusionModel(BatchModel[Any, Any]):
    """A resident diffusers pipeline shared by every request for its model.

    Args:
        pdir: the discovered directory.
        device: ``cpu`` or ``cuda``.
        options: ``dtype`` (``auto``/``float32``/``float16``/``bfloat16``),
            ``max_batch_rows``, ``vae_tiling`` (default: on for CUDA), ``nice``,
            ``cpu_threads`` (torch threads of its calls on CPU).
    """

    batch_linger_s = STEP_LINGER_S

    def __init__(self, pdir: PipelineDir, device: str, options: dict[str, Any]) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import torch
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        self.nice = int(options.get("nice", DIFFUSION_NICE))
        _lower_thread_priority(self.nice)
        self.threads = int(options.get("cpu_threads", 1)) if device == "cpu" else 0
        limit_torch_threads(self.threads)
        self.pdir = pdir
        self.device = device
        self.dtype = pick_dtype(device, options.get("dtype"))
        self.max_batch_cost = float(options.get("max_batch_rows") or DEFAULT_MAX_ROWS)
        self.cpu_threads = max(1, torch.get_num_threads()) if device == "cpu" else 1  # metering
        started = time.perf_counter()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()  # the peak then includes the weights
        pipe = DiffusionPipeline.from_pretrained(  # type: ignore[no-untyped-call]
            str(pdir.path), local_files_only=True, torch_dtype=self.dtype
        )
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        vae = getattr(pipe, "vae", None)
        if vae is not None and getattr(vae.config, "force_upcast", False) and device != "cpu":
            vae.to(torch.float32)  # SDXL's VAE overflows in fp16
        self.vae_tiling = bool(options.get("vae_tiling", device.startswith("cuda")))
        if self.vae_tiling and vae is not None and hasattr(vae, "enable_tiling"):
            vae.enable_tiling()
        self.pipe = pipe
        name = type(pipe).__name__
        self.family = pdir.family if name == pdir.class_name else "call"
        if self.family == "sdxl" and name not in BATCHED_SDXL:
            self.family = "call"  # refiners and the XL img2img/inpaint classes: own __call__
        self.load_ms = (time.perf_counter() - started) * 1000.0
        self._lock = threading.Lock()
        self._jobs: dict[int, DiffusionJob] = {}
        self._adapter_names: dict[str, str] = {}
        self._active_adapters: tuple[tuple[str, float], ...] = ()
        self._params: dict[str, frozenset[str]] = {}
        self.peak_rows = 0

    # -- runner interface -----------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """How this pipeline runs (shown by ``/readyz``)."""
        out: dict[str, Any] = {
            "pipeline": type(self.pipe).__name__,
            "family": self.family,
            "dtype": str(self.dtype).replace("torch.", ""),
            "vae_tiling": self.vae_tiling,
            "cpu_threads": self.threads or None,
            "batched_steps": self.family in ("sd", "sdxl"),
            "largest_step_batch_rows": self.peak_rows,
            "load_ms": round(self.load_ms, 1),
        }
        if self.device.startswith("cuda"):
            import torch

            out["peak_device_bytes"] = int(torch.cuda.max_memory_allocated())
        return out

    def cost(self, payload: Any) -> float:
        """Latent rows for steps (what fills a UNet call); 1 for the other items."""
        if isinstance(payload, StepItem):
            return float(payload.job.rows)
        return 1.0

    def batch_key(self, payload: Any) -> Hashable:
        """Steps of batched-family requests share by key; every other item runs alone."""
        if isinstance(payload, StepItem) and payload.job.key is not None:
            return payload.job.key
        return ("alone", id(payload))

    def expected_batch(self, key: Hashable) -> int:
        """Requests in the denoise loop whose steps share ``key`` (the runner waits for them)."""
        with self._lock:
            for gone in [k for k, j in self._jobs.items() if j.closed]:
                del self._jobs[gone]
            live = (
                j for j in self._jobs.values()
                if j.key == key and j.index < j.total_steps and not j.closed
            )
            return max(1, sum(1 for _ in live))

    def run_batch(self, payloads: Sequence[Any]) -> list[Any]:
        """Run starts, steps and finishes; a failing request fails alone where it can."""
        import torch

        with torch.inference_mode():
            first = payloads[0]
            if isinstance(first, StepItem) and first.job.key is not None:
                return self._step_batch([p.job for p in payloads])
            out: list[Any] = []
            for payload in payloads:
                try:
                    out.append(self._run_one(payload))
                except Exception as exc:
                    if not isinstance(exc, (DriverAborted, AdapterError)):
                        log.exception("diffusion item failed")
                    out.append(exc)
            return out

    def close(self) -> None:
        """Abort drivers and drop the pipeline."""
        with self._lock:
            jobs = list(self._jobs.values())
            self._jobs.clear()
        for job in jobs:
            if job.driver is not None:
                job.driver.abort()

    def release(self, job: DiffusionJob) -> None:
        """The request ended (any thread): stop its driver and forget it."""
        job.closed = True
        if job.driver is not None:
            job.driver.abort()
        with self._lock:
            self._jobs.pop(id(job), None)

    # -- items ----------------------------------------------------------------------

    def _run_one(self, payload: Any) -> Any:
        if isinstance(payload, StartItem):
            return self._start(payload.job)
        if isinstance(payload, StepItem):
            return self._call_step(payload.job)
        if isinstance(payload, FinishItem):
            return self._finish(payload.job)
        raise TypeError(f"unknown diffusion item {type(payload).__name__}")

    def _start(self, job: DiffusionJob) -> int:
        if job.closed:
            raise DriverAborted("closed")
        self._use_adapters(job)
        if self.family in ("sd", "sdxl") and job.task in ("text2image", "image2image", "inpaint"):
            self._start_sd(job)
        else:
            self._start_call(job)
        with self._lock:
            self._jobs[id(job)] = job
        return job.total_steps

    # -- LoRA -----------------------------------------------------------------------

    def _use_adapters(self, job: DiffusionJob) -> None:
        """Load the request's LoRA files once each, then activate exactly its set."""
        pipe = self.pipe
        if not job.adapters and not self._active_adapters:
            return
        if not hasattr(pipe, "load_lora_weights"):
            raise AdapterError(f"{type(pipe).__name__} does not take LoRA adapters")
        names: list[str] = []
        for path, _scale in job.adapters:
            try:
                stat = Path(path).stat()
            except OSError as exc:
                raise AdapterError(f"{Path(path).name} is no longer readable: {exc}") from exc
            cache_key = f"{path}:{stat.st_mtime_ns}:{stat.st_size}"
            name = self._adapter_names.get(cache_key)
            if name is None:
                name = f"lora{len(self._adapter_names)}"
                try:
                    pipe.load_lora_weights(
                        str(Path(path).parent), weight_name=Path(path).name, adapter_name=name
                    )
                except Exception as exc:
                    with contextlib.suppress(Exception):
                        pipe.delete_adapters([name])
                    self._active_adapters = (("?", 0.0),)  # re-apply the next set afresh
                    raise AdapterError(
                        f"{Path(path).name} does not fit {type(pipe).__name__}: "
                        f"{type(exc).__name__}: {str(exc)[:200]}"
                    ) from exc
                self._adapter_names[cache_key] = name
            else:
                job.cache_hits.append(f"lora:{Path(path).name}")
            names.append(name)
        if job.adapters == self._active_adapters:
            return
        if names:
            pipe.enable_lora()
            pipe.set_adapters(names, adapter_weights=[s for _, s in job.adapters])
        else:
            pipe.disable_lora()
        self._active_adapters = job.adapters

    # -- the Stable Diffusion family: our own loop, batched steps ----------------------

    def _scheduler(self, job: DiffusionJob) -> Any:
        import diffusers

        base = self.pipe.scheduler
        cls = type(base) if not job.scheduler else getattr(diffusers, job.scheduler)
        return cls.from_config(base.config)

    def _start_sd(self, job: DiffusionJob) -> None:
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        pipe = self.pipe
        device = self.device
        job.cfg = job.guidance_scale > 1.0
        n = job.num_images
        if self.family == "sdxl":
            self._encode_xl(job)
        else:
            positive, negative = pipe.encode_prompt(
                job.prompt, device, n, job.cfg, job.negative_prompt or None
            )
            job.embeds = torch.cat([negative, positive]) if job.cfg else positive
        sched = self._scheduler(job)
        sched.set_timesteps(job.steps, device=device)
        timesteps = sched.timesteps
        generator = torch.Generator("cpu").manual_seed(job.seed)
        job.generator = generator
        factor = pipe.vae_scale_factor
        channels = pipe.vae.config.latent_channels
        shape = (n, channels, job.height // factor, job.width // factor)
        nine = pipe.unet.config.in_channels == 9
        image_latents = None
        if job.task in ("image2image", "inpaint") and job.image is not None:
            image = self._to_tensor(job.image, job.width, job.height)
            encoded = pipe.vae.encode(image.to(device, pipe.vae.dtype)).latent_dist
            image_latents = encoded.mode().float() * pipe.vae.config.scaling_factor
            image_latents = image_latents.repeat(n, 1, 1, 1)
        noise = randn_tensor(shape, generator=generator, device=torch.device("cpu"))
        noise = noise.to(device)
        strength = job.strength if job.task == "image2image" else (
            job.strength if job.task == "inpaint" and not nine else 1.0
        )
        if image_latents is not None and strength < 1.0:
            init = min(int(job.steps * strength), job.steps)
            start = max(job.steps - init, 0)
            timesteps = timesteps[start * sched.order :]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(start * sched.order)
            if len(timesteps) == 0:
                raise ValueError("strength too low: no denoising step left")
            latents = sched.add_noise(image_latents, noise, timesteps[:1].repeat(n))
        else:
            latents = noise * sched.init_noise_sigma
        if job.task == "inpaint" and job.mask is not None and image_latents is not None:
            mask = torch.from_numpy(job.mask.astype(np.float32) / 255.0)[None, None]
            mask = torch.nn.functional.interpolate(mask, size=shape[2:], mode="nearest")
            mask = (mask > 0.5).float().to(device).repeat(n, 1, 1, 1)
            job.mask_latents = mask
            job.init_latents = image_latents
            job.noise = noise
            if nine:
                assert job.image is not None
                keep = torch.from_numpy(job.mask.astype(np.float32) / 255.0) < 0.5
                masked = self._to_tensor(job.image, job.width, job.height) * keep[None, None]
                masked_latents = pipe.vae.encode(masked.to(device, pipe.vae.dtype)).latent_dist
                job.masked_image_latents = (
                    masked_latents.mode().float() * pipe.vae.config.scaling_factor
                ).repeat(n, 1, 1, 1)
        job.latents = latents.float()
        job.sched = sched
        job.timesteps = timesteps
        job.total_steps = len(timesteps)
        job.rows = n * (2 if job.cfg else 1)
        job.key = ("step", shape[1:], nine, job.adapters)

    def _encode_xl(self, job: DiffusionJob) -> None:
        """SDXL's two text encoders, pooled embeddings and size conditioning, per row."""
        import torch

        pipe = self.pipe
        n = job.num_images
        positive, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=job.prompt,
            device=self.device,
            num_images_per_prompt=n,
            do_classifier_free_guidance=job.cfg,
            negative_prompt=job.negative_prompt or None,
        )
        encoder_2 = getattr(pipe, "text_encoder_2", None)
        projection = (
            int(encoder_2.config.projection_dim) if encoder_2 is not None else int(pooled.shape[-1])
        )
        size = (job.height, job.width)
        time_ids = pipe._get_add_time_ids(
            size, (0, 0), size, dtype=positive.dtype, text_encoder_projection_dim=projection
        ).to(self.device).repeat(n, 1)
        if job.cfg:
            job.embeds = torch.cat([negative, positive])
            job.text_embeds = torch.cat([negative_pooled, pooled])
            job.time_ids = torch.cat([time_ids, time_ids])
        else:
            job.embeds, job.text_embeds, job.time_ids = positive, pooled, time_ids

    @staticmethod
    def _to_tensor(image: npt.NDArray[np.uint8], width: int, height: int) -> Any:
        import torch
        from PIL import Image

        pil = Image.fromarray(image).convert("RGB")
        if pil.size != (width, height):
            pil = pil.resize((width, height), Image.Resampling.LANCZOS)
        array = np.asarray(pil, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1)[None]

    def _step_batch(self, jobs: list[DiffusionJob]) -> list[Any]:
        """One UNet call for every request in the batch, each at its own timestep."""
        import torch

        unet = self.pipe.unet
        self._use_adapters(jobs[0])
        inputs, times, embeds, pooled, time_ids = [], [], [], [], []
        live: list[DiffusionJob] = []
        results: list[Any] = [None] * len(jobs)
        for index, job in enumerate(jobs):
            if job.closed or job.index >= job.total_steps:
                results[index] = DriverAborted("closed")
                continue
            t = job.timesteps[job.index]
            x = torch.cat([job.latents] * 2) if job.cfg else job.latents
            x = job.sched.scale_model_input(x, t)
            if job.masked_image_latents is not None:
                reps = 2 if job.cfg else 1
                x = torch.cat(
                    [
                        x,
                        torch.cat([job.mask_latents] * reps),
                        torch.cat([job.masked_image_latents] * reps),
                    ],
                    dim=1,
                )
            inputs.append(x)
            times.append(torch.full((x.shape[0],), float(t), device=x.device))
            embeds.append(job.embeds)
            if job.text_embeds is not None:
                pooled.append(job.text_embeds)
                time_ids.append(job.time_ids)
            live.append(job)
        if not live:
            return results
        rows = torch.cat(inputs).to(unet.dtype)
        self.peak_rows = max(self.peak_rows, int(rows.shape[0]))
        extra: dict[str, Any] = {}
        if pooled:  # SDXL: pooled text and size conditioning ride along per row
            extra["added_cond_kwargs"] = {
                "text_embeds": torch.cat(pooled).to(unet.dtype),
                "time_ids": torch.cat(time_ids).to(unet.dtype),
            }
        predicted = unet(
            rows,
            torch.cat(times),
            encoder_hidden_states=torch.cat(embeds).to(unet.dtype),
            return_dict=False,
            **extra,
        )[0].float()
        offset = 0
        for job in live:
            count = job.rows
            part = predicted[offset : offset + count]
            offset += count
            if job.cfg:
                uncond, cond = part.chunk(2)
                part = uncond + job.guidance_scale * (cond - uncond)
            t = job.timesteps[job.index]
            kwargs: dict[str, Any] = {"return_dict": False}
            if "generator" in self._step_params(job.sched):
                kwargs["generator"] = job.generator
            job.latents = job.sched.step(part, t, job.latents, **kwargs)[0]
            job.index += 1
            if job.mask_latents is not None and job.masked_image_latents is None:
                if job.index < job.total_steps:
                    following = job.timesteps[job.index : job.index + 1].repeat(job.num_images)
                    known = job.sched.add_noise(job.init_latents, job.noise, following)
                else:
                    known = job.init_latents
                job.latents = (1 - job.mask_latents) * known + job.mask_latents * job.latents
        done = {id(j): j for j in live}
        for index, job in enumerate(jobs):
            if id(job) in done:
                results[index] = StepDone(job.index, job.total_steps, job.index >= job.total_steps)
        return results

    def _step_params(self, sched: Any) -> frozenset[str]:
        name = type(sched).__name__
        params = self._params.get(name)
        if params is None:
            params = frozenset(inspect.signature(sched.step).parameters)
            self._params[name] = params
        return params

    def _finish(self, job: DiffusionJob) -> npt.NDArray[np.uint8]:
        if job.driver is not None:
            while not job.driver.advance():
                pass
            self.release(job)
            return self._pixels(job.driver.output)
        import torch

        pipe = self.pipe
        vae = pipe.vae
        latents = job.latents / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift:
            latents = latents + shift
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        images = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        self.release(job)
        return np.ascontiguousarray(images.permute(0, 2, 3, 1).cpu().numpy())

    # -- every other pipeline: its own __call__, one step per item --------------------

    def _task_pipeline(self, job: DiffusionJob) -> Any:
        """A pipeline object for this request: the loaded components, a fresh scheduler.

        Diffusers pipelines keep the scheduler's state on the pipeline, so two requests
        interleaving steps on one object would corrupt each other; each gets its own
        (cheap: the modules are shared, not copied).
        """
        pipe = self.pipe
        scheduler = self._scheduler(job)
        name = type(pipe).__name__
        if "StableDiffusion" in name and job.task in ("text2image", "image2image", "inpaint"):
            from diffusers import (
                AutoPipelineForImage2Image,
                AutoPipelineForInpainting,
                AutoPipelineForText2Image,
            )

            auto = {
                "text2image": AutoPipelineForText2Image,
                "image2image": AutoPipelineForImage2Image,
                "inpaint": AutoPipelineForInpainting,
            }[job.task]
            return auto.from_pipe(pipe, scheduler=scheduler)
        components = dict(pipe.components)
        components["scheduler"] = scheduler
        clone = type(pipe)(**components)
        clone.set_progress_bar_config(disable=True)
        return clone

    def _start_call(self, job: DiffusionJob) -> None:
        import torch
        from PIL import Image

        target = self._task_pipeline(job)
        params = frozenset(inspect.signature(target.__call__).parameters)
        kwargs: dict[str, Any] = {"output_type": "np", "return_dict": True}

        def put(name: str, value: Any) -> None:
            if name in params and value is not None:
                kwargs[name] = value

        is_video = job.task in ("text2video", "image2video")
        put("prompt", job.prompt or None)
        put("negative_prompt", job.negative_prompt)
        put("width", job.width)
        put("height", job.height)
        put("num_inference_steps", job.steps)
        put("guidance_scale", job.guidance_scale)
        put("max_guidance_scale", job.guidance_scale)
        put("generator", torch.Generator("cpu").manual_seed(job.seed))
        put("num_images_per_prompt", job.num_images)
        put("num_videos_per_prompt", job.num_images if is_video else None)
        if job.image is not None:
            picture = Image.fromarray(job.image).convert("RGB")
            if picture.size != (job.width, job.height):
                picture = picture.resize((job.width, job.height), Image.Resampling.LANCZOS)
            put("image", picture)
        if job.mask is not None:
            put("mask_image", Image.fromarray(job.mask).convert("L").resize(
                (job.width, job.height), Image.Resampling.NEAREST))
        if job.task in ("image2image", "inpaint"):
            put("strength", job.strength)
        if is_video:
            put("num_frames", job.num_frames)
            put("fps", job.fps)
            put("decode_chunk_size", min(job.num_frames, 8))
        for name, value in job.extra.items():
            put(name, value)

        def call(step_reached: Callable[[], None]) -> Any:
            local = dict(kwargs)
            if "callback_on_step_end" in params:

                def on_step_end(
                    _pipe: Any, _i: int, _t: Any, tensors: dict[str, Any]
                ) -> dict[str, Any]:
                    step_reached()
                    return tensors

                local["callback_on_step_end"] = on_step_end
            elif "callback" in params:
                local["callback"] = lambda _i, _t, _latents: step_reached()
                local["callback_steps"] = 1
            with torch.inference_mode():
                result = target(**local)
            frames = getattr(result, "frames", None)
            return frames if frames is not None else result.images

        job.driver = _CallDriver(call, f"diffusion-call-{id(job):x}", self.nice, self.threads)
        job.total_steps = job.steps
        job.key = None

    def _call_step(self, job: DiffusionJob) -> StepDone:
        if job.closed or job.driver is None:
            raise DriverAborted("closed")
        self._use_adapters(job)
        done = job.driver.advance()
        job.index += 1
        return StepDone(job.index, job.total_steps, done)

    @staticmethod
    def _pixels(output: Any) -> npt.NDArray[np.uint8]:
        """Pipeline output (PIL list, float arrays, nested frame lists) → uint8 array."""
        if isinstance(output, list) and output and isinstance(output[0], list):
            output = output[0]  # videos: the first (only) video's frames
        if isinstance(output, list):
            output = np.stack([np.asarray(o) for o in output])
        if hasattr(output, "detach"):
            output = output.detach().float().cpu().numpy()
        array = np.asarray(output)
        if array.ndim == 5:  # (videos, frames, H, W, C)
            array = array[0]
        if array.dtype != np.uint8:
            array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        if array.shape[-1] != 3 and array.shape[1] == 3:
            array = np.moveaxis(array, 1, -1)
        return np.ascontiguousarray(array)


def load_model(pdir: PipelineDir, device: str, options: dict[str, Any]) -> DiffusionModel:
    """Load a pipeline directory onto a device (called in the runner thread)."""
    return DiffusionModel(pdir, device, options)
