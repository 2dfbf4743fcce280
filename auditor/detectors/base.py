"""The detector type, the pipeline check and the runner.

A detector is a function of the ``AuditContext`` that reads the results it ``requires``
and provides the results it declares in ``provides``. Stages run in the pipeline's
order; one whose requirements were not provided (no weights, an earlier stage failed or
skipped) does not run. One that fails records an error in the report and the others
still run (an audit with a broken backdoor probe still reports its lineage).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from auditor.detectors.context import AuditContext, StageResult
from auditor.errors import AuditorError

log = logging.getLogger(__name__)

DetectorFn = Callable[[AuditContext], None]


@dataclass(frozen=True)
class Detector:
    name: str
    run: DetectorFn
    requires: tuple[type[StageResult], ...] = ()
    provides: tuple[type[StageResult], ...] = ()

    @property
    def description(self) -> str:
        return (self.run.__doc__ or "").strip()


def check_pipeline(stages: Sequence[Detector]) -> None:
    """Every requirement is provided by an earlier stage; names and slots are unique."""
    provided: dict[type[StageResult], str] = {}
    names: set[str] = set()
    for det in stages:
        if det.name in names:
            raise ValueError(f"detector {det.name!r} listed twice")
        names.add(det.name)
        for kind in det.requires:
            if kind not in provided:
                raise ValueError(f"detector {det.name!r} requires {kind.__name__}, "
                                 "which no earlier stage provides")
        for kind in det.provides:
            if kind in provided:
                raise ValueError(f"{kind.__name__} provided by both {provided[kind]!r} "
                                 f"and {det.name!r}")
            provided[kind] = det.name


def select_stages(stages: Sequence[Detector], names: Sequence[str] | None) -> list[Detector]:
    """The named stages plus the stages providing what they require, in pipeline order."""
    if names is None:
        return list(stages)
    by_name = {d.name: d for d in stages}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise AuditorError(f"unknown detector {unknown[0]!r}; known: {', '.join(by_name)}")
    provider = {kind: d.name for d in stages for kind in d.provides}
    wanted: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo += [provider[kind] for kind in by_name[name].requires]
    return [d for d in stages if d.name in wanted]


def run_stages(ctx: AuditContext, stages: Sequence[Detector]) -> None:
    provider = {kind: d.name for d in stages for kind in d.provides}
    for det in stages:
        missing = [kind for kind in det.requires if not ctx.has(kind)]
        if missing:
            # Said once per stage, naming what is missing and which stage did not provide it.
            ctx.skip(", ".join(f"needs {k.__name__} from {provider[k]!r}" for k in missing),
                     detector=det.name)
            continue
        t0 = time.perf_counter()
        try:
            with ctx.running(det.name, det.provides):
                det.run(ctx)
        except AuditorError as exc:
            ctx.add_error(str(exc), kind=type(exc).__name__, detector=det.name)
        except Exception as exc:  # a detector bug must not lose the other results
            # One line; the traceback only at debug level (``auditor --debug``).
            log.error("detector %s crashed: %s: %s", det.name, type(exc).__name__,
                      (str(exc).splitlines() or [""])[0][:300])
            log.debug("detector %s traceback:\n%s", det.name, traceback.format_exc())
            ctx.add_error(f"{type(exc).__name__}: {exc}", kind="internal", detector=det.name)
        finally:
            ctx.timings[det.name] = time.perf_counter() - t0
