"""Keeping non-finite approximate outputs out of the image without a device sync.

A served call hands its backend a *flag*: a one-element int32 tensor on the call's device. The backend replaces
every output row that is not finite (NaN or ±inf, in the output's dtype) on the device and raises the flag —
`guard_rows` does both for any backend (a row replaced by zeros, or by a given fallback row); the ttr kernels do it
in their last pass, replacing a row by their exact landmark branch's row. `FiniteFlags` owns the flags and reads
them without waiting for the GPU: a poll starts one copy of every flag into pinned host memory and reads the copy a
previous poll started, if the GPU has done it — so a layer that went non-finite is known a poll or two late, while
its bad rows never reached the image.
"""
from __future__ import annotations

import torch

#: Flags per device buffer (a buffer is never reallocated: calls hold views of it).
_CHUNK = 256


def guard_rows(out: torch.Tensor, flag: torch.Tensor, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """`out` with every row (last dim) that holds a non-finite value replaced by `fallback`'s row (zeros where that
    is not finite either; all zeros without a fallback); adds 1 to `flag` when any row was replaced. On the device,
    no sync: a few elementwise passes over the output."""
    ok = torch.isfinite(out).all(dim=-1, keepdim=True)
    fb = 0.0 if fallback is None else torch.nan_to_num(fallback.to(out.dtype), nan=0.0, posinf=0.0, neginf=0.0)
    flag.add_((~ok).any().to(flag.dtype))
    return torch.where(ok, out, fb)


class FiniteFlags:
    """One int32 flag per (layer, device); `poll` returns the layers whose flag went up since it last said so."""

    def __init__(self) -> None:
        self._slots: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._buffers: dict[torch.device, list[torch.Tensor]] = {}
        self._names: dict[torch.device, list[str]] = {}
        self._pending: dict[torch.device, tuple[torch.Tensor, torch.cuda.Event, int]] = {}
        self._reported: set[tuple[str, torch.device]] = set()
        self._host: dict[torch.device, torch.Tensor] = {}

    def flag(self, layer_key: str, device: torch.device) -> torch.Tensor:
        """The flag of `layer_key` on `device` (a view into a zeroed buffer, made once)."""
        hit = self._slots.get((layer_key, device))
        if hit is not None:
            return hit
        names = self._names.setdefault(device, [])
        buffers = self._buffers.setdefault(device, [])
        if len(names) == len(buffers) * _CHUNK:
            with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
                buffers.append(torch.zeros(_CHUNK, dtype=torch.int32, device=device))
        slot = len(names)
        names.append(layer_key)
        view = buffers[-1][slot % _CHUNK:slot % _CHUNK + 1]
        self._slots[(layer_key, device)] = view
        return view

    def poll(self, wait: bool = False) -> list[str]:
        """Layers found non-finite and not reported before. Without `wait` nothing waits for a GPU (a flag raised
        on one is seen a poll or two later); with `wait`, every flag raised so far is read (one sync per device).
        Nothing is read while a CUDA graph is being captured."""
        found: list[str] = []
        for device, buffers in self._buffers.items():
            values = torch.cat(buffers).tolist() if device.type != "cuda" else self._read_cuda(device, buffers, wait)
            if values is None:
                continue
            for name, value in zip(self._names[device], values):
                if value and (name, device) not in self._reported:
                    self._reported.add((name, device))
                    found.append(name)
        return found

    def _read_cuda(self, device: torch.device, buffers: list[torch.Tensor], wait: bool) -> list[int] | None:
        """The flags as of the last copy the GPU finished (and a new copy started), None when none is done yet;
        with `wait`, the flags as of now."""
        if torch.cuda.is_current_stream_capturing():
            return None
        pending = self._pending.pop(device, None)
        if wait:
            if pending is not None:
                pending[1].synchronize()  # the pinned buffer is free again
            return torch.cat(buffers).tolist()
        values = None
        if pending is not None:
            if not pending[1].query():
                self._pending[device] = pending
                return None
            values = pending[0][:pending[2]].tolist()
        self._start_copy(device, buffers)
        return values

    def _start_copy(self, device: torch.device, buffers: list[torch.Tensor]) -> None:
        """Copy every flag of `device` into its pinned host buffer without waiting; an event marks when it is there."""
        n = len(buffers) * _CHUNK
        host = self._host.get(device)
        if host is None or host.numel() < n:
            host = self._host[device] = torch.empty(n, dtype=torch.int32, pin_memory=True)
        with torch.cuda.device(device):
            for i, buf in enumerate(buffers):
                host[i * _CHUNK:(i + 1) * _CHUNK].copy_(buf, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._pending[device] = (host, event, n)
