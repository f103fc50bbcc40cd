"""Replay of the online distiller: one global byte budget, globally-oldest eviction, storage dtype."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from attnplug.core import AttentionCall
from attnplug.plugins.ttr.replay import ReplayBuffer, ReplaySample, to_storage

_spec = importlib.util.spec_from_file_location(
    "distill_fakes_rp", Path(__file__).with_name("test_distill_fakes.py")
)
fk = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(fk)  # type: ignore[union-attr]


pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread (conftest)


def _sample(key: str, nk: int, nq: int = 4, d: int = 8, mask: bool = False) -> ReplaySample:
    def t(n: int) -> torch.Tensor:
        return torch.zeros(1, 2, n, d, dtype=torch.float16)

    m = torch.ones(1, nk, dtype=torch.bool) if mask else None
    return ReplaySample(key, t(nq), t(nk), t(nk), t(nq), m, AttentionCall(key))


def test_budget_never_exceeded_and_globally_oldest_evicted_first_over_a_long_run():
    gen = torch.Generator().manual_seed(0)
    buf = ReplayBuffer(max_bytes=200_000, per_layer=6)
    stored_seqs: set[int] = set()
    budget_evictions = 0
    for i in range(3000):
        key = f"single:{int(torch.randint(12, (1,), generator=gen))}"
        nk = int(torch.randint(16, 1200, (1,), generator=gen))
        s = _sample(key, nk, mask=bool(i % 2))
        before = {x.seq for q in buf.queues.values() for x in q}
        before_budget = buf.counters.evicted_budget
        before_layer = buf.counters.evicted_per_layer
        layer_oldest = buf.queues[key][0].seq if buf.queues.get(key) and len(buf.queues[key]) >= 6 else None
        assert buf.push(s)
        after = {x.seq for q in buf.queues.values() for x in q}
        evicted = before - after
        n_budget = buf.counters.evicted_budget - before_budget
        n_layer = buf.counters.evicted_per_layer - before_layer
        assert len(evicted) == n_budget + n_layer
        if n_layer:
            assert layer_oldest in evicted
        budget_evicted = evicted - ({layer_oldest} if n_layer else set())
        if budget_evicted:  # the budget evicted the globally oldest samples: every survivor is younger
            budget_evictions += 1
            assert max(budget_evicted) < min(after - {s.seq})
        assert buf.bytes_used <= buf.max_bytes
        assert buf.bytes_used == sum(x.nbytes for q in buf.queues.values() for x in q)
        assert all(len(q) <= 6 for q in buf.queues.values())
    assert budget_evictions > 100 and buf.peak_bytes <= buf.max_bytes
    stored_seqs = {x.seq for q in buf.queues.values() for x in q}
    assert stored_seqs


def test_too_large_sample_is_rejected_not_stored():
    buf = ReplayBuffer(max_bytes=10_000, per_layer=4)
    assert buf.push(_sample("a", 16))
    assert not buf.push(_sample("a", 4000))
    assert buf.counters.rejected_too_large == 1 and len(buf) == 1


def test_storage_copy_dtype_and_fp16_overflow():
    x = torch.randn(2, 3)
    y = to_storage(x, torch.float16, "cpu")
    assert y.dtype == torch.float16 and y.data_ptr() != x.data_ptr()
    big = torch.tensor([1e6, 1.0])
    assert to_storage(big, torch.float16, "cpu").dtype == torch.bfloat16, (
        "fp16 overflow stored as bf16, not inf"
    )
    assert to_storage(torch.ones(3, dtype=torch.bool), torch.float16, "cpu").dtype == torch.bool
    with torch.inference_mode():
        z = torch.randn(3)
        assert not to_storage(z, torch.float32, "cpu").is_inference()


def test_session_replay_stays_in_budget_on_cpu_fp16():
    # ~ (2*96 + 2*32) * 2 heads * 16 dims * 2 bytes ≈ 16 KiB per sample; budget holds ~6 of them
    s = fk.make_session(
        {
            "replay_max_mb": 0.1,
            "query_cap": 32,
            "replay_per_layer": 4,
            "log_every": 0,
            "layer_log_every": 0,
            "min_swap_layers": 3,
        }
    )
    gen = torch.Generator().manual_seed(1)
    fk.run_sampling(s, runs=2, steps=10, layers=["single:0", "single:1", "single:2"], gen=gen)
    buf = s.distiller.replay
    assert buf.peak_bytes <= buf.max_bytes == int(0.1 * 2**20)
    assert buf.counters.pushed == 60 and buf.counters.evicted_budget > 0
    for q in buf.queues.values():
        for smp in q:
            assert smp.k.dtype == torch.float16 and smp.k.device.type == "cpu" and smp.live is None


def test_export_restore_roundtrip():
    buf = ReplayBuffer(max_bytes=1_000_000, per_layer=3)
    for i in range(7):
        smp = _sample(f"single:{i % 2}", 20 + i, mask=bool(i % 2))
        smp.k.fill_(i)
        buf.push(smp)
    tensors, records = buf.export()
    other = ReplayBuffer(max_bytes=1_000_000, per_layer=3)
    other.counters = type(buf.counters).from_json(buf.counters.to_json())
    other.restore(tensors, records, torch.float16, "cpu")
    for key in buf.queues:
        a, b = buf.layer(key), other.layer(key)
        assert [x.seq for x in a] == [x.seq for x in b]
        for x, y in zip(a, b):
            assert torch.equal(x.k, y.k) and (x.mask is None) == (y.mask is None)
    assert other.counters.to_json() == buf.counters.to_json() and other.bytes_used == buf.bytes_used
