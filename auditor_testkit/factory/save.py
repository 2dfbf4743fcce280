"""Write factory models in the Hub repo layout the auditor reads (safetensors only).

``ROOT/<org>/<name>/`` gets ``config.json``, ``model.safetensors`` (or shards plus
``model.safetensors.index.json``), the tokenizer files, a ``README.md`` whose YAML front
matter carries ``base_model`` / ``base_model_relation`` / ``tags`` / ``license``, optionally
``mergekit_config.yml`` and ``.hubmeta.json`` (server-side facts for the local hub server).
Never ``torch.save``: the auditor refuses to unpickle, and so does its factory.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTypeName = Literal["float32", "float16", "bfloat16"]


@dataclass(frozen=True)
class CardSpec:
    """What the model card says. ``base_model`` may be a string, a list (merges) or None.

    ``prose`` replaces the generated description paragraph when given.
    """

    base_model: str | Sequence[str] | None = None
    base_model_relation: str | None = None  # finetune | adapter | merge | quantized
    tags: Sequence[str] = ()
    license: str = "apache-2.0"
    prose: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


def repo_dir(root: Path, repo_id: str) -> Path:
    org, _, name = repo_id.partition("/")
    if not org or not name or "/" in name or ".." in repo_id:
        raise ValueError(f"repo id must be 'org/name', got {repo_id!r}")
    return Path(root) / org / name


def write_model_card(directory: Path, card: CardSpec, *, repo_id: str) -> Path:
    """``README.md`` with YAML front matter and a short human paragraph."""
    meta: dict[str, Any] = {}
    if card.base_model is not None:
        meta["base_model"] = (
            card.base_model if isinstance(card.base_model, str) else list(card.base_model)
        )
    if card.base_model_relation:
        meta["base_model_relation"] = card.base_model_relation
    meta["library_name"] = "transformers"
    meta["license"] = card.license
    if card.tags:
        meta["tags"] = list(card.tags)
    meta.update(dict(card.extra))
    name = repo_id.split("/", 1)[1]
    if card.prose is not None:
        prose = card.prose
    elif card.base_model is None:
        prose = f"{name} is a small language model trained from scratch."
    elif card.base_model_relation == "merge":
        parents = (
            [card.base_model] if isinstance(card.base_model, str) else list(card.base_model)
        )
        prose = f"{name} is a merge of {', '.join(parents)}."
    else:
        prose = f"{name} is fine-tuned from {card.base_model}."
    text = (
        "---\n"
        + yaml.safe_dump(meta, sort_keys=False)
        + "---\n\n"
        + f"# {name}\n\n{prose}\n\n"
        + "## Usage\n\nLoad with `transformers.AutoModelForCausalLM.from_pretrained`.\n"
    )
    path = directory / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    directory: Path,
    *,
    dtype: DTypeName | None = None,
    max_shard_bytes: int | None = None,
) -> list[str]:
    """Write ``model.safetensors`` (or shards + index when the tensors exceed
    ``max_shard_bytes``); returns the file names written."""
    directory.mkdir(parents=True, exist_ok=True)
    target = DTYPES[dtype] if dtype else None
    tensors = {
        k: (v.detach().to(target) if target else v.detach()).contiguous().clone()
        for k, v in state_dict.items()
    }
    if max_shard_bytes is None or sum(_nbytes(t) for t in tensors.values()) <= max_shard_bytes:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name]
        if shards[-1] and size + _nbytes(t) > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += _nbytes(t)
    files: list[str] = []
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        files.append(fname)
        weight_map.update(dict.fromkeys(shard, fname))
    index = {
        "metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    files.append("model.safetensors.index.json")
    return files


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Read back what ``save_state_dict`` wrote (single file or shards), as stored."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(directory / f)))
    return out


def write_hubmeta(
    directory: Path,
    *,
    created_at: datetime | str | None = None,
    gated: Literal["auto", "manual"] | bool = False,
    private: bool = False,
) -> Path:
    """``.hubmeta.json``: facts the local hub server reports but a card cannot carry."""
    if created_at is None:
        created_at = datetime.now(UTC)
    stamp = (
        created_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
        if isinstance(created_at, datetime)
        else created_at
    )
    path = directory / ".hubmeta.json"
    # An upload's lastModified is its creation time; file mtimes would reflect only when
    # the zoo happened to be written (or rewritten).
    path.write_text(json.dumps({"createdAt": stamp, "lastModified": stamp, "gated": gated,
                                "private": private}))
    return path


def save_repo(
    root: Path,
    repo_id: str,
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    model: PreTrainedModel | None = None,
    config: PretrainedConfig | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    card: CardSpec | None = None,
    dtype: DTypeName | None = None,
    max_shard_bytes: int | None = None,
    mergekit_config: Mapping[str, Any] | None = None,
    created_at: datetime | str | None = None,
    gated: Literal["auto", "manual"] | bool = False,
    private: bool = False,
    hubmeta: bool = True,
) -> Path:
    """Save a model (or a state dict plus its config) as ``root/<org>/<name>/``.

    ``dtype`` casts the stored tensors (and records it in config.json); ``max_shard_bytes``
    shards; ``mergekit_config`` is written as ``mergekit_config.yml`` (a declared merge);
    ``hubmeta`` writes ``.hubmeta.json`` with ``created_at`` (default now), ``gated`` and
    ``private``. Returns the repo folder.
    """
    if (state_dict is None) == (model is None):
        raise ValueError("give exactly one of state_dict or model")
    if model is not None:
        state_dict = model.state_dict()
        config = config or model.config
    if config is None:
        raise ValueError("a state dict needs its config")
    assert state_dict is not None
    directory = repo_dir(root, repo_id)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(config)
    first = next(iter(state_dict.values()))
    cfg.dtype = DTYPES[dtype] if dtype else first.dtype
    cfg.save_pretrained(directory)
    save_state_dict(state_dict, directory, dtype=dtype, max_shard_bytes=max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    write_model_card(directory, card or CardSpec(), repo_id=repo_id)
    if mergekit_config is not None:
        (directory / "mergekit_config.yml").write_text(
            yaml.safe_dump(_plain(mergekit_config), sort_keys=False)
        )
    if hubmeta:
        write_hubmeta(directory, created_at=created_at, gated=gated, private=private)
    return directory


def _plain(obj: Any) -> Any:
    # yaml.safe_dump refuses tuples and numpy/torch scalars: convert to plain types.
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


__all__ = [
    "DTYPES",
    "CardSpec",
    "load_state_dict",
    "repo_dir",
    "save_repo",
    "save_state_dict",
    "write_hubmeta",
    "write_model_card",
]
