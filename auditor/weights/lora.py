"""Task vectors of a PEFT LoRA adapter, reconstructed from the adapter file (no peft import).

delta = (B @ A) * scaling per module, exactly as peft's ``merge_and_unload`` adds it, with
scaling = alpha / r (or alpha / sqrt(r) with rsLoRA) and per-module r / alpha from
``rank_pattern`` / ``alpha_pattern``. ``modules_to_save`` and trained biases are whole
replacements (delta = saved - base). DoRA rescales the merged weight by a learned magnitude,
so B @ A alone is not the delta: those modules are flagged (``AdapterReport.exact = False``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from auditor.errors import MalformedSafetensors, NoWeights, UnsupportedAdapter
from auditor.weights.base import TensorSource
from auditor.weights.inventory import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from auditor.weights.names import (
    EMBED_SUFFIXES,
    HEAD_SUFFIXES,
    NameMapping,
    best_prefix_mapping,
    strip_peft_prefix,
)
from auditor.weights.reader import SafetensorsModel

MAX_CONFIG_BYTES = 5_000_000

_LORA_KEY = re.compile(
    r"^(?P<mod>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|"
    r"lora_magnitude_vector|base_layer)(?:\.(?P<param>weight|bias))?$"
)
# Some writers keep the adapter name (``lora_A.default.weight``); peft's own save drops it.
_ADAPTER_NAME = re.compile(
    r"\.(lora_A|lora_B|lora_magnitude_vector)\.(?!weight$|bias$)[^.]+(?=\.|$)"
)
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.[^.]+\.")

Kind = Literal["lora", "embedding", "lora_bias", "whole"]


@dataclass(frozen=True)
class _Entry:
    kind: Kind
    module: str  # adapter module name (peft's key for patterns)
    base_name: str  # the base tensor this delta applies to
    a: str | None = None  # adapter tensor names
    b: str | None = None
    saved: str | None = None  # whole replacement / saved base_layer
    magnitude: str | None = None  # DoRA magnitude vector, applied when reconstructing exactly
    scaling: float = 1.0
    fan_in_fan_out: bool = False


@dataclass(frozen=True)
class AdapterReport:
    peft_type: str
    exact: bool  # False when some delta is an approximation (DoRA) or was skipped
    reason: str | None
    modules: tuple[str, ...]  # base tensor names that receive a delta
    scaling: Mapping[str, float]  # base tensor name -> scaling used
    ranks: Mapping[str, int]
    whole: tuple[str, ...]  # modules_to_save / trained biases, taken whole
    dora: tuple[str, ...]  # modules with a DoRA magnitude (approximated or skipped)
    unmatched: tuple[str, ...]  # adapter modules with no tensor in the base
    skipped: Mapping[str, str] = field(default_factory=dict)
    use_rslora: bool = False
    name_mapping: str = "identity"
    tied: tuple[str, ...] = ()


def _read_config(path: Path) -> dict[str, Any]:
    from auditor.bounded import json_limits, load_json_file
    from auditor.errors import AuditorError

    try:
        obj = load_json_file(path, name=path.name,
                             limits=json_limits(max_bytes=MAX_CONFIG_BYTES))
    except AuditorError as exc:
        raise UnsupportedAdapter(f"unreadable adapter config: {exc}") from None
    if not isinstance(obj, dict):
        raise UnsupportedAdapter(f"{path.name}: adapter config is not a JSON object")
    return obj


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """peft's ``get_pattern_key``: the first pattern matching ``(.*\\.)?(key)$``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def module_scaling(config: Mapping[str, Any], module: str) -> tuple[int, float, float]:
    """(r, alpha, scaling) peft would use for ``module``."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r_key = pattern_key(rank_pattern, module)
    a_key = pattern_key(alpha_pattern, module)
    r = int(rank_pattern[r_key]) if r_key is not None else int(config.get("r", 8))
    alpha = float(alpha_pattern[a_key]) if a_key is not None else float(config.get("lora_alpha", 8))
    if r <= 0:
        raise UnsupportedAdapter(f"module {module}: rank {r} is not positive")
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return r, alpha, scaling


def _adapter_files(adapter: Path | Mapping[str, Path]) -> tuple[Path, Path]:
    if isinstance(adapter, Mapping):
        cfg = adapter.get(ADAPTER_CONFIG)
        weights = adapter.get(ADAPTER_WEIGHTS)
    else:
        cfg, weights = Path(adapter) / ADAPTER_CONFIG, Path(adapter) / ADAPTER_WEIGHTS
    if cfg is None or not Path(cfg).is_file():
        raise NoWeights(f"no {ADAPTER_CONFIG} in the adapter")
    if weights is None or not Path(weights).is_file():
        raise NoWeights(f"no {ADAPTER_WEIGHTS} in the adapter (pickled adapters are never loaded)")
    return Path(cfg), Path(weights)


def _normalize_key(key: str) -> str:
    key = strip_peft_prefix(key)
    key = _MODULES_TO_SAVE.sub(".", key)
    return _ADAPTER_NAME.sub(lambda m: "." + m.group(1), key)


class AdapterDeltaSource:
    """``DeltaSource`` of a LoRA adapter in the base's namespace, one module at a time."""

    def __init__(
        self, adapter: SafetensorsModel, base: TensorSource, entries: Mapping[str, _Entry]
    ):
        self._adapter = adapter
        self._base = base
        self._entries = dict(entries)

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._base.shape(self._entries[name].base_name)

    def delta(self, name: str) -> torch.Tensor:
        e = self._entries[name]
        if e.kind == "whole":
            assert e.saved is not None
            out = self._adapter.get(e.saved)
            out.sub_(self._base.get(e.base_name))
            return out
        assert e.b is not None
        b = self._adapter.get(e.b)
        if e.kind == "lora_bias":
            return b.mul_(e.scaling)
        assert e.a is not None
        prod = b @ self._adapter.get(e.a)
        if e.magnitude is not None:
            return self._dora_delta(e, prod.mul_(e.scaling))
        if e.kind == "embedding" or e.fan_in_fan_out:
            # Embedding LoRA stores (r, vocab) and (dim, r); peft transposes B @ A.
            prod = prod.T.contiguous()
        prod.mul_(e.scaling)
        if e.saved is not None:
            # peft saved its own copy of the base layer (resized embeddings): it replaces ours.
            prod.add_(self._adapter.get(e.saved)).sub_(self._base.get(e.base_name))
        return prod

    def _dora_delta(self, e: _Entry, lora: torch.Tensor) -> torch.Tensor:
        # peft's DoRA merge: W' = (m / ||W + s B A||_row) * (W + s B A), rows = output features,
        # computed in the (out, in) layout and transposed back for fan_in_fan_out layers.
        assert e.magnitude is not None
        weight = self._base.get(e.base_name)
        if e.fan_in_fan_out:
            weight = weight.T
        merged = weight + lora
        factor = self._adapter.get(e.magnitude) / torch.linalg.vector_norm(merged, dim=1)
        out = merged.mul_(factor.view(-1, 1)).sub_(weight)
        return out.T.contiguous() if e.fan_in_fan_out else out

    def close(self) -> None:
        # We opened the adapter file; the base belongs to the caller.
        self._adapter.close()


