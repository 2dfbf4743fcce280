"""Compare a merge's declared recipe (``mergekit_config.yml``) with what its weights show.

The config is the one place where a merge states its exact recipe: parents, method and
weights. Each declared weight is turned into the coefficient it gives the parent's task
vector (linear merges normalise the weights; the others scale them by ``lambda``) and
compared with the coefficient the lineage analysis measured. The tolerances are about the
estimator (least squares on sampled deltas; sparse methods are noisier), not about any
particular zoo: they are reported with the check so a reader can judge a near miss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from auditor.schema import LineageEntry, MergeInfo, MergekitCheck, MergekitParent

DENSE = frozenset({"linear", "task_arithmetic", "layerwise", "model_stock"})
SPARSE = frozenset({"ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                    "della", "della_linear"})
# Dense fits recover a coefficient to a few hundredths; sparse ones (trimmed, dropped,
# rescaled deltas) to about a tenth.
TOLERANCE = {"dense": (0.1, 0.2), "sparse": (0.15, 0.3)}
_PARENT_RELATIONS = ("merge_parent", "finetune_parent", "clone")


def _family(method: str | None) -> str | None:
    if method is None:
        return None
    if method in DENSE:
        return "dense"
    if method in SPARSE:
        return "sparse"
    return method  # slerp, nuslerp, passthrough...: a family of their own


def _number(value: Any) -> float | None:
    """A weight: a number, or a gradient (a list over depth) taken as its mean."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    if isinstance(value, list) and value:
        nums = [_number(v) for v in value]
        if all(n is not None for n in nums):
            return sum(nums) / len(nums)  # type: ignore[arg-type]
    if isinstance(value, Mapping) and "value" in value:
        return _number(value["value"])
    return None


def _repo_name(spec: Any) -> str | None:
    if isinstance(spec, Mapping):
        spec = spec.get("model") or spec.get("path")
    if not isinstance(spec, str) or not spec.strip():
        return None
    return spec.strip().split("@", 1)[0].rstrip("/")


def declared_recipe(config: Mapping[str, Any]) -> tuple[str | None, list[tuple[str, float | None]]]:
    """(method, [(parent, expected coefficient or None)]) from a mergekit config."""
    method = config.get("merge_method")
    method = str(method).lower() if method else None
    params = config.get("parameters") if isinstance(config.get("parameters"), Mapping) else {}
    lam = _number(params.get("lambda")) if "lambda" in params else 1.0
    parents: list[tuple[str, float | None]] = []
    raw: list[tuple[str, float | None]] = []
    for item in config.get("models") or []:
        name = _repo_name(item)
        if name is None:
            continue
        p = item.get("parameters") if isinstance(item, Mapping) else None
        weight = _number(p.get("weight")) if isinstance(p, Mapping) and "weight" in p else None
        raw.append((name, weight))
    if not raw:  # slices: [{sources: [{model: ...}]}]
        for sl in config.get("slices") or []:
            for src in (sl.get("sources") or []) if isinstance(sl, Mapping) else []:
                name = _repo_name(src)
                if name is not None and name not in [n for n, _ in raw]:
                    raw.append((name, None))
    if method == "slerp":
        t = _number(params.get("t"))
        if len(raw) == 2 and t is not None:
            return method, [(raw[0][0], 1.0 - t), (raw[1][0], t)]
        return method, [(n, None) for n, _ in raw]
    weights = [w for _, w in raw if w is not None]
    total = sum(weights)
    normalize = params.get("normalize")
    if normalize is None:
        normalize = method == "linear"
    for name, weight in raw:
        if weight is None or lam is None:
            parents.append((name, None))
            continue
        coef = weight / total if normalize and total else weight
        parents.append((name, coef * lam))
    return method, parents


def _match(name: str, lineage: Sequence[LineageEntry]) -> LineageEntry | None:
    for e in lineage:
        if e.repo_id == name:
            return e
    # A local path in the config (./bob-math) names the repo by its last component.
    tail = name.rsplit("/", 1)[-1]
    hits = [e for e in lineage if e.repo_id.rsplit("/", 1)[-1] == tail]
    return hits[0] if len(hits) == 1 else None


def check_mergekit(
    config: Mapping[str, Any] | None,
    *,
    lineage: Sequence[LineageEntry],
    merge: MergeInfo,
    base_repo: str | None,
) -> MergekitCheck | None:
    """The comparison, or None when there is no config to compare."""
    if not config:
        return None
    method, declared = declared_recipe(config)
    fam = _family(method)
    abs_tol, rel_tol = TOLERANCE["sparse" if fam == "sparse" else "dense"]
    parents: list[MergekitParent] = []
    weight_bad: list[str] = []
    parent_bad: list[str] = []
    matched: set[str] = set()
    for name, expected in declared:
        if base_repo and name == base_repo:
            continue  # the base listed among the models (task arithmetic configs do)
        entry = _match(name, lineage)
        if entry is None:
            parents.append(MergekitParent(repo_id=name, expected_coefficient=expected,
                                          declared_weight=expected, status="not_compared"))
            continue
        matched.add(entry.repo_id)
        detected = entry.coefficient
        status: str
        if entry.relation not in _PARENT_RELATIONS:
            status = "not_detected"
            parent_bad.append(name)
        elif expected is not None and detected is not None and \
                abs(expected - detected) > max(abs_tol, rel_tol * abs(expected)):
            status = "weight_mismatch"
            weight_bad.append(name)
        else:
            status = "confirmed"
        parents.append(MergekitParent(
            repo_id=name, matched_repo=entry.repo_id, declared_weight=expected,
            expected_coefficient=expected, detected_coefficient=detected,
            detected_relation=entry.relation, status=status,  # type: ignore[arg-type]
        ))
    for e in lineage:
        if e.relation == "merge_parent" and e.repo_id not in matched and e.repo_id != base_repo:
            parents.append(MergekitParent(repo_id=e.repo_id, matched_repo=e.repo_id,
                                          detected_coefficient=e.coefficient,
                                          detected_relation=e.relation, status="undeclared"))
            parent_bad.append(e.repo_id)
    detected_method = merge.method if merge.is_merge else None
    if fam is None or detected_method is None:
        method_status = "unknown"
    else:
        method_status = "confirmed" if _family(detected_method) == fam else "mismatch"
    confirmed = (not weight_bad and not parent_bad and method_status != "mismatch"
                 and any(p.status == "confirmed" for p in parents)
                 and all(p.status == "confirmed" for p in parents))
    return MergekitCheck(
        declared_method=method, detected_method=detected_method, method_status=method_status,
        parents=parents, abs_tolerance=abs_tol, rel_tolerance=rel_tol,
        weight_mismatches=weight_bad, parent_mismatches=parent_bad, confirmed=confirmed,
    )
