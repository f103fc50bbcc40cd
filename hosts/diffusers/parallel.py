"""diffusers' context parallelism as a `core.shard.SequenceShard`: which tokens a processor's call holds.

`transformer.enable_parallelism(config=ContextParallelConfig(ring_degree=... or ulysses_degree=...))` splits the
transformer's inputs along the sequence before the blocks run (Flux's `_cp_plan`: `hidden_states` and
`encoder_hidden_states` each split over the flattened ring × ulysses mesh, `torch.chunk` — which needs the length
divisible by the ranks — or `tensor_split` with `ulysses_anything` / `ring_anything`); every block then sees on rank r
its slice of the text tokens followed by its slice of the image rows, and its attention kernel exchanges K/V (ring) or
heads (Ulysses). The layout is the same for both, so the shard is one description for either.

The whole sequence's counts come from the transformer's arguments (`StepState`: the text length and the latent
grid), which the attnplug hook sees before the split when `apply` runs after `enable_parallelism` (the hook
registered last runs first). A call whose counts do not match that layout is passed to the host, with the reason.
"""
from __future__ import annotations

from typing import Any

from ...core.shard import SequenceShard


def context_shard(parallel_config: Any, n_txt: int | None, grid: tuple[int, int] | None, n_tokens: int,
                  n_txt_arg: int | None) -> SequenceShard | str:
    """The shard of a call with `n_tokens` local tokens (`n_txt_arg`: the local text tokens the processor got, when
    it got them separately), or the reason none can be described."""
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None:
        return "tensor parallelism (the processor sees a subset of the heads; only the host kernel is distributed)"
    mesh = getattr(cp, "_flattened_mesh", None)
    if mesh is None:
        return "context parallelism that is not set up (no mesh)"
    import torch.distributed as dist

    group = mesh.get_group()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if grid is None:
        return "context parallelism without a latent grid (the transformer's image ids were not seen)"
    n_cond = n_txt or 0
    shard = SequenceShard.split(n_cond, grid[0] * grid[1], rank, world, group=group)
    local_txt = shard.cond_sizes[rank]
    if shard.n_local != n_tokens or (n_txt_arg is not None and n_txt_arg != local_txt):
        return (f"context parallelism: rank {rank} of {world} got {n_tokens} tokens, the layout of {n_cond} text + "
                f"{shard.n_image} image tokens gives {local_txt} + {shard.image_sizes[rank]} (call "
                "enable_parallelism before attnplug's apply, so that apply's hook sees the whole sequence)")
    return shard
