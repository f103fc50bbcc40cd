"""The ttr backend's fused inference path (plugins/ttr/kernels) against its PyTorch path, on a GPU."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from attnplug.core import AttentionCall, LayerSpec
from attnplug.plugins.landmark.backend import LandmarkBackend
from attnplug.plugins.landmark.settings import LandmarkSettings
from attnplug.plugins.ttr.backend import TtrBackend
from attnplug.plugins.ttr.settings import TtrSettings

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("triton")),
                                reason="needs CUDA and triton")


def _pair(landmarks: LandmarkSettings | None = None, **kw):
    lm = LandmarkBackend(landmarks or LandmarkSettings())
    fused = TtrBackend(TtrSettings(kernel="triton", **kw), landmark=lm.branch)
    ref = TtrBackend(TtrSettings(kernel="torch", **kw), landmark=lm.branch)
    spec = LayerSpec("single:0", 4, 64)
    layer = fused.layer(spec, torch.device("cuda"))
    with torch.no_grad():
        layer.conditioner.fc2.bias.copy_(torch.tensor([0.1, 0.02, -0.1, 0.01]))
        layer.alpha_logit.copy_(torch.tensor([-2.0, -1.0, 0.0, 1.0]))
    ref.layer(spec, torch.device("cuda")).load_state_dict(layer.state_dict())
    return fused, ref


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [2, 0], ids=["default-window", "no-window"])
def test_fused_matches_torch_path(adaptive: bool, dtype: torch.dtype, window: int) -> None:
    """The default landmark settings (window r = 2 on the call's 32 x 32 grid) and the landmarks alone."""
    fused, ref = _pair(LandmarkSettings(window=window), adaptive_alpha=adaptive)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1088, 64, device="cuda", generator=g).to(dtype) for _ in range(3))
    call = AttentionCall("single:0", n_cond_tokens=64, n_image_tokens=1024, latent_grid=(32, 32), sigma=0.7,
                         cfg_scale=3.0)
    with torch.inference_mode():
        a = fused(q, k, v, call)
        b = ref(q, k, v, call)
    assert a.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def test_auto_keeps_fp32_on_the_torch_path() -> None:
    fused, ref = _pair()
    fused.settings = fused.settings.model_copy(update={"kernel": "auto"})
    q, k, v = (torch.randn(1, 4, 320, 64, device="cuda") for _ in range(3))
    call = AttentionCall("single:0", n_cond_tokens=64, n_image_tokens=256, sigma=0.7)
    assert torch.equal(fused(q, k, v, call), ref(q, k, v, call))


def test_key_padding_without_landmarks_is_fused_and_masked_landmarks_fall_back() -> None:
    fused, ref = _pair(landmark=False)
    q, k, v = (torch.randn(2, 4, 512, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    keep = torch.ones(2, 512, dtype=torch.bool, device="cuda")
    keep[1, 400:] = False
    call = AttentionCall("single:0", n_cond_tokens=0, n_image_tokens=512)
    torch.testing.assert_close(fused(q, k, v, call, keep).float(), ref(q, k, v, call, keep).float(), atol=2e-2,
                               rtol=2e-2)
    hybrid, _ = _pair(LandmarkSettings(window=0))  # (a window with a key mask is declined for its own reason)
    with pytest.raises(ValueError, match="per-batch landmark sets"):
        hybrid(q, k, v, call, keep)  # kernel = 'triton' refuses; 'auto' would take the PyTorch path
    hybrid.settings = hybrid.settings.model_copy(update={"kernel": "auto"})
    assert hybrid(q, k, v, call, keep).shape == q.shape
