"""Evaluate loaded rules on Measurements and produce Findings.

The CEL activation holds ``m`` (``measurements.model_dump(mode="json")``), ``item`` (the
lineage entry, trigger or pickle scan of per-item rules; null for subject rules) and
``subject_owner``. Lineage items get a derived ``owner`` (the part of ``repo_id`` before
the slash) because CEL as cel-python implements it has no string split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import celpy
import jinja2

from auditor.errors import RuleError
from auditor.rules.authz import AuthorizationLike, apply_authorizations, owner_of
from auditor.rules.loader import Rule, example_measurements
from auditor.schema import Finding, Measurements, RuleMeta

__all__ = [
    "AuthorizationLike",
    "ExampleFailure",
    "evaluate",
    "rule_metas",
    "run_examples",
]


_INT64 = 2**63


def cel_safe(value: Any) -> Any:
    """JSON ``value`` with integers CEL cannot hold (beyond int64) as strings.

    Uploaders write configs with 30-digit ints (``model_max_length: 1e30`` as an int);
    cel-python's int type raises ``ValueError: overflow`` on them.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -_INT64 <= value < _INT64 else str(value)
    if isinstance(value, dict):
        return {k: cel_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [cel_safe(v) for v in value]
    return value


def _subject_owner(m: dict[str, Any]) -> str:
    subject = m["subject"]
    return subject.get("owner") or owner_of(subject["repo_id"])


def _items(rule: Rule, m: dict[str, Any]) -> list[dict[str, Any] | None]:
    scope = rule.spec.scope
    if scope == "subject":
        return [None]
    if scope == "lineage":
        return [{**entry, "owner": owner_of(entry["repo_id"])} for entry in m["lineage"]]
    if scope == "triggers":
        return list(m["backdoor"]["triggers"])
    return list(m["pickles"])


def _to_cel(item: dict[str, Any] | None) -> Any:
    """``item`` as a CEL value, or the exception converting it raised (reported per rule,
    as if it were raised there)."""
    try:
        return celpy.json_to_cel(cel_safe(item))
    except Exception as exc:
        return exc


def _short(exc: BaseException) -> str:
    # celpy errors carry the whole activation in their text: keep the first line of it.
    text = str(exc.args[0]) if exc.args else str(exc)
    return " ".join(text.split())[:300]


def _condition(rule: Rule, activation: dict[str, Any]) -> bool:
    try:
        result = rule.program.evaluate(activation)
    except celpy.CELEvalError as exc:
        raise RuleError(f"{rule.where}: rule {rule.id}: condition failed: {_short(exc)}") from None
    if isinstance(result, celpy.CELEvalError):
        raise RuleError(f"{rule.where}: rule {rule.id}: condition failed: {_short(result)}")
    if not isinstance(result, bool | celpy.celtypes.BoolType):
        raise RuleError(
            f"{rule.where}: rule {rule.id}: condition must give a bool, got {type(result).__name__}"
        )
    return bool(result)


def _lookup(m: dict[str, Any], path: str) -> Any:
    value: Any = m
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise RuleError(f"evidence path {path!r} not in the measurements")
        value = value[part]
    return value


def _finding(rule: Rule, m: dict[str, Any], item: dict[str, Any] | None) -> Finding:
    spec = rule.spec
    try:
        message = rule.template.render(m=m, item=item, subject_owner=_subject_owner(m)).strip()
    except jinja2.TemplateError as exc:
        raise RuleError(f"{rule.where}: rule {rule.id}: message failed: {exc}") from None
    related: str | None = None
    if item is not None:
        evidence = dict(item)
        if spec.scope == "lineage":
            related = item["repo_id"]
    else:
        try:
            evidence = {path: _lookup(m, path) for path in spec.evidence}
        except RuleError as exc:
            raise RuleError(f"{rule.where}: rule {rule.id}: {exc}") from None
    return Finding(
        rule_id=spec.id,
        severity=spec.severity,
        title=spec.title,
        message=message,
        confidence=spec.confidence,
        remediation=spec.remediation.strip() or None,
        references=list(spec.references),
        related_repo=related,
        evidence=evidence,
    )


def evaluate(
    rules: Sequence[Rule],
    measurements: Measurements,
    *,
    authorizations: Sequence[AuthorizationLike] = (),
    errors: list[str] | None = None,
) -> list[Finding]:
    """Every finding the rules give on ``measurements``, most severe first.

    With ``errors``, a rule that fails to evaluate is recorded there and the others go on
    (audits); without, it raises (``rules test``, where a failure is the answer).

    Findings an owner authorized are kept, marked ``suppressed`` with the reason.
    """
    m = measurements.model_dump(mode="json")
    base = {"m": celpy.json_to_cel(cel_safe(m)),
            "subject_owner": celpy.json_to_cel(_subject_owner(m))}
    findings: list[Finding] = []
    # each scope's items converted to CEL once, not once per rule (a family of 50
    # homologues times a dozen lineage rules)
    scoped: dict[str, list[tuple[dict[str, Any] | None, Any]]] = {}
    for rule in rules:
        if (pairs := scoped.get(rule.spec.scope)) is None:
            pairs = scoped[rule.spec.scope] = [(item, _to_cel(item)) for item in _items(rule, m)]
        for item, cel in pairs:
            try:
                if isinstance(cel, Exception):
                    raise cel
                activation = {**base, "item": cel}
                if _condition(rule, activation):
                    findings.append(_finding(rule, m, item))
            except Exception as exc:
                # One rule failing on odd measurements must not cost the others' findings
                # (a critical pickle next to a broken config is still reported).
                if errors is None:
                    raise
                errors.append(f"rule {rule.id}: {_short(exc) or type(exc).__name__}")
    findings = apply_authorizations(findings, subject_repo=measurements.subject.repo_id,
                                    authorizations=authorizations)
    findings.sort(key=lambda f: (-f.severity.rank, f.rule_id, f.related_repo or ""))
    return findings


def rule_metas(rules: Sequence[Rule]) -> list[RuleMeta]:
    return [
        RuleMeta(
            id=r.spec.id,
            title=r.spec.title,
            severity=r.spec.severity,
            confidence=r.spec.confidence,
            description=r.spec.description.strip(),
            remediation=r.spec.remediation.strip(),
            references=list(r.spec.references),
        )
        for r in rules
    ]


@dataclass(frozen=True)
class ExampleFailure:
    rule_id: str
    source: str
    kind: str  # "fires" or "does_not_fire"
    index: int
    reason: str

    def __str__(self) -> str:
        return (
            f"{self.source}: rule {self.rule_id}: examples.{self.kind}[{self.index}]: {self.reason}"
        )


def run_examples(rules: Sequence[Rule]) -> tuple[int, list[ExampleFailure]]:
    """Run every rule's examples alone; returns (examples run, failures)."""
    failures: list[ExampleFailure] = []
    count = 0
    for rule in rules:
        cases = [("fires", e, True) for e in rule.spec.examples.fires]
        cases += [("does_not_fire", e, False) for e in rule.spec.examples.does_not_fire]
        index = {"fires": 0, "does_not_fire": 0}
        for kind in ("fires", "does_not_fire"):
            if not getattr(rule.spec.examples, kind):
                failures.append(
                    ExampleFailure(rule.id, rule.where, kind, 0, f"no '{kind}' example given")
                )
        for kind, example, expected in cases:
            i = index[kind]
            index[kind] += 1
            count += 1
            try:
                found = evaluate([rule], example_measurements(example))
            except RuleError as exc:
                failures.append(ExampleFailure(rule.id, rule.where, kind, i, str(exc)))
                continue
            if bool(found) != expected:
                reason = (
                    "expected a finding, got none"
                    if expected
                    else (f"expected no finding, got {len(found)}: {found[0].message}")
                )
                failures.append(ExampleFailure(rule.id, rule.where, kind, i, reason))
    return count, failures
