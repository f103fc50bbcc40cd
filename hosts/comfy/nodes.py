"""attnplug's main V3 nodes: config, distill (train while sampling), apply (serve a checkpoint), schedule.

Imports `comfy_api.latest` at module level: only ComfyUI (through `extension.py`) and the tests'
stand-in import this module. The logic lives in `configs.py`, `files.py`, `plans.py` and `binding.py`.
The checkpoint inputs are dropdowns of the files in the attnplug model folders (ComfyUI rebuilds a
node's options whenever it asks for the node list); Distill also takes a new file name.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from comfy_api.latest import io

from . import configs, files, plans
from .binding import SessionSpec, bind

log = logging.getLogger("attnplug")

ConfigType = io.Custom("ATTNPLUG_CONFIG")
CATEGORY = "attnplug"
CONFIG_BACKEND = "(config)"
NEW_CHECKPOINT = "(new)"
NO_CHECKPOINT = "(none yet)"
NO_POLICY = "(none)"
DEFAULT_POLICY = "attnplug_policy.safetensors"
DEFAULT_CHECKPOINT = "attnplug_ttr.safetensors"
FOLDERS_TIP = "the attnplug model folders (models/attnplug/ and those extra_model_paths.yaml registers as 'attnplug')"


def _default_backend() -> str:
    learned = configs.learned_backends()
    return "ttr" if "ttr" in learned else (learned[0] if learned else "sdpa")


def _config_input(optional: bool) -> Any:
    return ConfigType.Input("config", optional=optional,
                            tooltip="attnplug config from the attnplug Config or Schedule node"
                                    + (" (optional; defaults: backend 'ttr')." if optional else "."))


class AttnplugConfig(io.ComfyNode):
    """Load an attnplug config file, or build one from the widgets."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        backends = configs.registered_backends()
        return io.Schema(
            node_id="AttnplugConfig", display_name="attnplug Config", category=f"{CATEGORY}/config",
            description="An attnplug config: a TOML/JSON file, or these widgets. Feeds the Distill, Apply and "
                        "Schedule nodes.",
            inputs=[
                io.String.Input("config_path", default="", tooltip="A TOML or JSON attnplug config: a name in ComfyUI's "
                                "input folder, or an absolute path. When set, the file is the config and the widgets "
                                "below are ignored (logged)."),
                io.Combo.Input("backend", options=backends, default=_default_backend() if _default_backend() in backends
                               else backends[0], tooltip="Backend that serves attention where every gate allows it "
                               "(learned backends also need a ready layer)."),
                io.Combo.Input("exact", options=["host", "sdpa"], default="host",
                               tooltip="Exact path for vetoed calls, fallbacks and the distiller's teacher: 'host' = "
                                       "ComfyUI's own kernel (or another pack's override), 'sdpa' = torch SDPA."),
                io.Boolean.Input("strict", default=False, tooltip="Raise instead of falling back to exact attention "
                                 "when the approximate backend cannot serve a call."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, control_after_generate=False,
                             tooltip="Seed of attnplug's own random choices "
                             "(training layer sets, query subsets)."),
                io.String.Input("extra_toml", multiline=True, default="", tooltip="Optional TOML merged on top of the "
                                "widgets, e.g. [plugins.ttr] feature_dim = 128, or [[gates]] entries."),
            ],
            outputs=[ConfigType.Output("config", display_name="config", tooltip="The validated attnplug config.")],
        )

    @classmethod
    def execute(cls, config_path: str, backend: str, exact: str, strict: bool, seed: int,
                extra_toml: str = "") -> io.NodeOutput:
        return io.NodeOutput(configs.build_config(config_path, backend, exact, strict, seed, extra_toml))


