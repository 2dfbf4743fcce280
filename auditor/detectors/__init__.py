"""The detectors, one module each, and ``PIPELINE``: the one ordered list they run in.

Each module defines the typed results it provides (frozen ``StageResult`` dataclasses)
and a ``DETECTOR = Detector(name, fn, requires=(...), provides=(...))``. The pipeline is
checked at import: every requirement is provided by an earlier stage. To add a detector,
write ``auditor/detectors/<name>.py`` and list its ``DETECTOR`` here.
"""

from __future__ import annotations

from auditor.detectors import (
    backdoor,
    barrier,
    behaviour,
    equivalence,
    lineage,
    pickles,
    protection,
    provenance,
    weights,
)
from auditor.detectors.base import Detector, check_pipeline

# Cheap static checks, then weights, then behaviour (the working model is built once).
PIPELINE: tuple[Detector, ...] = (
    pickles.DETECTOR,
    weights.DETECTOR,
    lineage.DETECTOR,
    provenance.DETECTOR,
    behaviour.DETECTOR,
    barrier.DETECTOR,
    equivalence.DETECTOR,
    protection.DETECTOR,
    backdoor.DETECTOR,
)
check_pipeline(PIPELINE)

DETECTORS: dict[str, Detector] = {d.name: d for d in PIPELINE}
