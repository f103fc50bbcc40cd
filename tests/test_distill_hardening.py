"""The distiller under pressure: CPU allocation failures are out-of-memory (shrink, then stop training the layer,
sampling goes on), and a soak of many calls of varied sizes keeps the replay within its byte budget exactly."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attnplug.core import AttentionCall

_spec = importlib.util.spec_from_file_location("distill_fakes_h", Path(__file__).with_name("test_distill_fakes.py"))
fk = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(fk)  # type: ignore[union-attr]

pytestmark = pytest.mark.usefixtures("one_thread")

CPU_OOM = ("[enforce fail at alloc_cpu.cpp:114] data. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)")


def _call(key: str, step: int) -> AttentionCall:
    return AttentionCall(key, "single", int(key[-1]), sigma=1 - step / 8, step_index=step, num_steps=8, host="test")


@pytest.mark.parametrize("error", [lambda: RuntimeError(CPU_OOM), lambda: MemoryError()])
def test_cpu_allocation_failures_shrink_then_stop_training_the_layer(error):
    s = fk.make_session({"query_cap": 32, "oom_min_query_cap": 8, "log_every": 0, "layer_log_every": 0})
    student, d = s.backends.get("fake"), s.distiller
    real = student.train_forward

    def failing(layer_key, *args, **kwargs):
        if layer_key == "single:0":
            raise error()
        return real(layer_key, *args, **kwargs)

    student.train_forward = failing
    gen = torch.Generator().manual_seed(0)
    for step in range(8):
        for key in ("single:0", "single:1"):
            q, k, v = fk.make_qkv(gen, n=48)
            out = s.attention(q, k, v, _call(key, step))
            torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))  # the teacher, every time
    assert d.query_caps["single:0"] == 8 and "single:0" in d.selector.disabled
    assert d.oom_events["single:0"] == 3  # 32 -> 16 (+ chunks), 16 -> 8 (+ chunks), then nothing left: stopped
    assert d.readiness["single:1"].updates > 0 and "single:1" not in d.selector.disabled
    assert not any(st.fallbacks for st in s.stats.values()), "an out-of-memory is not a distiller error"


def test_other_runtime_errors_are_not_taken_for_out_of_memory():
    s = fk.make_session({"log_every": 0, "layer_log_every": 0})
    student = s.backends.get("fake")

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    student.train_forward = broken
    q, k, v = fk.make_qkv(torch.Generator().manual_seed(0), n=32)
    s.attention(q, k, v, _call("single:0", 0))
    assert s.stats["single:0"].fallbacks["distiller error"] == 1 and not s.distiller.oom_events


def test_replay_soak_keeps_the_byte_budget_exactly():
    """500 calls over four layers with token counts from 8 to 640 (some samples larger than the budget):
    after every call the bytes accounted are the bytes stored, never above the budget; queues keep their cap."""
    budget_mb = 0.12
    s = fk.make_session({"train_steps_per_call": 0, "replay_per_layer": 2, "replay_max_mb": budget_mb,
                         "query_cap": 16, "replay_dtype": "float32", "log_every": 0, "layer_log_every": 0})
    replay = s.distiller.replay
    gen = torch.Generator().manual_seed(7)
    sizes = [8, 8, 24, 48, 96, 160, 640]
    for i in range(500):
        step = i % 8
        key = f"single:{i % 4}"
        q, k, v = fk.make_qkv(gen, n=sizes[int(torch.randint(len(sizes), (1,), generator=gen))])
        s.attention(q, k, v, _call(key, step))
        stored = [x for queue in replay.queues.values() for x in queue]
        assert replay.bytes_used == sum(x.nbytes for x in stored) <= replay.max_bytes
        assert all(len(queue) <= replay.per_layer for queue in replay.queues.values())
        assert all(x.live is None for x in stored), "no device copy outlives its call"
    c = replay.counters
    assert replay.max_bytes == int(budget_mb * 2**20) and replay.peak_bytes <= replay.max_bytes
    assert c.pushed == c.next_seq - c.rejected_too_large
    assert c.rejected_too_large > 0 and c.evicted_budget > 0 and c.evicted_per_layer > 0
    assert c.pushed - c.evicted_budget - c.evicted_per_layer == len(replay)
