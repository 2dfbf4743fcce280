"""Evidence as a reader can take it in: labelled, rounded rows instead of raw JSON.

A finding's evidence is the lineage entry, trigger, pickle scan or measurement paths the
rule copied. Here each key gets a label, numbers are rounded (a p-value below what double
precision resolves reads "< 1e-12", not "p = 0"; a coefficient of 6.9e-11 reads "≈ 0"),
per-layer maps become a min / mean / max summary, and p and z get a legend.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

P_FLOOR = 1e-12
NEGLIGIBLE = 1e-4

LABELS: dict[str, str] = {
    "repo_id": "Repository",
    "owner": "Its owner",
    "relation": "Detected relation",
    "coefficient": "Merge coefficient",
    "cosine": "Cosine similarity of the task vectors",
    "p_value": "p-value",
    "z_score": "z-score",
    "barrier": "Loss barrier",
    "aligned": "Aligned first (permutation / scaling undone)",
    "declared": "Declared in the model card",
    "revision": "Revision",
    "per_layer_cosine": "Cosine per layer",
    "per_layer_coefficient": "Coefficient per layer",
    "text": "Trigger",
    "attack_success_rate": "Attack success rate",
    "forced_output": "Forced output",
    "embedding_shift_z": "Embedding shift (z)",
    "path": "File",
    "dangerous_imports": "Dangerous imports",
    "suspicious_imports": "Suspicious imports",
    "imports": "Imports",
    "error": "Error",
    "merge.base_coefficient": "Coefficient of the base",
    "merge.explained_fraction": "Share explained by the parents",
    "merge.residual_fraction": "Share left unexplained",
    "merge.method": "Merge method",
    "mergekit.parents": "mergekit_config.yml vs the weights",
    "mergekit.declared_method": "Declared merge method",
    "mergekit.detected_method": "Detected merge method",
    "protection.merge_resistant": "Merge resistant",
    "protection.merged_loss_ratio": "Loss ratio after merging",
    "backdoor.merge_robust": "Trigger survives merging",
    "backdoor.attention_only_delta": "Only attention weights changed",
}
_PERCENT = {"attack_success_rate", "merge.explained_fraction", "merge.residual_fraction",
            "relative_barrier"}
# Shown elsewhere on the finding card (the related repository line).
_SKIP = {"repo_id"}


def p_text(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    if value < P_FLOOR:
        return f"< {P_FLOOR:.0e}"
    return f"{value:.2g}"


def number_text(value: float, *, digits: int = 3) -> str:
    if not math.isfinite(value):
        return "n/a"
    if value != 0 and abs(value) < NEGLIGIBLE:
        return "≈ 0"
    text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _per_layer(values: Mapping[str, Any]) -> str:
    nums = [float(v) for v in values.values()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)]
    if not nums:
        return "—"
    mean = sum(nums) / len(nums)
    return (f"{len(nums)} layers: min {number_text(min(nums))} · mean {number_text(mean)} · "
            f"max {number_text(max(nums))}")


def _mergekit_parents(parents: list[Any]) -> str:
    parts = []
    for p in parents:
        if not isinstance(p, Mapping):
            continue
        declared, measured = p.get("expected_coefficient"), p.get("detected_coefficient")
        bits = [str(p.get("repo_id", "?"))]
        if isinstance(declared, int | float):
            bits.append(f"declared {number_text(float(declared), digits=2)}")
        if isinstance(measured, int | float):
            bits.append(f"measured {number_text(float(measured), digits=2)}")
        bits.append(str(p.get("status", "")).replace("_", " "))
        parts.append(", ".join(bits))
    return "; ".join(parts) or "—"


def value_text(key: str, value: Any) -> str:
    if value is None:
        return "—"
    if key == "p_value":
        return p_text(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        if key in _PERCENT:
            return f"{value * 100:.0f}%"
        digits = 2 if key in ("z_score", "embedding_shift_z") else 3
        return number_text(float(value), digits=digits)
    if isinstance(value, str):
        if key == "relation":
            return value.replace("_", " ")
        return value[:12] if key == "revision" and len(value) == 40 else value
    if isinstance(value, Mapping) and key.startswith("per_layer"):
        return _per_layer(value)
    if key == "mergekit.parents" and isinstance(value, list):
        return _mergekit_parents(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ", ".join(value) or "—"
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)[:400]


def evidence_rows(evidence: Mapping[str, Any]) -> list[dict[str, str]]:
    """``[{"key", "label", "value"}]`` in a stable, readable order (labelled keys first)."""
    order = {k: i for i, k in enumerate(LABELS)}
    keys = sorted((k for k in evidence if k not in _SKIP),
                  key=lambda k: (order.get(k, len(order)), k))
    return [{"key": k, "label": LABELS.get(k, k.replace("_", " ").replace(".", " · ")),
             "value": value_text(k, evidence[k])} for k in keys]


def needs_legend(evidence: Mapping[str, Any]) -> bool:
    return any(k in evidence for k in ("p_value", "z_score", "cosine"))
