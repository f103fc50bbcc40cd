"""Saving a checkpoint loses nothing: symlinks are followed, odd destinations refused, permissions kept, and a
save killed at any point leaves the old file intact and loadable (its temp file is cleaned up by the next save)."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from attnplug.core.checkpoint import CheckpointError, load_checkpoint, remove_stale_temp_files, save_checkpoint

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file semantics")


def _comps(value: float) -> dict:
    return {"backend.x": ({"w": torch.full((8,), value)}, {"value": value})}


def _value(path) -> float:
    return load_checkpoint(path)["backend.x"][1]["value"]


def _temps(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@posix_only
def test_a_symlinked_checkpoint_is_updated_where_it_lives(tmp_path):
    real = tmp_path / "store" / "ttr.safetensors"
    save_checkpoint(real, _comps(1.0))
    link = tmp_path / "ttr.safetensors"
    link.symlink_to(real)
    save_checkpoint(link, _comps(2.0))
    assert link.is_symlink() and _value(real) == 2.0 and _value(link) == 2.0
    dangling = tmp_path / "later.safetensors"
    dangling.symlink_to(tmp_path / "store" / "new.safetensors")
    save_checkpoint(dangling, _comps(3.0))
    assert dangling.is_symlink() and _value(tmp_path / "store" / "new.safetensors") == 3.0


@posix_only
def test_destinations_that_are_not_regular_files_are_refused(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="is a folder, expected a checkpoint file.*refusing to replace it"):
        save_checkpoint(folder, _comps(1.0))
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="a FIFO"):
        save_checkpoint(fifo, _comps(1.0))
    device = tmp_path / "null.safetensors"
    device.symlink_to("/dev/null")
    with pytest.raises(CheckpointError, match="a character device"):
        save_checkpoint(device, _comps(1.0))
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert _temps(tmp_path) == []
    with pytest.raises(CheckpointError, match="is a folder, expected a checkpoint file"):
        load_checkpoint(folder)


@posix_only
def test_permissions_are_kept_and_new_files_follow_the_umask(tmp_path):
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, _comps(1.0))
    os.chmod(path, 0o640)
    save_checkpoint(path, _comps(2.0))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    old = os.umask(0o002)
    try:
        fresh = tmp_path / "fresh.safetensors"
        save_checkpoint(fresh, _comps(1.0))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o664


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@posix_only
def test_stale_temp_files_of_dead_saves_are_removed_and_nothing_else(tmp_path):
    from attnplug.core import checkpoint as ck

    target = tmp_path / "ck.safetensors"
    dead, alive = _dead_pid(), os.getppid()
    stale = tmp_path / f".ck.safetensors.attnplug-{ck._HOST}-{dead}-0a1b2c3d.tmp"
    live = tmp_path / f".ck.safetensors.attnplug-{ck._HOST}-{alive}-0a1b2c3d.tmp"
    other_host = tmp_path / f".ck.safetensors.attnplug-elsewhere-{dead}-0a1b2c3d.tmp"
    other_file = tmp_path / f".other.safetensors.attnplug-{ck._HOST}-{dead}-0a1b2c3d.tmp"
    foreign = tmp_path / "ck.safetensors.abc.tmp"
    for p in (stale, live, other_host, other_file, foreign):
        p.write_bytes(b"partial")
    assert remove_stale_temp_files(target) == [stale]
    save_checkpoint(target, _comps(1.0))
    assert sorted(_temps(tmp_path)) == sorted(p.name for p in (live, other_host, other_file, foreign))


_CHILD = textwrap.dedent("""
    import sys, time, torch
    from attnplug.core import checkpoint as ck
    path, mode = sys.argv[1], sys.argv[2]
    real_save = ck.save_file

    def stalled_save(tensors, filename, metadata=None):
        if mode == "writing":  # killed while the temp file is half written
            with open(filename, "wb") as fh:
                fh.write(b"\\0" * 4096)
                fh.flush()
        else:  # killed after the temp file is complete, before the rename
            real_save(tensors, filename, metadata=metadata)
        print("saving", flush=True)
        time.sleep(120)

    ck.save_file = stalled_save
    ck.save_checkpoint(path, {"backend.x": ({"w": torch.full((8,), 2.0)}, {"value": 2.0})})
""")


@posix_only
@pytest.mark.parametrize("mode", ["writing", "before-rename"])
def test_a_save_killed_midway_leaves_the_old_file_intact_and_loadable(tmp_path, mode):
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, _comps(1.0))
    before = path.read_bytes()
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), mode], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "saving"
        assert len(_temps(tmp_path)) == 1  # the save is under way, in its own temp file
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    assert path.read_bytes() == before and _value(path) == 1.0
    save_checkpoint(path, _comps(3.0))  # the next save removes what the killed one left
    assert _value(path) == 3.0 and _temps(tmp_path) == []
