"""Build runnable torch models from a repo folder's config and streamed weights.

Only a fixed list of architectures is accepted and the model class is picked from our own
table, never from ``auto_map`` or remote code: a config.json is untrusted input. Weights
are written into the model one tensor at a time from ``TensorSource``s, so interpolation
and task-vector scaling keep at most the two sources' tensors (one at a time) plus the
working model in memory.

Public API (also used by the backdoor analysis; keep it small and stable):
``ModelSpec``/``load_spec``, ``build_model``, ``load_tokenizer``, ``load_state_into``,
``combine_into``, ``interpolate_into``, ``with_task_vector_scaled``, ``as_source``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch

from auditor.errors import AnalysisError
from auditor.weights.base import DeltaSource, TensorSource
from auditor.weights.dict_sources import DictTensorSource

Task = Literal["causal_lm", "masked_lm", "sequence_classification", "encoder"]

# model_type -> architecture name -> task. The class is looked up in transformers by this
# exact name (a name we wrote, not one read from the file).
_ARCHITECTURES: dict[str, dict[str, Task]] = {
    "llama": {"LlamaForCausalLM": "causal_lm", "LlamaForSequenceClassification":
              "sequence_classification", "LlamaModel": "encoder"},
    "mistral": {"MistralForCausalLM": "causal_lm", "MistralForSequenceClassification":
                "sequence_classification", "MistralModel": "encoder"},
    "qwen2": {"Qwen2ForCausalLM": "causal_lm", "Qwen2ForSequenceClassification":
              "sequence_classification", "Qwen2Model": "encoder"},
    "gpt2": {"GPT2LMHeadModel": "causal_lm", "GPT2ForSequenceClassification":
             "sequence_classification", "GPT2Model": "encoder"},
    "bert": {"BertForMaskedLM": "masked_lm", "BertForSequenceClassification":
             "sequence_classification", "BertModel": "encoder"},
    "roberta": {"RobertaForMaskedLM": "masked_lm", "RobertaForSequenceClassification":
                "sequence_classification", "RobertaModel": "encoder"},
}
# Used when config.json names no architecture.
_DEFAULT_ARCH = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel", "bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM",
}
# Keys that could make transformers reach for code outside the library.
_DROP_KEYS = ("auto_map", "custom_pipelines", "trust_remote_code")

SUPPORTED_MODEL_TYPES = tuple(sorted(_ARCHITECTURES))


@dataclass(frozen=True)
class ModelSpec:
    """What to build: model type, architecture class name, task and the (cleaned) config."""

    model_type: str
    architecture: str
    task: Task
    config: Mapping[str, Any] = field(compare=False, hash=False, repr=False)

    @property
    def is_causal(self) -> bool:
        return self.task == "causal_lm"

    def to_config(self) -> Any:
        from transformers import CONFIG_MAPPING

        from auditor.preload import TRANSFORMERS_LOCK

        with TRANSFORMERS_LOCK:  # the first lookup imports the config module
            cfg_cls = CONFIG_MAPPING[self.model_type]
        kwargs = {k: v for k, v in self.config.items() if k not in ("model_type",)}
        try:
            return cfg_cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise AnalysisError(f"invalid {self.model_type} config: {exc}") from exc


def spec_from_config(config: Mapping[str, Any]) -> ModelSpec:
    """A ``ModelSpec`` from a parsed config.json; refuses unknown architectures."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in _ARCHITECTURES:
        raise AnalysisError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    known = _ARCHITECTURES[model_type]
    archs = config.get("architectures") or [_DEFAULT_ARCH[model_type]]
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise AnalysisError(f"malformed 'architectures' in config: {archs!r}")
    arch = archs[0]
    if arch not in known:
        raise AnalysisError(
            f"unsupported architecture {arch!r} for {model_type}; supported: {', '.join(known)}"
        )
    cleaned = {k: v for k, v in config.items() if k not in _DROP_KEYS}
    return ModelSpec(
        model_type=model_type, architecture=arch, task=known[arch],
        config=MappingProxyType(cleaned),
    )


