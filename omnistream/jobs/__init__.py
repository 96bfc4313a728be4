"""Offline generation: requests, jobs, one-shot sessions, tasks, artifacts and the CLI.

An offline task is a one-shot session on the same scheduler as live sessions; see
:mod:`omnistream.jobs.runtime` for how its steps yield to realtime work.
"""

from omnistream.jobs.schemas import (
    RUN_REPORT_SCHEMA_VERSION,
    TASKS,
    Artifact,
    GenerateRequest,
    GenerateResult,
    JobRecord,
    RunReport,
)

__all__ = [
    "RUN_REPORT_SCHEMA_VERSION",
    "TASKS",
    "Artifact",
    "GenerateRequest",
    "GenerateResult",
    "JobRecord",
    "RunReport",
]
