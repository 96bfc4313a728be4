"""Image and video generation: tiny diffusers pipelines loaded through ``--models-dir``.

The pipelines have random weights (nothing ships real ones), so the tests assert what a
user notices: the right files in the right formats and sizes, the same pixels for the
same seed, shared UNet calls under concurrency, cancellation between steps, LoRA effects,
the OpenAI SDK working against the routes, and clear 400s for bad input.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from PIL import Image

from omnistream.codecs.mp4 import probe
from tests.diffusion_helpers import build_models
from tests.jobs_helpers import sse_events, wait_job
from tests.server import RunningServer, run_server

SIZE = {"width": 64, "height": 64}
FAST = {**SIZE, "num_inference_steps": 2, "seed": 7}


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    paths = build_models(root)
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(root / "photo.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "small_mask.png")
    (root / "notes.png").write_bytes(b"this is not an image")
    import torch
    from safetensors.torch import save_file

    misfit = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    save_file({misfit: torch.zeros(4, 999)}, str(root / "loras" / "misfit.safetensors"))
    paths["root"] = root
    return paths


@pytest.fixture(scope="module")
def srv(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[RunningServer]:
    with run_server(
        models_dir=str(models["root"]),
        artifacts_dir=str(tmp_path_factory.mktemp("artifacts")),
        input_roots=[str(models["root"])],
        max_running_jobs=4,
        diffusion_max_pixels=256 * 256,
    ) as server:
        yield server


@pytest.fixture()
def client(srv: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.http, timeout=120) as c:
        yield c


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _fetch(client: httpx.Client, url: str) -> bytes:
    r = client.get(url)
    assert r.status_code == 200, r.text
    return r.content


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# -- discovery and listing ---------------------------------------------------------------


def test_models_dir_pipelines_are_listed_with_their_tasks(client: httpx.Client) -> None:
    data = client.get("/v1/models").json()["data"]
    tasks = {(m["id"], m["task"]) for m in data if m["available"]}
    assert {
        ("tiny-sdxl", "text2image"),
        ("tiny-sd", "text2image"),
        ("tiny-sd", "image2image"),
        ("tiny-sd", "inpaint"),
        ("tiny-pix2pix", "edit"),
        ("tiny-t2v", "text2video"),
        ("tiny-svd", "image2video"),
    } <= tasks
    assert next(m for m in data if m["id"] == "tiny-sd")["license"] == "apache-2.0"
    broken = [m for m in data if m["id"] == "not-a-pipeline"]
    assert broken and not broken[0]["available"]
    assert "KandinskyV99Pipeline" in broken[0]["reason"]
    missing = [m for m in data if m["id"] == "sdxl-base-1.0"]  # an OmniRT id, no weights here
    assert missing and "looked for" in missing[0]["reason"]


def test_manifest_lists_license_and_tier(models: dict[str, Path]) -> None:
    from omnistream.jobs.cli import manifest
    from omnistream.models.catalog import build_registry
    from omnistream.settings import Settings

    registry = build_registry(Settings(models_dir=str(models["root"])))
    spec = registry.get("tiny-sd")
    assert spec is not None
    entry = manifest(spec)["text2image"]  # a map by task: the model serves three
    assert entry["tier"] == "adjacent" and entry["available"]
    assert entry["capabilities"]["license"] == "apache-2.0"
    assert set(entry["tasks"]) == {"text2image", "image2image", "inpaint"}


# -- every task, sync and async -----------------------------------------------------------


def _task_body(task: str, models: dict[str, Path]) -> dict[str, Any]:
    photo = str(models["root"] / "photo.png")  # a plain path under the input roots (OmniRT)
    bodies: dict[str, dict[str, Any]] = {
        "text2image": {"model": "tiny-sd", "inputs": {"prompt": "a red cat"}},
        "image2image": {
            "model": "tiny-sd",
            "inputs": {"prompt": "a red cat", "image": _b64(models["root"] / "photo.png")},
            "config": {"strength": 0.7, "num_inference_steps": 3},
        },
        "inpaint": {
            "model": "tiny-sd",
            "inputs": {"prompt": "a hat", "image": photo,
                       "mask": {"path": str(models["root"] / "mask.png")}},
        },
        "edit": {"model": "tiny-pix2pix", "inputs": {"prompt": "make it blue", "image": photo}},
        "text2video": {
            "model": "tiny-t2v",
            "inputs": {"prompt": "a dog runs", "num_frames": 4, "fps": 4},
        },
        "image2video": {
            "model": "tiny-svd",
            "inputs": {"image": photo},
            "config": {"num_frames": 3, "fps": 6},
        },
    }
    body = bodies[task]
    return {"task": task, **body, "config": {**FAST, **body.get("config", {})}}


@pytest.mark.parametrize(
    "task", ["text2image", "image2image", "inpaint", "edit", "text2video", "image2video"]
)
def test_every_task_sync_and_async(
    client: httpx.Client, models: dict[str, Path], task: str
) -> None:
    body = _task_body(task, models)
    sync = client.post("/v1/generate", json=body)
    assert sync.status_code == 200, sync.text
    result = sync.json()
    job = client.post("/v1/generate", json=body | {"async_run": True})
    assert job.status_code == 200, job.text
    assert job.json()["backend"] == "auto"  # OmniRT's job parser reads it
    record = wait_job(client, job.json()["id"])
    assert record["state"] == "succeeded", record["error"]
    for outputs in (result["outputs"], record["result"]["outputs"]):
        data = _fetch(client, outputs[0]["url"])
        if task in ("text2video", "image2video"):
            frames = body["inputs"].get("num_frames") or body["config"]["num_frames"]
            assert outputs[0]["mime"] == "video/mp4" and outputs[0]["num_frames"] == frames
            path = Path(outputs[0]["path"])
            video = next(s for s in probe(path) if s.kind == "video")
            assert video.codec == "h264" and (video.width, video.height) == (64, 64)
        else:
            assert outputs[0]["mime"] == "image/png"
            assert _pixels(data).shape == (64, 64, 3)
    report = result["metadata"]
    assert report["backend"] == "auto" and report["task"] == task
    for stage in ("encode_prompt_ms", "denoise_ms", "decode_ms", "export_ms"):
        assert stage in report["timings"]
    assert report["device_placement"]["unet"] == "cpu"
    progress = [e for e in report["stream_events"] if e["event"] == "stage_progress"]
    assert progress and progress[-1]["data"]["done"] == progress[-1]["data"]["total"]
    assert report["memory"]["peak_bytes"] > 0


def test_same_seed_same_pixels_and_n_images(client: httpx.Client) -> None:
    body = {"task": "text2image", "model": "tiny-sd", "inputs": {"prompt": "a lighthouse"},
            "config": {**FAST, "num_images": 2}}
    first = client.post("/v1/generate", json=body).json()["outputs"]
    second = client.post("/v1/generate", json=body).json()["outputs"]
    assert len(first) == len(second) == 2
    a = [_pixels(_fetch(client, o["url"])) for o in first]
    b = [_pixels(_fetch(client, o["url"])) for o in second]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    other = client.post("/v1/generate", json=body | {"config": {**FAST, "seed": 8}}).json()
    assert not np.array_equal(a[0], _pixels(_fetch(client, other["outputs"][0]["url"])))
    euler = client.post("/v1/generate", json=body | {
        "config": {**FAST, "scheduler": "EulerDiscreteScheduler", "output_format": "jpeg"}})
    assert euler.status_code == 200, euler.text
    assert euler.json()["outputs"][0]["mime"] == "image/jpeg"


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
def test_concurrent_requests_share_unet_calls(srv: RunningServer, model: str) -> None:
    body = {"task": "text2image", "model": model, "inputs": {"prompt": "a boat"},
            "config": {**SIZE, "num_inference_steps": 12}}
    results: list[dict[str, Any]] = []

    def one(seed: int) -> None:
        with httpx.Client(base_url=srv.http, timeout=120) as c:
            r = c.post("/v1/generate", json=body | {"config": {**body["config"], "seed": seed}})
            assert r.status_code == 200, r.text
            results.append(r.json())

    threads = [threading.Thread(target=one, args=(s,)) for s in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 3
    assert max(r["metadata"]["batch_size"] for r in results) >= 2
    info = srv.state.engine.runtime(model)[0]
    assert info["largest_step_batch_rows"] >= 4  # two requests x (uncond + cond)


def test_steps_reproduce_diffusers_and_sharing_a_call_changes_nothing(
    models: dict[str, Path],
) -> None:
    torch = pytest.importorskip("torch")
    from diffusers import StableDiffusionPipeline

    from omnistream.models.diffusion.discovery import inspect_dir
    from omnistream.models.diffusion.items import DiffusionJob, FinishItem, StartItem, StepItem
    from omnistream.models.diffusion.pipeline import DiffusionModel

    model = DiffusionModel(inspect_dir("tiny-sd", models["tiny-sd"]), "cpu", {"nice": 0})

    def job(prompt: str, seed: int) -> DiffusionJob:
        return DiffusionJob(task="text2image", prompt=prompt, negative_prompt=None, width=64,
                            height=64, steps=4, guidance_scale=7.5, seed=seed)

    alone, other = job("a cat", 1), job("a dog", 2)
    model.run_batch([StartItem(alone)])
    for _ in range(4):
        model.run_batch([StepItem(alone)])
    mine = model.run_batch([FinishItem(alone)])[0][0]
    pipe = StableDiffusionPipeline.from_pretrained(str(models["tiny-sd"]), local_files_only=True)
    reference = pipe("a cat", width=64, height=64, num_inference_steps=4, guidance_scale=7.5,
                     generator=torch.Generator().manual_seed(1), output_type="np").images[0]
    assert np.abs(mine.astype(float) - np.round(reference * 255)).max() <= 1
    shared = job("a cat", 1)  # the same request, sharing calls with one a step behind
    model.run_batch([StartItem(shared)])
    model.run_batch([StartItem(other)])
    model.run_batch([StepItem(shared)])
    for _ in range(3):
        model.run_batch([StepItem(shared), StepItem(other)])
    together = model.run_batch([FinishItem(shared)])[0][0]
    assert np.abs(together.astype(int) - mine.astype(int)).max() <= 1  # bit-equal here


def test_running_job_is_cancelled_between_steps(client: httpx.Client) -> None:
    body = {"task": "text2image", "model": "tiny-sd", "inputs": {"prompt": "slow"},
            "config": {**SIZE, "num_inference_steps": 100, "seed": 1}, "async_run": True}
    job_id = client.post("/v1/generate", json=body).json()["id"]
    for name, event in sse_events(client, f"/v1/jobs/{job_id}/events", timeout=60):
        if name == "stage_progress":
            assert event["data"]["total"] == 100
            break
    cancelled = client.delete(f"/v1/jobs/{job_id}")
    assert cancelled.status_code == 200
    record = wait_job(client, job_id)
    assert record["state"] == "cancelled"
    done = [e["data"]["done"] for e in record["events"] if e["event"] == "stage_progress"]
    assert done and max(done) < 100
    assert record["result"] is None


def test_cancelled_video_job_stops_its_pipeline_between_steps(client: httpx.Client) -> None:
    body = {"task": "text2video", "model": "tiny-t2v", "inputs": {"prompt": "slow"},
            "config": {**SIZE, "num_inference_steps": 60, "num_frames": 2, "seed": 1},
            "async_run": True}
    job_id = client.post("/v1/generate", json=body).json()["id"]
    for name, _event in sse_events(client, f"/v1/jobs/{job_id}/events", timeout=60):
        if name == "stage_progress":
            break
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 200
    record = wait_job(client, job_id)
    assert record["state"] == "cancelled"
    deadline = time.monotonic() + 10
    while any(t.name.startswith("diffusion-call-") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the pipeline's __call__ kept running"
        time.sleep(0.05)


def test_lora_changes_the_image_and_is_cached(
    client: httpx.Client, models: dict[str, Path]
) -> None:
    base = {"task": "text2image", "model": "tiny-sd", "inputs": {"prompt": "a tree"},
            "config": FAST}
    plain = client.post("/v1/generate", json=base).json()
    lora = [{"path": str(models["lora"]), "scale": 1.0}]
    styled = client.post("/v1/generate", json=base | {"adapters": lora})
    assert styled.status_code == 200, styled.text
    again = client.post("/v1/generate", json=base | {"adapters": lora}).json()
    a, b, c = (
        _pixels(_fetch(client, r["outputs"][0]["url"])) for r in (plain, styled.json(), again)
    )
    assert not np.array_equal(a, b) and np.array_equal(b, c)
    assert "lora:style.safetensors" in again["metadata"]["cache_hits"]
    back = client.post("/v1/generate", json=base).json()  # adapters off again
    assert np.array_equal(a, _pixels(_fetch(client, back["outputs"][0]["url"])))


def test_job_finished_event_carries_output_urls(client: httpx.Client) -> None:
    body = {"task": "text2image", "model": "tiny-sd", "inputs": {"prompt": "x"},
            "config": FAST, "async_run": True}
    job_id = client.post("/v1/generate", json=body).json()["id"]
    finished = [e for n, e in sse_events(client, f"/v1/jobs/{job_id}/events", timeout=60)
                if n == "job_finished"]
    assert finished and finished[0]["data"]["urls"][0].startswith("/v1/files/")


# -- OpenAI SDK ------------------------------------------------------------------------------


def test_openai_sdk_images_generate_and_edit(srv: RunningServer, models: dict[str, Path]) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{srv.http}/v1", api_key="unused")
    made = client.images.generate(
        model="tiny-sd", prompt="a fox", n=2, size="64x64", response_format="b64_json",
        extra_body={"seed": 3, "num_inference_steps": 2},
    )
    assert made.data and len(made.data) == 2
    assert all(_pixels(base64.b64decode(d.b64_json or "")).shape == (64, 64, 3)
               for d in made.data)
    by_url = client.images.generate(model="tiny-sd", prompt="a fox", size="64x64",
                                    extra_body={"num_inference_steps": 2})
    assert by_url.data and (by_url.data[0].url or "").startswith(srv.http)
    with open(models["root"] / "photo.png", "rb") as image, \
            open(models["root"] / "mask.png", "rb") as mask:
        edited = client.images.edit(
            model="tiny-sd", image=image, mask=mask, prompt="a hat", size="64x64",
            response_format="b64_json", extra_body={"num_inference_steps": 2},
        )
    assert edited.data and _pixels(base64.b64decode(edited.data[0].b64_json or "")).shape[2] == 3
    with open(models["root"] / "photo.png", "rb") as image:
        instructed = client.images.edit(model="tiny-pix2pix", image=image, prompt="make it red",
                                        extra_body={"num_inference_steps": 2})
    assert instructed.data and instructed.data[0].url


def test_openai_sdk_video_jobs(srv: RunningServer) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{srv.http}/v1", api_key="unused")
    if not hasattr(client, "videos"):
        pytest.skip("this openai SDK has no videos API")
    video = client.videos.create(
        model="tiny-t2v", prompt="waves", size="64x64", seconds="1",
        extra_body={"num_inference_steps": 2, "fps": 4},
    )
    assert video.status in ("queued", "in_progress")
    deadline = time.monotonic() + 60
    while video.status not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
        video = client.videos.retrieve(video.id)
    assert video.status == "completed", video.error
    assert video.progress == 100 and video.size == "64x64"
    content = client.videos.download_content(video.id).read()
    assert content[4:8] == b"ftyp"
    deleted = client.videos.delete(video.id)
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve("job_nope")


def test_omnirt_video_route_sync(client: httpx.Client) -> None:
    r = client.post("/v1/videos/generations", json={
        "model": "tiny-t2v", "prompt": "rain", "size": "64x64", "num_frames": 2,
        "num_inference_steps": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["data"][0]["num_frames"] == 2 and body["data"][0]["url"].startswith("http")
    assert body["metadata"]["task"] == "text2video"


# -- a live session beside a job ---------------------------------------------------------


async def test_live_avatar_session_loses_no_chunk_while_an_image_renders(
    srv: RunningServer,
) -> None:
    from omnistream.codecs.framing import decode_video
    from tests.avatar_client import connect, flashtalk_init, speech_like

    slice_len = 12
    async with httpx.AsyncClient(base_url=srv.http, timeout=120) as client:
        ws = await connect(f"{srv.ws}/v1/audio2video/flashtalk")
        init = await flashtalk_init(ws, width=256, height=320, fps=25, slice_len=slice_len,
                                    frame_num=slice_len + 1)
        assert init["type"] == "init_ok", init
        samples = int(init["chunk_samples"])
        job = await client.post("/v1/generate", json={
            "task": "text2image", "model": "tiny-sd", "inputs": {"prompt": "busy"},
            "config": {**SIZE, "num_inference_steps": 60, "seed": 1}, "async_run": True})
        job_id = job.json()["id"]
        frames = []
        started = time.monotonic()
        for index in range(6):
            await asyncio.sleep(max(0.0, started + index * samples / 16000 - time.monotonic()))
            await ws.send(b"AUDI" + speech_like(samples, seed=index))
            reply = await asyncio.wait_for(ws.recv(), 30)
            assert isinstance(reply, bytes), reply
            frames.append(len(decode_video(reply)))
        record = (await client.get(f"/v1/jobs/{job_id}")).json()
        await ws.send(json.dumps({"type": "close"}))
        await ws.close()
        assert frames == [slice_len] * 6
        assert record["state"] in ("running", "succeeded"), record["error"]
        await client.delete(f"/v1/jobs/{job_id}")


# -- bad input ------------------------------------------------------------------------------


def _bad_generate(models: dict[str, Path]) -> list[tuple[dict[str, Any], str]]:
    root = models["root"]
    t2i = {"task": "text2image", "model": "tiny-sd", "inputs": {"prompt": "a cat"}}
    small_mask, not_image = root / "small_mask.png", root / "notes.png"
    inpaint = {"task": "inpaint", "model": "tiny-sd",
               "inputs": {"prompt": "x", "image": {"path": str(root / "photo.png")}}}
    return [
        (t2i | {"inputs": {"prompt": "x" * 5000}}, "prompt_too_long"),
        (t2i | {"config": {"width": 60, "height": 64}}, "invalid_size"),
        (t2i | {"config": {"width": 512, "height": 512}}, "invalid_size"),
        (t2i | {"config": {"num_inference_steps": 1000}}, "invalid_config"),
        (t2i | {"config": {"num_images": 50}}, "invalid_config"),
        (t2i | {"config": {"scheduler": "NoSuchScheduler"}}, "invalid_config"),
        (t2i | {"config": {"preset": "ultra"}}, "invalid_config"),
        (t2i | {"config": {"dtype": "float16"}}, "invalid_config"),  # runs in fp32 on CPU
        (inpaint | {"inputs": {**inpaint["inputs"], "mask": {"path": str(small_mask)}}},
         "invalid_mask"),
        (inpaint | {"inputs": {**inpaint["inputs"], "mask": {"path": str(not_image)}}},
         "invalid_image"),
        (t2i | {"adapters": [{"path": "/etc/passwd"}]}, "invalid_adapter"),
        (t2i | {"adapters": [{"path": str(models["not_lora"])}]}, "invalid_adapter"),
        (t2i | {"adapters": [{"path": str(root / "photo.png")}]}, "invalid_adapter"),
        (t2i | {"adapters": [{"path": str(root / "loras" / "misfit.safetensors")}]},
         "invalid_adapter"),
        ({"task": "edit", "model": "tiny-sd", "inputs": {"prompt": "x"}}, "model_not_found"),
        (t2i | {"model": "not-a-pipeline"}, "model_unavailable"),
        (t2i | {"backend": "ascend"}, "backend_not_available"),
        ({"task": "image2image", "model": "tiny-sd", "inputs": {"prompt": "x"}}, "missing_input"),
    ]


def test_bad_generate_input_is_a_400_that_says_what_to_change(
    client: httpx.Client, models: dict[str, Path], srv: RunningServer
) -> None:
    artifacts = Path(srv.settings.artifacts_dir)
    before = sorted(artifacts.glob("*")) if artifacts.exists() else []
    for body, code in _bad_generate(models):
        r = client.post("/v1/generate", json=body)
        assert r.status_code == 400, (code, r.text)
        error = r.json()["error"]
        assert error["code"] == code and error["message"], (code, error)
    assert (sorted(artifacts.glob("*")) if artifacts.exists() else []) == before


def test_bad_openai_input_is_a_400_in_openai_shape(
    client: httpx.Client, models: dict[str, Path]
) -> None:
    cases: list[tuple[str, dict[str, Any]]] = [
        ("/v1/images/generations", {"model": "tiny-sd", "prompt": "x" * 5000}),
        ("/v1/images/generations", {"model": "tiny-sd", "prompt": "x", "size": "60x64"}),
        ("/v1/images/generations", {"model": "tiny-sd", "prompt": "x", "size": "big"}),
        ("/v1/images/generations", {"model": "tiny-sd", "prompt": "x", "size": "4096x4096"}),
        ("/v1/images/generations", {"model": "tiny-sd", "prompt": "x", "n": 99}),
        ("/v1/images/generations", {"model": "tiny-sd", "prompt": "x", "steps": 9999}),
        ("/v1/images/generations", {"model": "tiny-sd", "prompt": "x",
                                    "adapters": [{"path": "/etc/passwd"}]}),
        ("/v1/images/generations", {"model": "tiny-t2v", "prompt": "x"}),
        ("/v1/images/generations", {"model": "not-a-pipeline", "prompt": "x"}),
        ("/v1/images/generations", {"model": "tiny-sd", "prompt": "x", "response_format": "gif"}),
        ("/v1/videos", {"model": "tiny-sd", "prompt": "x"}),
        ("/v1/videos/generations", {"model": "tiny-t2v", "prompt": "x", "num_frames": 100000}),
    ]
    for path, body in cases:
        r = client.post(path, json=body)
        assert r.status_code == 400, (path, body, r.text)
        error = r.json()["error"]
        assert {"message", "type", "code"} <= set(error) and error["message"], error
    root = models["root"]
    files = {"image": ("notes.png", (root / "notes.png").read_bytes(), "image/png")}
    r = client.post("/v1/images/edits", data={"model": "tiny-sd", "prompt": "x"}, files=files)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image", r.text
    files = {
        "image": ("photo.png", (root / "photo.png").read_bytes(), "image/png"),
        "mask": ("m.png", (root / "small_mask.png").read_bytes(), "image/png"),
    }
    r = client.post("/v1/images/edits", data={"model": "tiny-sd", "prompt": "x"}, files=files)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_mask", r.text


def test_other_tiers_are_403_on_the_openai_routes(models: dict[str, Path]) -> None:
    with run_server(models_dir=str(models["root"]), model_tiers=["core"]) as server, \
            httpx.Client(base_url=server.http, timeout=30) as client:
        r = client.post("/v1/images/generations", json={"model": "tiny-sd", "prompt": "x"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "model_tier_forbidden"
        r = client.post("/v1/videos", json={"model": "tiny-t2v", "prompt": "x"})
        assert r.status_code == 403, r.text
        assert all(m["id"] != "tiny-sd" for m in client.get("/v1/models").json()["data"])


# -- settings, precision --------------------------------------------------------------------


def test_models_dir_takes_a_path_or_a_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    from omnistream.cli import build_parser
    from omnistream.models.diffusion.discovery import parse_models_dirs
    from omnistream.settings import Settings

    monkeypatch.setenv("OMNISTREAM_MODELS_DIR", "/models/a")
    assert parse_models_dirs(Settings().models_dir) == ["/models/a"]
    monkeypatch.setenv("OMNISTREAM_MODELS_DIR", '["/models/a", "/models/b"]')
    assert parse_models_dirs(Settings().models_dir) == ["/models/a", "/models/b"]
    args = build_parser().parse_args(["serve", "--models-dir", "/x", "--models-dir", "/y"])
    assert args.models_dir == ["/x", "/y"]


def test_precision_is_fp32_on_cpu_and_half_on_gpu(models: dict[str, Path]) -> None:
    torch = pytest.importorskip("torch")
    from omnistream.models.diffusion.discovery import inspect_dir
    from omnistream.models.diffusion.items import DiffusionJob, FinishItem, StartItem, StepItem
    from omnistream.models.diffusion.pipeline import DiffusionModel, pick_dtype

    assert pick_dtype("cpu", None) == torch.float32
    if not torch.cuda.is_available():
        pytest.skip("bf16/fp16 and VAE tiling need a CUDA device")
    model = DiffusionModel(inspect_dir("tiny-sd", models["tiny-sd"]), "cuda", {})
    info = model.info()
    assert info["dtype"] in ("bfloat16", "float16") and info["vae_tiling"]
    job = DiffusionJob(task="text2image", prompt="a cat", negative_prompt=None, width=64,
                       height=64, steps=2, guidance_scale=7.5, seed=1)
    model.run_batch([StartItem(job)])
    model.run_batch([StepItem(job)])
    model.run_batch([StepItem(job)])
    pixels = model.run_batch([FinishItem(job)])[0]
    assert pixels.shape == (1, 64, 64, 3)
    assert model.info()["peak_device_bytes"] > 0
