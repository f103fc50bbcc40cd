"""Stand-in of `comfy/model_management.py`: `free_memory`, `get_free_memory`, `get_torch_device`.

`free_memory` has upstream's current signature; it records its calls in `FREE_MEMORY_CALLS` instead
of unloading models.
"""
from __future__ import annotations

import torch

FREE_MEMORY_CALLS: list[tuple[int, torch.device]] = []


def get_torch_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def free_memory(memory_required, device, keep_loaded=[], for_dynamic=False, pins_required=0,  # noqa: B006
                ram_required=0) -> list:
    FREE_MEMORY_CALLS.append((int(memory_required), device))
    return []


def get_free_memory(dev=None, torch_free_too=False):  # noqa: ANN001
    free = 8 * 1024 ** 3
    return (free, free) if torch_free_too else free


def soft_empty_cache(force: bool = False) -> None:
    return None