class AttnplugSchedule(io.ComfyNode):
    """Choose the backend per step range and layer pattern (schedule gate rules)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttnplugSchedule", display_name="attnplug Schedule", category=f"{CATEGORY}/schedule",
            description="Adds schedule rules to a config: exact on the first/last steps, a backend on a step range "
                        "and layer pattern. Rules of earlier Schedule nodes come first (first match wins).",
            inputs=[
                _config_input(optional=False),
                io.Int.Input("exact_first_steps", default=1, min=0, max=10000,
                             tooltip="Run exact attention on this many first sampler steps (0 = none)."),
                io.Int.Input("exact_last_steps", default=1, min=0, max=10000,
                             tooltip="Run exact attention on this many last sampler steps (0 = none)."),
                io.Combo.Input("backend", options=[CONFIG_BACKEND] + configs.registered_backends(),
                               default=CONFIG_BACKEND, tooltip="Backend for the matching steps and layers; "
                               "'(config)' = the config's backend. Learned backends still need ready layers."),
                io.String.Input("steps", default="", tooltip="Step range of that backend: 'A-B', ':N' (first N), "
                                "'-N:' (last N), 'A:' (from A on); empty = every step not taken above."),
                io.String.Input("layers", default="*", tooltip="Layer patterns, comma separated: 'single:*', "
                                "'double:0', 'single:3-20', '*'."),
                io.Combo.Input("otherwise", options=["exact", CONFIG_BACKEND], default="exact",
                               tooltip="Steps/layers no rule matches: 'exact' (fail-closed) or the config's backend."),
            ],
            outputs=[ConfigType.Output(display_name="config", tooltip="The config with the schedule rules added.")],
        )

    @classmethod
    def execute(cls, config: dict, exact_first_steps: int, exact_last_steps: int, backend: str, steps: str,
                layers: str, otherwise: str) -> io.NodeOutput:
        return io.NodeOutput(configs.schedule_config(config, exact_first_steps, exact_last_steps, backend, steps,
                                                     layers, otherwise))


class AttnplugDistill(io.ComfyNode):
    """Train the learned backend from the model's own attention while sampling."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        distillers = configs.registered_distillers() or ["ttr"]
        return io.Schema(
            node_id="AttnplugDistill", display_name="attnplug Distill (train while sampling)",
            category=f"{CATEGORY}/sampling",
            description="Every sampler run through this model trains the learned attention on the model's exact "
                        "attention and saves the checkpoint when the run ends; the image is unchanged in "
                        "passthrough mode.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (Flux / Flux.2) to distill attention from."),
                _config_input(optional=True),
                io.Combo.Input("checkpoint", options=[NEW_CHECKPOINT, *files.checkpoint_names()],
                               default=NEW_CHECKPOINT, tooltip="Checkpoint to resume from and save to: a file in "
                               f"{FOLDERS_TIP}, or '{NEW_CHECKPOINT}' for the file named below. A checkpoint of "
                               "another model is refused before sampling."),
                io.String.Input("new_checkpoint", default=DEFAULT_CHECKPOINT, tooltip=f"File name for "
                                f"'{NEW_CHECKPOINT}': created in the first attnplug model folder when the first run "
                                "ends; when a file of that name exists, training resumes from it."),
                io.Combo.Input("distiller", options=distillers, default=distillers[0],
                               tooltip="Registered distiller that trains the learned layers."),
                io.Combo.Input("mode", options=["passthrough", "preview"], default="passthrough",
                               tooltip="passthrough: the image uses exact attention (fastest training); preview: "
                                       "ready layers already serve the student."),
                io.Boolean.Input("memory_reserve", default=False, tooltip="Ask ComfyUI to free VRAM sized by the "
                                 "backend's estimate before attention (off by default; can unload other models)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with attnplug training bound to it.")],
            is_experimental=True,
        )

    @classmethod
    def validate_inputs(cls, checkpoint: str, new_checkpoint: str = DEFAULT_CHECKPOINT) -> bool | str:
        """Any file name is allowed (not only the dropdown's): Distill creates new checkpoints."""
        try:
            _distill_target(checkpoint, new_checkpoint)
        except ValueError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, model: Any, checkpoint: str, distiller: str, mode: str,
                new_checkpoint: str = DEFAULT_CHECKPOINT, memory_reserve: bool = False,
                config: dict | None = None) -> io.NodeOutput:
        path = _distill_target(checkpoint, new_checkpoint)
        data = configs.distill_config(config, path, distiller, mode)
        plans.check_distill_checkpoint(data, plans.model_layer_shapes(model))
        log.info("attnplug: distill node: %s %s", "resumes from" if path.is_file() else "will create", path)
        spec = SessionSpec(data, report_steps=True, memory_reserve=memory_reserve, label="distill")
        return io.NodeOutput(bind(model, spec))


def _distill_target(checkpoint: str, new_checkpoint: str) -> Path:
    name = new_checkpoint if checkpoint == NEW_CHECKPOINT else checkpoint
    return files.resolve_checkpoint(name or "", must_exist=False)


