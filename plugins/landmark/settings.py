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
    tokens present. Defaults are the seed's (0.08 / 64 / 0), which its authors tuned so that low
    resolutions are not over-provisioned while high ones keep enough softmax anchors.

    `window = r > 0` adds a local 2-D window: each *image* query's exact softmax runs over the
    landmarks ∪ the image keys within Chebyshev radius r of its own position on the latent grid
    (a (2r+1)² square clipped at the borders; a key that is both counts once). Conditioning queries
    keep the landmarks only. It needs the call's latent grid (h·w = image tokens) and queries that
    cover the whole sequence (or their positions, `query_index`); otherwise the call uses the
    landmarks only and the backend warns once per reason. The ttr fused kernels implement it inside
    their landmark pass (in-kernel softmax; plugins/ttr/kernels); calls the landmark backend would serve
    without the window (no or mismatching grid) take the ttr PyTorch path.
    """

    fraction: float = Field(0.08, ge=0.0, le=1.0, description="Share of image tokens used as landmarks.")
    min: int = Field(64, ge=0, description="Fewest image landmarks (before capping at the image tokens present).")
    max: int = Field(0, ge=0, description="Most image landmarks; 0 = unlimited.")
    layout: Literal["even", "stratified"] = Field(
        "even", description="'even': evenly spaced along the token sequence; 'stratified': one landmark per "
                            "cell of a 2-D partition of the latent grid (falls back to 'even' without a grid).")
    window: int = Field(0, ge=0, description="Chebyshev radius r of a local window on the latent grid: image "
                                             "queries also attend exactly to the image keys within r rows and "
                                             "columns of their own token ((2r+1)² keys, clipped at the borders); "
                                             "0 = off.")
    query_chunk: int = Field(1024, ge=1, description="Queries per softmax chunk (bounds the [B, H, chunk, L] "
                                                     "fp32 logits).")

    @model_validator(mode="after")
    def _min_le_max(self) -> "LandmarkSettings":
        if self.max and self.min > self.max:
            raise ValueError(f"min {self.min} > max {self.max} (max = 0 means unlimited)")
        return self
