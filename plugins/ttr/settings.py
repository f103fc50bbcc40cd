"""Config section `[plugins.ttr]`: the learned layer's architecture, its blend, and runtime knobs.

Fields fall in three classes, which decide what happens when a checkpoint and the config disagree
(see `state.py`):

- ARCHITECTURE — they define the function the weights compute; a checkpoint must match the config
  exactly, else loading is refused with the field, the file's value and the config's value.
- INIT_ONLY — used only to initialise a fresh layer (`alpha_init`); a checkpoint's weights already
  carry the learned value, so the config value is ignored for loaded layers (logged when different).
- RUNTIME — chunk sizes, ε, precision, landmark use: the config wins (logged when different).

Defaults follow offline fits on a digit-mosaic testbed model (feature maps fitted on real attention;
docs/QUALITY.md, "Offline fits"): a 2-layer φ (hidden 256, SiLU) with F = 128 and elu+1 gave 99.8 % prompt
adherence with 75 % of the layers replaced — better than 1-layer F = 64 maps (98.1 % elu+1, 99.0 % hedgehog)
and cheaper than the earlier node pack's 3-layer, F = 256, h = 512 map, which the speed targets (2× / 8× / 25×
cuDNN at 1024² / 2048² / 4096², docs/PERFORMANCE.md) cannot afford. The learned-α hybrid with α = α_max·σ(logit), logit from −2.2, matched kernel-only quality
on single blocks and helped on the double block; a fixed large α hurt.

α_max is 0.5, together with the landmark plugin's local window (docs/QUALITY.md,
"The default layer"): with the window the exact branch carries much of what the weak layers
need, so it must be allowed more than 20 % of the blend (testbed, six single blocks served: −0.02 /
−0.20 points with α_max 0.5 against −0.17 / −0.42 with 0.2). Checkpoints trained on the previous default
(e.g. testbed/weights/ttr_default.safetensors) have α_max 0.2 recorded: α_max is an architecture field, so
their configs must pin `alpha_max = 0.2` (`PREVIOUS_DEFAULTS`), else loading is refused naming it.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ...core.config import Strict
from ...core.patterns import any_layer_matches, validate_layer_pattern
from .joint_settings import JointSettings, Variant

Activation = Literal["elu+1", "hedgehog", "relu"]


class TtrSettings(Strict):
    """The ttr backend: learned feature maps φ_q, φ_k + Nadaraya–Watson normalization + landmark residual."""

    # ---- architecture (must match a loaded checkpoint) ----
    feature_dim: int = Field(128, ge=16, le=4096, description="F, features per token (any multiple of 16, at most "
                                                              "4096).")
    depth: int = Field(2, ge=1, le=3, description="Linear layers in φ (SiLU between them).")
    hidden: int = Field(256, ge=0, le=16384, description="Hidden width of φ when depth > 1 (at most 16384); 0 = "
                                                         "the earlier ComfyUI node pack's rule, "
                                                         "max(head_dim, 2·F).")
    activation: Activation = Field("elu+1", description="Positive output activation: 'elu+1', 'hedgehog' "
                                                        "(softmax(Wx) ⊕ softmax(−Wx)) or 'relu'.")
    per_head: bool = Field(False, description="One φ per head (true) or one shared by all heads (false).")
    split_qk: bool = Field(True, description="Separate φ for queries and keys (true) or one shared map.")
    l2_norm: bool = Field(False, description="L2-normalize φ over F. It cancels out for queries and removes "
                                             "per-key magnitude, which softmax attention uses; off by default.")
    conditioner: bool = Field(True, description="σ/CFG conditioner (scale/bias per branch), identity at init.")
    adaptive_alpha: bool = Field(True, description="α per token and head from branch disagreement "
                                                   "(α_max·σ(logit + γ·(d_norm − 0.5))); else α_max·σ(logit).")
    alpha_max: float = Field(0.5, gt=0.0, le=1.0, description="Upper bound of the blend weight α. 0.5 for "
                                                            "the landmark window on by default "
                                                            "(docs/QUALITY.md, 'The default layer'); "
                                                            "checkpoints of the previous default need 0.2.")
    gamma: float = Field(2.0, ge=0.0, description="How strongly branch disagreement shifts the α logit.")
    # ---- init-only ----
    alpha_init: float = Field(0.1, gt=0.0, lt=1.0, description="Initial σ(logit) of a fresh layer (α starts "
                                                               "at alpha_max·alpha_init = 0.05 by default).")
    # ---- runtime (the config wins over a checkpoint) ----
    landmark: bool = Field(True, description="Blend in the landmark branch when a landmark backend is "
                                             "registered; without one the layer runs kernel-only.")
    landmark_backend: str = Field("landmark", description="Registered backend whose `branch()` is the residual.")
    eps: float = Field(1e-6, gt=0.0, description="ε in φ(q)·S / (φ(q)·z + ε).")
    key_chunk: int = Field(1024, ge=1, description="Keys per chunk when accumulating S and z.")
    query_chunk: int = Field(1024, ge=1, description="Queries per chunk in the query pass.")
    kernel: Literal["auto", "torch", "triton"] = Field(
        "auto", description="Inference path: 'auto' (fused Triton kernels on CUDA where they serve the call, "
                            "else PyTorch), 'torch' (always the PyTorch reference), 'triton' (fused or an error).")
    alpha_reference: Literal["call", "running"] = Field(
        "running", description="What adaptive α measures each token's branch disagreement d against at inference: "
                               "'running' (a per-head running mean of d kept while distilling, like BatchNorm's "
                               "running statistics: the fused kernels blend in one pass; a layer without one, e.g. "
                               "from a checkpoint that has no running mean of d, uses 'call') or 'call' (the mean of d "
                               "over this call's queries: a second pass over the queries). Training always uses "
                               "the call's mean. Same quality on the testbed (docs/QUALITY.md).")
    feature_precision: Literal["float32", "input"] = Field(
        "input", description="dtype of the φ MLP at inference: 'input' (bf16/fp16 matmuls on GPU, as the fused "
                             "kernels compute it; S, z and the division stay fp32) or 'float32'. Training is always "
                             "fp32. Same testbed quality both ways (docs/PERFORMANCE.md, \"Precision\").")

    # ---- layer variant (per layer key; a checkpoint's layers must match) ----
    joint_layers: list[str] = Field(
        default_factory=list, description="Layer patterns served by the joint layer (e.g. ['double:*']): every "
                                          "interaction with conditioning tokens exact, only the image↔image far "
                                          "field learned (plugins/ttr/joint.py). Other layers get the hybrid layer. "
                                          "Empty (the default): the hybrid layer everywhere.")
    joint: JointSettings = Field(default_factory=JointSettings,
                                 description="[plugins.ttr.joint]: how joint layers combine the exact set and the "
                                             "learned far field.")

    @field_validator("feature_dim")
    @classmethod
    def _multiple_of_16(cls, v: int) -> int:
        if v % 16:
            raise ValueError(f"feature_dim must be a multiple of 16, got {v}")
        return v

    @field_validator("joint_layers")
    @classmethod
    def _layer_patterns(cls, v: list[str]) -> list[str]:
        return [validate_layer_pattern(p) for p in v]

    @model_validator(mode="after")
    def _joint_fused_or_torch(self) -> "TtrSettings":
        fused_joint = self.joint.combine == "shared" and self.joint.log_scale == "linear"
        if self.joint_layers and self.kernel == "triton" and not fused_joint:
            raise ValueError("kernel = 'triton' serves every layer with the fused kernels, which implement the joint "
                             "layer only with joint.combine = 'shared' and joint.log_scale = 'linear' (got "
                             f"{self.joint.combine!r}, {self.joint.log_scale!r}) for joint_layers = "
                             f"{self.joint_layers}; use kernel = 'auto' (fused where possible, those joint layers on "
                             "the PyTorch path)")
        return self

    def hidden_for(self, head_dim: int) -> int:
        """The hidden width for a layer of `head_dim` (resolves `hidden = 0`)."""
        return self.hidden or max(head_dim, 2 * self.feature_dim)

    def variant_for(self, layer_key: str) -> Variant:
        """Which layer serves `layer_key`: 'joint' when a `joint_layers` pattern matches it, else 'hybrid'."""
        return "joint" if any_layer_matches(self.joint_layers, layer_key) else "hybrid"


ARCHITECTURE_FIELDS = ("feature_dim", "depth", "hidden", "activation", "per_head", "split_qk", "l2_norm",
                       "conditioner", "adaptive_alpha", "alpha_max", "gamma")
INIT_ONLY_FIELDS = ("alpha_init",)
RUNTIME_FIELDS = ("landmark", "landmark_backend", "eps", "key_chunk", "query_chunk", "kernel", "alpha_reference",
                  "feature_precision")
#: Which layer variant serves which key, and the joint layers' own architecture: checked per layer when loading (a
#: checkpoint's layer must be of the variant the config selects for its key; joint layers must match `joint`).
VARIANT_FIELDS = ("joint_layers", "joint")
assert set(ARCHITECTURE_FIELDS + INIT_ONLY_FIELDS + RUNTIME_FIELDS + VARIANT_FIELDS) == set(TtrSettings.model_fields)

#: The `[plugins.ttr]` values of the previous product default that differ from the current one (with
#: the landmark plugin's `PREVIOUS_DEFAULTS`): what testbed/weights/ttr_default.safetensors and every
#: checkpoint distilled on those defaults were trained with. Configs that serve such a
#: checkpoint pin them; `bench` times this layer as `previous-default`.
PREVIOUS_DEFAULTS: dict[str, float] = {"alpha_max": 0.2}