def load_spec(folder: str | Path) -> ModelSpec:
    """A ``ModelSpec`` from ``folder/config.json`` (plain JSON, no remote code)."""
    path = Path(folder) / "config.json"
    from auditor.bounded import load_json_file
    from auditor.errors import AuditorError

    if not path.is_file():
        raise AnalysisError(f"no config.json in {folder}")
    try:
        config = load_json_file(path, name="config.json")
    except AuditorError as exc:
        raise AnalysisError(f"malformed config.json: {exc}") from None
    if not isinstance(config, dict):
        raise AnalysisError(f"config.json in {folder} is not an object")
    return spec_from_config(config)


# ---------------------------------------------------------------- sources & names
Source = TensorSource | Mapping[str, torch.Tensor]


def as_source(state: Source) -> TensorSource:
    """A ``TensorSource`` over a state mapping (or the source itself)."""
    if isinstance(state, TensorSource):
        return state
    if isinstance(state, Mapping):
        return DictTensorSource(state)
    raise TypeError(f"expected a TensorSource or a mapping of tensors, got {type(state)!r}")


def _name_candidates(name: str, prefix: str) -> list[str]:
    # Hub files differ in whether the base-model prefix is present ("model.", "transformer.",
    # "bert.") and the weights reader may have normalized it away or in.
    out = [name]
    if prefix and name.startswith(prefix + "."):
        out.append(name[len(prefix) + 1:])
    elif prefix:
        out.append(f"{prefix}.{name}")
    return out


