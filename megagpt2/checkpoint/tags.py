"""Checkpoint names ("tags") in a checkpoint directory: which exist, which are complete, the newest."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

TAG_RE = re.compile(r"^step_(\d{8})$")
STATE_FILE = "megagpt2.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    """COMPLETE is written last, after every rank's files and the metadata."""
    return (path / "COMPLETE").is_file() and (path / STATE_FILE).is_file()


def step_dirs(ckpt_dir: str) -> list[Path]:
    """Every step_* directory, complete or not, oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if TAG_RE.match(p.name) and p.is_dir()), key=lambda p: p.name)


def complete_tags(ckpt_dir: str) -> list[str]:
    """Tags of the complete checkpoints in ckpt_dir, oldest first."""
    return [p.name for p in step_dirs(ckpt_dir) if is_complete(p)]


def find_latest(ckpt_dir: Optional[str]) -> Optional[str]:
    """Tag of the newest complete checkpoint in ckpt_dir, or None (`latest` names it too)."""
    if not ckpt_dir:
        return None
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None
