"""Pickle-format files, scanned statically (never loaded) for the imports they would run."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from auditor.detectors.base import Detector
from auditor.detectors.context import AuditContext, StageResult
from auditor.errors import AuditorError
from auditor.schema import FileIssue, PickleScan


@dataclass(frozen=True)
class PickleScans(StageResult):
    scans: tuple[PickleScan, ...]

    def measurements(self) -> Mapping[str, Any]:
        return {"pickles": list(self.scans)}


def detect_pickles(ctx: AuditContext) -> None:
    """Scan pickle-format files statically (never loaded) for the imports they would run."""
    from auditor.weights.pickles import scan_pickle

    scans: list[PickleScan] = []
    resolved = ctx.subject.resolved
    for name in ctx.subject.inventory.pickles:
        try:
            path = ctx.client.fetch(resolved, name)
        except AuditorError as exc:
            ctx.file_issues.append(FileIssue(path=name, kind="download", message=str(exc)))
            continue
        scan = scan_pickle(path)
        scans.append(scan.model_copy(update={"path": name}))
    ctx.provide(PickleScans(scans=tuple(scans)))


DETECTOR = Detector("pickles", detect_pickles, provides=(PickleScans,))
