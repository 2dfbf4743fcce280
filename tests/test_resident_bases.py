"""Bases kept in memory across a process's audits (``auditor.weights.resident.SharedBases``).

A daemon worker audits a base's derivatives one after another: the second audit must not
read the base's weights again, must give the same fingerprints as an audit that did, and a
base must give way when the behavioural stage needs the memory or the budget is full.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from auditor.weights.dict_sources import DictTensorSource
from auditor.weights.resident import SHARED_BASES, SharedBases


class Counting(DictTensorSource):
    """A source that counts the reads reaching it and whether it was closed."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(tensors)
        self.reads = 0
        self.closed = False

    def get(self, name: str) -> torch.Tensor:
        self.reads += 1
        return super().get(name)

    def close(self) -> None:
        self.closed = True
        super().close()


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(64, 32, generator=g) for i in range(3)}


def test_a_second_lease_reads_nothing() -> None:
    cache, src = SharedBases(), Counting(_tensors(0))
    first = cache.lease("k", lambda: src, budget=1 << 30)
    want = {n: first.get(n) for n in first.keys()}
    first.close()
    assert src.reads == 3 and len(cache) == 1 and not src.closed
    second = cache.lease("k", lambda: pytest.fail("the base was opened again"), budget=1 << 30)
    assert all(torch.equal(second.get(n), want[n]) for n in want)
    second.close()
    assert src.reads == 3


def test_budget_zero_keeps_nothing() -> None:
    cache, src = SharedBases(), Counting(_tensors(0))
    lease = cache.lease("k", lambda: src, budget=0)
    lease.get("w0")
    lease.close()
    assert len(cache) == 0 and src.closed


def test_least_recently_used_goes_first_within_the_budget() -> None:
    cache = SharedBases()
    one_base = 3 * 64 * 32 * 4
    srcs = {k: Counting(_tensors(i)) for i, k in enumerate("abc")}
    for k in "abc":
        lease = cache.lease(k, lambda k=k: srcs[k], budget=2 * one_base)
        for n in lease.keys():
            lease.get(n)
        lease.close()
        if k == "b":  # "a" used again: "b" is now the oldest
            cache.lease("a", lambda: pytest.fail("reopened"), budget=2 * one_base).close()
    assert len(cache) == 2
    assert srcs["b"].closed and not srcs["a"].closed and not srcs["c"].closed


def test_at_most_a_few_bases_are_held_whatever_their_size() -> None:
    from auditor.weights.resident import MAX_SHARED_BASES

    cache = SharedBases()
    srcs = [Counting(_tensors(i)) for i in range(MAX_SHARED_BASES + 3)]
    for i, src in enumerate(srcs):
        cache.lease(i, lambda src=src: src, budget=1 << 40).close()
    assert len(cache) == MAX_SHARED_BASES
    assert [s.closed for s in srcs] == [True] * 3 + [False] * MAX_SHARED_BASES


def test_a_base_in_use_is_never_closed_and_release_falls_back_to_the_files() -> None:
    cache, src = SharedBases(), Counting(_tensors(1))
    a = cache.lease("k", lambda: src, budget=1)  # over budget at once
    b = cache.lease("k", lambda: pytest.fail("reopened"), budget=1)
    want = a.get("w1")
    a.close()
    assert not src.closed  # b still reads it
    b.release()  # the behavioural stage wants the memory: evicted, reads go to the source
    reads = src.reads
    assert torch.equal(b.get("w1"), want) and src.reads == reads + 1
    b.close()
    assert src.closed and len(cache) == 0


def test_threads_share_one_base_safely() -> None:
    cache, src = SharedBases(), Counting(_tensors(2))
    want = {n: src.get(n) for n in src.keys()}
    src.reads = 0
    errors: list[BaseException] = []

    def audit() -> None:
        try:
            lease = cache.lease("k", lambda: src, budget=1 << 30)
            for _ in range(20):
                for n in lease.keys():
                    assert torch.equal(lease.get(n), want[n])
            lease.close()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=audit) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and src.reads == 3  # each tensor read once, whatever the interleaving


def _settings(server: Any, tmp_path: Path, **kw: Any) -> Any:
    from auditor.settings import Settings

    return Settings(hub_endpoint=server.url, data_dir=tmp_path / "data",
                    cache_dir=tmp_path / "cache", device="cpu", **kw)


def test_a_workers_second_audit_of_a_family_reads_only_its_subject(
        hub_server: Any, small_zoo: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from auditor.detectors import weights as weights_stage
    from auditor.hub.client import HubClient
    from auditor.orchestrator import audit_revision

    server = hub_server(small_zoo.root)
    opened: list[str] = []
    real_open = weights_stage.open_weights

    def counting_open(model: Any) -> Any:
        opened.append(model.resolved.repo_id)
        return real_open(model)

    monkeypatch.setattr(weights_stage, "open_weights", counting_open)
    SHARED_BASES.clear()
    # the daemon's first passes (behaviour deferred) of two derivatives, one process
    settings = _settings(server, tmp_path, defer_behaviour_bytes=1)
    client = HubClient.from_settings(settings)
    prints = {}
    for subject in ("alice/tiny-copy", "bob/tiny-kv"):
        out = audit_revision(subject, settings=settings, client=client, defer_behaviour=True)
        assert out.fingerprint is not None
        prints[subject] = out.fingerprint
    base = small_zoo.manifest.by_kind("base")[0].repo_id
    assert opened.count(base) == 1, opened  # the base was opened for the first audit only
    assert len(SHARED_BASES) == 1
    # the same fingerprints as audits that read the base themselves
    SHARED_BASES.clear()
    plain = _settings(server, tmp_path / "plain", defer_behaviour_bytes=1,
                      resident_base_bytes=0)
    out = audit_revision("bob/tiny-kv", settings=plain, client=HubClient.from_settings(plain),
                         defer_behaviour=True)
    assert out.fingerprint is not None
    got, want = out.fingerprint, prints["bob/tiny-kv"]
    assert got.keys() == want.keys() and dict(got.meta) == dict(want.meta)
    for name in want.keys():
        a, b = got.tensors[name], want.tensors[name]
        assert (a.sq_norm, a.zero_fraction) == (b.sq_norm, b.zero_fraction), name
        assert (a.sample == b.sample).all(), name
    assert len(SHARED_BASES) == 0
