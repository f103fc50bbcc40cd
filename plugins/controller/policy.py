"""The routing policy: per step, one logit per attention layer from σ, guidance, resolution and the prompt.

`RoutingPolicy` maps the inputs of one sampler step (`PolicyInputs`) to a logit per layer of its fixed layer
list — every layer, joint blocks too; p = sigmoid(logit) is the probability of serving that layer
approximately at that step. Actions are Bernoulli draws of exactly that distribution, and training takes
their log-probabilities from the same `torch.distributions.Bernoulli(logits=...)`, so the gradient estimate
is unbiased (an earlier controller drew hard-Gumbel masks but scored them with σ(logit)).

Resolution enters in latent tokens, normalised the same way in training and serving (`features`):
height/64, width/64 and tokens/4096 of the latent token grid (1024² in Flux = 64 × 64 tokens = 1.0).
The text feature is optional: `use_text=False` builds the same network without it (the ablation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: scalar features per step (see `features`)
N_SCALARS = 10
TOKENS_UNIT = 4096.0  # latent tokens of a 1024² Flux image
SIDE_UNIT = 64.0


@dataclass(frozen=True)
class PolicyInputs:
    """What the policy sees at one step: known before the step's first attention call.

    :param sigma: the step's noise level (flow-matching σ in [0, 1]).
    :param step_fraction: step index / number of steps, in [0, 1]; None when the host does not know the count.
    :param guidance: CFG scale or distilled guidance; None when unknown.
    :param latent_h: rows of the latent token grid (image tokens per column).
    :param latent_w: columns of the latent token grid.
    :param text: the pooled conditioning embedding `[D]` (float32), or None.
    """

    sigma: float
    step_fraction: float | None = None
    guidance: float | None = None
    latent_h: int = 64
    latent_w: int = 64
    text: torch.Tensor | None = None


def features(inputs: PolicyInputs) -> torch.Tensor:
    """The scalar features `[N_SCALARS]` (float32, CPU) of one step — the one normalisation for training and serving."""
    s = float(inputs.sigma)
    frac = inputs.step_fraction
    g = inputs.guidance
    h, w = float(inputs.latent_h), float(inputs.latent_w)
    return torch.tensor([s, s * s, math.sin(math.pi * s), math.cos(math.pi * s),
                         -1.0 if frac is None else float(frac), 0.0 if g is None else math.log1p(max(g, 0.0)),
                         0.0 if g is None else 1.0, h / SIDE_UNIT, w / SIDE_UNIT, h * w / TOKENS_UNIT],
                        dtype=torch.float32)


class RoutingPolicy(nn.Module):
    """A small MLP: scalar features (+ the projected, normalised text embedding) → one logit per layer.

    :param layers: the layer keys it decides, in order (`double:0`, …, `single:37`); fixed for its lifetime.
    :param text_dim: width of the pooled text embedding it reads, or None (no text input).
    :param use_text: False ignores the text even when `text_dim` is set (the no-text ablation).
    :param hidden: width of the hidden layers.
    :param init_logit: every layer's initial logit (the output layer starts at zero, its bias at this value).
    """

    def __init__(self, layers: list[str], text_dim: int | None = None, *, use_text: bool = True, hidden: int = 64,
                 init_logit: float = 1.0) -> None:
        super().__init__()
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"RoutingPolicy: layers must be distinct and non-empty, got {layers}")
        self.layers = list(layers)
        self.index = {k: i for i, k in enumerate(self.layers)}
        self.use_text = bool(use_text and text_dim)
        self.text_dim = int(text_dim) if text_dim else None
        self.hidden = hidden
        self.init_logit = float(init_logit)
        self.scalar_in = nn.Linear(N_SCALARS, hidden)
        self.text_norm = nn.LayerNorm(self.text_dim) if self.use_text else None
        self.text_in = nn.Linear(self.text_dim, hidden, bias=False) if self.use_text else None
        self.body = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.out = nn.Linear(hidden, len(self.layers))
        nn.init.zeros_(self.out.weight)
        nn.init.constant_(self.out.bias, self.init_logit)

    def describe(self) -> dict[str, Any]:
        """The architecture as JSON (stored with checkpoints, checked on load)."""
        return {"layers": self.layers, "text_dim": self.text_dim, "use_text": self.use_text, "hidden": self.hidden,
                "init_logit": self.init_logit}

    @classmethod
    def from_description(cls, d: dict[str, Any]) -> "RoutingPolicy":
        return cls(list(d["layers"]), d.get("text_dim"), use_text=bool(d.get("use_text", True)),
                   hidden=int(d["hidden"]), init_logit=float(d.get("init_logit", 1.0)))

    def forward(self, scalars: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `[S, L]` for scalar features `[S, N_SCALARS]` and texts `[S, D]` (ignored without use_text)."""
        p = self.out.weight
        h = self.scalar_in(scalars.to(p.device, p.dtype))
        if self.use_text:
            if text is None:
                raise ValueError("RoutingPolicy: this policy reads the pooled text embedding; none was given")
            if text.shape[-1] != self.text_dim:
                raise ValueError(f"RoutingPolicy: text embedding of width {text.shape[-1]}, the policy reads "
                                 f"{self.text_dim}")
            assert self.text_norm is not None and self.text_in is not None
            h = h + self.text_in(self.text_norm(text.to(p.device, p.dtype)))
        return self.out(self.body(h))

    def logits(self, inputs: PolicyInputs) -> torch.Tensor:
        """Logits `[L]` of one step."""
        text = inputs.text[None] if inputs.text is not None else None
        return self.forward(features(inputs)[None], text)[0]


def distribution(logits: torch.Tensor) -> torch.distributions.Bernoulli:
    """The action distribution: Bernoulli with P(serve) = sigmoid(logit). Draws and log-probabilities both use it."""
    return torch.distributions.Bernoulli(logits=logits)