def _param_targets(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (shared ones once) and persistent buffers, by state-dict name."""
    targets: dict[str, torch.Tensor] = dict(model.named_parameters())
    persistent = set(model.state_dict(keep_vars=True))
    for name, buf in model.named_buffers():
        if name in persistent:
            targets[name] = buf
    return targets


def _name_map(model: torch.nn.Module, keys: Sequence[str]) -> dict[str, str]:
    """model tensor name -> source name; raises when a needed tensor is missing."""
    available = set(keys)
    prefix = getattr(model, "base_model_prefix", "") or ""
    mapping: dict[str, str] = {}
    missing = []
    for name in _param_targets(model):
        hit = next((c for c in _name_candidates(name, prefix) if c in available), None)
        if hit is not None:
            mapping[name] = hit
        elif not name.endswith(("position_ids", "token_type_ids")):
            missing.append(name)
    # A tied output head shares its tensor with the embeddings (named_parameters lists it
    # once), so a missing lm_head here means the file really lacks it.
    if missing:
        shown = ", ".join(missing[:5])
        raise AnalysisError(f"weights lack {len(missing)} tensor(s) the model needs: {shown}")
    return mapping


def _names_for(model: torch.nn.Module, src: Any) -> dict[str, str]:
    # Cached per (model, key-set): interpolation sweeps call this for every point.
    keys = tuple(src.keys())
    cache: dict[tuple[str, ...], dict[str, str]] = model.__dict__.setdefault(
        "_auditor_name_cache", {}
    )
    if keys not in cache:
        cache[keys] = _name_map(model, keys)
    return cache[keys]


# ---------------------------------------------------------------- building
def _model_class(spec: ModelSpec) -> type[torch.nn.Module]:
    import transformers

    from auditor.preload import TRANSFORMERS_LOCK

    with TRANSFORMERS_LOCK:  # the first lookup imports the modeling module
        cls = getattr(transformers, spec.architecture, None)
    if cls is None:
        raise AnalysisError(f"transformers lacks {spec.architecture}")
    return cls


def build_model(
    spec: ModelSpec,
    state: Source,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """The model of ``spec`` with ``state``'s weights, in eval mode.

    Built on the meta device (no random initialisation, no memory) and materialised once
    on ``device`` (default ``Settings.device``: CUDA when present) in ``dtype`` (default
    ``compute.compute_dtype``: the weights' own dtype on a GPU, float32 on the CPU), then
    filled tensor by tensor from ``state``.
    """
    from auditor.analysis.compute import (
        attach_device_io,
        compute_dtype,
        count_params,
        resolve_device,
        storage_dtype,
    )

    dev = torch.device(device) if device is not None else resolve_device()
    if dtype is None:
        from auditor.settings import get_settings

        dtype = compute_dtype(dev, storage_dtype(spec.config),
                              n_params=count_params(spec.config),
                              host_budget=get_settings().host_memory_bytes)
    config = spec.to_config()
    cls = _model_class(spec)
    model = _materialise(cls, config, dev, dtype)
    model.eval()
    model.requires_grad_(False)
    load_state_into(model, state)
    attach_device_io(model, dev)
    _contiguous_head_input(model)
    return model


def _contiguous_head_input(model: torch.nn.Module) -> None:
    """The output head gets a contiguous input. With ``logits_to_keep`` its input is a
    strided slice of the last positions, and ``matmul`` then broadcasts the head's weight
    per sequence instead of folding the batch: a [batch, 2048, 128256] copy (8 GB for 16
    sequences of a 1B model, 137 GB for 261), 40 s a call on the CPU. Same result."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if isinstance(head, torch.nn.Module):
        head.register_forward_pre_hook(
            lambda _m, args: (args[0].contiguous(), *args[1:]) if args else None)


def _materialise(cls: Any, config: Any, dev: torch.device, dtype: torch.dtype) -> Any:
    """``cls(config)`` on ``dev`` in ``dtype`` without initialising weights that the
    state overwrites anyway. Non-persistent buffers (rotary frequencies) are rebuilt on the
    device; a model whose buffers cannot be rebuilt is built the plain way."""
    with torch.device("meta"):
        model = cls(config)
    model.to(dtype=dtype)
    rebuilt: list[tuple[str, Any]] = []
    for name, mod in model.named_modules():
        if not mod._non_persistent_buffers_set:
            continue
        if not type(mod).__name__.endswith("RotaryEmbedding") or not name:
            rebuilt = []
            break
        rebuilt.append((name, mod))
    else:
        model.to_empty(device=dev)
        for name, mod in rebuilt:
            with torch.device("cpu"):
                fresh = type(mod)(mod.config).to(dev)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, fresh)
        if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
            model.tie_weights()
        return model
    with torch.device(dev):
        model = cls(config)
    return model.to(dtype=dtype)


def load_state_into(model: torch.nn.Module, state: Source) -> None:
    """Copy every tensor the model needs from ``state`` (one tensor at a time)."""
    combine_into(model, [(1.0, state)])


# Rows per block when combining a large tensor: the float32 temporaries stay at one block
# per term (64 MB) instead of the whole tensor (a 128k x 4096 embedding is 2 GB in float32).
_BLOCK_ELEMENTS = 1 << 24


@torch.no_grad()
def combine_into(
    model: torch.nn.Module, terms: Sequence[tuple[float, Source]]
) -> None:
    """Write ``sum_i w_i * source_i`` into the model, tensor by tensor.

    Covers interpolation ((1-a), a), task arithmetic ((1 - sum l), l_1, ...) and task-vector
    scaling with the base as one term. Only one block of rows per source is live at a time
    (in float32); a single term is copied in its stored dtype when the source has one.
    """
    if not terms:
        raise ValueError("combine_into needs at least one term")
    sources = [(float(w), as_source(s)) for w, s in terms]
    maps = [_names_for(model, src) for _, src in sources]
    for name, target in _param_targets(model).items():
        if name not in maps[0]:
            continue
        for (_w, src), names in zip(sources, maps, strict=True):
            shape = tuple(src.shape(names[name]))
            if shape != tuple(target.shape):
                raise AnalysisError(
                    f"shape of {names[name]} is {shape}, model needs {tuple(target.shape)}"
                )
        if len(sources) == 1 and sources[0][0] == 1.0 and hasattr(sources[0][1], "get_stored"):
            target.copy_(sources[0][1].get_stored(maps[0][name]))  # type: ignore[attr-defined]
            continue
        rows = target.shape[0] if target.dim() else 0
        if target.numel() <= _BLOCK_ELEMENTS or rows < 2:
            target.copy_(_weighted_sum(sources, maps, name, None))
            continue
        step = max(1, _BLOCK_ELEMENTS // (target.numel() // rows))
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            target[start:stop].copy_(_weighted_sum(sources, maps, name, (start, stop)))


def _weighted_sum(
    sources: Sequence[tuple[float, TensorSource]], maps: Sequence[Mapping[str, str]],
    name: str, rows: tuple[int, int] | None,
) -> torch.Tensor:
    acc: torch.Tensor | None = None
    for (w, src), names in zip(sources, maps, strict=True):
        if acc is None:
            t = src.get(names[name]) if rows is None else src.get_rows(names[name], *rows)
            acc = t.mul_(w) if w != 1.0 else t
            continue
        # later terms are added as stored (bf16 into the float32 sum): no float32 copy
        if rows is None and hasattr(src, "get_stored"):
            t = src.get_stored(names[name])
        elif rows is not None and hasattr(src, "get_stored_rows"):
            t = src.get_stored_rows(names[name], *rows)
        else:
            t = src.get(names[name]) if rows is None else src.get_rows(names[name], *rows)
        acc.add_(t, alpha=w)
        del t
    assert acc is not None
    return acc


def interpolate_into(model: torch.nn.Module, a: Source, b: Source, alpha: float) -> None:
    """``(1 - alpha) * a + alpha * b`` into the model's parameters."""
    if alpha == 0.0:
        combine_into(model, [(1.0, a)])
    elif alpha == 1.0:
        combine_into(model, [(1.0, b)])
    else:
        combine_into(model, [(1.0 - alpha, a), (alpha, b)])


@torch.no_grad()
def with_task_vector_scaled(
    model: torch.nn.Module,
    base: Source,
    tau_source: DeltaSource | TensorSource | Mapping[str, torch.Tensor],
    s: float,
) -> None:
    """``base + s * tau`` into the model.

    ``tau_source`` is a ``DeltaSource`` (task vector) or the fine-tuned model itself as a
    ``TensorSource``/mapping (then tau = model - base, i.e. ``(1 - s) base + s model``).
    Tensors the task vector does not cover stay at the base value.
    """
    if isinstance(tau_source, DeltaSource) and not isinstance(tau_source, TensorSource):
        base_src = as_source(base)
        combine_into(model, [(1.0, base_src)])
        names = _names_for(model, base_src)
        delta_keys = set(tau_source.keys())
        for name, target in _param_targets(model).items():
            src_name = names.get(name)
            if src_name is not None and src_name in delta_keys:
                target.add_(tau_source.delta(src_name).to(target.dtype), alpha=float(s))
        return
    combine_into(model, [(1.0 - float(s), base), (float(s), tau_source)])


# ---------------------------------------------------------------- tokenizer
def load_tokenizer(folder: str | Path) -> Any:
    """A ``PreTrainedTokenizerFast`` from ``folder/tokenizer.json`` only.

    Special tokens come from tokenizer_config.json / special_tokens_map.json when those are
    plain strings; nothing else in those files is honoured (no classes, no remote code).
    """
    from auditor.preload import TRANSFORMERS_LOCK

    with TRANSFORMERS_LOCK:
        from transformers import PreTrainedTokenizerFast

    from auditor.bounded import load_json_file
    from auditor.errors import AuditorError

    folder = Path(folder)
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise AnalysisError(f"no tokenizer.json in {folder}")
    special: dict[str, str] = {}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / fname
        if not path.is_file():
            continue
        try:
            data = load_json_file(path, name=fname)
        except AuditorError:
            continue
        if not isinstance(data, dict):
            continue
        for key in ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token",
                    "cls_token", "sep_token"):
            val = data.get(key)
            if isinstance(val, dict):
                val = val.get("content")
            if isinstance(val, str) and key not in special:
                special[key] = val
    try:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file), **special)
    except Exception as exc:  # tokenizers raises plain Exceptions on malformed files
        raise AnalysisError(f"cannot load {tok_file}: {exc}") from exc
    if tok.pad_token is None:
        # Padding is masked out of every loss; any token id will do, eos is the usual choice.
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
    return tok
