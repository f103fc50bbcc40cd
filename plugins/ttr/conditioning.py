"""The σ/CFG conditioner's output for served calls: once per (σ, CFG, batch) for every layer, in one batched op.

Every ttr layer's `Conditioner` maps the same two embeddings (of σ and of the CFG scale) through its own small MLP;
on the fused path a call only needs the result, `[B, 4]` fp32 (scale and bias per branch). `ConditionerBank` stacks
the MLPs of a backend's layers on one device and, the first time a (σ, CFG, batch) is served — in practice once per
sampler step — computes every layer's row with a few launches; the other calls of that step read their row. Rows
are rebuilt when any layer's weights change (`TtrLayer.weights_signature`), so they are never stale. Training and the
PyTorch path keep calling each layer's own conditioner (autograd).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layer import Conditioner, TtrLayer, sinusoidal

#: (σ, CFG, batch) keys whose rows are kept per device: this step's and a few before it
_KEEP = 4


@dataclass
class _Stack:
    """The conditioner MLPs of the layers on one device, stacked: `h = SiLU(W1·e + b1)`, `out = W2·h + b2`."""

    keys: list[str]
    signatures: dict[str, tuple[int, ...]]
    w1: torch.Tensor  # [L, hidden, 2·EMBED]
    b1: torch.Tensor  # [L, hidden, 1]
    w2: torch.Tensor  # [L, 4, hidden]
    b2: torch.Tensor  # [L, 4, 1]


class ConditionerBank:
    """Conditioner rows of every layer of one backend, per device and (σ, CFG, batch)."""

    def __init__(self) -> None:
        self._stacks: dict[torch.device, _Stack] = {}
        self._rows: dict[torch.device, dict[tuple[float, float, int], dict[str, torch.Tensor]]] = {}
        #: how many times rows were computed (one batched op each); tests read it
        self.computed = 0

    def clear(self) -> None:
        self._stacks.clear()
        self._rows.clear()

    def affine(self, layers: Mapping[str, object], layer_key: str, signature: tuple[int, ...], sigma: float,
               cfg: float, batch: int, device: torch.device) -> torch.Tensor:
        """`layer_key`'s conditioner output `[batch, 4]` (fp32, contiguous, on `device`) at (σ, CFG); `signature` is
        the layer's current `weights_signature()` (rows built from other weights are rebuilt first)."""
        stack = self._stacks.get(device)
        if stack is None or stack.signatures.get(layer_key) != signature:
            stack = self._stacks[device] = _stack(layers, device)
            self._rows[device] = {}
        by_key = self._rows.setdefault(device, {})
        rows = by_key.get((sigma, cfg, batch))
        if rows is None:
            if len(by_key) >= _KEEP:
                by_key.pop(next(iter(by_key)))
            rows = by_key[(sigma, cfg, batch)] = _compute(stack, sigma, cfg, batch, device)
            self.computed += 1
        return rows[layer_key]


def _stack(layers: Mapping[str, object], device: torch.device) -> _Stack:
    keys, sigs, nets = [], {}, []
    for key, layer in layers.items():
        if not isinstance(layer, TtrLayer) or layer.conditioner is None or layer.alpha_logit.device != device:
            continue
        sig = layer.weights_signature()
        if sig is None:
            continue
        keys.append(key)
        sigs[key] = sig
        nets.append(layer.conditioner)
    with torch.no_grad():
        w1 = torch.stack([n.fc1.weight for n in nets])
        b1 = torch.stack([n.fc1.bias for n in nets]).unsqueeze(-1)
        w2 = torch.stack([n.fc2.weight for n in nets])
        b2 = torch.stack([n.fc2.bias for n in nets]).unsqueeze(-1)
    return _Stack(keys, sigs, w1, b1, w2, b2)


def _compute(stack: _Stack, sigma: float, cfg: float, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        emb = torch.cat([sinusoidal(sigma, Conditioner.EMBED, device), sinusoidal(cfg, Conditioner.EMBED, device)])
        e = emb.view(1, -1, 1).expand(len(stack.keys), -1, 1)
        hidden = F.silu(torch.baddbmm(stack.b1, stack.w1, e))
        out = torch.baddbmm(stack.b2, stack.w2, hidden).squeeze(-1)  # [L, 4]
        rows = out.unsqueeze(1).expand(-1, batch, -1).contiguous()  # [L, batch, 4]: each layer's row contiguous
    return {key: rows[i] for i, key in enumerate(stack.keys)}
