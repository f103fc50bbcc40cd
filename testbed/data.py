"""Digit-mosaic data: prompts (G x G grids of digit classes), their images, and token packing.

Source: scikit-learn's bundled `load_digits` (1797 images of 8x8, values 0..16, no download).
- Digit IMAGES are split once, stratified by class, into train and held-out (`digit_split`).
- PROMPTS are split by a hash: a grid whose BLAKE2b digest starts with a byte < `HELDOUT_BYTE_LIMIT`
  is held out. Training prompts are drawn uniformly and held-out ones rejected; evaluation prompts
  come from a separately seeded generator that keeps only held-out ones, so the two never overlap.
- An image is a mosaic: each cell shows a randomly drawn digit image of the prompted class,
  optionally with a light gain jitter, scaled to [-1, 1] (`render_mosaics`).
- Model input (Flux convention): the image [B, 1, 8G, 8G] is packed 2x2 into tokens
  [B, (4G)^2, 4] (`pack` / `unpack`); image ids are (0, row, col) on the 4G x 4G token grid and the
  G*G conditioning tokens (one per cell, row-major) get ids at their cell centres, so that RoPE ties
  each conditioning token to its own cell (`img_ids` / `txt_ids`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

NUM_CLASSES = 10
DIGIT_PX = 8  # side of one scikit-learn digit
PATCH = 2  # 2x2 pixel packing -> in_channels 4
DEFAULT_GRID = 8
HELDOUT_BYTE_LIMIT = 16  # first digest byte < 16 -> held out (1/16 of all prompts)
SPLIT_SEED = 0
HELDOUT_DIGIT_FRACTION = 0.25


@dataclass(frozen=True)
class DigitSplit:
    """Digit images (float32, 0..16, [N, 8, 8]) and labels (int64, [N]) of one split, sorted by class."""

    images: torch.Tensor
    labels: torch.Tensor
    class_start: torch.Tensor  # [10] index of the first image of each class
    class_count: torch.Tensor  # [10] images per class

    def to(self, device: torch.device | str) -> DigitSplit:
        return DigitSplit(*(t.to(device) for t in (self.images, self.labels, self.class_start, self.class_count)))


@lru_cache(maxsize=1)
def load_digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 bundled digits: images float32 [N, 8, 8] in 0..16 and labels int64 [N]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


@lru_cache(maxsize=4)
def _split_indices(seed: int, heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    _, labels = load_digit_arrays()
    idx = np.arange(len(labels))
    train, held = train_test_split(idx, test_size=heldout_fraction, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(held)


def digit_split(which: str, seed: int = SPLIT_SEED, heldout_fraction: float = HELDOUT_DIGIT_FRACTION) -> DigitSplit:
    """The `which` ('train' or 'heldout') part of the deterministic stratified split of the digit images."""
    if which not in ("train", "heldout"):
        raise ValueError(f"digit_split: which must be 'train' or 'heldout', got {which!r}")
    images, labels = load_digit_arrays()
    train, held = _split_indices(seed, heldout_fraction)
    sel = train if which == "train" else held
    order = sel[np.argsort(labels[sel], kind="stable")]
    lab = torch.from_numpy(labels[order])
    counts = torch.bincount(lab, minlength=NUM_CLASSES)
    start = torch.cumsum(counts, 0) - counts
    return DigitSplit(torch.from_numpy(images[order]), lab, start, counts)


# ----------------------------------------------------------------------------------------------- prompts


def is_heldout_prompt(grid: torch.Tensor | np.ndarray) -> bool:
    """True if the class grid [G, G] belongs to the held-out prompt set (hash of its bytes and shape)."""
    if isinstance(grid, torch.Tensor):
        grid = grid.detach().to("cpu", torch.uint8).numpy()
    arr = np.ascontiguousarray(np.asarray(grid, dtype=np.uint8))
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"is_heldout_prompt: expected a square [G, G] grid, got shape {arr.shape}")
    h = hashlib.blake2b(arr.tobytes(), digest_size=8, person=b"attnplug-tb%03d" % arr.shape[0])
    return h.digest()[0] < HELDOUT_BYTE_LIMIT


def heldout_mask(prompts: torch.Tensor) -> torch.Tensor:
    """Bool [B]: which prompts [B, G, G] are held out (CPU result)."""
    arr = prompts.detach().to("cpu", torch.uint8).numpy()
    return torch.tensor([is_heldout_prompt(p) for p in arr], dtype=torch.bool)


def train_prompts(n: int, grid: int = DEFAULT_GRID, generator: torch.Generator | None = None) -> torch.Tensor:
    """`n` uniformly random training prompts [n, G, G] (int64, CPU); held-out grids are redrawn.

    `generator` must be a CPU generator (hashing happens on the CPU; move the result yourself).
    """
    out = torch.randint(0, NUM_CLASSES, (n, grid, grid), generator=generator)
    bad = heldout_mask(out)
    while bad.any():
        idx = bad.nonzero().flatten()
        out[idx] = torch.randint(0, NUM_CLASSES, (len(idx), grid, grid), generator=generator)
        bad = heldout_mask(out)
    return out


def heldout_prompts(n: int, grid: int = DEFAULT_GRID, seed: int = 1234) -> torch.Tensor:
    """The first `n` held-out prompts [n, G, G] (int64) of the evaluation stream `seed` (deterministic, CPU)."""
    g = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < n:
        cand = torch.randint(0, NUM_CLASSES, (256, grid, grid), generator=g)
        out.extend(p for p in cand if is_heldout_prompt(p))
    return torch.stack(out[:n])


# ----------------------------------------------------------------------------------------------- images


def render_mosaics(prompts: torch.Tensor, split: DigitSplit, generator: torch.Generator | None = None,
                   gain_jitter: float = 0.0) -> torch.Tensor:
    """Images [B, 1, 8G, 8G] in [-1, 1]: each cell a random digit image of the prompted class from `split`.

    `gain_jitter` > 0 multiplies each cell by U(1 - j, 1 + j) before clipping (light augmentation).
    Everything runs on `prompts.device`; `split` and `generator` must live there too.
    """
    if prompts.ndim != 3 or prompts.shape[1] != prompts.shape[2]:
        raise ValueError(f"render_mosaics: prompts must be [B, G, G], got {tuple(prompts.shape)}")
    b, g, _ = prompts.shape
    dev = prompts.device
    u = torch.rand(prompts.shape, generator=generator, device=dev)
    count = split.class_count.to(dev)[prompts]
    idx = split.class_start.to(dev)[prompts] + (u * count).long().clamp_max(count - 1)
    cells = split.images.to(dev)[idx]  # [B, G, G, 8, 8]
    if gain_jitter > 0:
        gain = 1 + gain_jitter * (2 * torch.rand((b, g, g, 1, 1), generator=generator, device=dev) - 1)
        cells = (cells * gain).clamp(0, 16)
    img = cells.permute(0, 1, 3, 2, 4).reshape(b, 1, g * DIGIT_PX, g * DIGIT_PX)
    return img / 8.0 - 1.0


def to_digit_scale(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> scikit-learn digit scale 0..16 (clipped)."""
    return ((images.float() + 1.0) * 8.0).clamp(0, 16)


