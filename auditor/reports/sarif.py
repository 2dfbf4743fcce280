"""SARIF 2.1.0 output, for GitHub code scanning and any SARIF viewer.

Locations point at the audited repository file (``model.safetensors`` unless the finding's
evidence names another path) relative to the ``REPO`` base id, which
``run.originalUriBaseIds`` maps to ``hf://ORG/NAME@REV/``. Repo ids and paths are
percent-encoded: they are attacker-written and must still form valid URIs.
The output validates against the official schema vendored in
``auditor/data/sarif-schema-2.1.0.json`` (see the tests).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from auditor.schema import AuditReport, Finding, RuleMeta, Severity

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA_URI = "https://json.schemastore.org/sarif-2.1.0.json"
TOOL_NAME = "auditor"
# Where a SARIF viewer sends a reader who wants to know what the tool is.
INFORMATION_URI = "https://huggingface.co/docs/hub/model-cards#specifying-a-base-model"
REPO_BASE_ID = "REPO"
DEFAULT_ARTIFACT = "model.safetensors"

_LEVELS = {
    Severity.CRITICAL: "error",
    Severity.HIGH: "error",
    Severity.MEDIUM: "warning",
    Severity.LOW: "note",
    Severity.INFO: "note",
}
# GitHub code scanning ranks security alerts by this CVSS-like number.
_SECURITY_SEVERITY = {
    Severity.CRITICAL: "9.5",
    Severity.HIGH: "8.0",
    Severity.MEDIUM: "5.5",
    Severity.LOW: "3.0",
    Severity.INFO: "1.0",
}


def sarif_level(severity: Severity) -> str:
    """critical/high -> error, medium -> warning, low/info -> note."""
    return _LEVELS[Severity(severity)]


def _quote(text: str) -> str:
    return quote(text, safe="/@-._~")


def repo_uri(repo_id: str, revision: str | None = None) -> str:
    """``hf://ORG/NAME@REV/``: the base every artifact location of a run is relative to."""
    rev = f"@{quote(revision, safe='-._~')}" if revision else ""
    return f"hf://{_quote(repo_id.strip('/'))}{rev}/"


def _artifact_path(finding: Finding) -> str:
    for key in ("path", "file", "filename"):
        value = finding.evidence.get(key)
        if isinstance(value, str) and value.strip():
            # A relative path inside the repo: no scheme, no leading slash, no "..".
            parts = [p for p in value.replace("\\", "/").split("/") if p not in ("", ".", "..")]
            if parts:
                return _quote("/".join(parts))
    return DEFAULT_ARTIFACT


def _rule_name(title: str) -> str:
    words = re.findall(r"[A-Za-z0-9]+", title)
    return "".join(w[:1].upper() + w[1:] for w in words) or "Rule"


def _tags(rule: RuleMeta) -> list[str]:
    tags = ["security", "ml-model"]
    text = f"{rule.id} {rule.title}".lower()
    for word, tag in (("merge", "model-merging"), ("backdoor", "backdoor"),
                      ("trigger", "backdoor"), ("lineage", "lineage"), ("clone", "lineage"),
                      ("pickle", "pickle"), ("protect", "protection")):
        if word in text and tag not in tags:
            tags.append(tag)
    return tags


def _rule_descriptor(rule: RuleMeta) -> dict[str, Any]:
    remediation = rule.remediation or "Review the evidence and the model card's declared lineage."
    references = [r for r in rule.references if r.startswith(("https://", "http://"))]
    help_md = remediation + "".join(f"\n\n- <{r}>" for r in references)
    descriptor: dict[str, Any] = {
        "id": rule.id,
        "name": _rule_name(rule.title),
        "shortDescription": {"text": rule.title},
        "fullDescription": {"text": rule.description or rule.title},
        "help": {"text": remediation, "markdown": help_md},
        "defaultConfiguration": {"level": sarif_level(rule.severity)},
        "properties": {
            "severity": rule.severity.value,
            "confidence": rule.confidence,
            "security-severity": _SECURITY_SEVERITY[rule.severity],
            "precision": {"high": "high", "medium": "medium", "low": "low"}.get(
                rule.confidence, "medium"),
            "tags": _tags(rule),
        },
    }
    if references:
        descriptor["helpUri"] = references[0]
    return descriptor


