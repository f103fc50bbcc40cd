"""bench-model under diffusers' context parallelism: the process group of a torchrun job, the device of a rank, and
`enable_parallelism` on the transformer before attnplug's `apply` (so that apply's hook sees the whole sequence and
ttr serves the sharded calls; every other call goes through diffusers' own context-parallel attention).

NVLink multicast stays off in every program (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1), set here
before any process group exists.
"""
from __future__ import annotations

import os
from typing import Any

import torch

KINDS = ("ulysses", "ring")
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def multicast_off() -> None:
    """NVLink multicast off for this process (before the first process group)."""
    os.environ.update(MULTICAST_OFF)


def start(device: str | None) -> tuple[torch.device, bool]:
    """The process group of a torchrun job (NCCL on GPUs, gloo on CPUs; reused when one exists) and this rank's
    device; returns `(device, started_here)`."""
    import torch.distributed as dist

    multicast_off()
    started = not dist.is_initialized()
    cuda = torch.cuda.is_available() and device != "cpu"
    if started:
        dist.init_process_group("nccl" if cuda else "gloo")
    if not cuda:
        return torch.device("cpu"), started
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count()))
    torch.cuda.set_device(local)
    return torch.device("cuda", local), started


def stop(started_here: bool) -> None:
    import torch.distributed as dist

    if started_here and dist.is_initialized():
        dist.destroy_process_group()


def rank_world() -> tuple[int, int]:
    """`(rank, world)` of the default group, `(0, 1)` without one."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def enable(model: Any, kind: str, attention_backend: str = "native") -> dict[str, Any]:
    """`model.enable_parallelism` with a `ContextParallelConfig` of `kind` ("ulysses": heads exchanged; "ring": K/V
    passed round) over every rank, diffusers' `attention_backend` for its own calls; returns what the report
    records. Call it before attnplug's `apply`."""
    from diffusers.models._modeling_parallel import ContextParallelConfig

    if kind not in KINDS:
        raise ValueError(f"context parallelism {kind!r}: expected one of {', '.join(KINDS)}")
    _, world = rank_world()
    if next(model.parameters()).device.type == "cpu":
        # diffusers places the mesh on `rank % accelerator count`; a CPU run (the gloo smoke) has none
        torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    model.set_attention_backend(attention_backend)
    model.enable_parallelism(config=ContextParallelConfig(**{f"{kind}_degree": world}))
    return {"kind": kind, "world": world, "attention_backend": attention_backend}
