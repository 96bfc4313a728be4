"""The hosted task API (Omni API shape) over the job engine.

``GET /api/omni/models`` lists model groups with the JSON Schema of each task type's
input and output; ``POST /api/omni/tasks/create`` queues a task, or hands back signed
upload slots for its files; ``PUT {upload_url}`` fills a slot without a key;
``GET /api/omni/tasks/{id}`` reports status, queue position, progress and signed output
URLs. Modules: :mod:`catalog` (groups, task types, schemas), :mod:`tasks` (task records
on the job engine), :mod:`signing` (HMAC-signed expiring URLs), :mod:`uploads` (slot
checks and spooling), :mod:`routes` (the HTTP surface).
"""

from omnistream.omni_api.catalog import DEFAULT_GROUPS, TASK_TYPES, GroupsFileError, load_groups

__all__ = ["DEFAULT_GROUPS", "TASK_TYPES", "GroupsFileError", "load_groups"]
