"""NaN end to end on the testbed: an approximate backend that returns NaN on every call it serves, sampled through
the diffusers host — the default finite check keeps every non-finite value out of the image (which is then the
exact image), counts each caught call and warns once per layer."""
from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("diffusers")

from attnplug.core import Session, hookimpl
from attnplug.core.backend import Backend, Capabilities
from attnplug.core.plugins import Plugins
from attnplug.hosts.diffusers import apply
from attnplug.testbed import data, sampling
from attnplug.testbed.model import load_testbed

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 3


class NanBackend(Backend):
    """Serves every call with NaN (a broken kernel)."""

    name = "nan"
    capabilities = Capabilities(exact=False)
    calls = 0

    def forward(self, q, k, v, call, mask=None):
        NanBackend.calls += 1
        return torch.full((*q.shape[:3], v.shape[-1]), float("nan"), dtype=q.dtype, device=q.device)


class NanPlugin:
    @hookimpl
    def attnplug_register_backends(self, registrar):
        registrar.add("nan", lambda settings, session: NanBackend(), doc="NaN on every call (tests)")


@pytest.fixture(scope="module")
def exact_images():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load_testbed("cpu")
        prompts = data.heldout_prompts(1, seed=7)
        noise = sampling.initial_noise(1, prompts.shape[1], seed=3)
        return prompts, noise, sampling.sample(model, prompts, noise, steps=STEPS)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("finite_check", ["every_call"])  # the default
def test_nan_from_the_approximate_backend_never_reaches_the_image(exact_images, caplog, finite_check):
    prompts, noise, expected = exact_images
    plugins = Plugins(builtins={"core": "attnplug.core.builtin"}, load_entry_points=False)
    plugins.register(NanPlugin(), name="nan-plugin")
    config = {"backend": "nan", "exact": "host", "loggers": [], "finite_check": finite_check,
              "gates": [{"kind": "layers", "include": ["single:*", "single:9"]}]}
    session = Session(config, plugins)
    model = load_testbed("cpu")
    NanBackend.calls = 0
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        handle = apply(model.transformer, session)
        try:
            images = sampling.sample(model, prompts, noise, steps=STEPS)
        finally:
            handle.remove()
            session.close()
    assert bool(torch.isfinite(images).all())
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)  # every NaN call was recomputed exactly
    single = {k: s for k, s in session.stats.items() if k.startswith("single:")}
    assert len(single) == 6 and NanBackend.calls == sum(s.calls for s in single.values()) > 0
    assert all(s.fallbacks["non-finite output"] == s.calls and "nan" not in s.served for s in single.values())
    messages = [r.getMessage() for r in caplog.records]
    assert sum("returned non-finite" in m or "non-finite output" in m for m in messages) == len(single)  # once each
    # the host knows the testbed's layers: a layer pattern that matches none of them is named at apply
    assert sum("pattern 'single:9' matches none of the model's layers (double:0-1, single:0-5)" in m
               for m in messages) == 1
