"""The references of the behavioural stages: the audit's own candidates before the store's,
and never a homologue the store already suspects of a backdoor."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from auditor.detectors import behaviour
from auditor.schema import BackdoorInfo


class _Ctx:
    def __init__(self, entries: dict[str, str], candidates: list[str],
                 homologues: dict[str, bool]) -> None:
        self._lineage = SimpleNamespace(result=SimpleNamespace(entries=[
            SimpleNamespace(repo_id=r, relation=rel, copy_of=None)
            for r, rel in entries.items()]))
        self.candidates = {r: SimpleNamespace(resolved=SimpleNamespace(revision="c" + r))
                           for r in candidates}
        self.homologues = {r: SimpleNamespace(revision="h" + r, backdoor=BackdoorInfo(
            suspected=bad)) for r, bad in homologues.items()}
        self.errors: list[str] = []

    def get(self, _kind: Any) -> Any:
        return self._lineage

    def add_error(self, msg: str, **_kw: Any) -> None:
        self.errors.append(msg)


@pytest.fixture
def fetched(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    got: list[str] = []
    monkeypatch.setattr(behaviour, "candidate_sources", lambda ctx: {})
    monkeypatch.setattr(behaviour, "download_weights",
                        lambda ctx, repo, rev: got.append(repo) or repo)
    return got


def test_named_candidates_come_before_the_stores_homologues(fetched: list[str]) -> None:
    sib = ("sibling",)
    ctx = _Ctx({"a/bd-1": "sibling", "a/bd-2": "sibling", "a/bd-3": "sibling",
                "z/clean": "sibling"}, candidates=["z/clean"],
               homologues={"a/bd-1": False, "a/bd-2": False, "a/bd-3": False})
    picked = behaviour.benign_homologues(ctx, relations=sib)  # type: ignore[arg-type]
    assert picked[0] == "z/clean" and len(picked) == behaviour.MAX_HOMOLOGUES


def test_a_suspected_homologue_is_never_a_reference(fetched: list[str]) -> None:
    ctx = _Ctx({"a/bd": "sibling", "b/ok": "sibling"}, candidates=[],
               homologues={"a/bd": True, "b/ok": False})
    picked = behaviour.benign_homologues(ctx, relations=("sibling",))  # type: ignore[arg-type]
    assert picked == ["b/ok"] and fetched == ["b/ok"]
