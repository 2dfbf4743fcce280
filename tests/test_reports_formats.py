"""JSON and SARIF formatters, and the registry."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from auditor.reports.formatters import FORMATTERS, UnknownFormat, render
from auditor.reports.sarif import build_sarif, sarif_level
from auditor.schema import AuditReport, CheckError, Severity, SkippedCheck
from auditor_testkit.reports import samples

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "auditor" / "data" / "sarif-schema-2.1.0.json"


@pytest.fixture(scope="module")
def sarif_validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    assert schema["title"].startswith("Static Analysis Results Format (SARIF) Version 2.1.0")
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())


def test_registry_has_every_format_with_one_signature() -> None:
    assert set(FORMATTERS) == {"json", "sarif", "html"}
    report = samples.merge_report()
    for fmt, formatter in FORMATTERS.items():
        out = formatter(report, rules=samples.RULES)
        assert out == render(report, fmt=fmt, rules=samples.RULES)
        assert out.strip()


def test_unknown_format_is_a_clear_error() -> None:
    with pytest.raises(UnknownFormat, match="unknown report format 'xml'"):
        render(samples.merge_report(), fmt="xml")


@pytest.mark.parametrize("report", samples.sample_reports(), ids=lambda r: r.subject.repo_id[:20])
def test_json_round_trip_and_stable(report: AuditReport) -> None:
    text = render(report, fmt="json")
    assert AuditReport.model_validate_json(text) == report
    assert render(report, fmt="json") == text
    # Sorted keys all the way down: re-dumping with sort_keys changes nothing.
    data = json.loads(text)
    assert json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n" == text
    assert list(data) == sorted(data)


def test_severity_to_sarif_level() -> None:
    assert [sarif_level(s) for s in Severity] == ["note", "note", "warning", "error", "error"]


@pytest.mark.parametrize("report", samples.sample_reports(), ids=lambda r: r.subject.repo_id[:20])
def test_sarif_validates_against_official_schema(
    report: AuditReport, sarif_validator: jsonschema.Draft7Validator
) -> None:
    log = json.loads(render(report, fmt="sarif", rules=samples.RULES))
    errors = sorted(sarif_validator.iter_errors(log), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
    assert log["version"] == "2.1.0"
    assert len(log["runs"][0]["results"]) == len(report.findings)


def test_sarif_content_of_merge_report() -> None:
    report = samples.merge_report()
    log = build_sarif(report, rules=samples.RULES)
    run = log["runs"][0]
    driver = run["tool"]["driver"]
    assert driver["name"] == "auditor" and driver["version"] == "0.1.0"
    assert driver["informationUri"].startswith("https://")
    rule_ids = [r["id"] for r in driver["rules"]]
    assert rule_ids[: len(samples.RULES)] == [r.id for r in samples.RULES]
    aud001 = driver["rules"][rule_ids.index("AUD001")]
    assert aud001["name"] == "UndeclaredMerge"
    assert aud001["shortDescription"]["text"] == "Undeclared merge"
    assert "base_model_relation: merge" in aud001["help"]["text"]
    assert aud001["properties"]["severity"] == "high"
    assert aud001["properties"]["confidence"] == "high"
    assert "model-merging" in aud001["properties"]["tags"]
    assert aud001["helpUri"] == "https://huggingface.co/docs/hub/model-cards"

    active, suppressed = run["results"]
    assert active["ruleId"] == "AUD001" and active["level"] == "error"
    assert driver["rules"][active["ruleIndex"]]["id"] == "AUD001"
    assert "bob/math-ft" in active["message"]["text"]
    loc = active["locations"][0]["physicalLocation"]["artifactLocation"]
    assert loc == {"uri": "model.safetensors", "uriBaseId": "REPO"}
    assert run["originalUriBaseIds"]["REPO"]["uri"] == "hf://mallory/super-merge-7b@9f1c2e7/"
    assert active["properties"]["evidence"]["coefficient"] == 0.41
    assert active["relatedLocations"][0]["physicalLocation"]["artifactLocation"]["uri"] == (
        "hf://bob/math-ft/model.safetensors")
    assert "suppressions" not in active

    assert suppressed["ruleId"] == "AUD020" and suppressed["level"] == "warning"
    assert suppressed["suppressions"] == [{
        "kind": "external", "state": "accepted",
        "justification": "alice/chat-ft's owner authorized merges by mallory",
    }]


def test_sarif_levels_and_unknown_rules_get_descriptors() -> None:
    report = samples.backdoor_report()
    log = build_sarif(report)  # no rule metadata given: descriptors come from the findings
    run = log["runs"][0]
    assert [r["id"] for r in run["tool"]["driver"]["rules"]] == ["AUD010", "AUD030"]
    assert [r["level"] for r in run["results"]] == ["error", "note"]
    assert run["results"][1]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == (
        "pytorch_model.bin")


def test_sarif_uris_of_attacker_ids_are_encoded(
    sarif_validator: jsonschema.Draft7Validator,
) -> None:
    log = build_sarif(samples.backdoor_report(), rules=samples.RULES)
    run = log["runs"][0]
    base = run["originalUriBaseIds"]["REPO"]["uri"]
    assert base.startswith("hf://sneaky/helpful%3Cscript%3E") and base.endswith("@d00rd00r/")
    uri = run["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    # The evidence path "../../<payload>.safetensors" stays inside the repo, encoded.
    assert ".." not in uri and "<" not in uri and '"' not in uri and uri.endswith(".safetensors")
    for text in (base, uri):
        assert not set(text) & set('<>" ')


def test_errors_and_skipped_checks_are_typed_and_apart_from_file_issues(
        sarif_validator: jsonschema.Draft7Validator) -> None:
    report = samples.backdoor_report()
    data = json.loads(render(report, fmt="json"))
    assert data["schema_version"] == 2
    assert [(e["detector"], e["kind"]) for e in data["errors"]] == [("barrier", "RepoNotFound")]
    assert [s["detector"] for s in data["skipped"]] == ["protection"]
    assert all(i["kind"] != "skipped" for i in data["file_issues"])
    log = build_sarif(report)
    assert not list(sarif_validator.iter_errors(log))
    invocation = log["runs"][0]["invocations"][0]
    assert invocation["executionSuccessful"] is False
    notes = invocation["toolExecutionNotifications"]
    assert [(n["level"], n["properties"]["detector"]) for n in notes] == [
        ("error", "barrier"), ("note", "protection")]
    clean = build_sarif(samples.finetune_report())["runs"][0]["invocations"][0]
    assert clean == {"executionSuccessful": True}


def test_a_version_1_report_still_loads() -> None:
    v1 = json.loads(render(samples.finetune_report(), fmt="json"))
    del v1["skipped"]
    v1.update(schema_version=1, errors=["barrier: x/y: not found", "no detector named"],
              file_issues=[{"path": "o/m", "kind": "skipped", "message": "an adapter"},
                           {"path": "a.json", "kind": "malformed", "message": "bad"}])
    report = AuditReport.model_validate(v1)
    assert report.schema_version == 2
    assert report.errors == [
        CheckError(detector="barrier", kind="unknown", message="x/y: not found"),
        CheckError(detector="audit", kind="unknown", message="no detector named")]
    assert report.skipped == [SkippedCheck(detector="behaviour", reason="an adapter")]
    assert [i.kind for i in report.file_issues] == ["malformed"]
