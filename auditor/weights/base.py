"""The two protocols every weight consumer codes against.

``TensorSource``: a model's tensors by normalized name, read one at a time in float32.
``DeltaSource``: a task vector (model minus base) by normalized name, one tensor at a time.
A full fine-tune gives a DeltaSource by subtracting its base; a LoRA adapter gives one
directly from B @ A. Analysis never needs a whole model in memory.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TensorSource(Protocol):
    def keys(self) -> list[str]:
        """Normalized tensor names (e.g. ``model.layers.0.mlp.up_proj.weight``), sorted."""
        ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor as float32 (a fresh tensor the caller may modify)."""
        ...

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of dimension 0 as float32."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class DeltaSource(Protocol):
    def keys(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def delta(self, name: str) -> torch.Tensor:
        """Task vector of one tensor (float32, same shape as the base tensor)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class ByteSource(Protocol):
    """Random access to a file's bytes: a local file, or HTTP Range reads on a Hub file."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes from ``offset`` (raises if fewer are available)."""
        ...
