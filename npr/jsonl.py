"""Reading JSONL data files: one JSON object per line, blank lines skipped, and a ValueError that
names the file and line of the first bad row (the trainers' and tasks' data readers share it)."""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any


def read_rows(path: str, keys: Sequence[str] = ()) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for each non-blank line of path; ValueError when a line is not JSON,
    not an object, or lacks one of keys."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from e
            if not isinstance(row, dict) or not set(keys) <= set(row):
                raise ValueError(f"{path}:{n}: a row needs the keys "
                                 + " and ".join(f"'{k}'" for k in keys))
            yield n, row
