"""Checkpoints: safetensors for tensors plus JSON metadata; atomic writes; never pickle.

Layout of one file: tensors named `<component>/<name>` and the safetensors metadata key
`attnplug` holding JSON `{"format": "attnplug", "version": 1, "components": {component: meta}}`.
Loading a file that someone shared never runs code.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT = "attnplug"
VERSION = 1
META_KEY = "attnplug"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message names the file and the mismatch."""


def save_checkpoint(path: str | Path, components: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]) -> Path:
    """Write `{component: (tensors, meta)}` to `path` atomically (temp file, fsync, rename).

    Tensors are cloned to contiguous CPU tensors; inference-mode tensors are fine. Until the rename,
    an existing file at `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    metas: dict[str, Any] = {}
    for comp, (ts, meta) in components.items():
        if "/" in comp:
            raise ValueError(f"checkpoint component name {comp!r} must not contain '/'")
        for name, t in ts.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"checkpoint {comp}/{name}: expected a Tensor, got {type(t).__name__}")
            with torch.inference_mode(False):
                tensors[f"{comp}/{name}"] = t.detach().to("cpu").clone().contiguous()
        metas[comp] = meta
    header = {"format": FORMAT, "version": VERSION, "components": metas}
    blob = json.dumps(header, sort_keys=True, allow_nan=False)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={META_KEY: blob})
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """Read a checkpoint written by `save_checkpoint`; raise `CheckpointError` naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            raw_meta = (fh.metadata() or {}).get(META_KEY)
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several error types for bad files
        raise CheckpointError(f"checkpoint {path}: not a readable safetensors file ({exc}); "
                              "it may be truncated or of another format") from None
    if raw_meta is None:
        raise CheckpointError(f"checkpoint {path}: no '{META_KEY}' metadata; not an attnplug checkpoint")
    try:
        header = json.loads(raw_meta)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {path}: metadata is not valid JSON ({exc})") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: format {header.get('format')!r}, expected {FORMAT!r}")
    if header.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path}: version {header.get('version')!r}, this attnplug reads {VERSION}")
    out: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {
        comp: ({}, meta) for comp, meta in header.get("components", {}).items()}
    for key, t in tensors.items():
        comp, _, name = key.partition("/")
        if comp not in out:
            raise CheckpointError(f"checkpoint {path}: tensor {key!r} belongs to no component in the metadata")
        out[comp][0][name] = t
    return out


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
