"""Stand-in of `comfy/patcher_extension.py`: callback/wrapper type names, WrapperExecutor, dict merging.

Same names, same semantics as upstream (callbacks and wrappers are `{type: {key: [fn, ...]}}`;
a wrapper is `fn(executor, *args, **kwargs)` and must call `executor(*args, **kwargs)`).
"""
from __future__ import annotations

from typing import Any, Callable


class CallbacksMP:
    ON_CLONE = "on_clone"
    ON_LOAD = "on_load_after"
    ON_DETACH = "on_detach_after"
    ON_CLEANUP = "on_cleanup"
    ON_PRE_RUN = "on_pre_run"
    ON_PREPARE_STATE = "on_prepare_state"
    ON_APPLY_HOOKS = "on_apply_hooks"
    ON_INJECT_MODEL = "on_inject_model"
    ON_EJECT_MODEL = "on_eject_model"


class WrappersMP:
    OUTER_SAMPLE = "outer_sample"
    PREPARE_SAMPLING = "prepare_sampling"
    SAMPLER_SAMPLE = "sampler_sample"
    PREDICT_NOISE = "predict_noise"
    CALC_COND_BATCH = "calc_cond_batch"
    APPLY_MODEL = "apply_model"
    DIFFUSION_MODEL = "diffusion_model"


def get_all_wrappers(wrapper_type: str, transformer_options: dict, is_model_options: bool = False) -> list:
    if is_model_options:
        transformer_options = transformer_options.get("transformer_options", {})
    out: list = []
    for w in transformer_options.get("wrappers", {}).get(wrapper_type, {}).values():
        out.extend(w)
    return out


class WrapperExecutor:
    """Calls wrappers in order around `original`; `class_obj` lets a wrapper reach the instance."""

    def __init__(self, original: Callable, class_obj: Any, wrappers: list, idx: int) -> None:
        self.original = original
        self.class_obj = class_obj
        self.wrappers = wrappers.copy()
        self.idx = idx
        self.is_last = idx == len(wrappers)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        nxt = WrapperExecutor(self.original, self.class_obj, self.wrappers, self.idx + 1)
        return nxt.execute(*args, **kwargs)

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        if self.is_last:
            return self.original(*args, **kwargs)
        return self.wrappers[self.idx](self, *args, **kwargs)

    @classmethod
    def new_executor(cls, original: Callable, wrappers: list, idx: int = 0) -> "WrapperExecutor":
        return cls(original, None, wrappers, idx)

    @classmethod
    def new_class_executor(cls, original: Callable, class_obj: Any, wrappers: list, idx: int = 0) -> "WrapperExecutor":
        return cls(original, class_obj, wrappers, idx)


def copy_nested_dicts(input_dict: dict) -> dict:
    new = input_dict.copy()
    for k, v in input_dict.items():
        if isinstance(v, dict):
            new[k] = copy_nested_dicts(v)
        elif isinstance(v, list):
            new[k] = v.copy()
    return new


def merge_nested_dicts(dict1: dict, dict2: dict, copy_dict1: bool = True) -> dict:
    merged = copy_nested_dicts(dict1) if copy_dict1 else dict1
    for k, v in dict2.items():
        if isinstance(v, dict):
            merged[k] = merge_nested_dicts(merged.setdefault(k, {}), v)
        elif isinstance(v, list):
            merged.setdefault(k, []).extend(v)
        else:
            merged[k] = v
    return merged
