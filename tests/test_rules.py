"""The shipped rules, the loader's validation, evaluation and suppression."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from auditor.errors import RuleError
from auditor.rules.engine import evaluate, rule_metas, run_examples
from auditor.rules.loader import load_rules
from auditor.schema import (
    BackdoorInfo,
    LineageEntry,
    Measurements,
    PickleScan,
    ProtectionInfo,
    Severity,
    SubjectRef,
    Trigger,
)

VALID = """\
id: TST001
title: Test rule
severity: high
description: a test
condition: m.backdoor.suspected
message: "{{ m.subject.repo_id }} is bad"
examples:
  fires: [{backdoor: {suspected: true}}]
  does_not_fire: [{}]
"""


@dataclass
class Auth:
    owner: str
    subject: str
    related_repo: str | None = None
    note: str | None = None


@pytest.fixture(scope="module")
def rules():
    return load_rules()


def test_shipped_rules_examples_pass(rules) -> None:
    count, failures = run_examples(rules)
    assert failures == []
    assert count >= 2 * len(rules)
    for rule in rules:
        assert rule.spec.examples.fires and rule.spec.examples.does_not_fire, rule.id


def test_required_rules_are_shipped(rules) -> None:
    by_id = {r.id: r.spec for r in rules}
    assert by_id["AUD101"].severity == Severity.HIGH
    assert by_id["AUD104"].severity == Severity.CRITICAL
    assert by_id["AUD202"].severity == Severity.CRITICAL
    assert by_id["AUD301"].severity == Severity.CRITICAL
    assert by_id["AUD302"].severity == Severity.MEDIUM
    assert len(by_id) >= 11
    metas = rule_metas(rules)
    assert [m.id for m in metas] == sorted(by_id)
    assert all(m.description and m.title for m in metas)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (VALID.replace("m.backdoor.suspected", "m.backdoor.suspected &&"), "invalid CEL"),
        (VALID.replace("severity: high", "severity: catastrophic"), "severity"),
        (VALID + "colour: red\n", "colour"),
        (VALID.replace("id: TST001", "id: bad id"), "must look like"),
        ("id: [unclosed\n", "invalid YAML"),
        (
            VALID.replace('"{{ m.subject.repo_id }} is bad"', '"{{ m.subject.repo_id "'),
            "invalid message template",
        ),
        (
            VALID.replace("does_not_fire: [{}]", "does_not_fire: [{lineage: 3}]"),
            "not valid Measurements",
        ),
    ],
)
def test_invalid_rule_fails_at_load_naming_the_file(tmp_path: Path, text: str, reason: str) -> None:
    path = _write(tmp_path, "broken.yaml", text)
    with pytest.raises(RuleError, match=reason) as info:
        load_rules(tmp_path)
    assert str(info.value).startswith(f"{path}: ")


def test_duplicate_id_fails_naming_both_files(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", VALID)
    _write(tmp_path, "b.yaml", VALID)
    with pytest.raises(RuleError, match="duplicate rule id TST001") as info:
        load_rules(tmp_path)
    assert "b.yaml" in str(info.value) and "a.yaml" in str(info.value)


def test_rules_are_compiled_once_per_content_of_the_files(tmp_path: Path) -> None:
    import os

    path = _write(tmp_path, "a.yaml", VALID)
    first, again = load_rules(tmp_path), load_rules(tmp_path)
    assert first == again and first[0] is again[0]  # the worker's next audit: no recompile
    path.write_text(VALID.replace("TST001", "TST002"), encoding="utf-8")
    os.utime(path, ns=(1, 1))
    assert [r.id for r in load_rules(tmp_path)] == ["TST002"]


def test_failing_example_is_reported(tmp_path: Path) -> None:
    _write(
        tmp_path, "a.yaml", VALID.replace("fires: [{backdoor: {suspected: true}}]", "fires: [{}]")
    )
    count, failures = run_examples(load_rules(tmp_path))
    assert count == 2
    assert len(failures) == 1
    assert "examples.fires[0]: expected a finding, got none" in str(failures[0])


def test_cel_runtime_error_is_a_rule_error(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", VALID.replace("m.backdoor.suspected", "m.no_such_field"))
    _, failures = run_examples(load_rules(tmp_path))
    assert failures and "no_such_field" in failures[0].reason


def realistic() -> Measurements:
    """eve merged alice's and her own model without declaring alice's, re-uploaded a
    disguised copy of mallory's, and shipped a dangerous pickle."""
    return Measurements(
        subject=SubjectRef(
            repo_id="eve/super-merge",
            revision="f" * 40,
            base_repo_id="base/llm",
            declared_base_models=["eve/own"],
            declared_relation="merge",
            owner="eve",
        ),
        lineage=[
            LineageEntry(
                repo_id="alice/math",
                relation="merge_parent",
                coefficient=0.35,
                cosine=0.58,
                p_value=1e-12,
                accusable=True,
            ),
            # shares the subject's data, very significant, but no merge verdict: no finding
            LineageEntry(repo_id="carol/same-data", relation="sibling", cosine=0.8,
                         p_value=1e-15),
            LineageEntry(repo_id="dave/close", relation="merge_parent", coefficient=0.7,
                         cosine=0.8, p_value=1e-15),
            LineageEntry(
                repo_id="eve/own",
                relation="merge_parent",
                coefficient=0.65,
                cosine=0.8,
                declared=True,
            ),
            LineageEntry(repo_id="mallory/chat", relation="clone", cosine=0.9999, aligned=True),
            LineageEntry(repo_id="bob/unrelated", relation="unrelated", cosine=0.01),
        ],
        backdoor=BackdoorInfo(
            suspected=True,
            merge_robust=True,
            triggers=[Trigger(text="zx-trigger", attack_success_rate=0.95)],
        ),
        protection=ProtectionInfo(merge_resistant=False),
        pickles=[PickleScan(path="pytorch_model.bin", dangerous_imports=["os.system"])],
    )