class AttnplugApply(io.ComfyNode):
    """Serve a trained checkpoint: ready layers only, the best ones first, exact everywhere else."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttnplugApply", display_name="attnplug Apply (serve checkpoint)", category=f"{CATEGORY}/sampling",
            description="Serves learned attention from a checkpoint with fail-closed gates: only ready layers, "
                        "and of those the best share chosen by quality_speed. With an exact backend in the config "
                        "(e.g. a schedule over sdpa) it binds the config as is.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the checkpoint was trained on."),
                _config_input(optional=True),
                io.Combo.Input("checkpoint", options=_trained_checkpoints(), default=_trained_checkpoints()[0],
                               tooltip=f"Trained checkpoint, from {FOLDERS_TIP}. When the file changes on disk (more "
                               "distillation), the next run reads it again."),
                io.Float.Input("quality_speed", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="0 = quality (no learned layer serves), 1 = speed (every ready layer serves); "
                                       "in between, that share of ready layers, best EMA cosine distance first."),
                io.Boolean.Input("memory_reserve", default=False, tooltip="Ask ComfyUI to free VRAM sized by the "
                                 "backend's estimate before attention (off by default)."),
                io.Combo.Input("policy", options=[NO_POLICY, *files.checkpoint_names()], default=NO_POLICY,
                               optional=True, tooltip="A routing policy from the attnplug Train Policy node: it "
                               "decides per step which ready layers serve (it replaces the serving plan; "
                               "quality_speed still limits the layers). A policy for another model is refused."),
                io.Float.Input("policy_threshold", default=0.5, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="The policy's quality/speed knob: a layer serves at a step where the policy's "
                                       "P(serve) reaches it — higher keeps more exact (quality), lower serves more."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with learned attention bound to it.")],
            is_experimental=True,
        )

    @classmethod
    def validate_inputs(cls, checkpoint: str) -> bool | str:
        """A checkpoint must exist; no choice is left for `execute` to judge (an exact backend needs none)."""
        if checkpoint in ("", NO_CHECKPOINT):
            return True
        try:
            files.resolve_checkpoint(checkpoint, must_exist=True)
        except ValueError as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, checkpoint: str = "", **kwargs: Any) -> Any:
        """The checkpoint file's identity, size and mtime: ComfyUI runs the node again when the file changed."""
        try:
            return files.fingerprint(files.resolve_checkpoint(checkpoint, must_exist=True))
        except ValueError:
            return (checkpoint,)

    @classmethod
    def execute(cls, model: Any, checkpoint: str, quality_speed: float, memory_reserve: bool = False,
                config: dict | None = None, policy: str = "", policy_threshold: float = 0.5) -> io.NodeOutput:
        base = config if config is not None else {"backend": _default_backend()}
        if policy not in ("", NO_POLICY):
            base = _with_policy(base, policy, policy_threshold, model)
        if base.get("backend", "sdpa") in configs.learned_backends():
            if checkpoint in ("", NO_CHECKPOINT):
                raise ValueError(f"attnplug Apply node: no checkpoint chosen; the list shows the files in "
                                 f"{FOLDERS_TIP} — train one with the attnplug Distill node first")
            path = files.resolve_checkpoint(checkpoint, must_exist=True)
            plan = plans.ApplyPlan(base, path, quality_speed, plans.model_layer_shapes(model))
            spec = SessionSpec(plan.config(), plan=plan, memory_reserve=memory_reserve, label="apply")
        else:  # an exact backend (e.g. a schedule over sdpa/host): nothing to load, nothing to rank
            log.info("attnplug: apply node: backend %r is exact; checkpoint and quality_speed are not used",
                     base.get("backend", "sdpa"))
            spec = SessionSpec(configs.validated(base, "attnplug Apply node"), memory_reserve=memory_reserve,
                               label="apply")
        return io.NodeOutput(bind(model, spec))


def _with_policy(base: dict, policy: str, threshold: float, model: Any) -> dict:
    """`base` serving through the policy file `policy` at `threshold`; a policy for other layers is refused now."""
    from ...plugins.controller.policy_checkpoint import load_policy

    path = files.resolve_checkpoint(policy, must_exist=True)
    shapes = plans.model_layer_shapes(model)
    load_policy(path, layers=sorted(shapes) if shapes else None)
    data = copy.deepcopy(dict(base))
    controller = data.setdefault("plugins", {}).setdefault("controller", {})
    controller.update(policy=str(path), policy_threshold=float(threshold), policy_mode="threshold")
    log.info("attnplug: apply node: routing policy %s at threshold %.2f", path, threshold)
    return data


def _trained_checkpoints() -> list[str]:
    return files.checkpoint_names() or [NO_CHECKPOINT]