def _rules_for(report: AuditReport, rules: Sequence[RuleMeta]) -> list[RuleMeta]:
    """The given rules, plus a descriptor made from the finding for any rule not given."""
    known: dict[str, RuleMeta] = {}
    for rule in rules:
        known.setdefault(rule.id, rule)
    for f in report.findings:
        if f.rule_id not in known:
            known[f.rule_id] = RuleMeta(
                id=f.rule_id, title=f.title, severity=f.severity, confidence=f.confidence,
                description=f.title, remediation=f.remediation or "", references=f.references,
            )
    return list(known.values())


def _fingerprint(report: AuditReport, finding: Finding) -> str:
    key = "\x1f".join((finding.rule_id, report.subject.repo_id, finding.related_repo or ""))
    return hashlib.sha256(key.encode()).hexdigest()


def _result(report: AuditReport, finding: Finding, rule_index: int) -> dict[str, Any]:
    subject = report.subject
    dumped = finding.model_dump(mode="json")
    result: dict[str, Any] = {
        "ruleId": finding.rule_id,
        "ruleIndex": rule_index,
        "kind": "fail",
        "level": sarif_level(finding.severity),
        "message": {"text": finding.message or finding.title},
        "locations": [{
            "physicalLocation": {
                "artifactLocation": {"uri": _artifact_path(finding), "uriBaseId": REPO_BASE_ID},
            },
            "logicalLocations": [{
                "name": subject.repo_id,
                "fullyQualifiedName": f"{subject.repo_id}@{subject.revision}",
                "kind": "module",
            }],
        }],
        "partialFingerprints": {"auditorFinding/v1": _fingerprint(report, finding)},
        "properties": {
            "title": finding.title,
            "severity": finding.severity.value,
            "confidence": finding.confidence,
            "evidence": dumped["evidence"],
            "tags": ["security"],
        },
    }
    if finding.related_repo:
        result["relatedLocations"] = [{
            "id": 1,
            "physicalLocation": {"artifactLocation": {
                "uri": repo_uri(finding.related_repo) + DEFAULT_ARTIFACT}},
            "message": {"text": f"related repository {finding.related_repo}"},
        }]
        result["properties"]["relatedRepo"] = finding.related_repo
    if finding.remediation:
        result["properties"]["remediation"] = finding.remediation
    if finding.suppressed:
        result["suppressions"] = [{
            "kind": "external",
            "state": "accepted",
            "justification": finding.suppressed_reason or "authorized by the base model's owner",
        }]
    return result


def build_sarif(report: AuditReport, *, rules: Sequence[RuleMeta] = ()) -> dict[str, Any]:
    """The SARIF log as a dict (one run, one result per finding, suppressed ones included)."""
    all_rules = _rules_for(report, rules)
    index = {r.id: i for i, r in enumerate(all_rules)}
    subject = report.subject
    invocation: dict[str, Any] = {"executionSuccessful": not report.errors}
    # Failed checks are errors; checks that did not apply are notes (the run still succeeded).
    notifications = [
        {"level": "error", "message": {"text": f"{e.detector}: {e.message}"},
         "properties": {"detector": e.detector, "kind": e.kind}}
        for e in report.errors
    ] + [
        {"level": "note", "message": {"text": f"{s.detector} skipped: {s.reason}"},
         "properties": {"detector": s.detector, "skipped": True}}
        for s in report.skipped
    ]
    if notifications:
        invocation["toolExecutionNotifications"] = notifications
    run: dict[str, Any] = {
        "tool": {"driver": {
            "name": TOOL_NAME,
            "version": report.tool_version,
            "semanticVersion": report.tool_version,
            "informationUri": INFORMATION_URI,
            "rules": [_rule_descriptor(r) for r in all_rules],
            "properties": {"analysisVersion": report.analysis_version},
        }},
        "invocations": [invocation],
        "originalUriBaseIds": {
            REPO_BASE_ID: {
                "uri": repo_uri(subject.repo_id, subject.revision),
                "description": {"text": f"{subject.repo_id} at revision {subject.revision}"},
            },
        },
        "versionControlProvenance": [{
            "repositoryUri": repo_uri(subject.repo_id),
            "revisionId": subject.revision,
        }],
        "results": [_result(report, f, index[f.rule_id]) for f in report.findings],
        "columnKind": "unicodeCodePoints",
        "properties": {
            "subject": subject.model_dump(mode="json"),
            "schemaVersion": report.schema_version,
        },
    }
    return {"$schema": SARIF_SCHEMA_URI, "version": SARIF_VERSION, "runs": [run]}


def format_report(report: AuditReport, *, rules: Sequence[RuleMeta] = ()) -> str:
    return json.dumps(build_sarif(report, rules=rules), indent=2, ensure_ascii=False,
                      allow_nan=False) + "\n"
