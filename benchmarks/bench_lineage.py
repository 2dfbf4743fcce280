"""Lineage benchmark through the product path: served zoo, ``audit_revision``, rules.

    .venv/bin/python benchmarks/bench_lineage.py [--seeds S1 S2 S3] [--root DIR] [--verbose]

Without --seeds, three seeds are drawn at random each run (and printed), so the figures
never come from one fixed zoo.

For each seed the factory builds (or reuses) the ``lineage-hard`` zoo, whose structure,
owners and coefficients are drawn from that seed (``auditor_testkit.factory.lineage_zoo``): same-
data siblings, same-domain fine-tunes by other owners, clones of siblings, merges of every
method with random coefficients, merge-then-fine-tune, a merge of a protected copy, a
disguised merge. The zoo is served by the Hub-compatible server (``auditor serve-hub``) and
every published model is audited as the daemon does it:

1. a first audit of each repo (the daemon's first pass; its fingerprint is what the store
   keeps, disguise test included);
2. the audit of each repo with every other repo's stored fingerprint as its homologues
   (``HomologueRef``, as ``daemon.worker`` passes them), the real detectors and rules.

Scored against the manifest (``zoo.json``), pooled over the seeds:
- false accusations: AUD101 on a model that is no merge, or naming a non-parent, out of
  all innocent (subject, candidate) pairs;
- merge recall / FPR (subject level: ``merge.is_merge``), parent precision / recall
  (merge parents named), coefficient MAE per method;
- disguised / protected recall: merges of a protected or disguised model attributed to its
  owner; the protected copy reported merge-resistant, and no plain fine-tune so.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from auditor.hub.client import HubClient
from auditor.orchestrator import HomologueRef, audit_revision
from auditor.settings import Settings
from auditor_testkit.factory.zoo import ZooEntry, ZooManifest, build_zoo
from auditor_testkit.hub.server import HubServer

# The daemon runs every registered detector; the backdoor probe and the barrier curves
# do not touch lineage verdicts and take most of the time, so they are left out here.
DETECTORS = ["pickles", "weights", "lineage", "equivalence", "protection"]
SPARSE = ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
          "della_linear")
MERGE_KINDS = ("merge", "disguised")


@dataclass
class Tally:
    innocent_pairs: int = 0
    false_accusations: list[str] = field(default_factory=list)
    merges: int = 0
    merges_found: int = 0
    non_merges: int = 0
    non_merges_flagged: list[str] = field(default_factory=list)
    parents_true: int = 0
    parents_named: int = 0
    parents_hit: int = 0
    mae: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    owner_cases: int = 0
    owner_hits: int = 0
    protected_ok: int = 0
    protected_total: int = 0
    plain_resistant: list[str] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)


def _method_bucket(method: str | None) -> str:
    m = (method or "").removesuffix("+finetune")
    return m.removesuffix("_densities")


def _audit_all(manifest: ZooManifest, url: str, work: Path, log: Any) -> dict[str, Any]:
    base = manifest.base.repo_id
    settings = Settings(data_dir=work / "data", hub_endpoint=url)
    client = HubClient(endpoint=url, token=None, cache_dir=work / "hf-cache",
                       disk_budget_bytes=None)
    subjects = [e for e in manifest.published() if e.kind not in ("base", "adapter")]
    refs: dict[str, HomologueRef] = {}
    for e in subjects:  # first pass: what the store keeps (fingerprint, upload time)
        out = audit_revision(e.repo_id, base=base, settings=settings, client=client,
                             detectors=["weights"])
        refs[e.repo_id] = HomologueRef(repo_id=e.repo_id, revision=out.resolved.revision,
                                       fingerprint=out.fingerprint,
                                       created_at=out.resolved.created_at)
    reports: dict[str, Any] = {}
    for e in subjects:
        homs = {k: v for k, v in refs.items() if k != e.repo_id}
        out = audit_revision(e.repo_id, base=base, homologues=homs, settings=settings,
                             client=client, detectors=DETECTORS)
        reports[e.repo_id] = out.report
        log(e, out.report)
    return reports


def _score(manifest: ZooManifest, reports: dict[str, Any], t: Tally) -> None:
    pub = {e.repo_id for e in manifest.published()}
    owner_of = {e.repo_id: e.owner for e in manifest.entries}
    for subj, rep in reports.items():
        e = manifest.get(subj)
        is_merge = e.kind in MERGE_KINDS
        truth = {p.repo_id: p.coefficient for p in e.parents if p.repo_id in pub}
        acc = {f.related_repo for f in rep.findings
               if f.rule_id == "AUD101" and not f.suppressed}
        for cand in reports:
            if cand == subj:
                continue
            innocent = not (is_merge and cand in truth)
            if innocent:
                t.innocent_pairs += 1
                if cand in acc:
                    t.false_accusations.append(f"AUD101 {subj} <- {cand}")
        named = {x.repo_id: x for x in rep.lineage if x.relation == "merge_parent"}
        if is_merge:
            t.merges += 1
            t.merges_found += int(rep.merge.is_merge)
            if not rep.merge.is_merge:
                t.misses.append(f"merge missed: {subj} ({e.method})")
            t.parents_true += len(truth)
            t.parents_named += len(named)
            t.parents_hit += len(set(named) & set(truth))
            for p in set(truth) - set(named):
                t.misses.append(f"parent missed: {subj} <- {p} ({e.method})")
            for p in set(named) - set(truth):
                t.misses.append(f"wrong parent: {subj} <- {p} ({e.method})")
            for p, c in truth.items():
                got = named.get(p)
                if got is not None and c is not None and got.coefficient is not None \
                        and e.method != "layerwise":
                    t.mae[_method_bucket(e.method)].append(abs(got.coefficient - c))
            owners = {owner_of[p] for p in truth
                      if manifest.get(p).kind == "protected" or e.kind == "disguised"}
            for o in owners:
                t.owner_cases += 1
                hit = any(owner_of.get(p) == o for p in named)
                t.owner_hits += int(hit)
                if not hit:
                    t.misses.append(f"owner {o} not attributed: {subj}")
        else:
            t.non_merges += 1
            t.parents_named += len(named)
            if rep.merge.is_merge or named:
                t.non_merges_flagged.append(f"{subj} ({e.kind}) called a merge of "
                                            f"{sorted(named)}")
        resistant = rep.protection.merge_resistant if rep.protection else None
        if e.kind == "protected":
            t.protected_total += 1
            t.protected_ok += int(resistant is True)
            if resistant is not True:
                t.misses.append(f"protected copy {subj}: merge_resistant={resistant}")
        elif e.kind == "finetune" and resistant is True:
            t.plain_resistant.append(subj)


def _print(t: Tally, seeds: list[int], seconds: float) -> None:
    def ratio(a: int, b: int) -> str:
        return f"{a / b:.3f} ({a}/{b})" if b else "n/a"

    print(f"\n== lineage benchmark, product path, seeds {seeds} ==")
    rows = [
        ("innocent (subject, candidate) pairs", str(t.innocent_pairs), ">= 200"),
        ("false accusations (AUD101)", str(len(t.false_accusations)), "0"),
        ("false-accusation rate", ratio(len(t.false_accusations), t.innocent_pairs), "0"),
        ("merge recall", ratio(t.merges_found, t.merges), ">= 0.95"),
        ("merge false-positive rate", ratio(len(t.non_merges_flagged), t.non_merges),
         "<= 0.02"),
        ("parent precision", ratio(t.parents_hit, t.parents_named), ">= 0.95"),
        ("parent recall", ratio(t.parents_hit, t.parents_true), ">= 0.95"),
    ]
    for m, v in sorted(t.mae.items()):
        tgt = "<= 0.10" if m in SPARSE else "<= 0.05"
        rows.append((f"coef MAE {m} (n={len(v)})", f"{sum(v) / len(v):.3f}", tgt))
    rows += [
        ("disguised/protected owner attributed", ratio(t.owner_hits, t.owner_cases), "all"),
        ("protected copy merge-resistant", ratio(t.protected_ok, t.protected_total), "all"),
        ("plain fine-tunes called resistant", str(len(t.plain_resistant)), "0"),
        ("seconds", f"{seconds:.0f}", ""),
    ]
    for name, val, tgt in rows:
        print(f"{name:<42}{val:>22}  {tgt}")
    for line in [*t.false_accusations, *t.non_merges_flagged, *t.misses,
                 *(f"resistant: {s}" for s in t.plain_resistant)]:
        print("  !", line)


def _log_line(verbose: bool) -> Any:
    def log(e: ZooEntry, rep: Any) -> None:
        if not verbose:
            return
        par = {x.repo_id: round(x.coefficient or 0, 3) for x in rep.lineage
               if x.relation in ("merge_parent", "finetune_parent")}
        sib = [x.repo_id for x in rep.lineage if x.relation in ("sibling", "related")]
        rules = sorted({f.rule_id for f in rep.findings})
        truth = {p.repo_id: p.coefficient for p in e.parents}
        print(f"{e.repo_id:<30} {e.kind:<9} {e.method or '-':<24} got={rep.merge.method} "
              f"parents={par} truth={truth} rules={rules} related={sib[:4]} "
              f"resistant={rep.protection.merge_resistant if rep.protection else None}")
    return log


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="default: three seeds drawn at random per run (printed)")
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "lineage-hard")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    if args.seeds is None:
        args.seeds = random.SystemRandom().sample(range(1_000_000), 3)
        print(f"seeds drawn for this run: {args.seeds}")
    logging.basicConfig(level=logging.ERROR)
    tally = Tally()
    t0 = time.perf_counter()
    for seed in args.seeds:
        root = args.root / f"seed{seed}"
        manifest = build_zoo(root / "zoo", spec="lineage-hard", seed=seed)
        with tempfile.TemporaryDirectory(prefix="bench-lineage-") as tmp, \
                HubServer(root / "zoo") as server:
            reports = _audit_all(manifest, server.url, Path(tmp), _log_line(args.verbose))
        _score(manifest, reports, tally)
    _print(tally, args.seeds, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
