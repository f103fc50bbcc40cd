"""Stand-in of the parts of `comfy/utils.py` attnplug touches: `deepcopy_list_dict`, `ProgressBar`."""
from __future__ import annotations

from typing import Any, Callable

#: upstream: set by the server; here tests set it to record progress updates.
PROGRESS_BAR_HOOK: Callable[..., None] | None = None


def deepcopy_list_dict(obj: Any, memo: dict | None = None) -> Any:
    """Copy dicts and lists recursively; every other value is shared (functions, tensors, objects)."""
    if memo is None:
        memo = {}
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, dict):
        res: Any = {deepcopy_list_dict(k, memo): deepcopy_list_dict(v, memo) for k, v in obj.items()}
    elif isinstance(obj, list):
        res = [deepcopy_list_dict(i, memo) for i in obj]
    else:
        res = obj
    memo[id(obj)] = res
    return res


class ProgressBar:
    """Same constructor and update methods as upstream; updates go to `PROGRESS_BAR_HOOK` (no throttling)."""

    def __init__(self, total: int, node_id: str | None = None) -> None:
        self.total = total
        self.current = 0
        self.hook = PROGRESS_BAR_HOOK
        self.node_id = node_id

    def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
        if total is not None:
            self.total = total
        value = min(value, self.total)
        self.current = value
        if self.hook is not None:
            self.hook(self.current, self.total, preview, node_id=self.node_id)

    def update(self, value: int) -> None:
        self.update_absolute(self.current + value)
