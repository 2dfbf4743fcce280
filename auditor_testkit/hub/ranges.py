"""HTTP ``Range: bytes=...`` headers as the local Hub answers them (206, 416 or the whole)."""

from __future__ import annotations

import re

RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
_MAX_RANGE_DIGITS = 19


def parse_range(match: re.Match[str], size: int) -> tuple[int, int] | None:
    first, last = match.group(1), match.group(2)
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        n = int(last) if len(last) <= _MAX_RANGE_DIGITS else size
        if n == 0 or size == 0:
            return None
        return max(0, size - n), size - 1
    # More digits than any file size: the start is past the end (416), an end is "to EOF".
    # Checked before int(): a 5,000-digit number would raise (int max str digits).
    if len(first) > _MAX_RANGE_DIGITS:
        return None
    start = int(first)
    end = int(last) if last and len(last) <= _MAX_RANGE_DIGITS else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)
