"""The testbeds by name: one architecture family at three sizes, each with its weights and training recipe.

Every testbed is the same network (2 double + 6 single blocks, 4 heads x 32; `model.TestbedConfig`) on the
same digit-mosaic task; only the number of cells differs, so a cell is always one 8x8 digit (4x4 tokens) and
the digit classifier reads the samples the same way at every size:

- `default` — 8x8 cells, a 32x32 latent grid: 1 024 image tokens + 64 conditioning tokens (the committed
  model, `weights/`);
- `grid64` — 16x16 cells, a 64x64 latent grid: 4 096 image tokens + 256 conditioning tokens (what FLUX
  sees at 1024², where ttr is about as fast as exact attention);
- `grid128` — 32x32 cells, a 128x128 latent grid: 16 384 image tokens + 1 024 conditioning tokens (FLUX
  at 2048², where ttr is several times faster).

Because the layers have the same heads and head size everywhere, a ttr checkpoint distilled on one testbed
loads on another (resolution transfer). Each `Testbed` names its weights file, the command that trains it
and the recipe that command uses (`train.py --testbed NAME`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import data
from .model import WEIGHTS_DIR, TestbedConfig, TestbedModel


class TestbedMissing(FileNotFoundError):
    """A testbed's weights are not there yet; the message says how to train them (one line)."""

    __test__ = False


@dataclass(frozen=True)
class TrainRecipe:
    """How `python -m attnplug.testbed.train --testbed NAME` trains a testbed (each value an argument's default).

    `init_from`: testbeds whose weights may start the run, the first one trained wins (the transformer and the
    class embeddings carry over, the cell embeddings start at that model's mean cell embedding); none: from
    scratch. `minutes`: the wall-clock budget of the training loop on one H200 (the evaluation after it comes on
    top; `steps` is then an upper bound). `eval_prompts`: held-out prompts of the card's evaluation (64 x 64
    cells on the default testbed; the larger ones read as many cells or more from fewer prompts)."""

    steps: int
    batch: int
    lr: float
    minutes: float = 0.0
    init_from: tuple[str, ...] = ()
    warmup: float = 0.3
    ema: float = 0.999
    eval_prompts: int = 64
    eval_batch: int = 64

    def start_from(self) -> str | None:
        """The first testbed of `init_from` whose weights are there (None: from scratch)."""
        return next((name for name in self.init_from if TESTBEDS[name].weights.is_file()), None)


@dataclass(frozen=True)
class Testbed:
    """One named testbed: architecture, weights file, training recipe and the Flux shape it stands for."""

    __test__ = False

    name: str
    config: TestbedConfig
    weights: Path
    recipe: TrainRecipe
    flux_shape: str
    description: str = ""
    eval_batch: int = 8  # held-out prompts sampled together by `attnplug eval`

    @property
    def grid(self) -> int:
        """Cells per side."""
        return self.config.grid

    @property
    def image_tokens(self) -> int:
        return (data.image_size(self.grid) // data.PATCH) ** 2

    @property
    def cond_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def latent_side(self) -> int:
        return data.image_size(self.grid) // data.PATCH

    def train_command(self, out: str = "OUT") -> str:
        """The command that trains this testbed (then commit OUT's files into the weights folder)."""
        return (f"python -m attnplug.testbed.train --testbed {self.name} --out {out} --device cuda"
                + (f" --minutes {self.recipe.minutes:g}" if self.recipe.minutes else ""))

    def require_weights(self) -> Path:
        """The weights file; `TestbedMissing` (one line: how to train it) when it is not there."""
        if not self.weights.is_file():
            raise TestbedMissing(f"testbed {self.name!r} has no weights at {self.weights}; train it with: "
                                 f"{self.train_command()} (then copy OUT/testbed.safetensors, MODEL_CARD.md, "
                                 f"config.json and train.log to {self.weights.parent})")
        return self.weights

    def load(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> TestbedModel:
        """The trained model in eval mode; refuses weights of another grid than the registry's."""
        model = TestbedModel.load(self.require_weights(), device=device, dtype=dtype)
        if model.cfg != self.config:
            raise ValueError(f"testbed {self.name!r}: {self.weights} holds a model of grid {model.cfg.grid}, "
                             f"the registry expects {self.config}")
        return model

    def heldout_prompts(self, n: int, seed: int = 1234) -> torch.Tensor:
        return data.heldout_prompts(n, self.grid, seed=seed)


def _bed(name: str, grid: int, recipe: TrainRecipe, flux_shape: str, description: str,
         eval_batch: int) -> Testbed:
    folder = WEIGHTS_DIR if name == "default" else WEIGHTS_DIR / name
    return Testbed(name, TestbedConfig(grid=grid), folder / "testbed.safetensors", recipe, flux_shape,
                   description, eval_batch)


#: name → testbed. `default` is the committed model (its recipe: the command in weights/MODEL_CARD.md).
#: The larger ones start from a trained smaller model (the per-token work is the same, only more cells: grid128
#: from grid64 once that is trained, else from the default) and fine-tune at their size with a short warm-up and
#: a shorter EMA; their minutes fit the training loop and the evaluation of the saved file in one 10-minute
#: device call. On a CPU the default model sampled at 16x16 cells follows 15 % of them (its transformer and class
#: embeddings, the cells' mean embedding, or its 8x8 embeddings tiled): the larger grid must be learnt, not
#: only read. Estimated H200 rates (`train.py --estimate`, a CPU timing: docs/QUALITY.md, "Large testbeds"):
#: grid64 170-400 samples/s, grid128 ~13 samples/s (FLOP counts suggest two or three times that).
TESTBEDS: dict[str, Testbed] = {b.name: b for b in (
    _bed("default", data.DEFAULT_GRID, TrainRecipe(steps=6000, batch=128, lr=3e-4), "512² (1 024 image tokens)",
         "8x8 cells, 1 024 image tokens + 64 conditioning tokens", 8),
    _bed("grid64", 16, TrainRecipe(steps=4000, batch=32, lr=2e-4, minutes=7.0, init_from=("default",),
                                   warmup=0.05, ema=0.998, eval_prompts=32, eval_batch=32),
         "1024² (4 096 image tokens)", "16x16 cells, 4 096 image tokens + 256 conditioning tokens", 8),
    _bed("grid128", 32, TrainRecipe(steps=2000, batch=8, lr=1.5e-4, minutes=7.0, init_from=("grid64", "default"),
                                    warmup=0.05, ema=0.995, eval_prompts=16, eval_batch=8),
         "2048² (16 384 image tokens)", "32x32 cells, 16 384 image tokens + 1 024 conditioning tokens", 4),
)}
DEFAULT_TESTBED = "default"


def get_testbed(name: str | None = None) -> Testbed:
    """The testbed `name` (None: the default); `ValueError` listing the known names."""
    key = DEFAULT_TESTBED if name is None else name
    if key not in TESTBEDS:
        raise ValueError(f"unknown testbed {name!r}; known: {', '.join(TESTBEDS)}")
    return TESTBEDS[key]
