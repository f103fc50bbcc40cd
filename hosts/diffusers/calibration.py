"""Calibrate a serving plan on a diffusers pipeline: a sampler of fixed prompts and noise, and the job.

Each calibration run samples every prompt with its own seeded generator through the patched pipeline
(`output_type="pt"`), so the exact reference and every candidate see the same noise. It records the
final latents (through `callback_on_step_end`), the decoded images (mapped to [-1, 1]) and the
transformer's prediction at every call (a forward hook), for latent, image, LPIPS and velocity terms.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ...core.quality import Sample
from .apply import apply, find_transformer


class PipelineSampler:
    """Samples `prompts` with seeds `seed + i` through `pipe` patched by `session`."""

    def __init__(self, pipe: Any, session: Any, prompts: Sequence[str], *, seed: int = 0, steps: int = 20,
                 height: int = 1024, width: int = 1024, call_kwargs: Mapping[str, Any] | None = None) -> None:
        if not prompts:
            raise ValueError("PipelineSampler: no prompts given")
        self.pipe, self.prompts, self.seed, self.steps = pipe, list(prompts), seed, steps
        self.height, self.width = height, width
        self.call_kwargs = dict(call_kwargs or {})
        self.transformer, _ = find_transformer(pipe)
        self.handle = apply(pipe, session)

    def _one(self, i: int, prompt: str, predictions: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        final: dict[str, torch.Tensor] = {}

        def keep_latents(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            final["latents"] = kwargs["latents"].detach().float().cpu()
            return kwargs

        def keep_prediction(module: Any, args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
            predictions.append(out.detach().float().cpu())

        hook = self.transformer.register_forward_hook(keep_prediction)
        try:
            result = self.pipe(prompt, height=self.height, width=self.width, num_inference_steps=self.steps,
                               generator=torch.Generator("cpu").manual_seed(self.seed + i), output_type="pt",
                               callback_on_step_end=keep_latents, callback_on_step_end_tensor_inputs=["latents"],
                               **self.call_kwargs)
        finally:
            hook.remove()
        images = result.images if isinstance(result.images, torch.Tensor) else torch.as_tensor(result.images)
        return final["latents"], images.float().cpu() * 2 - 1

    def sample(self) -> Sample:
        latents, images, per_prompt = [], [], []
        for i, prompt in enumerate(self.prompts):
            predictions: list[torch.Tensor] = []
            latent, image = self._one(i, prompt, predictions)
            latents.append(latent)
            images.append(image)
            per_prompt.append(predictions)
        calls = min(len(p) for p in per_prompt)
        velocities = tuple(torch.cat([p[c] for p in per_prompt]) for c in range(calls))
        return Sample(latent=torch.cat(latents), image=torch.cat(images), velocities=velocities,
                      prompts=list(self.prompts))

    def close(self) -> None:
        self.handle.remove()


def read_prompts(path: str | Path) -> list[str]:
    """A JSON list of non-empty prompt strings; errors name the file and the entry."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"prompts file {path}: cannot read a JSON list of strings ({exc})") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"prompts file {path}: expected a non-empty JSON list of strings")
    for i, p in enumerate(data):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompts file {path}: entry {i} must be a non-empty string, got {p!r}")
    return data


def load_pipeline(pipeline: str | Any, dtype: str, device: str) -> Any:
    """A pipeline object as is, or one loaded from a local folder or cached hub id (no downloads) onto `device`;
    a failure is a `ValueError` naming the pipeline."""
    if not isinstance(pipeline, str):
        return pipeline
    from diffusers import DiffusionPipeline

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"--dtype {dtype!r} is not a torch dtype (e.g. bfloat16, float16, float32)")
    try:
        pipe = DiffusionPipeline.from_pretrained(pipeline, torch_dtype=torch_dtype, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds for a missing/odd folder
        raise ValueError(f"cannot load the pipeline {pipeline!r} from local files ({exc})") from None
    return pipe.to(device)


def calibrate_pipeline(pipeline: str | Any, config: Any, checkpoint: str | Path, *, out: str | Path,
                       prompts_file: str | Path | None, n_prompts: int | None = None, steps: int = 20,
                       device: str = "cuda", dtype: str = "bfloat16", height: int = 1024, width: int = 1024,
                       write_checkpoint: bool = True, plan_out: str | Path | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """`attnplug calibrate --pipeline`: load the pipeline (a folder or cached hub id, no downloads) unless one is
    given, calibrate `checkpoint` under `config` on the prompts of `prompts_file`, store the plan. Returns the report."""
    from ...plugins.controller.calibrate import CalibrationError, run_calibration

    if prompts_file is None:
        raise CalibrationError("calibrating a pipeline needs --prompts-file (a JSON list of prompt strings)")
    prompts = read_prompts(prompts_file)
    pipeline = load_pipeline(pipeline, dtype, device)

    def make_sampler(session: Any, settings: Any) -> PipelineSampler:
        chosen = prompts[:settings.prompts] if n_prompts is None else prompts[:n_prompts]
        return PipelineSampler(pipeline, session, chosen, seed=settings.seed, steps=steps, height=height, width=width)

    return run_calibration(config, checkpoint, make_sampler, out=out, prompts=n_prompts,
                           write_checkpoint=write_checkpoint, plan_out=plan_out, progress=progress)
