"""The detector registry: each detector reads the ``AuditContext`` and fills measurements.

Detectors run in registration order; one that fails records an error in the report and the
others still run (an audit with a broken backdoor probe still reports its lineage). A
detector declares what it ``needs`` (e.g. weights), so a pickle-only repo skips the rest.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from auditor.errors import AuditorError
from auditor.orchestrator import AuditContext

log = logging.getLogger(__name__)

DetectorFn = Callable[[AuditContext], None]


@dataclass(frozen=True)
class Detector:
    name: str
    fn: DetectorFn
    needs_weights: bool
    description: str


DETECTORS: dict[str, Detector] = {}
# Detectors that run the subject model (losses, outputs), pointless on NaN / inf weights.
RUNS_THE_MODEL = frozenset({"barrier", "equivalence", "protection", "backdoor"})


def register(name: str, *, needs_weights: bool = True) -> Callable[[DetectorFn], DetectorFn]:
    def deco(fn: DetectorFn) -> DetectorFn:
        if name in DETECTORS:
            raise ValueError(f"detector {name!r} registered twice")
        DETECTORS[name] = Detector(name, fn, needs_weights, (fn.__doc__ or "").strip())
        return fn

    return deco


def run_detectors(ctx: AuditContext, names: list[str]) -> None:
    for name in names:
        det = DETECTORS.get(name)
        if det is None:
            raise AuditorError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}")
        if det.needs_weights and not ctx.state.get("weights_analyzed", False):
            continue
        if name in RUNS_THE_MODEL and ctx.values.get("nonfinite_tensors"):
            # Running a model with NaN / inf weights measures nothing: say so (the audit is
            # incomplete, and the AUD501 finding says why) rather than report NaN losses.
            ctx.errors.append(f"{name}: not run: the subject holds non-finite weights")
            continue
        t0 = time.perf_counter()
        try:
            det.fn(ctx)
        except AuditorError as exc:
            ctx.errors.append(f"{name}: {exc}")
        except Exception as exc:  # a detector bug must not lose the other results
            # One line; the traceback only at debug level (``auditor --debug``).
            log.error("detector %s crashed: %s: %s", name, type(exc).__name__,
                      (str(exc).splitlines() or [""])[0][:300])
            log.debug("detector %s traceback:\n%s", name, traceback.format_exc())
            ctx.errors.append(f"{name}: internal error: {type(exc).__name__}: {exc}")
        finally:
            ctx.timings[name] = time.perf_counter() - t0


# Registration order is run order: cheap static checks, then weights, then behaviour
# (detectors_behaviour imports detectors_builtin first).
from auditor import detectors_behaviour as _behaviour  # noqa: E402,F401