def lora_deltas(
    adapter: Path | Mapping[str, Path],
    base: TensorSource,
    *,
    dora: Literal["exact", "approximate", "skip"] = "exact",
) -> tuple[AdapterDeltaSource, AdapterReport]:
    """Reconstruct a LoRA adapter's task vector against ``base``.

    ``adapter`` is the adapter folder or a mapping of its file names to local paths.
    DoRA modules: ``exact`` applies peft's magnitude rescaling with the base weight (linear
    layers; DoRA embeddings fall back to B @ A, flagged), ``approximate`` gives B @ A only and
    ``skip`` leaves them out; the last two set ``AdapterReport.exact = False``.
    Raises ``UnsupportedAdapter`` for non-LoRA PEFT types or an adapter matching nothing.
    """
    cfg_path, weights_path = _adapter_files(adapter)
    config = _read_config(cfg_path)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapter(f"PEFT type {peft_type} is not supported (only LORA)")
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    model = SafetensorsModel({ADAPTER_WEIGHTS: weights_path})
    try:
        return _build(model, base, config, peft_type, fan_in_fan_out, dora)
    except Exception:
        model.close()
        raise


def _build(
    model: SafetensorsModel,
    base: TensorSource,
    config: Mapping[str, Any],
    peft_type: str,
    fan_in_fan_out: bool,
    dora: str,
) -> tuple[AdapterDeltaSource, AdapterReport]:
    parts: dict[str, dict[str, str]] = {}
    whole: dict[str, str] = {}  # normalized name -> adapter key
    for key in model.keys():
        norm = _normalize_key(key)
        m = _LORA_KEY.match(norm)
        if m is None:
            whole[norm] = key
            continue
        slot = m.group("part") + ("." + m.group("param") if m.group("param") else "")
        parts.setdefault(m.group("mod"), {})[slot] = key
    for mod in [m for m, slots in parts.items() if set(slots) == {"base_layer.weight"}]:
        # A saved embedding layer without LoRA factors is a whole replacement.
        whole[f"{mod}.weight"] = parts.pop(mod)["base_layer.weight"]

    base_keys = base.keys()
    candidates = [f"{mod}.weight" for mod in parts] + list(whole)
    mapping: NameMapping = best_prefix_mapping(candidates, base_keys)
    base_set = set(base_keys)
    tied: list[str] = []

    def to_base(name: str) -> str | None:
        mapped = mapping.apply(name)
        if mapped in base_set:
            return mapped
        # A head saved whole against a base with tied embeddings: the base head is the embedding.
        if any(mapped == s or mapped.endswith("." + s) for s in HEAD_SUFFIXES):
            for n in base_keys:
                if any(n.endswith(s) for s in EMBED_SUFFIXES):
                    tied.append(f"base: {mapped} tied to {n}")
                    return n
        return None

    entries: dict[str, _Entry] = {}
    scalings: dict[str, float] = {}
    ranks: dict[str, int] = {}
    unmatched: list[str] = []
    skipped: dict[str, str] = {}
    dora_mods: list[str] = []
    approx_dora: list[str] = []
    whole_names: list[str] = []
    reasons: list[str] = []
    for mod, slots in sorted(parts.items()):
        target = to_base(f"{mod}.weight")
        if target is None:
            unmatched.append(mod)
            continue
        r, _alpha, scaling = module_scaling(config, mod)
        embedding = "lora_embedding_A" in slots
        a = slots.get("lora_embedding_A" if embedding else "lora_A.weight")
        b = slots.get("lora_embedding_B" if embedding else "lora_B.weight")
        if a is None or b is None:
            skipped[target] = "lora_A or lora_B missing"
            continue
        a_shape, b_shape = model.shape(a), model.shape(b)
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise MalformedSafetensors(
                f"adapter module {mod}: A {a_shape} and B {b_shape} mismatch"
            )
        if a_shape[0] != r:
            reasons.append(f"{mod}: stored rank {a_shape[0]} differs from configured {r}")
        out_shape = (
            (a_shape[1], b_shape[0]) if embedding or fan_in_fan_out else (b_shape[0], a_shape[1])
        )
        if out_shape != base.shape(target):
            skipped[target] = f"delta shape {out_shape} vs base {base.shape(target)}"
            continue
        mag = slots.get("lora_magnitude_vector") or slots.get("lora_magnitude_vector.weight")
        exact_dora = mag is not None and dora == "exact" and not embedding
        if mag is not None:
            dora_mods.append(target)
            if dora == "skip":
                skipped[target] = "DoRA module skipped (magnitude rescaling)"
                continue
            if not exact_dora:
                approx_dora.append(target)
        entries[target] = _Entry(
            kind="embedding" if embedding else "lora",
            module=mod,
            base_name=target,
            a=a,
            b=b,
            saved=slots.get("base_layer.weight"),
            scaling=scaling,
            fan_in_fan_out=fan_in_fan_out and not embedding,
            magnitude=mag if exact_dora else None,
        )
        scalings[target] = scaling
        ranks[target] = a_shape[0]
        bias_key = slots.get("lora_B.bias")
        if bias_key is not None:
            bias_target = to_base(f"{mod}.bias")
            if bias_target is None:
                unmatched.append(f"{mod}.bias")
            else:
                entries[bias_target] = _Entry(
                    kind="lora_bias", module=mod, base_name=bias_target, b=bias_key, scaling=scaling
                )
    for name, key in sorted(whole.items()):
        target = to_base(name)
        if target is None:
            unmatched.append(name)
        elif model.shape(key) != base.shape(target):
            skipped[target] = f"saved shape {model.shape(key)} vs base {base.shape(target)}"
        elif target not in entries:
            entries[target] = _Entry(kind="whole", module=name, base_name=target, saved=key)
            whole_names.append(target)

    if not entries and dora_mods and dora == "skip":
        raise UnsupportedAdapter(
            f"every matched module ({len(dora_mods)}) uses DoRA and DoRA modules were skipped"
        )
    if not entries:
        raise UnsupportedAdapter(
            f"the adapter matches no tensor of the base ({len(unmatched)} unmatched module(s), "
            f"{len(skipped)} skipped): wrong base model?"
        )
    if approx_dora:
        reasons.insert(
            0, f"{len(approx_dora)} DoRA module(s) approximated by B @ A: magnitude not applied"
        )
    if skipped:
        reasons.append(f"{len(skipped)} module(s) skipped")
    report = AdapterReport(
        peft_type=peft_type,
        exact=not approx_dora and not skipped,
        reason="; ".join(reasons) or None,
        modules=tuple(sorted(entries)),
        scaling=scalings,
        ranks=ranks,
        whole=tuple(whole_names),
        dora=tuple(dora_mods),
        unmatched=tuple(unmatched),
        skipped=skipped,
        use_rslora=bool(config.get("use_rslora", False)),
        name_mapping=mapping.describe(),
        tied=tuple(dict.fromkeys(tied)),
    )
    return AdapterDeltaSource(model, base, entries), report
