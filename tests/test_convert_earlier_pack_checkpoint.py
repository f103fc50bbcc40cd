"""convert_seed_checkpoint on synthetic files in the layout of the earlier ComfyUI node pack (Flux2TTR v2)."""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnplug.core import AttentionCall, Plugins, Session, load_checkpoint
from attnplug.plugins.ttr.seed_convert import SeedCheckpointError, convert_seed_checkpoint

BUILTINS = {"core": "attnplug.core.builtin", "landmark": "attnplug.plugins.landmark.plugin",
            "ttr": "attnplug.plugins.ttr.plugin"}
FEAT, HEADS, HEAD_DIM = 32, 2, 16
HID = max(HEAD_DIM, 2 * FEAT)


class SeedPhi(nn.Module):
    """The earlier pack's φ: Linear · SiLU · Linear · SiLU · Linear, ELU + 1, L2-normalized."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(HEAD_DIM, HID), nn.SiLU(), nn.Linear(HID, HID), nn.SiLU(),
                                 nn.Linear(HID, FEAT))

    def forward(self, x):
        y = F.elu(self.net(x)) + 1
        return y / y.norm(dim=-1, keepdim=True).clamp_min(1e-6)


class SeedLayer(nn.Module):
    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.phi_q, self.phi_k = SeedPhi(), SeedPhi()
        self.alpha = nn.Parameter(torch.tensor(alpha))
        self.conditioner = nn.Module()
        self.conditioner.net = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 4))

    def kernel(self, q, k, v):
        """The earlier pack's kernel branch: out = φq·KV / max(φq·Ksum, 1e-6)."""
        pq, pk = self.phi_q(q), self.phi_k(k)
        kv = pk.transpose(-1, -2) @ v
        den = (pq @ pk.sum(2).unsqueeze(-1)).clamp_min(1e-6)
        return (pq @ kv) / den


def _seed_file(path: Path, alpha_format: str | None = "logit", **extra) -> dict[str, SeedLayer]:
    torch.manual_seed(3)
    layers = {"single:0": SeedLayer(-2.197), "double:1": SeedLayer(0.3 if alpha_format is None else 1.5)}
    data = {
        "format": "flux2_ttr_v2", "feature_dim": FEAT, "learning_rate": 1e-4, "comet_project_name": "x",
        "landmark_fraction": 0.1, "landmark_min": 32, "landmark_max": 256, "qk_norm": True,
        "alpha_max": 0.2, "gamma": 2.0, "last_loss": 0.5, "log_var_huber": 0.0, "log_var_cosine": -1.0,
        "layer_specs": {k: {"num_heads": HEADS, "head_dim": HEAD_DIM} for k in layers},
        "layers": {k: {n: t.detach().clone() for n, t in m.state_dict().items()} for k, m in layers.items()},
        "layer_readiness": {"single:0": {"ready": True, "threshold": 0.1, "ema": 0.05, "count": 300},
                            "double:1": {"ready": False}},
        "optimizer_states": {"single:0": {"state": {}, "param_groups": [{"lr": 1e-4}]}},
    }
    if alpha_format is not None:
        data["alpha_format"] = alpha_format
    data.update(extra)
    torch.save(data, path)
    return layers


def _session(result, checkpoint: Path) -> Session:
    cfg = {"backend": "ttr", "exact": "sdpa", "loggers": [], "checkpoint": str(checkpoint),
           "plugins": {"ttr": {k: result.ttr_settings[k] for k in ("feature_dim", "depth", "hidden", "l2_norm",
                                                                   "split_qk", "conditioner", "alpha_max")},
                       "landmark": result.landmark_settings}}
    return Session(cfg, Plugins(builtins=BUILTINS, load_entry_points=False))


