"""Stand-in of ComfyUI's `folder_paths`: `models_dir`, `folder_names_and_paths`, `add_model_folder_path`,
`get_folder_paths`. Tests point `models_dir` at a temporary folder."""
from __future__ import annotations

import os

base_path = os.path.dirname(os.path.realpath(__file__))
models_dir = os.path.join(base_path, "models")
folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {}


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    paths, exts = folder_names_and_paths.setdefault(folder_name, ([], set()))
    if full_folder_path in paths:
        if is_default and paths[0] != full_folder_path:
            paths.remove(full_folder_path)
            paths.insert(0, full_folder_path)
    elif is_default:
        paths.insert(0, full_folder_path)
    else:
        paths.append(full_folder_path)


def get_folder_paths(folder_name: str) -> list[str]:
    return folder_names_and_paths[folder_name][0][:]
