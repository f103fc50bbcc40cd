"""`[[loggers]] kind = "comet"`: the settings of the Comet logger."""
from __future__ import annotations

from pydantic import Field, SecretStr, field_validator

from ...core.config import Strict
from .keys import check_experiment_key


class CometSettings(Strict):
    """Send metrics, the config (as parameters) and images to a Comet experiment (comet_ml)."""

    project: str = Field("attnplug", min_length=1, description="Comet project name.")
    workspace: str | None = Field(None, description="Comet workspace (default: the API key's default workspace).")
    experiment_name: str | None = Field(
        None, description="Display name of the experiment, and part of its derived key (default: the checkpoint's "
                          "file name without suffix, else 'attnplug').")
    experiment_key: str | None = Field(
        None, description="Explicit experiment key, 32-50 letters and digits. Default: derived from the checkpoint's "
                          "resolved path, the experiment name, project, workspace and whether the session trains, so "
                          "every session on one checkpoint continues one experiment (without a checkpoint: a new "
                          "experiment per session).")
    api_key: SecretStr | None = Field(
        None, description="Comet API key; better left unset: comet_ml then reads COMET_API_KEY or its own config "
                          "(`comet login`). A key set here is used, never logged, printed, saved or echoed.")
    offline: bool = Field(False, description="Write an offline archive (comet_ml's offline experiment; upload it "
                                             "later with `comet upload`) instead of streaming to the server.")
    offline_directory: str | None = Field(
        None, description="Folder of the offline archives (default: comet_ml's setting, COMET_OFFLINE_DIRECTORY, "
                          "else ./.cometml-runs).")
    tags: list[str] = Field(default_factory=list, description="Tags of the experiment.")
    scopes: list[str] = Field(default_factory=lambda: ["*"],
                              description="Scopes to send: exact names, 'prefix/*' or '*' (every scope).")
    log_every: int = Field(1, ge=1, description="Send one metrics event in `log_every` per scope and layer; the "
                                                "latest held-back event of each is sent at run end.")
    max_metrics_per_minute: int = Field(
        6000, ge=1, description="Metric values sent per minute at most (a token bucket; Comet allows 12,000 per "
                                "minute): events over budget are held back, the latest of each scope and layer "
                                "sent at run end and at close.")
    images: bool = Field(True, description="Send the sample images hosts and tools hand to the loggers.")

    @field_validator("experiment_key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        return None if v is None else check_experiment_key(v)
