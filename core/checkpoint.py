"""Checkpoints: safetensors for tensors plus JSON metadata; atomic writes; never pickle.

Layout of one file: tensors named `<component>/<name>` and the safetensors metadata key
`attnplug` holding JSON `{"format": "attnplug", "version": 1, "components": {component: meta}}`.
Loading a file that someone shared never runs code.

Saving writes a temp file next to the real file (symlinks followed, so a linked checkpoint is updated
where it lives), fsyncs it and renames it over the target: until the rename the old file is untouched,
also when the process is killed. The temp file is named `.<name>.attnplug-<host>-<pid>-<random>.tmp`;
a later save removes such files of the same host whose process is gone. Only regular files are
replaced; the new file keeps the old one's permission bits (a new file gets the umask's).

`MetaReader` reads component metadata strictly (a boolean is `true`/`false`, not `"false"`), and
`require_finite` refuses NaN/inf tensors, each error naming the field or tensor.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import socket
import stat
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load_file, save_file

FORMAT = "attnplug"
VERSION = 1
META_KEY = "attnplug"
_MISSING: Any = object()


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message names the file and the mismatch."""


def checkpoint_path_problem(path: str | Path) -> str | None:
    """Why `path` cannot be a checkpoint (it exists but is not a regular file, symlinks followed), or None."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{path}: cannot be inspected ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    return f"{path} is {file_kind(mode)}, expected a checkpoint file (e.g. ttr.safetensors)"


def file_kind(mode: int) -> str:
    """`a folder`, `a FIFO (named pipe)`, ... for an `st_mode` that is not a regular file."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "not a regular file"


