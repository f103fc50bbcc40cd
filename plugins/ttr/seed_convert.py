"""`convert_seed_checkpoint`: convert a checkpoint of the earlier ComfyUI node pack (Flux2TTR v2: `flux2_ttr.pt`,
format `flux2_ttr_v2`) into an attnplug checkpoint.

That pack (ComfyUI-Approximate-Attention) saved a `torch.save` dict. It is read with
`torch.load(weights_only=True)`, so a file that tries to run code is refused by torch itself.
Its layout is known only from a description of that pack, not from a real file; the key names
below are ASSUMPTIONS (marked *) that a real file must match, else it is refused with the name of
what is missing or unexpected:

    format: "flux2_ttr_v2"                 feature_dim: F (int)
    alpha_format: "logit" | absent (absent: α stored raw, a value in (0, 1) becomes its logit,
                  <= 0 → −5, >= 1 → +5, as the earlier pack migrated it)
    layer_specs*: {layer_key: {"num_heads"* | "heads": H, "head_dim": D}}
    layers: {layer_key: state_dict}
      phi_q.net.{0,2,4}.{weight,bias}*   Linear(D→h) · SiLU · Linear(h→h) · SiLU · Linear(h→F), h = max(D, 2F)
      phi_k.net.{0,2,4}.{weight,bias}*   (split_qk; a single shared map is `phi.net.*`*)
      alpha*: scalar (logit or raw, see alpha_format)
      conditioner.net.{0,2}.{weight,bias}*  Linear(64→128) · SiLU · Linear(128→4) (optional)
    landmark_fraction*, landmark_min*, landmark_max* (legacy landmark_count is ignored: 0.08/64/0; the
                  earlier pack had no local window, so the converted settings say window = 0)
    qk_norm* (default true), alpha_max* (0.2), gamma* (2.0), adaptive_alpha* (true)
    layer_readiness*: {layer_key: {"ready": bool, ...}} (optional; readiness is carried over)

Everything else in the file (optimizer states, Comet fields, EMAs, log-variances) is not ours to
import and is ignored. The result is an attnplug checkpoint with one component `backend.ttr`
whose settings are the earlier pack's architecture: depth 3, hidden 0 (= max(D, 2F)), elu+1, L2 norm as
saved, shared across heads. A session must use the same `[plugins.ttr]` architecture fields to load
it; `ConversionResult.config_toml` is the snippet to paste.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...core.call import LayerSpec
from ...core.checkpoint import save_checkpoint
from .backend import TtrBackend
from .settings import ARCHITECTURE_FIELDS, TtrSettings
from .state import with_added_tensors

log = logging.getLogger("attnplug")

SEED_FORMAT = "flux2_ttr_v2"
_LINEAR_IDX = (0, 2, 4)
_COND_IDX = (0, 2)


class SeedCheckpointError(ValueError):
    """The input is not a Flux2TTR v2 checkpoint this converter understands; the message says why."""


@dataclass
class ConversionResult:
    """What was converted: layer keys, the `[plugins.ttr]` / `[plugins.landmark]` values to use."""

    out_path: Path
    layers: list[str]
    ttr_settings: dict[str, Any]
    landmark_settings: dict[str, Any]
    ready: list[str] = field(default_factory=list)

    @property
    def config_toml(self) -> str:
        """Config lines that make a session accept the converted checkpoint."""
        def fmt(v: Any) -> str:
            return ("true" if v else "false") if isinstance(v, bool) else f'"{v}"' if isinstance(v, str) else repr(v)
        ttr = "\n".join(f"{k} = {fmt(self.ttr_settings[k])}" for k in ARCHITECTURE_FIELDS)
        lm = "\n".join(f"{k} = {fmt(v)}" for k, v in self.landmark_settings.items())
        return f"[plugins.ttr]\n{ttr}\n\n[plugins.landmark]\n{lm}\n"


def convert_seed_checkpoint(in_path: str | Path, out_path: str | Path) -> ConversionResult:
    """Read the earlier pack's `flux2_ttr.pt` and write an attnplug checkpoint to `out_path` (atomic).

    Raises `SeedCheckpointError` (a ValueError) naming the problem for anything else; `out_path`
    is only written after everything was read and validated, so on error it is untouched.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise SeedCheckpointError(f"{in_path}: no such file")
    if in_path.resolve() == out_path.resolve():
        raise SeedCheckpointError(f"{in_path}: input and output are the same file")
    try:
        raw = torch.load(str(in_path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad/unsafe files
        raise SeedCheckpointError(f"{in_path}: not loadable with torch.load(weights_only=True) "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                                  "it is truncated, not a torch file, or holds objects other than tensors "
                                  "and plain data") from None
    if not isinstance(raw, dict):
        raise SeedCheckpointError(f"{in_path}: expected a dict, got {type(raw).__name__}")
    fmt = raw.get("format")
    if fmt != SEED_FORMAT:
        raise SeedCheckpointError(f"{in_path}: format {fmt!r}; only {SEED_FORMAT!r} checkpoints can be converted"
                                  + (" (this is already an attnplug checkpoint?)" if fmt is None else ""))
    try:
        return _convert(raw, in_path, out_path)
    except SeedCheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise SeedCheckpointError(f"{in_path}: {type(exc).__name__}: {exc}") from None


def _convert(raw: dict[str, Any], in_path: Path, out_path: Path) -> ConversionResult:
    def bad(msg: str) -> SeedCheckpointError:
        return SeedCheckpointError(f"{in_path}: {msg}")

    feature_dim = raw.get("feature_dim")
    if not isinstance(feature_dim, int) or feature_dim <= 0 or feature_dim % 16:
        raise bad(f"feature_dim {feature_dim!r}: expected a positive multiple of 16")
    layers = raw.get("layers")
    specs = raw.get("layer_specs")
    if not isinstance(layers, dict) or not layers:
        raise bad("no 'layers' dict of per-layer state_dicts (nothing to convert)")
    if not isinstance(specs, dict):
        raise bad("no 'layer_specs' dict (layer_key → num_heads, head_dim)")

    first = next(iter(layers.values()))
    if not isinstance(first, dict):
        raise bad("'layers' values must be state_dicts")
    split_qk = any(k.startswith("phi_k.") for k in first)
    conditioner = any(k.startswith("conditioner.") for k in first)
    settings = TtrSettings(
        feature_dim=feature_dim, depth=3, hidden=0, activation="elu+1", per_head=False, split_qk=split_qk,
        l2_norm=bool(raw.get("qk_norm", True)), conditioner=conditioner,
        adaptive_alpha=bool(raw.get("adaptive_alpha", True)), alpha_max=float(raw.get("alpha_max", 0.2)),
        gamma=float(raw.get("gamma", 2.0)))
    alpha_is_logit = raw.get("alpha_format") == "logit"
    if raw.get("alpha_format") not in (None, "logit"):
        raise bad(f"alpha_format {raw.get('alpha_format')!r}: expected 'logit' or absent (raw)")

    backend = TtrBackend(settings)
    readiness = raw.get("layer_readiness") or {}
    for key, sd in layers.items():
        if not isinstance(sd, dict):
            raise bad(f"layer {key}: expected a state_dict, got {type(sd).__name__}")
        spec_raw = specs.get(key)
        if not isinstance(spec_raw, dict):
            raise bad(f"layer {key}: missing from layer_specs")
        heads = spec_raw.get("num_heads", spec_raw.get("heads"))
        head_dim = spec_raw.get("head_dim")
        if not isinstance(heads, int) or not isinstance(head_dim, int) or heads < 1 or head_dim < 1:
            raise bad(f"layer {key}: layer_specs entry {spec_raw!r} needs integer num_heads and head_dim")
        mapped = _map_layer(key, sd, heads, head_dim, settings, alpha_is_logit, bad)
        module = backend.layer(LayerSpec(key, heads, head_dim))
        expected = module.state_dict()
        for name, t in mapped.items():
            if tuple(t.shape) != tuple(expected[name].shape):
                raise bad(f"layer {key}: {name} maps to shape {tuple(t.shape)}, expected {tuple(expected[name].shape)}")
        # tensors the earlier pack never had (the running mean of d) keep the fresh layer's value: none kept
        module.load_state_dict(with_added_tensors(mapped, expected), strict=True)
        entry = readiness.get(key) if isinstance(readiness, dict) else None
        backend.ready[key] = bool(entry.get("ready", False)) if isinstance(entry, dict) else False

    # the earlier pack had no local window: window 0 is recorded (and goes into config_toml) explicitly, since
    # attnplug's default has the window on
    landmark = {"fraction": float(raw.get("landmark_fraction", 0.08)), "min": int(raw.get("landmark_min", 64)),
                "max": int(raw.get("landmark_max", 0)), "window": 0}
    if "landmark_count" in raw and "landmark_fraction" not in raw:
        log.info("attnplug: %s: legacy landmark_count %r ignored in favour of fraction 0.08, min 64, max 0 "
                 "(as the earlier pack did)", in_path, raw["landmark_count"])
    tensors, meta = backend.state()
    meta["landmark"] = landmark
    meta["converted_from"] = {"format": SEED_FORMAT, "file": in_path.name}
    save_checkpoint(out_path, {"backend.ttr": (tensors, meta)})
    result = ConversionResult(out_path, sorted(layers), settings.model_dump(), landmark,
                              sorted(k for k, r in backend.ready.items() if r))
    log.info("attnplug: converted %d layers of the earlier node pack from %s to %s; load it with:\n%s", len(layers), in_path,
             out_path, result.config_toml)
    return result


def _map_layer(key: str, sd: dict[str, Any], heads: int, head_dim: int, s: TtrSettings, alpha_is_logit: bool,
               bad: Any) -> dict[str, torch.Tensor]:
    """The earlier pack's per-layer state_dict → our TtrLayer's parameter names and layouts."""
    f = s.feature_dim
    h = max(head_dim, 2 * f)
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = sd.get(name)
        if not isinstance(t, torch.Tensor):
            raise bad(f"layer {key}: missing tensor {name!r}")
        if tuple(t.shape) != shape:
            raise bad(f"layer {key}: {name} has shape {tuple(t.shape)}, expected {shape} "
                      f"(head_dim {head_dim}, feature_dim {f}, hidden max(D, 2F) = {h})")
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise bad(f"layer {key}: {name} must be finite floating point")
        used.add(name)
        return t.detach().to(torch.float32)

    out: dict[str, torch.Tensor] = {}
    dims = [(head_dim, h), (h, h), (h, f)]
    nets = [("phi_q", "phi_q"), ("phi_k", "phi_k")] if s.split_qk else [("phi", "phi_q")]
    for src, dst in nets:
        for i, (idx, (fan_in, fan_out)) in enumerate(zip(_LINEAR_IDX, dims)):
            w = take(f"{src}.net.{idx}.weight", (fan_out, fan_in))
            b = take(f"{src}.net.{idx}.bias", (fan_out,))
            out[f"{dst}.weights.{i}"] = w.t().contiguous().unsqueeze(0)  # nn.Linear [out, in] → ours [1, in, out]
            out[f"{dst}.biases.{i}"] = b.unsqueeze(0)
    if s.conditioner:
        for idx, name, (fan_in, fan_out) in zip(_COND_IDX, ("fc1", "fc2"), [(64, 128), (128, 4)]):
            out[f"conditioner.{name}.weight"] = take(f"conditioner.net.{idx}.weight", (fan_out, fan_in))
            out[f"conditioner.{name}.bias"] = take(f"conditioner.net.{idx}.bias", (fan_out,))
    alpha = sd.get("alpha")
    if not isinstance(alpha, torch.Tensor) or alpha.numel() != 1:
        raise bad(f"layer {key}: missing scalar tensor 'alpha'")
    used.add("alpha")
    value = float(alpha.reshape(()))
    if not math.isfinite(value):
        raise bad(f"layer {key}: alpha is {value}")
    if not alpha_is_logit:  # raw α, migrated as the earlier pack did
        value = -5.0 if value <= 0 else 5.0 if value >= 1 else math.log(value / (1.0 - value))
    out["alpha_logit"] = torch.full((heads,), value, dtype=torch.float32)
    unknown = sorted(set(sd) - used)
    if unknown:
        raise bad(f"layer {key}: unexpected tensors {unknown} (not part of the Flux2TTR v2 layer this converter "
                  "knows); refusing rather than dropping learned state")
    return out
