"""Digit reader for prompt adherence: an SVC (RBF, gamma 0.001, C 10) on the 8x8 scikit-learn digits.

Trained on the train split of `data.digit_split` at first use (about a second on a CPU) and cached
in-process per split seed — no pickle is ever written or read. `read_cells` classifies every 8x8
cell of generated mosaics; `adherence` is the fraction of cells that show the prompted digit.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch

from . import data

SVC_GAMMA = 0.001
SVC_C = 10.0


@lru_cache(maxsize=4)
def digit_classifier(seed: int = data.SPLIT_SEED) -> Any:
    """The fitted `sklearn.svm.SVC` for split `seed` (deterministic; cached in-process)."""
    from sklearn.svm import SVC

    train = data.digit_split("train", seed)
    clf = SVC(gamma=SVC_GAMMA, C=SVC_C)
    clf.fit(train.images.reshape(len(train.labels), -1).numpy(), train.labels.numpy())
    return clf


def heldout_accuracy(seed: int = data.SPLIT_SEED) -> float:
    """Accuracy of the classifier on the held-out digit images of split `seed`."""
    held = data.digit_split("heldout", seed)
    pred = digit_classifier(seed).predict(held.images.reshape(len(held.labels), -1).numpy())
    return float(np.mean(pred == held.labels.numpy()))


def read_cells(images: torch.Tensor, seed: int = data.SPLIT_SEED) -> torch.Tensor:
    """Classes [B, G, G] (int64) read from images [B, 1, 8G, 8G] in [-1, 1], one per cell."""
    cells = data.to_digit_scale(data.cells_of(images.detach().cpu()))
    b, g = cells.shape[:2]
    pred = digit_classifier(seed).predict(cells.reshape(b * g * g, -1).numpy())
    return torch.from_numpy(np.asarray(pred, dtype=np.int64)).reshape(b, g, g)


def adherence(images: torch.Tensor, prompts: torch.Tensor, seed: int = data.SPLIT_SEED) -> float:
    """Fraction of cells of `images` [B, 1, 8G, 8G] that show the digit prompted in `prompts` [B, G, G]."""
    if images.shape[0] != prompts.shape[0] or images.shape[-1] != prompts.shape[-1] * data.DIGIT_PX:
        raise ValueError(f"adherence: images {tuple(images.shape)} do not match prompts {tuple(prompts.shape)}")
    return float((read_cells(images, seed) == prompts.cpu()).float().mean())


def adherence_per_prompt(images: torch.Tensor, prompts: torch.Tensor, seed: int = data.SPLIT_SEED) -> torch.Tensor:
    """Fraction of correct cells per prompt [B]."""
    return (read_cells(images, seed) == prompts.cpu()).float().flatten(1).mean(1)
