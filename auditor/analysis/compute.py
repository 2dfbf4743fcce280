"""The compute backend of the behavioural detectors: device, dtype, budget, generation.

* ``resolve_device``: ``AUDITOR_DEVICE`` = auto (CUDA when present, else the CPU), cpu,
  cuda or cuda:N.
* ``compute_dtype``: the weights' own dtype (bf16/fp16) on a GPU, where it is safe and
  fast; float32 on the CPU unless a float32 working model next to the subject's resident
  copy would not fit the host budget (a 1B model and up, at the default 8 GiB).
* ``attach_device_io``: hooks that move a model's inputs to its device and hand logits back
  on the CPU in float32, so every caller keeps its CPU tensors.
* ``decode``: greedy or sampled continuation with a KV cache (one token per step after the
  prompt), instead of re-running the whole sequence per new token.
* ``probe_budget``: tokens the probe set may hold per evaluation, from the per-audit
  compute budget in settings and the number of evaluations the detectors plan.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from auditor.errors import AnalysisError


def resolve_device(spec: str | None = None) -> torch.device:
    """The device for behavioural checks from a setting (default ``Settings.device``)."""
    if spec is None:
        from auditor.settings import get_settings

        spec = get_settings().device
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise AnalysisError(f"AUDITOR_DEVICE={spec} but no CUDA device is available")
    try:
        return torch.device(spec)
    except RuntimeError as exc:
        raise AnalysisError(f"unknown AUDITOR_DEVICE {spec!r}") from exc


_STORAGE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
            "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def storage_dtype(config: Any) -> torch.dtype:
    """The dtype config.json declares (``torch_dtype`` or ``dtype``), float32 if none."""
    get = config.get if hasattr(config, "get") else (lambda _k: None)
    value = get("torch_dtype") or get("dtype")
    return _STORAGE.get(str(value).lower().removeprefix("torch."), torch.float32)


def compute_dtype(
    device: torch.device, stored: torch.dtype, *, n_params: int, host_budget: int | None
) -> torch.dtype:
    if device.type == "cuda":
        return stored if stored in (torch.bfloat16, torch.float16) else torch.float32
    # The behavioural stage holds the working model plus a resident copy of the subject
    # in its stored dtype: float32 compute only when both fit in half the host budget (the
    # rest: fingerprints, streamed blocks, the allocator's slack). Bigger models compute
    # in their stored dtype, two copies in all (bf16 matmuls are fast on CPUs with
    # AMX/AVX512-BF16, and losses are still taken in float32).
    if host_budget is not None and stored != torch.float32 and (
        (4 + stored.itemsize) * n_params > host_budget // 2
    ):
        return stored
    return torch.float32


def count_params(config: Any) -> int:
    """An estimate of a decoder's parameters from config.json (no weights read)."""
    get = config.get
    hidden = int(get("hidden_size") or get("n_embd") or 0)
    layers = int(get("num_hidden_layers") or get("n_layer") or 0)
    vocab = int(get("vocab_size") or 0)
    inter = int(get("intermediate_size") or get("n_inner") or 4 * hidden)
    heads = int(get("num_attention_heads") or get("n_head") or 1)
    kv = int(get("num_key_value_heads") or heads)
    head_dim = int(get("head_dim") or (hidden // max(heads, 1)))
    attn = hidden * head_dim * (2 * heads + 2 * kv)
    mlp = 3 * hidden * inter
    tied = bool(get("tie_word_embeddings", True))
    return layers * (attn + mlp) + vocab * hidden * (1 if tied else 2)


def attach_device_io(model: torch.nn.Module, device: torch.device) -> None:
    """Inputs go to ``device``; logits come back on the CPU (float32). No-op on the CPU."""
    if device.type == "cpu" or getattr(model, "_auditor_io", False):
        return

    def pre(_mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                  for k, v in kwargs.items()}
        return args, kwargs

    def post(_mod: Any, _args: Any, _kwargs: Any, out: Any) -> Any:
        if getattr(out, "logits", None) is not None:
            out.logits = out.logits.float().cpu()
        return out

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.register_forward_hook(post, with_kwargs=True)
    model._auditor_io = True  # type: ignore[assignment]


Chooser = Callable[[torch.Tensor, int], torch.Tensor]


@torch.no_grad()
def decode(
    model: torch.nn.Module,
    ids: torch.Tensor,
    steps: int,
    choose: Chooser,
    *,
    on_step: Callable[[int], Any] | None = None,
) -> torch.Tensor:
    """Extend ``ids`` [n, len] (no padding) by ``steps`` tokens with a KV cache.

    ``choose(logits [n, V] float32, step) -> next ids [n]``. The prompt runs once; each
    later step feeds only the new token. ``on_step(tokens)`` is told the tokens each
    forward pass processes (for cost accounting). Models that refuse a cache fall back to
    re-running the sequence.
    """
    params = _forward_params(model)
    cache_kw = "cache" if "cache" in params else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    past = None
    current = ids
    for step in range(steps):
        feed = current if past is None else current[:, -1:]
        if on_step is not None:
            on_step(int(feed.numel()))
        try:
            out = model(input_ids=feed, use_cache=True, **{cache_kw: past}, **extra)
            past = getattr(out, cache_kw, None)
        except (TypeError, ValueError):
            out = model(input_ids=current)
            past = None
        logits = out.logits[:, -1, :].float()
        nxt = choose(logits, step)
        current = torch.cat([current, nxt.to(current.device)[:, None]], dim=1)
    return current


def _forward_params(model: torch.nn.Module) -> set[str]:
    import inspect

    # a view that runs another module (``backdoor_refs.SwappedModel``) takes its arguments
    module = getattr(model, "wrapped_module", model)
    try:
        return set(inspect.signature(type(module).forward).parameters)
    except (AttributeError, TypeError, ValueError):
        return set()


def probe_budget(
    *, n_params: int, device: torch.device, planned_evaluations: int,
    cpu_flops: float, gpu_flops: float, floor: int = 48, ceiling: int = 4096,
) -> int:
    """Probe tokens per evaluation so the audit's forward passes fit the compute budget.

    A forward pass costs about 2 x parameters FLOPs per token.
    """
    flops = gpu_flops if device.type == "cuda" else cpu_flops
    tokens = flops / max(2.0 * n_params, 1.0) / max(planned_evaluations, 1)
    return int(max(floor, min(ceiling, tokens)))


_ALLOCATOR_BOUND = False


def bound_host_allocator() -> None:
    """Serve every allocation of 1 MB and more by its own mapping (glibc ``mallopt``).

    The audit allocates and frees tensors of tens of MB in turn (a block of rows, a
    layer); glibc's adaptive threshold soon serves those from its heap, where freed
    blocks fragment and stay resident: RSS climbs a model's worth above what is held.
    Mapped blocks go back to the system when freed. A no-op where glibc is absent.
    """
    global _ALLOCATOR_BOUND
    if _ALLOCATOR_BOUND:
        return
    _ALLOCATOR_BOUND = True
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixes it: no adaptive growth)
    except (OSError, AttributeError):
        return
