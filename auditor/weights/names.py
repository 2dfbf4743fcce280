"""Match tensor names between two checkpoints of the same architecture.

Checkpoints of one model disagree on names for boring reasons: PEFT wraps everything in
``base_model.model.``, some exports drop or change the top-level prefix (``transformer.`` vs
``model.``), and tied embeddings leave ``lm_head.weight`` out of the file. We pick the prefix
mapping that makes the most of the model's names land on the base's names, and say what we did.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from auditor.weights.base import TensorSource

PEFT_PREFIX = "base_model.model."
EMBED_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "embed_in.weight",
    "word_embeddings.weight",
    "tok_embeddings.weight",
)
HEAD_SUFFIXES = ("lm_head.weight", "embed_out.weight", "output.weight")


def strip_peft_prefix(name: str) -> str:
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def _prefixes(names: Iterable[str], depth: int = 2) -> set[str]:
    """Module prefixes (1 or 2 leading components) shared by at least two names.

    A prefix held by a single tensor (``score.``, ``lm_head.``) is not a namespace: rewriting it
    could only fold one head onto another.
    """
    counts: dict[str, int] = {}
    for n in names:
        parts = n.split(".")
        for d in range(1, min(depth, len(parts) - 1) + 1):
            p = ".".join(parts[:d]) + "."
            counts[p] = counts.get(p, 0) + 1
    return {""} | {p for p, c in counts.items() if c >= 2}


@dataclass(frozen=True)
class NameMapping:
    """Rewrite names starting with ``src_prefix`` to start with ``dst_prefix``."""

    src_prefix: str = ""
    dst_prefix: str = ""

    @property
    def identity(self) -> bool:
        return self.src_prefix == self.dst_prefix

    def apply(self, name: str) -> str:
        if self.identity or not name.startswith(self.src_prefix):
            return name
        return self.dst_prefix + name[len(self.src_prefix) :]

    def describe(self) -> str:
        return "identity" if self.identity else f"{self.src_prefix!r} -> {self.dst_prefix!r}"


def _hits(mapping: NameMapping, src: list[str], tgt: set[str]) -> int:
    mapped = [mapping.apply(n) for n in src]
    if len(set(mapped)) != len(mapped):
        return -1  # two names onto one: a coincidence of prefixes, not a rename
    return sum(1 for n in mapped if n in tgt)


def best_prefix_mapping(names: Iterable[str], target: Iterable[str]) -> NameMapping:
    """The prefix rewrite of ``names`` that maximises overlap with ``target`` (identity on ties).

    Only one-to-one rewrites count, so a new head (``score.``) is never folded onto an
    existing one (``lm_head.``).
    """
    src = [strip_peft_prefix(n) for n in names]
    tgt = set(target)
    best = NameMapping()
    best_hits = _hits(best, src, tgt)
    if best_hits == len(src):
        return best
    for sp in sorted(_prefixes(src)):
        for dp in sorted(_prefixes(tgt)):
            if sp == dp:
                continue
            m = NameMapping(sp, dp)
            hits = _hits(m, src, tgt)
            if hits > best_hits:
                best, best_hits = m, hits
    return best


@dataclass(frozen=True)
class NameAlignment:
    """How a model's names map onto its base's names."""

    mapping: NameMapping
    to_model: Mapping[str, str]  # base-namespace name -> the model source's own name
    tied: tuple[str, ...] = ()  # human-readable notes on tied embeddings resolved
    model_aliases: Mapping[str, str] = field(default_factory=dict)  # name -> aliased model name
    base_aliases: Mapping[str, str] = field(default_factory=dict)


def _find(names: Iterable[str], suffixes: tuple[str, ...]) -> str | None:
    for suffix in suffixes:
        for n in sorted(names):
            if n == suffix or n.endswith("." + suffix):
                return n
    return None


def _tied_flag(config: Mapping[str, Any] | None) -> bool | None:
    if config is None:
        return None
    value = config.get("tie_word_embeddings")
    if value is None and isinstance(config.get("text_config"), Mapping):
        value = config["text_config"].get("tie_word_embeddings")
    return None if value is None else bool(value)


def _same_data(source: TensorSource, a: str, b: str) -> bool:
    if source.shape(a) != source.shape(b):
        return False
    return bool(torch.equal(source.get(a), source.get(b)))


def align_names(
    model: TensorSource,
    base: TensorSource,
    *,
    model_config: Mapping[str, Any] | None = None,
    base_config: Mapping[str, Any] | None = None,
) -> NameAlignment:
    """Map the model's names into the base's namespace and resolve tied embeddings.

    A side lacking the output head while holding embeddings is treated as tied when its config
    says ``tie_word_embeddings`` or the other side's head is bit-identical to its embeddings
    (then the head was tied there too, and the missing copy is the embedding).
    """
    model_names = model.keys()
    base_names = base.keys()
    mapping = best_prefix_mapping(model_names, base_names)
    to_model = {mapping.apply(strip_peft_prefix(n)): n for n in model_names}
    base_set = set(base_names)

    tied: list[str] = []
    model_aliases: dict[str, str] = {}
    base_aliases: dict[str, str] = {}
    base_head = _find(base_set, HEAD_SUFFIXES)
    base_embed = _find(base_set, EMBED_SUFFIXES)
    model_head = _find(to_model, HEAD_SUFFIXES)
    model_embed = _find(to_model, EMBED_SUFFIXES)

    if base_head and not model_head and model_embed and base_head not in to_model:
        flag = _tied_flag(model_config)
        if flag or (flag is None and base_embed and _same_data(base, base_head, base_embed)):
            model_aliases[base_head] = to_model[model_embed]
            to_model[base_head] = to_model[model_embed]
            tied.append(f"model: {base_head} tied to {model_embed}")
    elif model_head and not base_head and base_embed and model_head not in base_set:
        flag = _tied_flag(base_config)
        if flag or (
            flag is None
            and model_embed
            and _same_data(model, to_model[model_head], to_model[model_embed])
        ):
            base_aliases[model_head] = base_embed
            tied.append(f"base: {model_head} tied to {base_embed}")
    return NameAlignment(
        mapping=mapping,
        to_model=to_model,
        tied=tuple(tied),
        model_aliases=model_aliases,
        base_aliases=base_aliases,
    )
