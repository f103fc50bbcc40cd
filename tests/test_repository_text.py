"""The repository's text speaks about the product, not about how it was developed.

Every tracked text file (docs, descriptions, messages, configs, file names, raw results) is scanned for
references to development history — numbered work sessions, issue numbers —, names of files that are not in
the repository, and absolute paths of development machines. The class `Session` and the word "session" are
fine: only "session" followed by a number is a history reference.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: This file names the forbidden references in its examples; it is the one file not scanned.
SELF = "tests/test_repository_text.py"

#: (what it is, pattern). Case-insensitive.
FORBIDDEN: tuple[tuple[str, re.Pattern[str]], ...] = tuple((what, re.compile(pattern, re.IGNORECASE)) for what, pattern in (
    ("a numbered work session", r"\bsessions?[ _-]?#?\d|_session\d"),
    ("an issue number", r"\bissues?[ _-]?#\d|\bissues? \d"),
    ("a file outside the repository", r"\breference/|SEED_FEATURES|SEED_LEARNINGS|MEASUREMENTS\.md|HOSTS\.md|"
                                      r"ANCHORS\.md|DESIGN\.md|TEAM_NOTES"),
    ("a development machine's path", r"(?<![\w.])/work/"),
))


def problems(text: str) -> list[tuple[int, str, str]]:
    """(line number, what, the matched text) of every forbidden reference in `text`."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for what, pattern in FORBIDDEN:
            for m in pattern.finditer(line):
                found.append((number, what, m.group(0)))
    return found


def _tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout (or git is not installed): no tracked files to scan")
    files = [f for f in out.stdout.decode("utf-8", "replace").split("\0") if f]
    if not files:
        pytest.skip("git lists no tracked files here")
    return files


def _text_of(path: Path) -> str | None:
    """The file's text, or None for a binary file (a NUL byte in its first 8 KiB) or one that is not there."""
    try:
        data = path.read_bytes()
    except OSError:  # listed by git but deleted in the work tree
        return None
    if b"\0" in data[:8192]:
        return None
    return data.decode("utf-8", "replace")


def test_tracked_text_has_no_history_references() -> None:
    report = []
    for name in _tracked_files():
        if name == SELF:
            continue
        report += [f"{name} (file name): {what}: {hit!r}" for _, what, hit in problems(name)]
        text = _text_of(ROOT / name)
        if text is not None:
            report += [f"{name}:{line}: {what}: {hit!r}" for line, what, hit in problems(text)]
    assert not report, ("describe what things are and do, with dated results, instead of:\n  "
                        + "\n  ".join(report))


@pytest.mark.parametrize("text", [
    "renamed in session 5", "the session-5 default", "Session 7: adaptive α", "sessions 4 and 5",
    "quality_session3.json", "see issue 8", "issue #12", "Issue 8's speed targets",
    "reference/MEASUREMENTS.md", "SEED_FEATURES.md §2", "SEED_LEARNINGS", "HOSTS.md", "ANCHORS.md", "DESIGN.md",
    "docs/TEAM_NOTES.md", "cd /work/main && pytest",
])
def test_history_references_are_found(text: str) -> None:
    assert problems(f"first line\n{text}\n") and problems(f"x\n{text}")[0][0] == 2


@pytest.mark.parametrize("text", [
    "Session.attention(q, k, v, call)", "session = Session(cfg)", "a Session serves the call",
    "the session's per-call check", "`attnplug_session_start`", "session/layer scope", "seed 0 / seed 1",
    "issues a warning once", "an issue with the grid", "docs/PERFORMANCE.md", "tests/test_core_session.py",
    "SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1", "https://example.com/work/x", "/tmp/out",
])
def test_product_text_passes(text: str) -> None:
    assert problems(text) == []
