"""Example third-party attnplug plugin: `chunked_sdpa`, exact attention over query chunks.

Chunking the queries bounds the score matrix at `chunk × Nk` per head, which lets exact attention
run at sizes where one full SDPA call would not fit. It shows the whole plugin surface: a settings
model contributed as `[plugins.example_backend]`, a backend registered through the typed registrar,
and the entry point `attnplug = {example_backend = "attnplug_example_backend"}` in pyproject.toml.
"""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from attnplug.core import AttentionCall, Backend, Capabilities, Strict, hookimpl
from attnplug.core.exact import sdpa


class ChunkedSettings(Strict):
    """`[plugins.example_backend]`."""

    query_chunk: int = Field(1024, ge=1, description="Queries per SDPA call.")


class ChunkedSdpa(Backend):
    name = "chunked_sdpa"
    capabilities = Capabilities()

    def __init__(self, settings: ChunkedSettings | None = None) -> None:
        self.settings = settings or ChunkedSettings()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        step = self.settings.query_chunk
        parts = []
        for i in range(0, q.shape[2], step):
            m = mask
            if mask is not None and mask.dim() == 4 and mask.shape[2] == q.shape[2]:
                m = mask[:, :, i:i + step]
            parts.append(sdpa(q[:, :, i:i + step], k, v, m))
        return torch.cat(parts, dim=2)


@hookimpl
def attnplug_config_sections() -> dict[str, Any]:
    return {"example_backend": ChunkedSettings}


@hookimpl
def attnplug_register_backends(registrar: Any) -> None:
    def factory(settings: ChunkedSettings | None, session: Any) -> ChunkedSdpa:
        return ChunkedSdpa(settings)

    factory.capabilities = ChunkedSdpa.capabilities  # type: ignore[attr-defined]
    registrar.add("chunked_sdpa", factory, doc="exact attention in query chunks (example third-party plugin)")
