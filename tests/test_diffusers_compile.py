"""diffusers host under torch.compile (fullgraph not required).

The wrapped processors are traced by dynamo; the session call (`_route_dispatch`) and the step hook
(`_observe_forward`) are `torch.compiler.disable` boundaries, i.e. the only graph breaks attnplug adds.
Dynamo's "eager" backend keeps this test fast on 2 CPU cores; the inductor backend was checked by hand
(same graphs and graph breaks; outputs within 3e-6 of eager, as inductor fuses differently).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import torch._dynamo
from attnplug.core import Session
from attnplug.hosts.diffusers import apply
from attnplug.hosts.diffusers import testing as tiny
from torch._dynamo.utils import counters

HOST = {"backend": "host", "exact": "host", "loggers": []}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(old)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(8, 3),
        guidance=torch.tensor([3.5]),
    )


def test_patched_flux_transformer_runs_under_torch_compile():
    model = tiny.tiny_flux_transformer(0)
    inputs = _inputs()
    session = Session(HOST)
    calls = []
    inner = session.attention

    def record(q, k, v, call, mask=None, host_attention=None):
        calls.append(call)
        return inner(q, k, v, call, mask, host_attention)

    session.attention = record
    with apply(model, session) as handle, torch.no_grad():
        eager = [model(timestep=torch.tensor([t]), **inputs).sample for t in (0.9, 0.6)]
        compiled = torch.compile(model, backend="eager")
        out = [compiled(timestep=torch.tensor([t]), **inputs).sample for t in (0.9, 0.6)]
        summary = handle.session.summary()["layers"]
    for a, b in zip(out, eager):
        assert torch.equal(a, b)
    # the token split the wrappers record inside the compiled region reaches the session unchanged
    assert calls[8:] == calls[:8] and len(calls) == 16
    assert all(c.n_cond_tokens == 8 and c.n_image_tokens == 16 for c in calls)
    assert [c.step_index for c in calls[8::4]] == [0, 1] and session.runs_done == 2
    assert {k: v["served"] for k, v in summary.items()} == {k: {"host": 4} for k in handle.layers}
    breaks = counters["graph_break"]
    assert breaks, "dynamo traced nothing: the compiled path did not run"
    for reason in breaks:
        assert "_route_dispatch" in reason or "_observe_forward" in reason, (
            f"unexpected graph break: {reason}"
        )


def test_apply_to_an_already_compiled_model_patches_the_original():
    model = tiny.tiny_flux2_transformer(0)
    compiled = torch.compile(model, backend="eager")
    inputs = dict(
        hidden_states=torch.randn(1, 16, 16),
        encoder_hidden_states=torch.randn(1, 8, 32),
        img_ids=torch.zeros(1, 16, 4),
        txt_ids=torch.zeros(1, 8, 4),
        guidance=torch.tensor([4.0]),
    )
    with torch.no_grad():
        ref = model(timestep=torch.tensor([0.5]), **inputs).sample
        with apply(compiled, HOST) as handle:
            assert handle.transformer is model
            out = compiled(timestep=torch.tensor([0.5]), **inputs).sample
            calls = {k: s.calls for k, s in handle.session.stats.items()}
    assert torch.equal(out, ref)
    assert calls == {"double:0": 1, "double:1": 1, "single:0": 1, "single:1": 1}


def test_flux_transformer_with_ttr_serving_under_torch_compile():
    """ttr serving the single blocks of a compiled Flux transformer: the session call stays eager (the only graph
    breaks are attnplug's two boundaries) and the compiled model gives the eager model's output, every single-block
    call served by ttr. (On a GPU, `attnplug bench-model --modes ttr-100/compile` runs this under
    mode="reduce-overhead", the pieces between the breaks in CUDA graphs.)"""
    model = tiny.tiny_flux_transformer(0)
    inputs = _inputs()
    cfg = {"backend": "ttr", "exact": "host", "loggers": [], "strict": True,
           "gates": [{"kind": "layers", "include": ["single:*"]}],
           "plugins": {"ttr": {"feature_dim": 16, "hidden": 32}}}
    session = Session(cfg)
    ttr = session.backends.get("ttr")
    for key in ("single:0", "single:1"):
        ttr.ready[key] = True
    with apply(model, session), torch.no_grad():
        eager = model(timestep=torch.tensor([0.7]), **inputs).sample
        compiled = torch.compile(model, backend="eager")
        out = compiled(timestep=torch.tensor([0.7]), **inputs).sample
        served = {k: dict(s.served) for k, s in session.stats.items()}
    torch.testing.assert_close(out, eager)
    assert served["single:0"] == {"ttr": 2} and served["single:1"] == {"ttr": 2}
    assert served["double:0"] == {"host": 2}
    for reason in counters["graph_break"]:
        assert "_route_dispatch" in reason or "_observe_forward" in reason, f"unexpected graph break: {reason}"
