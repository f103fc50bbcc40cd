"""Comet experiment keys: the rule Comet enforces, and the stable key derived from a checkpoint.

Comet keys are 32-50 letters and digits. A key that names the same experiment for every session on
one checkpoint keeps a long distillation in one experiment across runs and restarts (a key made
per session would split it into many).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

KEY_RE = re.compile(r"[A-Za-z0-9]{32,50}")


def check_experiment_key(key: str) -> str:
    """`key` when Comet accepts it; else ValueError saying what a key must look like."""
    if not KEY_RE.fullmatch(key):
        raise ValueError(f"a Comet experiment key is 32-50 letters and digits, got {len(key)} characters "
                         f"{'including others' if not key.isalnum() else ''}".rstrip()
                         + " (leave it unset to derive one from the checkpoint)")
    return key


def derived_experiment_key(checkpoint: str | Path, name: str, project: str, workspace: str | None,
                           training: bool) -> str:
    """40 hex digits from the checkpoint's resolved path, the experiment name, project, workspace and
    whether the session trains (distilling and serving one checkpoint are two experiments)."""
    resolved = Path(checkpoint).expanduser().resolve()
    text = "\0".join(("attnplug", workspace or "", project, str(resolved), name, "train" if training else "serve"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:40]
