"""Where the nodes' files live, as ComfyUI users expect, and whether a file changed.

- Checkpoints: every folder registered as the model folder `attnplug` (`models/attnplug/` plus what
  `extra_model_paths.yaml` adds); names are relative to those folders and looked up in each, in order;
  a new file goes into the first. Names that leave the folders (`..`, absolute paths elsewhere) are
  refused: a prompt sent to a ComfyUI server must not write files anywhere on its disk.
- Input files (prompt lists, config files): ComfyUI's input folder, with its annotations
  (`name [input]`, `name [output]`, `name [temp]`); absolute paths as given.
- `fingerprint(path)`: what ComfyUI's cache needs to see a file changed (path, inode, mtime, size).

`folder_paths` is imported lazily; outside ComfyUI the folders are `./models/attnplug/` and `./`.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

FOLDER = "attnplug"
SUFFIX = ".safetensors"


def _folder_paths() -> ModuleType | None:
    try:
        import folder_paths  # type: ignore[import-not-found]
    except ImportError:
        return None
    return folder_paths


def register_folder() -> None:
    """Register `models/attnplug/` as the model folder `attnplug` (for `.safetensors` files); folders
    extra_model_paths.yaml registered under that name keep their order and `models/attnplug/` joins last."""
    fp = _folder_paths()
    if fp is None:
        return
    default = os.path.join(fp.models_dir, FOLDER)
    registered = fp.folder_names_and_paths.get(FOLDER)
    if registered is None:
        fp.folder_names_and_paths[FOLDER] = ([default], {SUFFIX})
    elif default not in registered[0]:
        registered[0].append(default)


def model_folders() -> list[Path]:
    """The `attnplug` model folders in search order; the first is where new checkpoints go."""
    fp = _folder_paths()
    if fp is None:
        return [Path.cwd() / "models" / FOLDER]
    register_folder()
    return [Path(p) for p in fp.get_folder_paths(FOLDER)]


def _folders_text() -> str:
    return ", ".join(str(f) for f in model_folders())


def checkpoint_names() -> list[str]:
    """The checkpoint files in every `attnplug` model folder, as names relative to their folder (sorted)."""
    fp = _folder_paths()
    if fp is None:
        names = {str(p.relative_to(f)) for f in model_folders() if f.is_dir() for p in f.rglob(f"*{SUFFIX}")}
    else:
        register_folder()
        names = set(fp.get_filename_list(FOLDER))
    return sorted(n for n in names if n.lower().endswith(SUFFIX))


def _within(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def resolve_checkpoint(name: str, must_exist: bool) -> Path:
    """The checkpoint file a widget names: the first `attnplug` model folder that holds it, else (when
    `must_exist` is False) the path a new file gets in the first folder. `.safetensors` is added when the
    name lacks it. Raises ValueError naming the problem (empty name, outside the folders, not found)."""
    text = name.strip()
    if not text:
        raise ValueError("checkpoint: no file name given; choose a checkpoint, or type a name such as "
                         "'flux_ttr.safetensors' (it goes into the attnplug model folder)")
    rel = Path(text).expanduser()
    if not rel.name.lower().endswith(SUFFIX):
        rel = rel.with_name(rel.name + SUFFIX)
    folders = model_folders()
    if rel.is_absolute():
        if not any(_within(rel, f) for f in folders):
            raise ValueError(f"checkpoint {text}: outside the attnplug model folders ({_folders_text()}); give a "
                             "name inside them, or register another folder as 'attnplug' in extra_model_paths.yaml")
        candidates = [rel]
    elif ".." in rel.parts:
        raise ValueError(f"checkpoint {text!r}: '..' is not allowed; names are relative to the attnplug model "
                         f"folders ({_folders_text()})")
    else:
        candidates = [f / rel for f in folders]
    for path in candidates:
        if path.is_file():
            return path
    if must_exist:
        raise ValueError(f"checkpoint {text!r}: no such file in the attnplug model folders ({_folders_text()}); "
                         "train one with the attnplug Distill node first")
    return candidates[0]


def input_file(name: str, what: str) -> Path:
    """A file the user gives a node: relative names in ComfyUI's input folder (`name [output]` / `[temp]`
    pick those folders), absolute paths as given. `what` names the node input in errors."""
    text = name.strip()
    fp = _folder_paths()
    base = Path(fp.get_input_directory()) if fp is not None else Path.cwd()
    if not text:
        raise ValueError(f"{what}: no file given; name a file in ComfyUI's input folder ({base}), e.g. "
                         "'prompts.json', or give an absolute path")
    text = os.path.expanduser(text)
    return Path(fp.get_annotated_filepath(text)) if fp is not None else base / text


def fingerprint(path: Path | None) -> tuple[Any, ...]:
    """What changes when the file at `path` is rewritten (atomic writes give a new inode): path, inode,
    mtime in ns, size; `(path, None)` when there is no such file."""
    if path is None:
        return (None,)
    try:
        st = path.stat()
    except OSError:
        return (str(path), None)
    return (str(path), st.st_ino, st.st_mtime_ns, st.st_size)