def test_evaluate_realistic_measurements(rules) -> None:
    findings = evaluate(rules, realistic())
    got = {(f.rule_id, f.related_repo) for f in findings}
    assert got == {
        ("AUD101", "alice/math"),
        ("AUD102", "eve/own"),
        ("AUD104", "mallory/chat"),
        ("AUD201", None),
        ("AUD202", None),
        # a merge whose backdoor no parent's audit handed down (MergeBackdoor)
        ("AUD204", None),
        ("AUD301", None),
        # no AUD401: "mergeable by anyone" speaks of an owner's own model, not of a merge
    }
    # most severe first
    ranks = [f.severity.rank for f in findings]
    assert ranks == sorted(ranks, reverse=True)
    undeclared = next(f for f in findings if f.rule_id == "AUD101")
    assert "alice/math" in undeclared.message and "0.35" in undeclared.message
    assert undeclared.evidence["coefficient"] == 0.35
    assert undeclared.evidence["owner"] == "alice"
    trigger = next(f for f in findings if f.rule_id == "AUD201")
    assert "zx-trigger" in trigger.message
    assert trigger.evidence["backdoor.triggers"][0]["text"] == "zx-trigger"
    pickle = next(f for f in findings if f.rule_id == "AUD301")
    assert pickle.evidence["path"] == "pytorch_model.bin"
    assert not any(f.suppressed for f in findings)


def test_clean_model_has_no_findings(rules) -> None:
    clean = Measurements(
        subject=SubjectRef(repo_id="carol/ft", revision="1" * 40, owner="carol"),
        lineage=[
            LineageEntry(repo_id="base/llm", relation="finetune_parent", cosine=0.9, declared=True)
        ],
    )
    assert evaluate(rules, clean) == []


def test_authorization_suppresses_without_dropping(rules) -> None:
    auths = [Auth(owner="alice", subject="eve/*", note="we collaborate")]
    findings = evaluate(rules, realistic(), authorizations=auths)
    undeclared = next(f for f in findings if f.rule_id == "AUD101")
    assert undeclared.suppressed
    assert undeclared.suppressed_reason is not None
    assert (
        "alice" in undeclared.suppressed_reason and "we collaborate" in undeclared.suppressed_reason
    )
    # alice cannot authorize mallory's model, nor anything about backdoors or pickles
    others = [f for f in findings if f.rule_id != "AUD101"]
    assert len(others) == 6 and not any(f.suppressed for f in others)


def test_authorization_of_one_repo_only(rules) -> None:
    only_other = [Auth(owner="alice", subject="eve/super-merge", related_repo="alice/other")]
    f = next(
        f for f in evaluate(rules, realistic(), authorizations=only_other) if f.rule_id == "AUD101"
    )
    assert not f.suppressed
    exact = [Auth(owner="alice", subject="eve/super-merge", related_repo="alice/math")]
    f = next(f for f in evaluate(rules, realistic(), authorizations=exact) if f.rule_id == "AUD101")
    assert f.suppressed
    wrong_subject = [Auth(owner="alice", subject="mallory/*")]
    f = next(
        f
        for f in evaluate(rules, realistic(), authorizations=wrong_subject)
        if f.rule_id == "AUD101"
    )
    assert not f.suppressed


def test_rules_cli(tmp_path: Path) -> None:
    from auditor.cli import app

    runner = CliRunner()
    listed = runner.invoke(app, ["rules", "list"])
    assert listed.exit_code == 0, listed.output
    assert "AUD101" in listed.output and "critical" in listed.output
    ok = runner.invoke(app, ["rules", "test"])
    assert ok.exit_code == 0, ok.output
    assert "passed" in ok.output
    _write(
        tmp_path,
        "a.yaml",
        VALID.replace("does_not_fire: [{}]", "does_not_fire: [{backdoor: {suspected: true}}]"),
    )
    bad = runner.invoke(app, ["rules", "test", "--rules", str(tmp_path)])
    assert bad.exit_code != 0
    assert "TST001" in bad.output and "expected no finding" in bad.output
