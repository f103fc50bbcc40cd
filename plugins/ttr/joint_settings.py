"""Config of the joint ttr layer (`[plugins.ttr.joint]`) and which layers use it (`joint_layers`).

Joint (double-stream) blocks carry the text-to-image routing: on the testbed, serving them with the
hybrid layer of single blocks costs 6–9 adherence points each while their layer-output cosine is among
the best. The joint layer keeps every interaction with conditioning tokens exact and learns only the
image↔image far field (plugins/ttr/joint.py). These fields define the function its weights compute, so
a checkpoint's joint layers must match them (state.py refuses otherwise).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...core.config import Strict

Combine = Literal["shared", "blend"]
LogScale = Literal["linear", "mlp"]
Variant = Literal["hybrid", "joint"]


class JointSettings(Strict):
    """How a joint layer combines its exact set with the learned far field."""

    combine: Combine = Field(
        "shared", description="'shared': one normaliser over the exact set and the far field, y = (Σ_exact e^s v + "
                              "φ(q)ᵀS_far) / (Σ_exact e^s + φ(q)ᵀz_far), with a learned per-head log-scale g(q) "
                              "because φ does not approximate e^s in scale; 'blend': the hybrid layer's α blend "
                              "out_far + α·(out_exact − out_far) with α ≤ alpha_max.")
    log_scale: LogScale = Field(
        "linear", description="g(q) of 'shared': 'linear' (a_h + b_hᵀq per head) or 'mlp' (plus a small MLP of q, "
                              "hidden 32, shared by the heads, zero at init). Ignored by 'blend'.")


def joint_field_names() -> tuple[str, ...]:
    """The fields of `JointSettings` (every one is an architecture field of the joint layers)."""
    return tuple(JointSettings.model_fields)
