"""Reference models of the backdoor search (the base, the homologues) within a memory budget.

The search compares the subject with its references on the same inputs, many times. A
small model gets one copy of its module per reference. A large one cannot: at 1B in bf16
four references are four more 2.5 GB copies beside the working model and the subject's
resident weights (a 1B audit reached 15 GB). There, every reference is a *view* of the
subject's own module: its weights are loaded into the module when it runs, and the
subject's own weights are loaded back before the subject runs again (a forward pre-hook),
or before anything reads or rewrites the module's weights (``own_weights``). Views are used
in phases (the subject over the whole vocabulary, then each reference), so the loads stay
few next to the forward passes. Copies are kept for models whose copies together stay
small (``BackdoorConfig.reference_memory_bytes``): an audit's peak stays at two copies of
any model worth counting.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence
from typing import Any

import torch

# Modules shared by views, by id (a module cannot hold a back-reference in a plain
# attribute without registering it as a submodule).
_SHARED: weakref.WeakValueDictionary[int, SharedWeights] = weakref.WeakValueDictionary()


class SharedWeights:
    """One module, the subject's weights and several reference weight sets."""

    def __init__(self, module: torch.nn.Module, own: Any) -> None:
        self.module = module
        self.own = own
        self.loaded: int | None = None  # index of the reference loaded; None: own weights
        self.want: int | None = None
        self.refs: list[Any] = []
        self.loads = 0
        self._hook = module.register_forward_pre_hook(self._before_forward)
        _SHARED[id(module)] = self

    def view(self, weights: Any) -> SwappedModel:
        self.refs.append(weights)
        return SwappedModel(self, len(self.refs) - 1)

    def _before_forward(self, _module: torch.nn.Module, _args: Any) -> None:
        if self.loaded != self.want:
            self._load(self.want)

    def _load(self, key: int | None) -> None:
        from auditor.analysis.modeling import combine_into

        combine_into(self.module, [(1.0, self.own if key is None else self.refs[key])])
        self.loaded = key
        self.loads += 1

    def restore(self) -> None:
        """The subject's own weights back in the module."""
        if self.loaded is not None:
            self._load(None)

    def close(self) -> None:
        self.restore()
        self._hook.remove()
        _SHARED.pop(id(self.module), None)


class SwappedModel:
    """Called like the module; runs it with one reference's weights."""

    def __init__(self, shared: SharedWeights, key: int) -> None:
        self._shared = shared
        self._key = key

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._shared.want = self._key
        try:
            return self._shared.module(*args, **kwargs)
        finally:
            self._shared.want = None

    def eval(self) -> SwappedModel:
        return self

    @property
    def wrapped_module(self) -> torch.nn.Module:
        """The module it runs (whose forward takes its arguments)."""
        return self._shared.module

    def __getattr__(self, name: str) -> Any:
        # config, get_input_embeddings().weight.shape ...: the module's (same architecture)
        return getattr(self._shared.module, name)


def own_weights(module: Any) -> None:
    """Before reading or rewriting ``module``'s weights directly: its own weights loaded."""
    shared = _SHARED.get(id(module))
    if shared is not None:
        shared.restore()


def module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def reference_models(
    subject: torch.nn.Module, own: Any, references: Sequence[Any], *,
    memory_bytes: int | None,
) -> tuple[list[Any], SharedWeights | None]:
    """A model per reference weight set: copies of the subject's module while all the
    copies together fit ``memory_bytes`` (None: always copies), else views of the subject's
    own module. Returns the models and the sharing (to ``close``)."""
    from auditor.analysis.modeling import combine_into

    size = module_bytes(subject)
    if memory_bytes is None or size * len(references) <= memory_bytes:
        out: list[Any] = []
        for weights in references:
            work = copy.deepcopy(subject)
            combine_into(work, [(1.0, weights)])
            out.append(work.eval())
        return out, None
    shared = SharedWeights(subject, own)
    return [shared.view(w) for w in references], shared


__all__ = ["SharedWeights", "SwappedModel", "module_bytes", "own_weights", "reference_models"]
