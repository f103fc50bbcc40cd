"""attnplug's main V3 nodes: config, distill (train while sampling), apply (serve a checkpoint), schedule.

Imports `comfy_api.latest` at module level: only ComfyUI (through `extension.py`) and the tests'
stand-in import this module. The logic lives in `configs.py` and `binding.py`.
"""
from __future__ import annotations

import logging
from typing import Any

from comfy_api.latest import io

from . import configs
from .binding import SessionSpec, bind

log = logging.getLogger("attnplug")

ConfigType = io.Custom("ATTNPLUG_CONFIG")
CATEGORY = "attnplug"
CONFIG_BACKEND = "(config)"


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
                io.String.Input("config_path", default="", tooltip="Path of a TOML or JSON attnplug config. When set, "
                                "the file is the config and the widgets below are ignored (logged)."),
                io.Combo.Input("backend", options=backends, default=_default_backend() if _default_backend() in backends
                               else backends[0], tooltip="Backend that serves attention where every gate allows it "
                               "(learned backends also need a ready layer)."),
                io.Combo.Input("exact", options=["host", "sdpa"], default="host",
                               tooltip="Exact path for vetoed calls, fallbacks and the distiller's teacher: 'host' = "
                                       "ComfyUI's own kernel (or another pack's override), 'sdpa' = torch SDPA."),
                io.Boolean.Input("strict", default=False, tooltip="Raise instead of falling back to exact attention "
                                 "when the approximate backend cannot serve a call."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, tooltip="Seed of attnplug's own random choices "
                             "(training layer sets, query subsets)."),
                io.String.Input("extra_toml", multiline=True, default="", tooltip="Optional TOML merged on top of the "
                                "widgets, e.g. [plugins.ttr] feature_dim = 128, or [[gates]] entries."),
            ],
            outputs=[ConfigType.Output("config", tooltip="The validated attnplug config.")],
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
                io.String.Input("checkpoint", default="attnplug_ttr.safetensors", tooltip="Checkpoint to resume from "
                                "and save to; bare names live in models/attnplug/ (created when missing)."),
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
    def execute(cls, model: Any, checkpoint: str, distiller: str, mode: str, memory_reserve: bool = False,
                config: dict | None = None) -> io.NodeOutput:
        path = configs.resolve_checkpoint(checkpoint, must_exist=False)
        data = configs.distill_config(config, path, distiller, mode)
        spec = SessionSpec(data, report_steps=True, memory_reserve=memory_reserve, label="distill")
        return io.NodeOutput(bind(model, spec))


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
                io.String.Input("checkpoint", default="attnplug_ttr.safetensors", tooltip="Trained checkpoint; bare "
                                "names are looked up in models/attnplug/."),
                io.Float.Input("quality_speed", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="0 = quality (no learned layer serves), 1 = speed (every ready layer serves); "
                                       "in between, that share of ready layers, best EMA cosine distance first."),
                io.Boolean.Input("memory_reserve", default=False, tooltip="Ask ComfyUI to free VRAM sized by the "
                                 "backend's estimate before attention (off by default)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with learned attention bound to it.")],
            is_experimental=True,
        )

    @classmethod
    def execute(cls, model: Any, checkpoint: str, quality_speed: float, memory_reserve: bool = False,
                config: dict | None = None) -> io.NodeOutput:
        base = config if config is not None else {"backend": _default_backend()}
        if base.get("backend", "sdpa") in configs.learned_backends():
            path = configs.resolve_checkpoint(checkpoint, must_exist=True)
            data, _, _ = configs.apply_config(base, path, quality_speed)
        else:  # an exact backend (e.g. a schedule over sdpa/host): nothing to load, nothing to rank
            log.info("attnplug: apply node: backend %r is exact; checkpoint and quality_speed are not used",
                     base.get("backend", "sdpa"))
            data = configs.validated(base)
        spec = SessionSpec(data, report_steps=False, memory_reserve=memory_reserve, label="apply")
        return io.NodeOutput(bind(model, spec))


NODES: list[type[io.ComfyNode]] = [AttnplugConfig, AttnplugSchedule, AttnplugDistill, AttnplugApply]