def cells_of(images: torch.Tensor) -> torch.Tensor:
    """Cut images [B, 1, 8G, 8G] into cells [B, G, G, 8, 8]."""
    if images.ndim != 4 or images.shape[1] != 1 or images.shape[2] % DIGIT_PX or images.shape[2] != images.shape[3]:
        raise ValueError(f"cells_of: images must be [B, 1, 8G, 8G], got {tuple(images.shape)}")
    b, _, h, _ = images.shape
    g = h // DIGIT_PX
    return images.reshape(b, g, DIGIT_PX, g, DIGIT_PX).permute(0, 1, 3, 2, 4)


# ----------------------------------------------------------------------------------------------- packing


def pack(images: torch.Tensor) -> torch.Tensor:
    """Images [B, C, H, W] -> tokens [B, (H/2)(W/2), 4C] (same 2x2 order as diffusers' Flux pipeline)."""
    if images.ndim != 4 or images.shape[2] % PATCH or images.shape[3] % PATCH:
        raise ValueError(f"pack: images must be [B, C, H, W] with even H, W, got {tuple(images.shape)}")
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Tokens [B, N, 4C] -> images [B, C, height, width]; inverse of `pack`."""
    b, n, d = tokens.shape
    hh, ww = height // PATCH, width // PATCH
    if n != hh * ww or d % (PATCH * PATCH):
        raise ValueError(f"unpack: tokens {tuple(tokens.shape)} do not fit an image of {height}x{width}")
    c = d // (PATCH * PATCH)
    x = tokens.reshape(b, hh, ww, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def img_ids(grid: int = DEFAULT_GRID, device: torch.device | str = "cpu") -> torch.Tensor:
    """Position ids [(4G)^2, 3] of the image tokens: (0, row, col) on the token grid, row-major."""
    side = grid * DIGIT_PX // PATCH
    r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([torch.zeros_like(r), r, c], -1).reshape(-1, 3).float().to(device)


def txt_ids(grid: int = DEFAULT_GRID, device: torch.device | str = "cpu") -> torch.Tensor:
    """Position ids [G*G, 3] of the conditioning tokens: (0, row, col) at each cell's centre on the token grid."""
    per = DIGIT_PX // PATCH  # tokens per cell side
    centre = torch.arange(grid).float() * per + (per - 1) / 2
    r, c = torch.meshgrid(centre, centre, indexing="ij")
    return torch.stack([torch.zeros_like(r), r, c], -1).reshape(-1, 3).to(device)


def image_size(grid: int = DEFAULT_GRID) -> int:
    """Side in pixels of a G x G mosaic."""
    return grid * DIGIT_PX