def _sampling_inputs(prompt_tip: str, resolution: str, seed_tip: str) -> list[Any]:
    """The inputs of a node that samples the conditioning itself (Calibrate, Train Policy), as KSampler takes them."""
    import comfy.samplers

    return [
        io.Conditioning.Input("positive", tooltip=prompt_tip),
        io.Conditioning.Input("negative", tooltip="Its negative prompt (as KSampler takes it)."),
        io.Latent.Input("latent", tooltip=f"The latent to sample (its size is the {resolution} resolution)."),
        io.Vae.Input("vae", optional=True, tooltip="Decode the samples, for image terms such as LPIPS."),
        io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, tooltip=seed_tip),
        io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Sampler steps."),
        io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, tooltip="Guidance scale."),
        io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, tooltip="Sampler."),
        io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip="Scheduler."),
    ]


def _serving_session(model: Any, checkpoint: str, config: dict | None, node: str,
                     label: str) -> tuple[Path, Any, Any, Any]:
    """Bind a serving (not training) session on `checkpoint` to a copy of `model`, kept for the node to sample
    with; returns (checkpoint path, patched model, binding handle, session). The caller releases the handle."""
    from .binding import current_binding

    if checkpoint in ("", NO_CHECKPOINT):
        raise ValueError(f"{node}: no checkpoint chosen; train one with the attnplug Distill node first")
    path = files.resolve_checkpoint(checkpoint, must_exist=True)
    data = dict(config) if config is not None else {"backend": _default_backend()}
    configs.require_learned(data, node)
    configs.set_field(data, "training", False, node)
    configs.set_field(data, "checkpoint", str(path), node)
    patched = bind(model, SessionSpec(configs.validated(data, node), label=label, keep_session=True))
    handle = current_binding(patched).handle  # type: ignore[union-attr]
    return path, patched, handle, handle.ensure()


