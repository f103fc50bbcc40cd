"""The distiller protocol: trains learned backends from the exact path's output while sampling."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from .call import AttentionCall

if TYPE_CHECKING:
    from .session import RunInfo


@runtime_checkable
class Distiller(Protocol):
    """Called by the session; never by hosts directly.

    `wants(call)` is cheap and decides whether this call trains (e.g. the layer is in this step's
    randomized training set); when it does, the session computes the exact (teacher) output and
    hands it to `observe`. `run_end` flushes per-run accumulators exactly once per sampling run.
    """

    name: str

    def wants(self, call: AttentionCall) -> bool: ...

    def observe(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                teacher: torch.Tensor, mask: torch.Tensor | None) -> None: ...

    def step_start(self, step_index: int | None, sigma: float | None) -> None: ...

    def run_start(self, run: "RunInfo") -> None: ...

    def run_end(self, run: "RunInfo") -> None: ...

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None: ...
