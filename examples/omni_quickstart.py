"""The hosted task API's quickstart in Python: list models, create a text task, create a
file task and upload its file, poll until done, download the outputs.

Usage:
    export OMNI_API_KEY=...  OMNI_API_BASE=http://127.0.0.1:8000
    python examples/omni_quickstart.py --out outputs/                      # a text task
    python examples/omni_quickstart.py --image input.png --out outputs/    # and an edit

The text task is ``text_to_image`` when the server has an image pipeline, else
``text_to_speech``; the file task is ``single_image_edit`` of ``--image``.
"""

from __future__ import annotations

import argparse
import mimetypes
import os
import pathlib
import sys
import time
from typing import Any

import httpx

#: Where the standard table has no (or an odd) answer.
SUFFIXES = {"audio/wav": ".wav", "image/jpeg": ".jpg", "application/json": ".json"}


def poll(client: httpx.Client, task_id: str, timeout_s: float) -> dict[str, Any]:
    """Step 5: ask until the task has ended, printing its queue position on the way."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = client.get(f"/api/omni/tasks/{task_id}")
        r.raise_for_status()
        task: dict[str, Any] = r.json()
        if task["status"] in ("succeeded", "failed", "cancelled"):
            return task
        if task.get("queue"):
            print(f"  {task_id}: queued, position {task['queue']['position']}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{task_id} is still {task['status']}")
        time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=os.environ.get("OMNI_API_BASE", "http://127.0.0.1:8000"))
    parser.add_argument("--key", default=os.environ.get("OMNI_API_KEY", ""))
    parser.add_argument("--prompt", default="a clean studio product photo")
    parser.add_argument("--image", type=pathlib.Path, help="a picture to edit (PNG/JPEG/WebP)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("outputs"))
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    with httpx.Client(base_url=args.base, headers=headers, timeout=60) as client:
        # 2. List models: which groups and task types this server has.
        groups = client.get("/api/omni/models").json()["model_groups"]
        group_of: dict[str, str] = {}  # task type -> the first group offering it
        for group in groups:
            print(group["model_group"], [t["task_type"] for t in group["task_types"]])
            for task_type in group["task_types"]:
                group_of.setdefault(task_type["task_type"], group["model_group"])
        # 3. A text task.
        if "text_to_image" in group_of:
            body = {"model_group": group_of["text_to_image"], "task_type": "text_to_image",
                    "input": {"prompt": args.prompt}}
        elif "text_to_speech" in group_of:
            body = {"model_group": group_of["text_to_speech"], "task_type": "text_to_speech",
                    "input": {"text": "Hello from the task API."}}
        else:
            print("the server offers neither text_to_image nor text_to_speech", file=sys.stderr)
            return 1
        r = client.post("/api/omni/tasks/create", json=body)
        if r.status_code != 200:
            print(r.json()["error"], file=sys.stderr)
            return 1
        task_ids = [r.json()["portal_task_id"]]
        # 4. A file task: request an upload slot, PUT the file to it (no key needed).
        if args.image is not None:
            if "single_image_edit" not in group_of:
                print("the server offers no single_image_edit", file=sys.stderr)
                return 1
            content_type = mimetypes.guess_type(args.image.name)[0] or "image/png"
            r = client.post("/api/omni/tasks/create", json={
                "model_group": group_of["single_image_edit"], "task_type": "single_image_edit",
                "input": {"prompt": "make the product photo cleaner"},
                "files_to_upload": [{"field": "source_image", "filename": args.image.name,
                                     "content_type": content_type}],
            })
            if r.status_code != 200:
                print(r.json()["error"], file=sys.stderr)
                return 1
            slot = r.json()["uploads"][0]
            httpx.put(slot["upload_url"], content=args.image.read_bytes(),
                      headers=slot["headers"], timeout=120).raise_for_status()
            task_ids.append(r.json()["portal_task_id"])
        # 5. Poll, then fetch each output through its signed URL.
        args.out.mkdir(parents=True, exist_ok=True)
        failed = False
        for task_id in task_ids:
            task = poll(client, task_id, args.timeout)
            if task["status"] != "succeeded":
                print(f"{task_id}: {task['status']} {task['error']}", file=sys.stderr)
                failed = True
                continue
            for index, output in enumerate(task["outputs"]):
                mime = output["mime"].split(";")[0]
                suffix = SUFFIXES.get(mime) or mimetypes.guess_extension(mime) or ".bin"
                path = args.out / f"{task_id}-{index}{suffix}"
                path.write_bytes(httpx.get(output["url"], timeout=120).content)
                print(f"{task_id}: {output['kind']} -> {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