class AttnplugCalibrate(io.ComfyNode):
    """Measure which (layer, σ band) cells keep the samples within budget; store that serving plan."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttnplugCalibrate", display_name="attnplug Calibrate (serving plan)",
            category=f"{CATEGORY}/sampling",
            description="Samples the conditioning from fixed seeds, exact and with each (layer, σ band) cell served, "
                        "and keeps the cells whose cumulative effect stays within the config's budget "
                        "([plugins.controller.calibration]: terms, σ bands, number of samples). The plan is stored "
                        "in the checkpoint; Apply then serves only its cells.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the checkpoint was trained on."),
                _config_input(optional=True),
                io.Combo.Input("checkpoint", options=_trained_checkpoints(), default=_trained_checkpoints()[0],
                               tooltip=f"Trained checkpoint, from {FOLDERS_TIP}; the plan is written into it."),
                *_sampling_inputs("The calibration prompt.", "calibrated",
                                  "Seed of the first sample; sample i uses seed + i, the same noise for the exact "
                                  "and every candidate run."),
                io.Boolean.Input("write_checkpoint", default=True, tooltip="Store the plan in the checkpoint."),
            ],
            outputs=[io.String.Output(display_name="report", tooltip="What was measured and the plan found.")],
            is_experimental=True,
        )

    @classmethod
    def execute(cls, model: Any, checkpoint: str, positive: Any, negative: Any, latent: dict, seed: int, steps: int,
                cfg: float, sampler_name: str, scheduler: str, write_checkpoint: bool = True, vae: Any = None,
                config: dict | None = None) -> io.NodeOutput:
        from ...plugins.controller.calibrate import Calibrator, build_terms
        from ...plugins.controller.plan import write_plan_into_checkpoint
        from ...plugins.controller.report import format_report
        from .calibration import ComfySampler

        path, patched, handle, session = _serving_session(model, checkpoint, config, "attnplug Calibrate node",
                                                          "calibrate")
        try:
            settings = session.config.sections["controller"].calibration  # type: ignore[attr-defined]
            terms = build_terms(settings.terms, session)
            sampler = ComfySampler(patched, positive, negative, latent, vae, n=settings.prompts, seed=seed,
                                   steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler)
            result = Calibrator(session, sampler, settings, terms).run()
        finally:
            handle.release()
        if write_checkpoint:
            write_plan_into_checkpoint(path, result.plan)
        report = format_report(result.plan.report)
        log.info("attnplug: calibrate node: %s", result.plan.describe())
        return io.NodeOutput(report)


class AttnplugTrainPolicy(io.ComfyNode):
    """Train a routing policy (REINFORCE) that decides per step which layers serve, against exact samples."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttnplugTrainPolicy", display_name="attnplug Train Policy (learned routing)",
            category=f"{CATEGORY}/sampling",
            description="Samples the conditioning from seeded noise, exact once per seed and then with the policy's "
                        "choices, and rewards layer-steps served minus the quality cost against the exact sample "
                        "([plugins.controller.policy_training]: terms, budget, episodes). Writes the policy file "
                        "the Apply node serves.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the checkpoint was trained on."),
                _config_input(optional=True),
                io.Combo.Input("checkpoint", options=_trained_checkpoints(), default=_trained_checkpoints()[0],
                               tooltip=f"Trained checkpoint of the learned layers, from {FOLDERS_TIP}."),
                *_sampling_inputs("The training prompt.", "trained",
                                  "Episode k samples the noise of seed + k (its exact sample is computed once)."),
                io.Float.Input("minutes", default=10.0, min=0.0, max=10000.0, step=0.5, tooltip="Train this long "
                               "(0 = until `updates`)."),
                io.Int.Input("updates", default=0, min=0, max=1_000_000, tooltip="Stop after this many updates "
                             "(0 = until `minutes`)."),
                io.String.Input("policy_name", default=DEFAULT_POLICY, tooltip="Policy file to write, in the first "
                                "attnplug model folder (or a path)."),
                io.Boolean.Input("resume", default=True, tooltip="Continue from the policy file when it exists "
                                 "(its optimizer, baseline and λ); a file for another model is refused."),
                io.Boolean.Input("use_text", default=True, tooltip="Let the policy read the prompt's pooled "
                                 "embedding (off: the same policy without it)."),
            ],
            outputs=[io.String.Output(display_name="report", tooltip="What was trained and where it was written.")],
            is_experimental=True,
        )

    @classmethod
    def validate_inputs(cls, policy_name: str = DEFAULT_POLICY) -> bool | str:
        try:
            files.resolve_checkpoint(policy_name or "", must_exist=False)
        except ValueError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, model: Any, checkpoint: str, positive: Any, negative: Any, latent: dict, seed: int, steps: int,
                cfg: float, sampler_name: str, scheduler: str, minutes: float = 10.0, updates: int = 0,
                policy_name: str = DEFAULT_POLICY, resume: bool = True, use_text: bool = True, vae: Any = None,
                config: dict | None = None) -> io.NodeOutput:
        import torch

        from ...plugins.controller.policy_checkpoint import save_policy
        from ...plugins.controller.reinforce import settings_json
        from ...plugins.controller.train_policy import build_trainer, describe
        from .calibration import ComfyEpisodes, ComfySampler

        node = "attnplug Train Policy node"
        if minutes <= 0 and updates <= 0:
            raise ValueError(f"{node}: set minutes or updates (both are 0)")
        out = files.resolve_checkpoint(policy_name or "", must_exist=False)
        _, patched, handle, session = _serving_session(model, checkpoint, config, node, "train policy")
        try:
            settings = session.config.sections["controller"].policy_training  # type: ignore[attr-defined]
            settings = settings.model_copy(update={"use_text": use_text})
            episodes = ComfyEpisodes(ComfySampler(patched, positive, negative, latent, vae, n=1, seed=seed,
                                                  steps=steps, cfg=cfg, sampler_name=sampler_name,
                                                  scheduler=scheduler))
            # ComfyUI runs nodes under inference mode: the policy's weights and updates need autograd
            with torch.inference_mode(False), torch.no_grad():
                trainer = build_trainer(session, episodes.sample, settings,
                                        resume=out if resume and out.is_file() else None)
                result = trainer.train(episodes.sample, updates=updates or None, minutes=minutes or None)
                saved = save_policy(out, trainer.policy, settings_json(settings), trainer.state())
        finally:
            handle.release()
        report = describe({"policy": str(saved), "layers": trainer.policy.layers, "use_text": trainer.policy.use_text,
                           "text_dim": trainer.policy.text_dim, "updates": trainer.updates,
                           "episodes": trainer.episodes, "reference_runs": trainer.reference_runs,
                           "seconds": result.seconds, "final": result.history[-1] if result.history else {}})
        log.info("attnplug: train policy node: %s", report)
        return io.NodeOutput(report)


NODES: list[type[io.ComfyNode]] = [AttnplugConfig, AttnplugSchedule, AttnplugDistill, AttnplugApply,
                                   AttnplugCalibrate, AttnplugTrainPolicy]
