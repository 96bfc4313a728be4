"""Loading a user's Wav2Lip checkpoint safely and strictly.

Published Wav2Lip weights are non-commercial, so omnistream ships none: the server loads
whatever file an operator points it at. That file is untrusted input, so it is read only
with ``torch.load(weights_only=True)`` (tensors and plain containers, never pickled code)
and must match one of the committed layouts exactly; anything else is refused with a
message that names the problem instead of a stack trace from deep inside torch.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from omnistream.models.wav2lip.network import LAYOUTS, Wav2Lip, build, state_manifest

#: BatchNorm counters: older exports lack them and inference never reads them.
OPTIONAL_SUFFIX = "num_batches_tracked"
_LIST_LIMIT = 8


class CheckpointError(ValueError):
    """The checkpoint cannot be used; the message says why in user terms."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``name -> tensor`` dict on the CPU.

    Accepts a bare state dict or a training checkpoint with a ``state_dict`` entry, with
    or without the ``module.`` prefix that ``DataParallel`` adds.

    Raises:
        CheckpointError: the file is missing, pickles code or objects other than tensors,
            or is not a state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    with path.open("rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (PK..) or, in the legacy format, a pickle (0x80).
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CheckpointError(
            f"checkpoint {path} is not a PyTorch checkpoint (torch.save writes a zip archive "
            f"or a pickle; this file starts with {head!r})"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = _unpickling_reason(exc)
        raise CheckpointError(
            f"checkpoint {path} was refused: it pickles code or objects other than tensors, "
            f"and omnistream only loads weights ({first})"
        ) from None
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} could not be read as a PyTorch file: {type(exc).__name__}: {exc}"
        ) from None
    return _as_state_dict(obj, path)


def _unpickling_reason(exc: Exception) -> str:
    """The line of torch's refusal that names what the file pickles.

    torch's message opens with advice to retry with ``weights_only=False``, which is
    exactly what a server must not do with a file it was handed; the useful part is the
    unsupported global it found.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "WeightsUnpickler error" in line:
            return line[:300]
    return lines[0][:300] if lines else type(exc).__name__


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint {path} is not a state dict: it holds a {type(obj).__name__}, "
            "expected a dict of tensor names to tensors (or a dict with a 'state_dict' key)"
        )
    if not obj:
        raise CheckpointError(f"checkpoint {path} is not a state dict: it is an empty dict")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"checkpoint {path} is not a state dict: entry {key!r} holds a "
                f"{type(value).__name__}, not a tensor"
            )
        out[key.removeprefix("module.")] = value
    return out


def detect_variant(state: Mapping[str, torch.Tensor]) -> str | None:
    """Which layout the keys and shapes describe: ``"96"``, ``"256"``, ``"384"`` or None.

    The face encoder's stage count separates 96 (7) from the rest (8); 256 and 384 have
    the same count, and only 384 carries the spatial-attention gate (``sam.*``).
    """
    stages = {
        int(m.group(1))
        for key in state
        if (m := re.match(r"face_encoder_blocks\.(\d+)\.", key)) is not None
    }
    if not stages:
        return None
    attention = any(key.startswith("sam.") for key in state)
    matches = [name for name, layout in LAYOUTS.items()
               if len(layout.face_encoder) == max(stages) + 1]
    return next((name for name in matches
                 if LAYOUTS[name].spatial_attention == attention),
                matches[0] if matches else None)


#: Layouts each registry variant (crop size) accepts. The spatial-attention generator is
#: fully convolutional and circulates trained on 256 crops too (LiveTalking's
#: ``wav2lip256``), so ``wav2lip-256`` takes either the v2 layout or that one.
ACCEPTED_LAYOUTS: dict[str, tuple[str, ...]] = {
    "96": ("96",),
    "256": ("256", "384"),
    "384": ("384",),
}


def _preview(names: list[str]) -> str:
    shown = ", ".join(names[:_LIST_LIMIT])
    more = len(names) - _LIST_LIMIT
    return shown + (f" … and {more} more" if more > 0 else "")


def check_layout(state: Mapping[str, torch.Tensor], variant: str, source: str) -> None:
    """Compare a state dict with a variant's layout; raise with the differences.

    Raises:
        CheckpointError: missing keys, extra keys or shape mismatches, each listed.
    """
    expected = state_manifest(variant)
    missing = [k for k in expected if k not in state and not k.endswith(OPTIONAL_SUFFIX)]
    extra = [k for k in state if k not in expected]
    shapes = [
        f"{k} {list(state[k].shape)} (expected {expected[k]})"
        for k in expected
        if k in state and list(state[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_preview(missing)}")
    if extra:
        problems.append(f"{len(extra)} unexpected key(s): {_preview(extra)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_preview(shapes)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {source} does not match the wav2lip-{variant} layout: "
            + "; ".join(problems)
        )


def layout_for(state: Mapping[str, torch.Tensor], variant: str | None, source: str) -> str:
    """The layout a state dict holds, checked against what ``variant`` accepts.

    Raises:
        CheckpointError: no known layout, one ``variant`` does not accept, or keys and
            shapes that differ from the layout.
    """
    detected = detect_variant(state)
    if detected is None:
        raise CheckpointError(
            f"checkpoint {source} is not a Wav2Lip generator: no face_encoder_blocks.* keys "
            f"with a known stage count (first keys: {_preview(list(state))})"
        )
    if variant is not None and detected not in ACCEPTED_LAYOUTS.get(variant, (variant,)):
        raise CheckpointError(
            f"checkpoint {source} is a wav2lip-{detected} checkpoint, but wav2lip-{variant} "
            "was asked for"
        )
    check_layout(state, detected, source)
    return detected


def load_generator(
    path: str | Path, variant: str | None = None, *, fold: bool = True
) -> Wav2Lip:
    """Load a checkpoint into a generator on the CPU, strictly, BatchNorm folded.

    Args:
        path: the checkpoint file.
        variant: the crop size the caller serves (``"96"``…); the checkpoint's layout
            must be one :data:`ACCEPTED_LAYOUTS` lists for it. None accepts any layout.
        fold: fold BatchNorm into the convolutions (inference); off for manifests/tests.

    Raises:
        CheckpointError: unreadable, unsafe, not a state dict, another variant than
            asked for, or keys/shapes that do not match the layout.
    """
    state = read_state_dict(path)
    detected = layout_for(state, variant, str(path))
    model = build(detected, "cpu")
    for key, tensor in model.state_dict().items():
        if key.endswith(OPTIONAL_SUFFIX) and key not in state:
            state[key] = torch.zeros_like(tensor)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # pragma: no cover - check_layout catches these first
        raise CheckpointError(f"checkpoint {path} failed to load strictly: {exc}") from None
    model.eval()
    if fold:
        model.fold_batchnorm()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def save_random_checkpoint(path: str | Path, variant: str, *, seed: int = 0,
                           wrap: bool = True) -> Path:
    """Write a random-weight checkpoint in the published layout (tests, benchmarks).

    BatchNorm statistics are randomised too so that folding is actually exercised;
    ``wrap`` stores it the way training scripts do: ``{"state_dict": {"module.…"}}``.
    """
    torch.manual_seed(seed)
    model = build(variant, "cpu")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    state = model.state_dict()
    payload: dict[str, Any]
    if wrap:
        payload = {"state_dict": {f"module.{k}": v for k, v in state.items()},
                   "global_step": 0}
    else:
        payload = dict(state)
    path = Path(path)
    torch.save(payload, path)
    return path