def save_checkpoint(path: str | Path, components: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]) -> Path:
    """Write `{component: (tensors, meta)}` to `path` atomically (temp file, fsync, rename).

    Tensors are cloned to contiguous CPU tensors; inference-mode tensors are fine. Until the rename,
    an existing file at `path` is untouched. A symlink is followed (its target is replaced); a
    destination that is not a regular file (a folder, a device, a FIFO) is refused.
    """
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
    try:
        return _replace_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata={META_KEY: blob}))
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {exc}") from None


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a small text file (JSON reports, plans) atomically, with the same safeguards as a checkpoint save."""
    return _replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _replace_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Replace `path` by what `write` puts into a temp file beside it: fsync, rename, fsync the folder.

    Until the rename an existing file at `path` is untouched. A symlink is followed (its target is
    replaced); a destination that is not a regular file is refused; the file keeps its permission bits.
    """
    path = Path(path)
    target = Path(os.path.realpath(path))  # every symlink followed; a dangling one: the file it names
    problem = checkpoint_path_problem(target)
    if problem:
        raise CheckpointError(f"{path}: {problem}; refusing to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(target)
    mode = _mode_for(target)
    tmp = _create_temp(target)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # after the write: the writer may create the file anew
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
_TEMP = re.compile(r"^\.(?P<name>.+)\.attnplug-(?P<host>[A-Za-z0-9]*)-(?P<pid>\d+)-[0-9a-f]+\.tmp$")


def _mode_for(target: Path) -> int:
    """Permission bits of the file a save writes: the existing file's, else what the umask gives a new file."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where the system tells (Linux), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _create_temp(target: Path) -> Path:
    """A new, empty temp file next to `target`, named so that `remove_stale_temp_files` can recognise it."""
    while True:
        tmp = target.parent / f".{target.name}.attnplug-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


def remove_stale_temp_files(target: Path) -> list[Path]:
    """Remove temp files a killed save of `target` left behind: same host, a process that no longer runs.
    Returns what was removed; files it cannot decide about (another host, a live process) stay."""
    removed: list[Path] = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m or m["name"] != target.name or m["host"] != _HOST or int(m["pid"]) == os.getpid() \
                or _pid_alive(int(m["pid"])):
            continue
        try:
            if stat.S_ISREG(entry.lstat().st_mode):
                entry.unlink()
                removed.append(entry)
        except OSError:
            continue
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists (another user's), or cannot tell: keep its file
    return True


class MetaReader:
    """Strict reads from one component's JSON metadata; every error is a `CheckpointError` naming the field.

    JSON has one number type: an integer field takes only integers (not `true`, not `2.5`), a boolean only
    `true`/`false` (the string `"false"` is an error, never true), a number only finite values."""

    def __init__(self, data: Any, path: str = "") -> None:
        if not isinstance(data, dict):
            raise CheckpointError(f"{'field ' + path if path else 'metadata'}: expected an object, got "
                                  f"{_shown(data)}")
        self.data: dict[str, Any] = data
        self.path = path

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _get(self, key: str, default: Any) -> Any:
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            raise CheckpointError(f"field {self.where(key)}: missing")
        return default

    def _bad(self, key: str, value: Any, expected: str) -> CheckpointError:
        return CheckpointError(f"field {self.where(key)}: got {_shown(value)}, expected {expected}")

    def get_bool(self, key: str, default: Any = _MISSING) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, value, "true or false")
        return value

    def get_int(self, key: str, default: Any = _MISSING, lo: int | None = None, hi: int | None = None) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, value, "an integer")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self._bad(key, value, f"an integer in [{lo if lo is not None else '-inf'}, "
                                        f"{hi if hi is not None else 'inf'}]")
        return value

    def get_float(self, key: str, default: Any = _MISSING, lo: float | None = None,
                  optional: bool = False) -> float | None:
        value = self._get(key, default)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
                or value in (float("inf"), float("-inf")):
            raise self._bad(key, value, "a finite number" + (" or null" if optional else ""))
        if lo is not None and value < lo:
            raise self._bad(key, value, f"a number >= {lo}")
        return float(value)

    def get_str(self, key: str, default: Any = _MISSING) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise self._bad(key, value, "a string")
        return value

    def get_obj(self, key: str, default: Any = _MISSING) -> "MetaReader":
        value = self._get(key, default)
        if not isinstance(value, dict):
            raise self._bad(key, value, "an object")
        return MetaReader(value, self.where(key))

    def get_list(self, key: str, default: Any = _MISSING) -> list[Any]:
        value = self._get(key, default)
        if not isinstance(value, list):
            raise self._bad(key, value, "a list")
        return value

    def get_str_list(self, key: str, default: Any = _MISSING) -> list[str]:
        values = self.get_list(key, default)
        if not all(isinstance(v, str) for v in values):
            raise self._bad(key, values, "a list of strings")
        return list(values)

    def get_counts(self, key: str) -> dict[str, int]:
        """An object of non-negative integer counters (absent: empty)."""
        counts = self.get_obj(key, {})
        return {k: counts.get_int(k, lo=0) for k in counts.data}


def require_finite(tensors: Mapping[str, torch.Tensor], what: str = "tensor") -> None:
    """Refuse NaN/inf in floating-point tensors (weights, optimizer states), naming the first bad tensor."""
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{what} {name!r} holds non-finite values (NaN or inf); a checkpoint with them "
                                  "would poison serving and training")


def _shown(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def load_checkpoint(path: str | Path) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """Read a checkpoint written by `save_checkpoint`; raise `CheckpointError` naming the problem."""
    path = Path(path)
    problem = checkpoint_path_problem(path)
    if problem:
        raise CheckpointError(f"checkpoint {problem}")
    if not path.exists():
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
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"checkpoint {path}: metadata is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"checkpoint {path}: metadata is {type(header).__name__}, expected an object")
    if header.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: format {_shown(header.get('format'))}, expected {FORMAT!r}")
    if type(header.get("version")) is not int or header.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path}: version {_shown(header.get('version'))}, this attnplug reads "
                              f"{VERSION}")
    components = header.get("components", {})
    if not isinstance(components, dict):
        raise CheckpointError(f"checkpoint {path}: field components: expected an object, got {_shown(components)}")
    for comp, meta in components.items():
        if not isinstance(meta, dict):
            raise CheckpointError(f"checkpoint {path}, component {comp}: metadata is {_shown(meta)}, expected an "
                                  "object")
    out: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {
        comp: ({}, meta) for comp, meta in components.items()}
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
