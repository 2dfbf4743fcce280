"""The detector pipeline: typed slots, the import-time order check, selection, isolation."""

from __future__ import annotations

import pkgutil
from dataclasses import dataclass
from typing import Any

import pytest

import auditor.detectors as detectors_pkg
from auditor.detectors import PIPELINE
from auditor.detectors.base import Detector, check_pipeline, run_stages, select_stages
from auditor.detectors.context import AuditContext, StageResult
from auditor.errors import AnalysisError, AuditorError


@dataclass(frozen=True)
class First(StageResult):
    value: int

    def measurements(self) -> dict[str, Any]:
        return {"first": self.value}


@dataclass(frozen=True)
class Second(StageResult):
    value: int


def _ctx() -> AuditContext:
    return AuditContext(settings=None, client=None, subject=None, base=None,  # type: ignore[arg-type]
                        candidates={}, homologues={}, declared_parents=[],
                        progress=lambda _m: None)


def _first(ctx: AuditContext) -> None:
    ctx.provide(First(value=2))


def _second(ctx: AuditContext) -> None:
    ctx.provide(Second(value=ctx.get(First).value * 10))


ONE = Detector("one", _first, provides=(First,))
TWO = Detector("two", _second, requires=(First,), provides=(Second,))


def test_pipeline_order_is_checked() -> None:
    check_pipeline([ONE, TWO])
    with pytest.raises(ValueError, match="requires First"):
        check_pipeline([TWO, ONE])
    with pytest.raises(ValueError, match="provided by both"):
        check_pipeline([ONE, Detector("again", _first, provides=(First,))])
    with pytest.raises(ValueError, match="listed twice"):
        check_pipeline([ONE, ONE])


def test_every_detector_module_is_in_the_pipeline() -> None:
    check_pipeline(PIPELINE)
    helpers = {"base", "context"}
    modules = {m.name for m in pkgutil.iter_modules(detectors_pkg.__path__)} - helpers
    listed = {d.run.__module__.rsplit(".", 1)[1] for d in PIPELINE}
    assert modules == listed


def test_results_flow_through_typed_slots_in_run_order() -> None:
    ctx = _ctx()
    run_stages(ctx, [ONE, TWO])
    assert ctx.get(Second).value == 20
    assert [type(r) for r in ctx.results()] == [First, Second]
    assert ctx.errors == [] and ctx.skipped == []
    assert set(ctx.timings) == {"one", "two"}


def test_selection_pulls_in_the_providers() -> None:
    assert [d.name for d in select_stages([ONE, TWO], ["two"])] == ["one", "two"]
    assert [d.name for d in select_stages([ONE, TWO], ["one"])] == ["one"]
    assert [d.name for d in select_stages(PIPELINE, ["backdoor"])] == [
        "weights", "lineage", "behaviour", "backdoor"]
    with pytest.raises(AuditorError, match="unknown detector"):
        select_stages([ONE, TWO], ["three"])


def test_missing_requirement_is_a_skip_and_failures_are_typed_errors() -> None:
    def fails(_ctx: AuditContext) -> None:
        raise AnalysisError("no probes")

    def crashes(_ctx: AuditContext) -> None:
        raise ZeroDivisionError("bug")

    ctx = _ctx()
    run_stages(ctx, [Detector("one", fails, provides=(First,)), TWO,
                     Detector("bug", crashes)])
    assert [(e.detector, e.kind, e.message) for e in ctx.errors] == [
        ("one", "AnalysisError", "no probes"),
        ("bug", "internal", "ZeroDivisionError: bug")]
    assert [(s.detector, s.reason) for s in ctx.skipped] == [
        ("two", "needs First from 'one'")]


def test_a_stage_provides_only_what_it_declares() -> None:
    ctx = _ctx()
    run_stages(ctx, [Detector("sneaky", _first, provides=(Second,))])
    assert not ctx.has(First)
    assert [(e.detector, e.kind) for e in ctx.errors] == [("sneaky", "internal")]
    assert "not declared" in ctx.errors[0].message
