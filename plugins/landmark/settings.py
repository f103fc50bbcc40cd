"""Config section `[plugins.landmark]`: how many landmarks, where, an optional local window, and how
the softmax is chunked."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ...core.config import Strict


class LandmarkSettings(Strict):
    """Landmark selection and the exact softmax against the landmarks.

    Every conditioning token is a landmark; image tokens get a budget
    `clamp(round(n_img * fraction), min, max)` (max = 0: unlimited), never more than the image
    tokens present.

    Defaults (docs/QUALITY.md, "The default layer"): 2 % of the image tokens (at
    least 16), unlimited, plus the local window r = 2, with the ttr layer's `alpha_max = 0.5`. On the
    testbed (six single blocks served, 64 held-out prompts) that layer loses 0.22 / 0.27 adherence
    points (seeds 0 / 1) against 1.46 / 1.66 for the previous default (0.08 / 64, the earlier node
    pack's budget, no window) trained the same way (0.17 / 0.19 with the distiller's own query subsample);
    the window carries the sharp, local attention the landmarks miss,
    and fewer landmarks make the exact softmax, which dominates the layer's time at 2048² and up,
    much cheaper. Checkpoints distilled on the previous defaults (testbed/weights/ttr_default.safetensors)
    were trained against 0.08 / 64 / no window (`PREVIOUS_DEFAULTS`): their configs pin those values
    (loading one with other values works, the config wins, and the difference is logged as a warning).

    `window = r > 0` adds a local 2-D window: each *image* query's exact softmax runs over the
    landmarks ∪ the image keys within Chebyshev radius r of its own position on the latent grid
    (a (2r+1)² square clipped at the borders; a key that is both counts once). Conditioning queries
    keep the landmarks only. It needs the call's latent grid (h·w = image tokens) and queries that
    cover the whole sequence (or their positions, `query_index`); otherwise the call uses the
    landmarks only and the backend warns once per reason. The diffusers and ComfyUI hosts report the
    grid for Flux-style models (from `img_ids` / the latent's shape); a host or model without one
    (or with extra reference-image tokens, e.g. Kontext-style edits, whose grid does not cover every
    image token) gets the 2 % landmarks alone, which the testbed measured without a window at −1.54
    points against −1.12 for 8 % (docs/QUALITY.md, "The sweep", seed 0); there `fraction = 0.08,
    min = 64` is the safer setting. The ttr fused kernels implement the window inside their landmark
    pass (after the in-kernel landmark softmax, or from cuDNN's result and log-sum-exp; plugins/ttr/kernels);
    calls the landmark backend serves without the window (no or mismatching grid) run the kernels with
    the landmarks only, as its branch does.
    """

    fraction: float = Field(0.02, ge=0.0, le=1.0, description="Share of image tokens used as landmarks (0.02 "
                                                              "with the window; the previous default was 0.08).")
    min: int = Field(16, ge=0, description="Fewest image landmarks (before capping at the image tokens present; 16; "
                                           "the previous default was 64).")
    max: int = Field(0, ge=0, description="Most image landmarks; 0 = unlimited.")
    layout: Literal["even", "stratified"] = Field(
        "even", description="'even': evenly spaced along the token sequence; 'stratified': one landmark per "
                            "cell of a 2-D partition of the latent grid (falls back to 'even' without a grid).")
    window: int = Field(2, ge=0, le=64, description="Chebyshev radius r of a local window on the latent grid: "
                                                    "image queries also attend exactly to the image keys within r "
                                                    "rows and columns of their own token ((2r+1)² keys, clipped at "
                                                    "the borders); 0 = off, at most 64 (16 641 keys per query; "
                                                    "wider, exact attention is cheaper). 2 by default "
                                                    "(docs/QUALITY.md); calls without a latent grid use the "
                                                    "landmarks only (warned once).")
    query_chunk: int = Field(1024, ge=1, description="Queries per softmax chunk (bounds the [B, H, chunk, L] "
                                                     "fp32 logits).")
    precision: Literal["input", "fp8"] = Field(
        "input", description="Precision of the exact softmax's two products at inference: 'input' (the call's "
                             "dtype in the fused kernels, fp32 on the PyTorch path) or 'fp8' (e4m3 with per-token "
                             "q/k scales and per-channel value scales, SageAttention-style: core/exact_fp8.py; "
                             "the fused kernels on GPUs of compute capability 8.9 or newer, emulated on the "
                             "PyTorch path). Opt-in: docs/QUALITY.md has its cost on the testbed. Training "
                             "(with gradients) always computes in fp32.")

    @model_validator(mode="after")
    def _min_le_max(self) -> "LandmarkSettings":
        if self.max and self.min > self.max:
            raise ValueError(f"min {self.min} > max {self.max} (max = 0 means unlimited)")
        return self


#: The `[plugins.landmark]` values of the previous product default that differ from the current one
#: (the earlier node pack's budget, no window; with the ttr plugin's `PREVIOUS_DEFAULTS`): what
#: testbed/weights/ttr_default.safetensors was trained with. Configs that serve such a checkpoint pin them.
PREVIOUS_DEFAULTS: dict[str, float | int] = {"fraction": 0.08, "min": 64, "window": 0}
