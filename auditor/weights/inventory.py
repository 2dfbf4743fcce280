"""Which files of a repo hold weights, and in which format (by name only; nothing is opened)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Formats that are Python pickles (or torch zip archives holding pickles): never loaded,
# only scanned statically by ``auditor.weights.pickles``.
PICKLE_EXTENSIONS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"


@dataclass(frozen=True)
class FileInventory:
    safetensors: tuple[str, ...]  # top-level model weights (not the adapter), sorted
    shard_index: str | None  # top-level *.safetensors.index.json
    adapter_config: str | None
    adapter_weights: str | None  # adapter_model.safetensors next to adapter_config.json
    pickles: tuple[str, ...]  # pickle-format files at any depth (to scan, never to load)
    nested_safetensors: tuple[str, ...]  # safetensors in sub-folders (onnx/, original/...)
    other: tuple[str, ...]
    sizes: Mapping[str, int]

    @property
    def has_adapter(self) -> bool:
        return self.adapter_config is not None and self.adapter_weights is not None

    @property
    def has_weights(self) -> bool:
        """Weights we can analyse: top-level safetensors or a safetensors adapter."""
        return bool(self.safetensors) or self.has_adapter

    @property
    def only_pickles(self) -> bool:
        """Weights exist, but only in pickle formats we refuse to load."""
        return not self.has_weights and bool(self.pickles)

    @property
    def total_weight_bytes(self) -> int:
        return sum(self.sizes.get(f, 0) for f in self.safetensors)


def classify_files(files: Mapping[str, int]) -> FileInventory:
    """Sort repo file names (repo-relative, ``/``-separated) -> size into weight categories."""
    safetensors: list[str] = []
    nested: list[str] = []
    pickles: list[str] = []
    other: list[str] = []
    shard_index: str | None = None
    adapter_config: str | None = None
    adapter_weights: str | None = None
    for name in sorted(files):
        base = name.rsplit("/", 1)[-1]
        top = "/" not in name
        lower = base.lower()
        if top and base == ADAPTER_CONFIG:
            adapter_config = name
        elif top and base == ADAPTER_WEIGHTS:
            adapter_weights = name
        elif lower.endswith(".safetensors"):
            (safetensors if top else nested).append(name)
        elif top and lower.endswith(".safetensors.index.json"):
            # Prefer the transformers name when several indexes exist.
            if shard_index is None or base == "model.safetensors.index.json":
                shard_index = name
            else:
                other.append(name)
        elif lower.endswith(PICKLE_EXTENSIONS):
            pickles.append(name)
        else:
            other.append(name)
    if adapter_weights is not None and adapter_config is None:
        # Adapter weights without their config cannot be reconstructed: treat as a plain file.
        other.append(adapter_weights)
        adapter_weights = None
    return FileInventory(
        safetensors=tuple(safetensors),
        shard_index=shard_index,
        adapter_config=adapter_config,
        adapter_weights=adapter_weights,
        pickles=tuple(pickles),
        nested_safetensors=tuple(nested),
        other=tuple(sorted(other)),
        sizes=dict(files),
    )
