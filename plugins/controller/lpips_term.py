"""LPIPS (Zhang et al. 2018) through the `lpips` package, with its backbone from the torch hub cache.

The package ships its linear calibration layers; the backbone (AlexNet, VGG16 or SqueezeNet) comes
from torchvision's pretrained weights in the user's torch hub cache. Nothing is downloaded here: when
the file is absent, the error says which file, where, and how to get it. `random_weights = true` builds
the network with random weights (tests, smoke runs: the values mean nothing).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from ...core.config import Strict
from ...core.quality import Direction, QualityError, Sample

_BACKBONE_WEIGHTS = {"alex": ("AlexNet_Weights", "alexnet"), "vgg": ("VGG16_Weights", "vgg16"),
                     "squeeze": ("SqueezeNet1_1_Weights", "squeezenet1_1")}


class LpipsSettings(Strict):
    """Options of the `lpips` term."""

    net: Literal["alex", "vgg", "squeeze"] = Field("alex", description="Backbone network ('alex' is the "
                                                                       "package's recommended metric).")
    random_weights: bool = Field(False, description="Random backbone and calibration weights (tests only: the "
                                                    "values mean nothing).")


def backbone_file(net: str) -> tuple[Path, str]:
    """Where torchvision keeps the backbone's pretrained weights in the hub cache, and their URL."""
    import torchvision.models as tvm

    enum_name, _ = _BACKBONE_WEIGHTS[net]
    url = getattr(tvm, enum_name).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1], url


def _import_lpips() -> Any:
    try:
        import lpips  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise QualityError(f"quality term 'lpips' needs the `lpips` package and torchvision ({exc}); install "
                           "them with `pip install lpips torchvision` (a torchvision build that matches your "
                           "torch)") from None
    return lpips


def build_lpips(settings: LpipsSettings) -> torch.nn.Module:
    """The LPIPS network in eval mode with frozen weights; a clear error when weights are missing."""
    lpips = _import_lpips()
    if settings.random_weights:
        net = lpips.LPIPS(net=settings.net, pretrained=False, pnet_rand=True, verbose=False)
    else:
        path, url = backbone_file(settings.net)
        if not path.is_file():
            raise QualityError(
                f"quality term 'lpips' (net {settings.net!r}) needs the pretrained backbone weights at {path}, "
                f"which are not there. Download {url} to that path (or run "
                f"`python -c \"import lpips; lpips.LPIPS(net='{settings.net}')\"` once on a machine with network "
                "access and copy the torch hub cache), or set TORCH_HOME to a cache that has them.")
        net = lpips.LPIPS(net=settings.net, pretrained=True, pnet_rand=False, verbose=False)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@dataclass
class LpipsTerm:
    """LPIPS distance of the decoded images (grey images are repeated to three channels)."""

    settings: LpipsSettings = field(default_factory=LpipsSettings)
    name: str = "lpips"
    better: Direction = "lower"
    needs: frozenset[str] = field(default_factory=lambda: frozenset({"image"}))

    def __post_init__(self) -> None:
        self._net = build_lpips(self.settings)

    def score(self, candidate: Sample, reference: Sample) -> torch.Tensor:
        assert candidate.image is not None and reference.image is not None
        a = candidate.image.detach().float()
        b = reference.image.detach().float().to(a.device)
        if a.shape[1] not in (1, 3):
            raise QualityError(f"quality term 'lpips': images must have 1 or 3 channels, got {tuple(a.shape)}")
        if a.shape[1] == 1:
            a, b = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)
        net = self._net.to(a.device)  # moved at call time: the images decide the device
        with torch.no_grad():
            return net(a.clamp(-1, 1), b.clamp(-1, 1)).flatten()
