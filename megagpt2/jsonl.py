"""Reading JSON-lines files with errors that name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator


def iter_json_lines(path: str, what: str, hint: str = "", errors: str = "strict") -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line of `path`.

    `what` names the file's role in messages ("evaluation file"); `hint` is appended to the
    missing-file error (e.g. which option must point at it). `errors="replace"` turns invalid
    UTF-8 into U+FFFD, as preprocessing does, instead of failing.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist{f' ({hint})' if hint else ''}")
    with open(p, encoding="utf-8", errors=errors) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON value") from None
            yield n, value
