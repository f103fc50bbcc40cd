"""Run a function on N gloo CPU processes (torch.multiprocessing, spawn) and collect what each returns.

Rendezvous through a file in the test's tmp_path (no port to find), a timeout on every collective and on the
whole run, so that a hang fails the test within a minute instead of blocking the suite.
"""
from __future__ import annotations

import os
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def need_gloo() -> None:
    """Skip the calling test where torch.distributed or its gloo backend is missing."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")


def _entry(worker: Callable[..., Any], rank: int, world: int, init: str, out: str, args: tuple[Any, ...]) -> None:
    """One rank: run the worker, save its result, then leave without tearing gloo down under a peer.

    All ranks meet at a barrier before the group is destroyed, and a rank that saved its result leaves through
    `os._exit(0)`: gloo's background threads can otherwise abort the process at interpreter exit ("terminate
    called without an active exception") on a loaded machine, after the work itself succeeded."""
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        result = worker(rank, world, *args)
        torch.save(result, os.path.join(out, f"result-{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        Path(out, f"error-{rank}.txt").write_text(traceback.format_exc())
        raise
    os._exit(0)


def run_ranks(worker: Callable[..., Any], world: int, tmp_path: Path, *args: Any, timeout: float = 120.0) -> list[Any]:
    """`worker(rank, world, *args)` on `world` processes with a gloo group initialised; returns each rank's result
    (torch.save-able). A rank that fails or a run past `timeout` seconds fails the test with the ranks' tracebacks."""
    need_gloo()
    out = tmp_path / f"ranks-{world}-{time.monotonic_ns()}"
    out.mkdir()
    init = f"file://{out / 'rendezvous'}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(worker, r, world, init, str(out), args), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    errors = "\n".join(f.read_text() for f in sorted(out.glob("error-*.txt")))
    if hung:
        pytest.fail(f"ranks {hung} of {world} still running after {timeout:.0f} s\n{errors}")
    failed = [r for r, p in enumerate(procs) if p.exitcode != 0 or not (out / f"result-{r}.pt").exists()]
    if failed:
        codes = {r: procs[r].exitcode for r in failed}
        pytest.fail(f"ranks {failed} of {world} failed (exit codes {codes})\n{errors}")
    return [torch.load(out / f"result-{r}.pt", weights_only=False) for r in range(world)]
