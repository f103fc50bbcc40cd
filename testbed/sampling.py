"""Flow-matching Euler sampling of the testbed and the fidelity metrics.

The sampler is an explicit Euler loop over the sigmas of diffusers'
`FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).set_timesteps(steps)`
(for shift 1: `linspace(1, 1/1000, steps)` then a final 0; see `euler_sigmas`), so it
needs no diffusers import; tests check the sigmas against the scheduler. Each step calls
`model.velocity(x_t, sigma, prompts)` — the one hook point: pass any object with that method (for
example a `TestbedModel` whose transformer attnplug's diffusers host has patched). Fidelity two
ways: per step (`velocity_fidelity`: both models' velocities from the same x_t on the reference
trajectory — isolates the approximation) and per trajectory (`psnr` of the final samples from the
same noise — includes trajectory divergence).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from . import data


class VelocityModel(Protocol):
    def velocity(self, x_t: torch.Tensor, sigma: torch.Tensor | float, prompts: torch.Tensor) -> torch.Tensor: ...


StepCallback = Callable[[int, float, torch.Tensor], None]  # (step index, sigma, x_t before the step)


def euler_sigmas(steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Sigmas [steps + 1] of FlowMatchEulerDiscreteScheduler(shift) for `steps` steps, ending at 0 (float64)."""
    if steps < 1:
        raise ValueError(f"euler_sigmas: steps must be >= 1, got {steps}")
    def shifted(x: torch.Tensor | float) -> torch.Tensor | float:
        return shift * x / (1 + (shift - 1) * x)

    # as the scheduler does: the training sigmas end at shifted(1/T); set_timesteps spaces linearly
    # from 1 to that minimum and applies the shift once more
    s = shifted(torch.linspace(1.0, float(shifted(1.0 / num_train_timesteps)), steps, dtype=torch.float64))
    return torch.cat([s, s.new_zeros(1)])


def initial_noise(n: int, grid: int = data.DEFAULT_GRID, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Deterministic starting noise [n, N, 4] (drawn on the CPU, then moved) for `n` samples."""
    side = data.image_size(grid)
    g = torch.Generator().manual_seed(seed)
    return data.pack(torch.randn(n, 1, side, side, generator=g)).to(device)


@torch.no_grad()
def sample(model: VelocityModel, prompts: torch.Tensor, noise: torch.Tensor | None = None, steps: int = 20,
           shift: float = 1.0, seed: int = 0, batch_size: int | None = None,
           callback: StepCallback | None = None) -> torch.Tensor:
    """Euler-sample images [B, 1, 8G, 8G] (float32, roughly [-1, 1]) for prompts [B, G, G].

    `noise` [B, N, 4] defaults to `initial_noise(B, G, seed)`; the model runs in its own dtype/device.
    `batch_size` splits the work into chunks; `callback` sees every step (for per-step hooks).
    """
    b, g, _ = prompts.shape
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None  # type: ignore[attr-defined]
    device = p.device if p is not None else prompts.device
    dtype = p.dtype if p is not None else torch.float32
    if noise is None:
        noise = initial_noise(b, g, seed)
    if batch_size is not None and batch_size < b:
        parts = [sample(model, prompts[i:i + batch_size], noise[i:i + batch_size], steps, shift, seed, None, callback)
                 for i in range(0, b, batch_size)]
        return torch.cat(parts)
    sig = euler_sigmas(steps, shift)
    x = noise.to(device=device, dtype=torch.float32)
    prompts = prompts.to(device)
    for i in range(steps):
        if callback is not None:
            callback(i, float(sig[i]), x)
        v = model.velocity(x.to(dtype), float(sig[i]), prompts).float()
        x = x + float(sig[i + 1] - sig[i]) * v
    side = data.image_size(g)
    return data.unpack(x, side, side).cpu()


@torch.no_grad()
def reference_trajectory(reference: VelocityModel, prompts: torch.Tensor, noise: torch.Tensor | None = None,
                         steps: int = 20, shift: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """The reference model's trajectory: per step `x_t` and its velocity (`points`: a list of `(x_t, sigma, v)`,
    fp32, on the model's device) and the final images — what `velocity_fidelity` compares a candidate on, kept
    so that several candidates are compared on one trajectory without sampling it again."""
    points: list[tuple[torch.Tensor, float, torch.Tensor]] = []

    class _Recording:
        def velocity(self, x_t: torch.Tensor, sigma: float, pr: torch.Tensor) -> torch.Tensor:
            vr = reference.velocity(x_t, sigma, pr).float()
            points.append((x_t.clone(), sigma, vr))
            return vr

        def parameters(self):
            return reference.parameters()  # type: ignore[attr-defined]

    images = sample(_Recording(), prompts, noise, steps, shift, seed)  # type: ignore[arg-type]
    return {"points": points, "reference_images": images}


@torch.no_grad()
def velocity_fidelity(reference: VelocityModel, candidate: VelocityModel, prompts: torch.Tensor,
                      noise: torch.Tensor | None = None, steps: int = 20, shift: float = 1.0,
                      seed: int = 0, trajectory: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per-step fidelity of `candidate` against `reference` from the same x_t on the reference trajectory.

    Returns `cosine` and `rel_error` lists (one value per step, averaged over samples; cosine of the
    flattened per-sample velocities, rel_error = ||v_c - v_r|| / ||v_r||), their means, and the reference
    samples [B, 1, 8G, 8G]. `trajectory`: the reference's, from `reference_trajectory` with the same prompts,
    noise and steps (the candidate then runs alone, on the same inputs in the same order).
    """
    trajectory = trajectory if trajectory is not None else reference_trajectory(reference, prompts, noise, steps,
                                                                                shift, seed)
    cos_steps: list[float] = []
    err_steps: list[float] = []
    pr = prompts.to(trajectory["points"][0][0].device) if trajectory["points"] else prompts
    for x_t, sigma, vr in trajectory["points"]:
        vc = candidate.velocity(x_t, sigma, pr).float()
        cos_steps.append(float(velocity_cosine(vc, vr).mean()))
        err_steps.append(float(relative_error(vc, vr).mean()))
    return {"cosine": cos_steps, "rel_error": err_steps,
            "cosine_mean": sum(cos_steps) / len(cos_steps), "rel_error_mean": sum(err_steps) / len(err_steps),
            "reference_images": trajectory["reference_images"]}


def velocity_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [B] of the flattened per-sample tensors a, b."""
    return torch.nn.functional.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1)


def relative_error(approx: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """||approx - ref|| / ||ref|| [B] per sample."""
    a, r = approx.flatten(1).float(), ref.flatten(1).float()
    return (a - r).norm(dim=1) / r.norm(dim=1).clamp_min(1e-12)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """PSNR in dB [B] of images a vs b (both clipped to [-1, 1]; `data_range` 2 for that range)."""
    x, y = a.float().clamp(-1, 1).flatten(1), b.float().clamp(-1, 1).flatten(1)
    mse = (x - y).pow(2).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(data_range ** 2 / mse)