def test_converts_and_reproduces_the_earlier_pack_kernel_branch(tmp_path: Path) -> None:
    seed_layers = _seed_file(tmp_path / "flux2_ttr.pt")
    out = tmp_path / "converted.safetensors"
    result = convert_seed_checkpoint(tmp_path / "flux2_ttr.pt", out)
    assert result.layers == ["double:1", "single:0"] and result.ready == ["single:0"]
    assert result.ttr_settings["depth"] == 3 and result.ttr_settings["hidden"] == 0
    assert result.ttr_settings["l2_norm"] is True and result.ttr_settings["activation"] == "elu+1"
    assert result.landmark_settings == {"fraction": 0.1, "min": 32, "max": 256, "window": 0}  # the earlier pack: no window
    assert result.ttr_settings["alpha_max"] == 0.2 and "alpha_max = 0.2" in result.config_toml
    assert "[plugins.ttr]" in result.config_toml and "feature_dim = 32" in result.config_toml
    meta = load_checkpoint(out)["backend.ttr"][1]
    assert meta["landmark"] == {"fraction": 0.1, "min": 32, "max": 256, "window": 0}

    session = _session(result, out)
    ttr = session.backends.get("ttr")
    assert ttr.ready == {"double:1": False, "single:0": True}
    layer = ttr.layers["single:0"]
    assert torch.allclose(layer.alpha_logit, torch.full((HEADS,), -2.197))
    q, k, v = (torch.randn(1, HEADS, 40, HEAD_DIM) for _ in range(3))
    with torch.no_grad():
        ref = seed_layers["single:0"].kernel(q, k, v)
    ttr.settings = ttr.settings.model_copy(update={"landmark": False})  # kernel branch only
    out_k = ttr(q, k, v, AttentionCall("single:0", n_cond_tokens=8, n_image_tokens=32))
    torch.testing.assert_close(out_k, ref, atol=1e-5, rtol=1e-5)
    sd = seed_layers["double:1"].conditioner.net[2].weight
    assert torch.equal(ttr.layers["double:1"].conditioner.fc2.weight, sd)


def test_raw_alpha_is_migrated_to_logits(tmp_path: Path) -> None:
    _seed_file(tmp_path / "seed.pt", alpha_format=None)
    convert_seed_checkpoint(tmp_path / "seed.pt", tmp_path / "out.safetensors")
    tensors = load_checkpoint(tmp_path / "out.safetensors")["backend.ttr"][0]
    torch.testing.assert_close(tensors["double:1/alpha_logit"], torch.full((HEADS,), math.log(0.3 / 0.7)))
    # raw -2.197 <= 0 → -5, as the earlier pack migrated it
    torch.testing.assert_close(tensors["single:0/alpha_logit"], torch.full((HEADS,), -5.0))


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("case", ["wrong_format", "not_torch", "truncated", "pickled_code", "not_dict",
                                  "feature_dim_mismatch", "unknown_tensor", "missing_spec", "attnplug_file"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_refuses_anything_else_and_leaves_output_untouched(tmp_path: Path, case: str, capsys) -> None:
    src = tmp_path / "in.pt"
    if case == "wrong_format":
        _seed_file(src, format="flux2_ttr_v1")
    elif case == "not_torch":
        src.write_text("hello")
    elif case == "truncated":
        _seed_file(src)
        src.write_bytes(src.read_bytes()[:300])
    elif case == "pickled_code":
        src.write_bytes(pickle.dumps({"format": "flux2_ttr_v2", "x": Evil()}))
    elif case == "not_dict":
        torch.save([1, 2, 3], src)
    elif case == "feature_dim_mismatch":
        _seed_file(src, feature_dim=64)
    elif case == "unknown_tensor":
        layers = _seed_file(tmp_path / "tmp.pt")
        data = torch.load(tmp_path / "tmp.pt", weights_only=True)
        data["layers"]["single:0"]["extra_gate"] = torch.zeros(3)
        torch.save(data, src)
        del layers
    elif case == "missing_spec":
        _seed_file(src, layer_specs={"single:0": {"num_heads": HEADS, "head_dim": HEAD_DIM}})
    elif case == "attnplug_file":
        _seed_file(tmp_path / "seed.pt")
        convert_seed_checkpoint(tmp_path / "seed.pt", src)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous contents")
    with pytest.raises(SeedCheckpointError) as err:
        convert_seed_checkpoint(src, out)
    assert str(src) in str(err.value)
    expected = {"wrong_format": "format 'flux2_ttr_v1'", "not_torch": "weights_only", "truncated": "weights_only",
                "pickled_code": "weights_only", "not_dict": "expected a dict",
                "feature_dim_mismatch": "expected (128, 16) (head_dim 16, feature_dim 64", "unknown_tensor": "unexpected tensors ['extra_gate']",
                "missing_spec": "double:1: missing from layer_specs", "attnplug_file": "weights_only"}[case]
    assert expected in str(err.value)
    assert out.read_bytes() == b"previous contents"
    assert "this must never run" not in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []
