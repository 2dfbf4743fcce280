"""Import the heavy modules once, under a lock, before any audit thread needs them.

``transformers`` resolves its public names lazily (a module-level ``__getattr__`` importing
submodules on first use). Several threads making that first access at the same moment see
half-initialised modules: 3 of 4 threads failed with ``ImportError: cannot import name
'PreTrainedTokenizerFast'``, and the detector that needed it crashed. The worker pool calls
``preload`` before starting its threads, and ``audit_revision`` calls it too (first call of
a process, e.g. 4 threads of a library user), so every lazy name is bound before use.
"""

from __future__ import annotations

import threading

_LOCK = threading.Lock()
# Held around every lazy transformers lookup (model classes, config classes): the first
# access imports a submodule, and two threads doing it at once is what broke.
TRANSFORMERS_LOCK = threading.RLock()
_done = False


def preload() -> None:
    """Import torch, scipy, safetensors, transformers' tokenizer and config registry (model
    classes are bound later, under ``TRANSFORMERS_LOCK``). The detector modules are the
    caller's to import (the orchestrator does at import): the analysis imports this module
    for the lock, and must not depend on the detectors above it."""
    global _done
    if _done:
        return
    with _LOCK, TRANSFORMERS_LOCK:
        if _done:
            return
        import safetensors  # noqa: F401
        import scipy.optimize
        import scipy.stats  # noqa: F401
        import torch  # noqa: F401
        from transformers import CONFIG_MAPPING, PreTrainedTokenizerFast  # noqa: F401
        _done = True
