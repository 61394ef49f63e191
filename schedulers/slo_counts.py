"""Deadlines met and missed per SLO class, shared between processes through small files.

The scheduler (engine process) counts, per class, first tokens and later tokens on time
and late, and decodes deferred; the metrics endpoint (front end) sums the files of a
directory, one per engine process. Classes are few (the operator's, plus `default` and
`custom`), so a JSON file rewritten at most once a second, and at shutdown, is enough;
the step log's fixed-layout ring is for per-step fields.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

FIELDS = ("first_met", "first_missed", "tokens_met", "tokens_missed", "decodes_deferred")
_WRITE_EVERY_S = 1.0


class SLOCounts:
    """One process's counts, written to `<directory>/slo-<pid>.json` (no directory: kept
    in memory only)."""

    def __init__(self, directory: str | os.PathLike | None) -> None:
        self.path = None if directory is None else Path(directory) / f"slo-{os.getpid()}.json"
        self.by_class: dict[str, dict[str, int]] = {}
        self._written = -float("inf")
        self._dirty = False

    def add(self, slo_class: str, **counts: int) -> None:
        row = self.by_class.get(slo_class)
        if row is None:
            row = self.by_class[slo_class] = dict.fromkeys(FIELDS, 0)
        for name, n in counts.items():
            row[name] += n
        self._dirty = True

    def flush(self, force: bool = False) -> None:
        """Write the file if anything changed, at most once a second unless `force`."""
        if self.path is None or not self._dirty:
            return
        now = time.monotonic()
        if not force and now - self._written < _WRITE_EVERY_S:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.by_class))
        os.replace(tmp, self.path)  # readers see the old file or the new, never half
        self._written, self._dirty = now, False


def read_counts(directory: str | os.PathLike | None) -> dict[str, dict[str, int]]:
    """Every engine process's counts in `directory`, summed per class."""
    total: dict[str, dict[str, int]] = {}
    for path in sorted(Path(directory).glob("**/slo-*.json")) if directory else ():
        try:
            data: Mapping[str, Mapping[str, int]] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a process that is writing or gone: its next write counts
        for name, row in data.items():
            mine = total.setdefault(name, dict.fromkeys(FIELDS, 0))
            for field in FIELDS:
                mine[field] += int(row.get(field, 0))
    return total
