"""Behavioural results cached by content, next to the fingerprints.

The behavioural checks (barrier curves, function equivalence, protection, backdoor) are
a deterministic function of the subject's, the base's and the compared models' weights
and of the settings that size them. Keyed by those contents, an audit repeated over the
same models (a re-run of ``auditor audit``, a re-queued daemon audit) neither builds a
model nor reads a weight for them again: it reuses the measurements, and the report
says so (``coverage.behaviour_cached``). A changed candidate set, model or setting makes
a new key. Results of a run with an error in these stages are never stored.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from auditor.detectors import PIPELINE
from auditor.detectors.context import AuditContext

BEHAVIOUR_STAGES = ("behaviour", "barrier", "equivalence", "protection", "backdoor")
_SETTINGS = ("barrier_points", "behaviour_top_k", "cpu_probe_flops", "gpu_probe_flops",
             "host_memory_bytes", "device", "probe_file")
_PREFIX = "behaviour:"


def behaviour_key(ctx: AuditContext) -> str | None:
    """The cache key of this audit's behavioural results; None when a compared model is
    not pinned to its content (a stored homologue without a revision)."""
    if ctx.base is None:
        return None
    homologues = []
    for repo_id, ref in ctx.homologues.items():
        if not ref.revision:
            return None
        homologues.append(f"{repo_id}@{ref.revision}")
    settings: dict[str, str] = {k: str(getattr(ctx.settings, k, None)) for k in _SETTINGS}
    probe_file = getattr(ctx.settings, "probe_file", None)
    if probe_file:
        try:
            settings["probe_file_sha"] = hashlib.sha256(Path(probe_file).read_bytes()).hexdigest()
        except OSError:
            return None
    parts = {
        "subject": ctx.subject.resolved.revision, "base": ctx.base.resolved.revision,
        "candidates": sorted(f"{r}@{c.resolved.revision}" for r, c in ctx.candidates.items()),
        "homologues": sorted(homologues), "settings": settings,
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return _PREFIX + digest[:48]


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def behaviour_measurements(ctx: AuditContext) -> dict[str, Any] | None:
    """The behavioural stages' measurements, JSON-ready; None when one of them failed or
    did not run (nothing worth reusing)."""
    if any(e.detector in BEHAVIOUR_STAGES for e in ctx.errors):
        return None
    out: dict[str, Any] = {}
    barriers: dict[str, float] = {}
    for det in PIPELINE:
        if det.name not in BEHAVIOUR_STAGES:
            continue
        for kind in det.provides:
            result = ctx.find(kind)
            if result is None:
                return None
            for name, value in result.measurements().items():
                if name == "lineage":  # only the barriers it adds to the entries
                    barriers |= {e.repo_id: e.barrier for e in value if e.barrier is not None}
                else:
                    out[name] = _jsonable(value)
    return {"measurements": out, "lineage_barriers": barriers}


def apply_cached(measured: dict[str, Any], cached: dict[str, Any]) -> dict[str, Any]:
    """``measured`` with the cached behavioural results (barriers on the lineage entries)."""
    out = dict(measured)
    out.update(cached.get("measurements") or {})
    barriers = cached.get("lineage_barriers") or {}
    if "lineage" in out and barriers:
        out["lineage"] = [e.model_copy(update={"barrier": barriers[e.repo_id]})
                          if e.repo_id in barriers else e for e in out["lineage"]]
    return out


def lookup(ctx: AuditContext, key: str | None) -> dict[str, Any] | None:
    cache = ctx.fp_cache
    if key is None or cache is None:
        return None
    hit = cache.get(ctx.subject.resolved.revision, key)
    return None if hit is None else dict(hit.meta)


def store(ctx: AuditContext, key: str | None) -> None:
    cache = ctx.fp_cache
    if key is None or cache is None or ctx.base is None:
        return
    found = behaviour_measurements(ctx)
    if found is None:
        return
    from auditor.analysis.fingerprint import Fingerprint

    cache.put(content_key=ctx.subject.resolved.revision, base_key=key,
              repo_id=ctx.subject.resolved.repo_id, base_repo_id=ctx.base.resolved.repo_id,
              fingerprint=Fingerprint(tensors={}), meta=found)
