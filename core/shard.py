"""Sequence parallelism: which tokens of one attention call this process holds, and the few collectives a
sharded backend needs (`torch.distributed`; NCCL on GPUs, gloo on CPUs).

A host that shards the token sequence over ranks (diffusers' context parallelism: every rank holds a contiguous
slice of the text tokens and one of the image tokens) describes its layout with a `SequenceShard` and hangs it on
the `AttentionCall` (`call.shard`). q, k, v and the output are then this rank's rows only, ordered as everywhere in
attnplug: this rank's conditioning tokens first, then its image tokens; `call.n_cond_tokens` / `n_image_tokens` are
the local counts and `call.latent_grid` is the grid of the whole image. A backend serves such a call only when its
`Capabilities.sequence_parallel` says it can; every other call on a shard goes to the host's own (distributed)
attention.

Global token order (what "global index" means below): every conditioning token, then every image token in
row-major grid order — the order of the same call on one process.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def split_sizes(n: int, world: int) -> tuple[int, ...]:
    """How `torch.tensor_split(x, world)` splits `n` rows: the first `n % world` ranks get one more. For `n` divisible
    by `world` this is also `torch.chunk`'s split (diffusers' equipartition sharding)."""
    if world < 1 or n < 0:
        raise ValueError(f"split_sizes: need n >= 0 and world >= 1, got n={n}, world={world}")
    base, extra = divmod(n, world)
    return tuple(base + (1 if r < extra else 0) for r in range(world))


def _starts(sizes: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return tuple(out)


@dataclass(frozen=True)
class SequenceShard:
    """This rank's part of a token sequence split over `world` ranks.

    Attributes:
        rank: this process's rank in `group`.
        world: ranks in `group`.
        cond_sizes: conditioning tokens each rank holds (contiguous, in rank order); with `cond_replicated`
            every rank holds all of them and this is `(n_cond,) * world`.
        image_sizes: image tokens each rank holds (contiguous rows of the row-major grid, in rank order).
        cond_replicated: True when every rank holds every conditioning token (xDiT-style), False when they are
            split like the image tokens (diffusers' context parallelism).
        group: the `torch.distributed` process group (None: the default group).
    """

    rank: int
    world: int
    cond_sizes: tuple[int, ...]
    image_sizes: tuple[int, ...]
    cond_replicated: bool = False
    group: Any = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world or len(self.cond_sizes) != self.world \
                or len(self.image_sizes) != self.world or min(self.cond_sizes + self.image_sizes) < 0:
            raise ValueError(f"SequenceShard: rank {self.rank} of {self.world} with cond sizes {self.cond_sizes} "
                             f"and image sizes {self.image_sizes}")
        if self.cond_replicated and len(set(self.cond_sizes)) != 1:
            raise ValueError(f"SequenceShard: replicated conditioning tokens need one count, got {self.cond_sizes}")

    @classmethod
    def split(cls, n_cond: int, n_image: int, rank: int, world: int, cond_replicated: bool = False,
              group: Any = None) -> "SequenceShard":
        """The `tensor_split` layout of `n_cond` conditioning and `n_image` image tokens (diffusers' sharding)."""
        cond = (n_cond,) * world if cond_replicated else split_sizes(n_cond, world)
        return cls(rank, world, cond, split_sizes(n_image, world), cond_replicated, group)

    # ---- the global picture ---------------------------------------------------------------------------
    @property
    def n_cond(self) -> int:
        """Conditioning tokens of the whole sequence."""
        return self.cond_sizes[0] if self.cond_replicated else sum(self.cond_sizes)

    @property
    def n_image(self) -> int:
        """Image tokens of the whole sequence."""
        return sum(self.image_sizes)

    @property
    def n_tokens(self) -> int:
        return self.n_cond + self.n_image

    @property
    def n_local(self) -> int:
        """Tokens this rank holds."""
        return self.cond_sizes[self.rank] + self.image_sizes[self.rank]

    def cond_range(self, rank: int | None = None) -> tuple[int, int]:
        """`[start, stop)` of a rank's conditioning tokens in the global order."""
        r = self.rank if rank is None else rank
        if self.cond_replicated:
            return 0, self.n_cond
        start = _starts(self.cond_sizes)[r]
        return start, start + self.cond_sizes[r]

    def image_range(self, rank: int | None = None) -> tuple[int, int]:
        """`[start, stop)` of a rank's image tokens, counted among the image tokens (0 = the first image token)."""
        r = self.rank if rank is None else rank
        start = _starts(self.image_sizes)[r]
        return start, start + self.image_sizes[r]

    def global_index(self, rank: int | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """`[n_local]` long: the global index of each of a rank's tokens, in its local order."""
        c0, c1 = self.cond_range(rank)
        i0, i1 = self.image_range(rank)
        return torch.cat([torch.arange(c0, c1, device=device), torch.arange(i0, i1, device=device) + self.n_cond])

    def counted_here(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """`[n_local]` bool: which local tokens this rank adds into sums over keys (each token on exactly one rank),
        or None when all of them (replicated conditioning tokens count on rank 0 only)."""
        if not self.cond_replicated or self.rank == 0 or self.n_cond == 0:
            return None
        keep = torch.ones(self.n_local, dtype=torch.bool, device=device)
        keep[:self.n_cond] = False
        return keep

    def owner(self, global_idx: torch.Tensor) -> torch.Tensor:
        """The rank that contributes each global token (`[L]` long in, `[L]` long out; replicated conditioning
        tokens: rank 0)."""
        idx = global_idx.to("cpu", torch.long)
        is_img = idx >= self.n_cond
        img_stops = torch.tensor(_starts(self.image_sizes)[1:] + (self.n_image,))
        img_owner = torch.searchsorted(img_stops, (idx - self.n_cond).clamp_min(0), right=True)
        if self.cond_replicated:
            cond_owner = torch.zeros_like(idx)
        else:
            cond_stops = torch.tensor(_starts(self.cond_sizes)[1:] + (self.n_cond,))
            cond_owner = torch.searchsorted(cond_stops, idx.clamp_max(max(self.n_cond - 1, 0)), right=True)
        return torch.where(is_img, img_owner, cond_owner).clamp_max(self.world - 1)

    def local_position(self, global_idx: torch.Tensor) -> torch.Tensor:
        """Where each global token sits in its owner's local order (`[L]` long in and out)."""
        idx = global_idx.to("cpu", torch.long)
        owner = self.owner(idx)
        cond_start = torch.tensor([self.cond_range(r)[0] for r in range(self.world)])
        img_start = torch.tensor([self.image_range(r)[0] for r in range(self.world)])
        n_cond_local = torch.tensor(self.cond_sizes)
        is_img = idx >= self.n_cond
        return torch.where(is_img, idx - self.n_cond - img_start[owner] + n_cond_local[owner],
                           idx - cond_start[owner])


def shard_reasons(call: Any, q: torch.Tensor, mask: torch.Tensor | None) -> list[str]:
    """Why a sequence-parallel call (`call.shard`) cannot be served by a shard-aware backend (empty: it can, or the
    call is not sharded): masks are not sharded, and the tensors and counts must be this rank's."""
    shard = call.shard
    if shard is None:
        return []
    reasons = []
    if mask is not None:
        reasons.append("a mask on a sequence-parallel call")
    if q.dim() == 4 and q.shape[2] != shard.n_local:
        reasons.append(f"rank {shard.rank} holds {shard.n_local} tokens but q has {q.shape[2]}")
    if call.n_cond_tokens != shard.cond_sizes[shard.rank] or call.n_image_tokens != shard.image_sizes[shard.rank]:
        reasons.append(f"the call declares {call.n_cond_tokens} + {call.n_image_tokens} tokens, rank {shard.rank}'s "
                       f"shard {shard.cond_sizes[shard.rank]} + {shard.image_sizes[shard.rank]}")
    return reasons


# ---- collectives -----------------------------------------------------------------------------------------
def all_reduce_sum(t: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """Sum `t` over the shard's ranks, in place (returns `t`)."""
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=shard.group)
    return t


def all_reduce_max(t: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """The largest `t` over the shard's ranks, in place (returns `t`): a flag any rank raised."""
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=shard.group)
    return t


def _all_gather(t: torch.Tensor, shard: SequenceShard) -> list[torch.Tensor]:
    import torch.distributed as dist

    t = t.contiguous()
    out = [torch.empty_like(t) for _ in range(shard.world)]
    dist.all_gather(out, t, group=shard.group)
    return out


class RowGather:
    """Rows of the whole sequence at `global_idx` (`[L]` long, any order), gathered from every rank: which rows
    this rank sends and where each received row goes, worked out once (on the CPU) for a call shape; a call then
    runs one all-gather with no host↔device copy.

    Each rank sends the rows it owns (padded to the largest share); every rank gets `[B, H, L, D]` in
    `global_idx`'s order — the rows the same call on one process would gather."""

    def __init__(self, global_idx: torch.Tensor, shard: SequenceShard, device: torch.device | str) -> None:
        self.shard = shard
        owner = shard.owner(global_idx)
        local = shard.local_position(global_idx)
        counts = torch.bincount(owner, minlength=shard.world)
        self.width = int(counts.max()) if owner.numel() else 0
        self.mine = local[owner == shard.rank].to(device)
        # row j of the result: the (rank of global_idx[j] among its owner's rows)-th row of that owner's part
        order = torch.argsort(owner, stable=True)
        slot = torch.empty_like(owner)
        slot[order] = torch.arange(owner.numel()) - torch.cumsum(counts, 0)[owner[order]] + counts[owner[order]]
        self.flat = (owner * self.width + slot).to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, H, L, D]` from this rank's `x [B, H, n_local, D]`. A collective."""
        shard = self.shard
        send = x.new_zeros(*x.shape[:2], self.width, x.shape[-1])
        send[:, :, :self.mine.numel()] = x.index_select(2, self.mine)
        stacked = torch.stack(_all_gather(send, shard), dim=0)  # [W, B, H, width, D]
        return stacked.permute(1, 2, 0, 3, 4).reshape(*x.shape[:2], shard.world * self.width,
                                                      x.shape[-1]).index_select(2, self.flat)


def gather_rows(x: torch.Tensor, global_idx: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """`RowGather(global_idx, shard, x.device)(x)`: the rows at `global_idx`, planned and gathered in one go."""
    return RowGather(global_idx, shard, x.device)(x)


def grid_rows(radius: int, grid_w: int, shard: SequenceShard, grid_h: int) -> tuple[int, int]:
    """`[row0, row1)`: the whole latent-grid rows within `radius` rows of this rank's image tokens (clipped to the
    grid) — the keys a local window of that radius reads for this rank's queries, as whole rows."""
    lo, hi = shard.image_range()
    if hi <= lo:
        return 0, 0
    return max(0, lo // grid_w - radius), min(grid_h, -(-hi // grid_w) + radius)


def grid_band(x_img: torch.Tensor, radius: int, grid: tuple[int, int], shard: SequenceShard) -> torch.Tensor:
    """This rank's image rows widened to the whole grid rows `grid_rows(radius, ...)` with the neighbours' rows
    (`image_band` with a halo of `(radius + 1)·w` tokens, cut to whole rows): `[B, H, (row1 − row0)·w, D]`."""
    row0, row1 = grid_rows(radius, grid[1], shard, grid[0])
    band, start = image_band(x_img, (radius + 1) * grid[1], shard)
    return band[:, :, row0 * grid[1] - start:row1 * grid[1] - start]


def image_band(x_img: torch.Tensor, halo: int, shard: SequenceShard) -> tuple[torch.Tensor, int]:
    """This rank's image rows with up to `halo` image rows of the neighbouring shards on either side.

    :param x_img: `[B, H, n_img_local, D]`, this rank's image tokens.
    :return: `(band [B, H, stop - start, D], start)`: the image tokens `[start, stop)` of the whole image, with
        `start = max(0, lo - halo)`, `stop = min(n_image, hi + halo)` around this rank's `[lo, hi)`. Each rank
        all-gathers the first and the last `halo` rows of every shard (a shard shorter than the halo sends all of
        it), which covers the halo even where it spans several shards.
    """
    lo, hi = shard.image_range()
    start, stop = max(0, lo - halo), min(shard.n_image, hi + halo)
    edge = min(halo, max(shard.image_sizes))
    if shard.world == 1 or edge == 0:
        return x_img, lo
    b, h, n, d = x_img.shape
    send = x_img.new_zeros(b, h, 2 * edge, d)
    e = min(edge, n)
    send[:, :, :e] = x_img[:, :, :e]
    send[:, :, edge:edge + e] = x_img[:, :, n - e:]
    parts = _all_gather(send, shard)
    pieces: list[torch.Tensor] = []
    for r in range(shard.world):
        r_lo, r_hi = shard.image_range(r)
        a, z = max(start, r_lo), min(stop, r_hi)
        if a >= z:
            continue
        if r == shard.rank:
            pieces.append(x_img[:, :, a - r_lo:z - r_lo])
            continue
        if z - r_lo <= edge:  # the shard's first rows (a shard shorter than the edge: all of it)
            pieces.append(parts[r][:, :, a - r_lo:z - r_lo])
        else:  # its last rows
            n_r = r_hi - r_lo
            tail0 = r_hi - min(edge, n_r)
            assert a >= tail0, "image_band: the halo reaches beyond a neighbour's edge rows"
            pieces.append(parts[r][:, :, edge + a - tail0:edge + z - tail0])
    return torch.cat(pieces, dim=2), start
