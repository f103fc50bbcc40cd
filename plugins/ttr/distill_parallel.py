"""Data-parallel distillation: every rank samples its own prompts and trains the same layers in lockstep.

```
rank r: its sampling run → Session.attention → distiller.observe → LayerTrainer.update
   trainer built       → start:      the layer's weights, buffers and log-variances broadcast from rank 0
   loss computed       → all_finite: one all-reduce; every rank skips a non-finite update together
   backward            → gradients:  every gradient averaged (one all-reduce of one flat buffer) before clipping
   AdamW step          → finish:     the running reference of d and the step's loss and cosine distance averaged
                                     (one all-reduce), so readiness and the EMA are the same numbers on every rank
save                   → rank 0 writes the checkpoint (the atomic `Session.save`), the others wait at a barrier
```

With the same number of samples per rank, one update equals a single-process update on the ranks' samples
concatenated along the batch (the loss is a mean over the batch, so is the averaged gradient; the running
reference folds in the batch mean of d). The ranks must reach the same updates in the same order: the same
distiller seed and settings, calls of one shape per step (the layer draw and the query subsample use the seeded
generator, identical on every rank); a rank that runs out of memory in one layer and not the others stops the
lockstep (not handled).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ...core.backend import LearnedBackend

if TYPE_CHECKING:
    from ...core.session import Session


class DataParallel:
    """Makes a training session's distiller data-parallel over `group` (`torch.distributed`, initialised by the
    caller: NCCL on GPUs, gloo on CPUs). Implements `distill_train.TrainSync`."""

    def __init__(self, session: "Session", group: Any = None) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.session = session
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        distiller = session.distiller
        if distiller is None or not hasattr(distiller, "sync"):
            raise ValueError("DataParallel: the session has no distiller that trains data-parallel (the ttr "
                             "distiller does)")
        self.distiller = distiller
        self.device = torch.device("cpu")  # where small collectives run: the layers' device once one is seen
        distiller.sync = self
        for key, trainer in sorted(distiller.trainers.items()):  # a resumed session: its trainers exist already
            trainer.sync = self
            self.start(key, distiller.student, trainer.logvars)

    # ---- distill_train.TrainSync ----------------------------------------------------------------------
    def start(self, layer_key: str, backend: LearnedBackend, logvars: torch.Tensor) -> None:
        module = backend.layers[layer_key]
        self.device = logvars.device
        tensors = [*module.parameters(), *module.buffers(), logvars]
        tracked = torch.tensor([float(getattr(module, "reference_tracked", False))], device=logvars.device)
        flat = torch.cat([t.detach().float().reshape(-1) for t in tensors] + [tracked])
        self.dist.broadcast(flat, src=self._global_rank(0), group=self.group)
        with torch.inference_mode(False), torch.no_grad():
            offset = 0
            for t in tensors:
                t.copy_(flat[offset:offset + t.numel()].view_as(t).to(t.dtype))
                offset += t.numel()
        if hasattr(module, "reference_tracked"):
            module.reference_tracked = bool(flat[-1] > 0)

    def all_finite(self, finite: bool) -> bool:
        bad = torch.tensor([0.0 if finite else 1.0], device=self.device)
        self.dist.all_reduce(bad, group=self.group)
        return float(bad) == 0.0

    def gradients(self, params: list[torch.Tensor]) -> None:
        grads = [p.grad for p in params if p.grad is not None]  # the same parameters have gradients on every rank
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.dist.all_reduce(flat, group=self.group)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def finish(self, layer_key: str, backend: LearnedBackend, loss: float, cos: float) -> tuple[float, float]:
        module = backend.layers[layer_key]
        reference = getattr(module, "d_reference", None)
        parts = [torch.tensor([loss, cos], dtype=torch.float32)]
        if isinstance(reference, torch.Tensor):
            parts.append(reference.detach().float().cpu())
        flat = torch.cat(parts).to(next(module.parameters()).device)
        self.dist.all_reduce(flat, group=self.group)
        flat /= self.world
        if isinstance(reference, torch.Tensor):
            with torch.no_grad():
                reference.copy_(flat[2:].to(reference.dtype))
        return float(flat[0]), float(flat[1])

    # ---- checkpoints ----------------------------------------------------------------------------------
    def save(self, path: str | Path | None = None) -> Path | None:
        """Rank 0 writes the checkpoint (atomic, `Session.save`); every rank returns once it is written (rank 0:
        the path, the others None)."""
        written = self.session.save(path) if self.rank == 0 else None
        self.dist.barrier(group=self.group)
        return written

    def close(self) -> None:
        """Back to single-process training."""
        self.distiller.sync = None
        for trainer in self.distiller.trainers.values():
            trainer.sync = None

    def _global_rank(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return self.dist.get_global_rank(self.group, group_rank)
