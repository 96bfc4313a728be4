"""Runtime Profiles (OmniRT's format) and the Model Capability Manifest.

A Runtime Profile describes a service composition as data: which models run, on which
backend, behind which service adapter and port, with what warmup, concurrency and
fallback. ``omnistream profile validate`` checks one against this server's registry;
``omnistream serve --profile`` starts the composition it describes in one process.
"""

from omnistream.profiles.schema import (
    BACKENDS,
    SERVICE_ADAPTERS,
    Finding,
    ModelPlan,
    ProfileModel,
    RuntimeProfile,
    check_profile,
    load_profile,
    plan_model,
)

__all__ = [
    "BACKENDS",
    "SERVICE_ADAPTERS",
    "Finding",
    "ModelPlan",
    "ProfileModel",
    "RuntimeProfile",
    "check_profile",
    "load_profile",
    "plan_model",
]
