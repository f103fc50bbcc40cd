"""Stand-in of ComfyUI's `folder_paths`: model folders, the input/output/temp folders and annotated names.

Same names and semantics as upstream: `folder_names_and_paths` maps a folder name to
`([paths], {extensions})` (an empty set accepts every file); `add_model_folder_path` appends, or inserts
first with `is_default=True`, and a new name gets an empty extension set; `get_filename_list` lists the
files under every path of a folder (relative names, sorted, filtered by extension); `get_full_path`
finds a name in the first path that holds it; `get_annotated_filepath` resolves `name [input]`,
`name [output]` and `name [temp]`, and plain names against the input folder. Left out: the file-list
cache (upstream caches by folder mtime; the results are the same), `map_legacy`, save-path helpers.
Tests point `models_dir` and `input_directory` at temporary folders.
"""
from __future__ import annotations

import os

base_path = os.path.dirname(os.path.realpath(__file__))
models_dir = os.path.join(base_path, "models")
folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {}
input_directory = os.path.join(base_path, "input")
output_directory = os.path.join(base_path, "output")
temp_directory = os.path.join(base_path, "temp")


def get_input_directory() -> str:
    return input_directory


def get_output_directory() -> str:
    return output_directory


def get_temp_directory() -> str:
    return temp_directory


def annotated_filepath(name: str) -> tuple[str, str | None]:
    if name.endswith("[output]"):
        return name[:-9], get_output_directory()
    if name.endswith("[input]"):
        return name[:-8], get_input_directory()
    if name.endswith("[temp]"):
        return name[:-7], get_temp_directory()
    return name, None


def get_annotated_filepath(name: str, default_dir: str | None = None) -> str:
    name, base_dir = annotated_filepath(name)
    if base_dir is None:
        base_dir = default_dir if default_dir is not None else get_input_directory()
    return os.path.join(base_dir, name)


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    if folder_name in folder_names_and_paths:
        paths = folder_names_and_paths[folder_name][0]
        if is_default:
            paths.insert(0, full_folder_path)
        else:
            paths.append(full_folder_path)
    else:
        folder_names_and_paths[folder_name] = ([full_folder_path], set())


def get_folder_paths(folder_name: str) -> list[str]:
    return folder_names_and_paths[folder_name][0][:]


def recursive_search(directory: str, excluded_dir_names: list[str] | None = None) -> tuple[list[str], dict[str, float]]:
    if not os.path.isdir(directory):
        return [], {}
    excluded = set(excluded_dir_names or [])
    result: list[str] = []
    dirs: dict[str, float] = {}
    for root, subdirs, files in os.walk(directory, followlinks=True):
        subdirs[:] = [d for d in subdirs if d not in excluded]
        dirs[root] = os.path.getmtime(root)
        result.extend(os.path.relpath(os.path.join(root, f), directory) for f in files)
    return result, dirs


def filter_files_extensions(files, extensions) -> list[str]:  # noqa: ANN001
    return sorted(f for f in files if os.path.splitext(f)[-1].lower() in extensions or len(extensions) == 0)


def get_filename_list(folder_name: str) -> list[str]:
    paths, extensions = folder_names_and_paths[folder_name]
    names: set[str] = set()
    for x in paths:
        files, _ = recursive_search(x, excluded_dir_names=[".git"])
        names.update(filter_files_extensions(files, extensions))
    return sorted(names)


def get_full_path(folder_name: str, filename: str) -> str | None:
    if folder_name not in folder_names_and_paths:
        return None
    filename = os.path.relpath(os.path.join("/", filename), "/")
    for x in folder_names_and_paths[folder_name][0]:
        full_path = os.path.join(x, filename)
        if os.path.isfile(full_path):
            return full_path
    return None
