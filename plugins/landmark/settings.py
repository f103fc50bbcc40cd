"""Config section `[plugins.landmark]`: how many landmarks, where, and how the softmax is chunked."""
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
    """

    fraction: float = Field(0.08, ge=0.0, le=1.0, description="Share of image tokens used as landmarks.")
    min: int = Field(64, ge=0, description="Fewest image landmarks (before capping at the image tokens present).")
    max: int = Field(0, ge=0, description="Most image landmarks; 0 = unlimited.")
    layout: Literal["even", "stratified"] = Field(
        "even", description="'even': evenly spaced along the token sequence; 'stratified': one landmark per "
                            "cell of a 2-D partition of the latent grid (falls back to 'even' without a grid).")
    query_chunk: int = Field(1024, ge=1, description="Queries per softmax chunk (bounds the [B, H, chunk, L] "
                                                     "fp32 logits).")

    @model_validator(mode="after")
    def _min_le_max(self) -> "LandmarkSettings":
        if self.max and self.min > self.max:
            raise ValueError(f"min {self.min} > max {self.max} (max = 0 means unlimited)")
        return self
