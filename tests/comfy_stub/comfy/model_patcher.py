"""Stand-in of `comfy/model_patcher.py` → `ModelPatcher`: clone, model_options, callbacks, wrappers, patches.

Kept: `clone()` copies `model_options` with `comfy.utils.deepcopy_list_dict` (so a clone's
`transformer_options[k] = fn` does not leak to the source) and copies callbacks and wrappers per key;
`pre_run()` / `cleanup()` fire `ON_PRE_RUN` / `ON_CLEANUP` with the patcher; `set_model_patch` appends
to `transformer_options["patches"][name]`. Left out: weights, LoRA patching, hooks, loading/offloading.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

import comfy.patcher_extension
import comfy.utils
from comfy.patcher_extension import CallbacksMP


def create_model_options_clone(orig_model_options: dict) -> dict:
    return comfy.patcher_extension.copy_nested_dicts(orig_model_options)


class ModelPatcher:
    def __init__(self, model: Any, load_device: torch.device | str = "cpu",
                 offload_device: torch.device | str = "cpu") -> None:
        self.model = model
        self.load_device = torch.device(load_device)
        self.offload_device = torch.device(offload_device)
        self.model_options: dict[str, Any] = {"transformer_options": {}}
        self.callbacks: dict[str, dict[Any, list[Callable]]] = {}
        self.wrappers: dict[str, dict[Any, list[Callable]]] = {}
        self.parent: ModelPatcher | None = None

    def clone(self, disable_dynamic: bool = False, model_override: Any = None,
              force_deepcopy: bool = False) -> "ModelPatcher":
        n = self.__class__(self.model, self.load_device, self.offload_device)
        n.model_options = comfy.utils.deepcopy_list_dict(self.model_options)
        n.parent = self
        for k, c in self.callbacks.items():
            n.callbacks[k] = {k1: c1.copy() for k1, c1 in c.items()}
        for k, w in self.wrappers.items():
            n.wrappers[k] = {k1: w1.copy() for k1, w1 in w.items()}
        for callback in self.get_all_callbacks(CallbacksMP.ON_CLONE):
            callback(self, n)
        return n

    def model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ---- patches ----
    def set_model_patch(self, patch: Callable, name: str) -> None:
        to = self.model_options["transformer_options"]
        if "patches" not in to:
            to["patches"] = {}
        to["patches"][name] = to["patches"].get(name, []) + [patch]

    def set_model_attn1_patch(self, patch: Callable) -> None:
        self.set_model_patch(patch, "attn1_patch")

    def set_model_attn1_output_patch(self, patch: Callable) -> None:
        self.set_model_patch(patch, "attn1_output_patch")

    # ---- lifecycle ----
    def pre_run(self) -> None:
        if hasattr(self.model, "current_patcher"):
            self.model.current_patcher = self
        for callback in self.get_all_callbacks(CallbacksMP.ON_PRE_RUN):
            callback(self)

    def cleanup(self) -> None:
        if hasattr(self.model, "current_patcher"):
            self.model.current_patcher = None
        for callback in self.get_all_callbacks(CallbacksMP.ON_CLEANUP):
            callback(self)

    # ---- callbacks ----
    def add_callback(self, call_type: str, callback: Callable) -> None:
        self.add_callback_with_key(call_type, None, callback)

    def add_callback_with_key(self, call_type: str, key: Any, callback: Callable) -> None:
        self.callbacks.setdefault(call_type, {}).setdefault(key, []).append(callback)

    def remove_callbacks_with_key(self, call_type: str, key: Any) -> None:
        c = self.callbacks.get(call_type, {})
        if key in c:
            c.pop(key)

    def get_callbacks(self, call_type: str, key: Any) -> list[Callable]:
        return self.callbacks.get(call_type, {}).get(key, [])

    def get_all_callbacks(self, call_type: str) -> list[Callable]:
        out: list[Callable] = []
        for c in self.callbacks.get(call_type, {}).values():
            out.extend(c)
        return out

    # ---- wrappers ----
    def add_wrapper(self, wrapper_type: str, wrapper: Callable) -> None:
        self.add_wrapper_with_key(wrapper_type, None, wrapper)

    def add_wrapper_with_key(self, wrapper_type: str, key: Any, wrapper: Callable) -> None:
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def remove_wrappers_with_key(self, wrapper_type: str, key: Any) -> None:
        w = self.wrappers.get(wrapper_type, {})
        if key in w:
            w.pop(key)

    def get_wrappers(self, wrapper_type: str, key: Any) -> list[Callable]:
        return self.wrappers.get(wrapper_type, {}).get(key, [])

    def get_all_wrappers(self, wrapper_type: str) -> list[Callable]:
        out: list[Callable] = []
        for w in self.wrappers.get(wrapper_type, {}).values():
            out.extend(w)
        return out
