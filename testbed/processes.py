"""Run independent pieces of a testbed study side by side in spawned processes.

The testbed's model is small, so one study process is bound by Python on one CPU core and leaves the GPU mostly
idle; several processes sharing the GPU finish the same work in a fraction of the wall time. Each piece must be a
module-level function whose arguments pickle (paths, numbers, JSON-like values): it runs in a fresh interpreter.
"""
from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

T = TypeVar("T")


def run_side_by_side(fn: Callable[..., T], pieces: Sequence[Any], *args: Any) -> Iterator[T]:
    """`fn(piece, *args)` for every piece, each in its own spawned process (in this one when there is a single
    piece); results as each finishes. A piece that raises re-raises here."""
    if len(pieces) <= 1:
        for piece in pieces:
            yield fn(piece, *args)
        return
    with ProcessPoolExecutor(len(pieces), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(fn, piece, *args) for piece in pieces]
        for future in as_completed(futures):
            yield future.result()
