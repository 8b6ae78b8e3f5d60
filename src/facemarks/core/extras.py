"""The optional extras behind one door: ``dlib`` (the ``peers`` extra: dlib's HOG/CNN detectors and 68-point
predictor) and ``onnxruntime`` (a core dependency, imported on first use so that importing the library stays light).

These are the only imports of the library made on first use instead of at the top of a module: every ``facemarks``
module is imported at module level (``tests/test_dvc_deps.py``), and a third-party package that may be absent or is
slow to load is reached through :func:`optional`. Each helper raises :class:`ImportError` when the package is absent.
"""
from __future__ import annotations

import importlib
from types import ModuleType


def optional(name: str) -> ModuleType:
    """The module ``name`` (``"dlib"``, ``"onnxruntime"``, ``"onnxruntime.quantization"``), imported on first use;
    :class:`ImportError` when it is not installed."""
    return importlib.import_module(name)


def dlib() -> ModuleType:
    """``import dlib`` (the ``peers`` extra)."""
    return optional("dlib")


def dlib_available() -> bool:
    """True when ``import dlib`` works."""
    try:
        dlib()
    except ImportError:
        return False
    return True


def onnxruntime() -> ModuleType:
    """``import onnxruntime``."""
    return optional("onnxruntime")


__all__ = ["optional", "dlib", "dlib_available", "onnxruntime"]
