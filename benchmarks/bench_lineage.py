"""Lineage benchmark: merge detection, parent identification and coefficient error.

    .venv/bin/python benchmarks/bench_lineage.py [--root DIR] [--synthetic] [--sample-size K]

Default: build (or reuse) the factory's "lineage" zoo under --root, fingerprint every
published model against its base, run ``analyze_lineage`` for each subject against all
other published models and score against the manifest ``zoo.json``. ``--synthetic`` runs
the same scoring on random task vectors merged with ``auditor_testkit.factory.merge`` (no
training; seconds).

Manifest fields read (per model entry, tolerant of naming): ``repo_id``; ``base``/
``base_model``; ``method``; ``parents`` (list of repo ids) and ``coefficients`` (same
order) or ``parents`` as {repo_id: coefficient}; ``clone_of``; ``disguise``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from auditor.analysis.align import align_to_base
from auditor.analysis.fingerprint import (
    Fingerprint,
    compute_fingerprint,
    fingerprint_weights,
)
from auditor.analysis.lineage import analyze_lineage
from auditor.weights.dict_sources import DictDeltaSource, DictTensorSource

PARENT = ("merge_parent", "finetune_parent")


def _truth(entry: Mapping[str, Any]) -> dict[str, Any]:
    parents = entry.get("parents") or []
    coefs = entry.get("coefficients")
    if isinstance(parents, Mapping):
        pmap = {str(k): (float(v) if v is not None else None) for k, v in parents.items()}
    else:
        cl = list(coefs) if isinstance(coefs, list | tuple) else [None] * len(parents)
        pmap = {
            str(p): (float(c) if c is not None else None) for p, c in zip(parents, cl, strict=False)
        }
    return {
        "parents": pmap,
        "method": entry.get("method") or entry.get("merge_method"),
        "clone_of": entry.get("clone_of"),
        "disguised": bool(entry.get("disguise") or entry.get("disguised")),
        "per_layer": entry.get("per_layer"),
    }


def score(
    results: Mapping[str, Any], truth: Mapping[str, dict[str, Any]], published: list[str]
) -> dict[str, Any]:
    tp = fn = fp_ = tn = 0
    parent_hits = parent_total = 0
    mae: dict[str, list[float]] = defaultdict(list)
    clones_ok = clones_total = disg_ok = disg_total = 0
    method_ok = method_total = 0
    errors: list[str] = []
    for subj, res in results.items():
        t = truth[subj]
        is_merge = bool(t["method"]) and len(t["parents"]) >= 1 and not t["clone_of"]
        for cand in published:
            if cand == subj:
                continue
            e = res.entry(cand)
            predicted = e is not None and e.relation == "merge_parent"
            actual = is_merge and cand in t["parents"]
            if actual and predicted:
                tp += 1
            elif actual:
                fn += 1
                errors.append(f"missed {cand} -> {subj}")
            elif predicted:
                fp_ += 1
                errors.append(f"false parent {cand} -> {subj} ({e.coefficient:.2f})")
            else:
                tn += 1
            # layer-wise truth is per layer (scored separately), not one global number
            if (
                actual
                and predicted
                and t["parents"][cand] is not None
                and t["method"] != "layerwise"
            ):
                mae[str(t["method"])].append(abs((e.coefficient or 0) - t["parents"][cand]))
        if t["parents"] and not t["clone_of"]:
            parent_total += 1
            found = set(res.parents())
            parent_hits += int(found == set(t["parents"]) & set(published) or False)
        if is_merge:
            method_total += 1
            method_ok += int(res.merge.method == t["method"])
        if t["clone_of"]:
            clones_total += 1
            e = res.entry(str(t["clone_of"]))
            ok = e is not None and e.relation in ("clone", "finetune_parent")
            if t["disguised"]:
                disg_total += 1
                disg_ok += int(ok)
            else:
                clones_ok += int(ok)
    return {
        "recall": tp / max(1, tp + fn),
        "fpr": fp_ / max(1, fp_ + tn),
        "parent_id": parent_hits / max(1, parent_total),
        "mae": {k: sum(v) / len(v) for k, v in mae.items()},
        "clones": f"{clones_ok}/{clones_total - disg_total}",
        "disguised": f"{disg_ok}/{disg_total}",
        "method": f"{method_ok}/{method_total}",
        "pairs": tp + fn + fp_ + tn,
        "errors": errors,
    }


def print_table(s: Mapping[str, Any], seconds: float) -> None:
    targets = {"recall": ">= 0.95", "fpr": "<= 0.02", "parent_id": ">= 0.95"}
    print(f"{'metric':<28}{'value':>10}  target")
    print(f"{'pairs scored':<28}{s['pairs']:>10}")
    for k in ("recall", "fpr", "parent_id"):
        print(f"{k:<28}{s[k]:>10.3f}  {targets[k]}")
    for m, v in sorted(s["mae"].items()):
        tgt = "<= 0.05" if m in ("linear", "task_arithmetic", "layerwise") else "<= 0.10"
        print(f"{'coef MAE ' + m:<28}{v:>10.3f}  {tgt}")
    print(f"{'clones recognised':<28}{s['clones']:>10}")
    print(f"{'disguised recognised':<28}{s['disguised']:>10}")
    print(f"{'method guessed':<28}{s['method']:>10}")
    print(f"{'seconds':<28}{seconds:>10.1f}")
    for e in s["errors"][:20]:
        print("  !", e)


def synthetic_zoo() -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    """Fine-tunes, merges of every method, clones and a disguised copy on random weights."""
    from auditor_testkit.factory import disguise as dg
    from auditor_testkit.factory import merge as mk
    from tests.lineage_synth import add, base_weights, task_vector

    base = base_weights()
    fts = {f"ft{i}": add(base, task_vector(i)) for i in range(8)}
    models: dict[str, dict[str, torch.Tensor]] = dict(fts)
    truth: dict[str, dict[str, Any]] = {n: _truth({}) for n in fts}

    def put(name: str, r: Any, parents: list[str]) -> None:
        models[name] = r.state_dict
        coefs = list(r.coefficients)
        truth[name] = _truth({"method": r.method, "parents": parents, "coefficients": coefs})

    f = fts
    put("lin", mk.linear_merge([f["ft0"], f["ft1"]], weights=[0.6, 0.4]), ["ft0", "ft1"])
    put(
        "ta",
        mk.task_arithmetic(base, [f["ft2"], f["ft3"], f["ft4"]], lambdas=[0.5, 0.7, 0.3]),
        ["ft2", "ft3", "ft4"],
    )
    put(
        "ties",
        mk.ties_merge(base, [f["ft1"], f["ft5"]], density=0.5, weights=[0.5, 0.5], normalize=False),
        ["ft1", "ft5"],
    )
    put(
        "dare",
        mk.dare_merge(base, [f["ft3"], f["ft6"]], drop=0.5, weights=[0.5, 0.5], seed=3),
        ["ft3", "ft6"],
    )
    put(
        "dareties",
        mk.dare_merge(
            base,
            [f["ft0"], f["ft7"]],
            drop=0.5,
            weights=[0.6, 0.6],
            seed=4,
            ties=True,
            normalize=False,
        ),
        ["ft0", "ft7"],
    )
    put("slerp", mk.slerp_merge(f["ft2"], f["ft6"], t=0.4), ["ft2", "ft6"])
    models["clone"] = {k: v.to(torch.bfloat16).float() for k, v in f["ft4"].items()}
    truth["clone"] = _truth({"clone_of": "ft4"})
    d = dg.permute_mlp(f["ft5"], seed=1).state_dict
    models["stolen"] = dg.rescale_heads(d, num_heads=4, seed=2).state_dict
    truth["stolen"] = _truth({"clone_of": "ft5", "disguise": True})
    return models, truth, base


def run_synthetic(sample_size: int) -> None:
    models, truth, base = synthetic_zoo()
    t0 = time.perf_counter()
    bsrc = DictTensorSource(base)
    prints: dict[str, Fingerprint] = {}
    aligned: dict[str, bool] = {}
    for name, sd in models.items():
        res = align_to_base(DictTensorSource(sd), bsrc, num_heads=4)
        aligned[name] = res.report.applied
        tv = {k: res.source.get(k) - base[k] for k in base}
        prints[name] = compute_fingerprint(DictDeltaSource(tv), sample_size=sample_size)
    bfp = fingerprint_weights(bsrc, sample_size=sample_size)
    names = list(models)
    results = {
        s: analyze_lineage(
            prints[s],
            {c: prints[c] for c in names if c != s},
            base_fingerprint=bfp,
            subject_aligned=aligned[s],
        )
        for s in names
    }
    print_table(score(results, truth, names), time.perf_counter() - t0)


def run_zoo(root: Path, sample_size: int) -> None:
    from auditor_testkit.factory.save import load_state_dict
    from auditor_testkit.factory.zoo import build_zoo

    manifest = build_zoo(root, spec="lineage", progress=print)
    t0 = time.perf_counter()
    base_id = manifest.base.repo_id
    pub = {e.repo_id for e in manifest.published()}
    # adapters are scored elsewhere (their delta comes from B @ A, not a state dict)
    subjects = [e for e in manifest.published() if e.kind not in ("base", "adapter")]
    truth: dict[str, dict[str, Any]] = {}
    for e in subjects:
        parents = {p.repo_id: p.coefficient for p in e.parents if p.repo_id in pub}
        if e.kind in ("clone", "protected"):
            truth[e.repo_id] = _truth(
                {"clone_of": e.parents[0].repo_id, "disguise": e.kind == "protected"}
            )
        elif e.kind in ("merge", "disguised"):
            per_layer = {p.repo_id: p.per_layer for p in e.parents if p.per_layer}
            truth[e.repo_id] = _truth(
                {
                    "method": e.method,
                    "parents": parents,
                    "per_layer": per_layer or None,
                    "disguise": e.kind == "disguised",
                }
            )
        else:
            truth[e.repo_id] = _truth({})
    base_sd = {k: v.float() for k, v in load_state_dict(manifest.path(root, base_id)).items()}
    bsrc = DictTensorSource(base_sd)
    cfg = json.loads((manifest.path(root, base_id) / "config.json").read_text())
    prints: dict[str, Fingerprint] = {}
    aligned: dict[str, bool] = {}
    for e in subjects:
        sd = load_state_dict(manifest.path(root, e.repo_id))
        res = align_to_base(DictTensorSource(sd), bsrc, config=cfg)
        aligned[e.repo_id] = res.report.applied
        keys = [k for k in base_sd if k in sd and tuple(sd[k].shape) == tuple(base_sd[k].shape)]
        tv = {k: res.source.get(k) - base_sd[k] for k in keys}
        prints[e.repo_id] = compute_fingerprint(DictDeltaSource(tv), sample_size=sample_size)
    bfp = fingerprint_weights(bsrc, sample_size=sample_size)
    names = [e.repo_id for e in subjects]
    # creation times are Hub metadata (createdAt), not ground truth: they pick the original
    # among clones, as the orchestrator can
    created = {
        e.repo_id: datetime.fromisoformat(e.created_at.replace("Z", "+00:00")) for e in subjects
    }
    results = {
        s: analyze_lineage(
            prints[s],
            {c: prints[c] for c in names if c != s},
            base_fingerprint=bfp,
            subject_aligned=aligned[s],
            created_at=created,
        )
        for s in names
    }
    for s in names:
        r = results[s]
        par = {e.repo_id: round(e.coefficient or 0, 3) for e in r.entries if e.relation in PARENT}
        cl = r.clones()
        t = truth[s]
        sigs = r.merge.signatures
        print(
            f"{s:<26} truth={t['method'] or ('clone' if t['clone_of'] else '-')!s:<16}"
            f" got={r.merge.method!s:<16} parents={par} clones={cl}"
            f" expl={r.merge.explained_fraction or 0:.3f}"
            f" row_z2={ {k[5:]: round(v, 1) for k, v in sigs.items() if k.startswith('rows:')} }"
        )
    # layer-wise: per-layer coefficient error on the true per-layer values
    for s in names:
        pl = truth[s].get("per_layer")
        if not pl:
            continue
        errs = []
        for parent, vals in pl.items():
            ent = results[s].entry(parent)
            if ent is None or not ent.per_layer_coefficient:
                continue
            for i, v in enumerate(vals):
                got = ent.per_layer_coefficient.get(f"layer.{i}")
                if got is not None:
                    errs.append(abs(got - v))
        if errs:
            print(
                f"layer-wise {s}: per-layer MAE {sum(errs) / len(errs):.3f}, "
                f"flag={results[s].merge.layerwise}"
            )
    print_table(score(results, truth, names), time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=Path("/tmp/lineage-zoo"))
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--sample-size", type=int, default=4096)
    args = ap.parse_args()
    if args.synthetic:
        run_synthetic(args.sample_size)
    else:
        run_zoo(args.root, args.sample_size)


if __name__ == "__main__":
    main()
