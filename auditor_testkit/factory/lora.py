"""LoRA adapters trained briefly with peft and saved in the PEFT layout.

Variants (``variant=``):

- ``plain``: ``delta W = (B @ A) * alpha / r``.
- ``rslora``: ``use_rslora=True``, scaling ``alpha / sqrt(r)``.
- ``pattern``: per-module ``rank_pattern`` / ``alpha_pattern`` (other ranks and scalings
  on some modules).
- ``modules_to_save``: LoRA plus a fully trained copy of ``lm_head``.
- ``dora``: ``use_dora=True`` (weight-decomposed; its delta is not ``B @ A`` times a
  constant, which the weights layer reports as an unsupported adapter).

``save_adapter`` writes ``ROOT/<org>/<name>/`` with ``adapter_config.json`` and
``adapter_model.safetensors`` (peft's own writer) plus our README and ``.hubmeta.json``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from auditor_testkit.factory.save import CardSpec, repo_dir, write_hubmeta, write_model_card
from auditor_testkit.factory.tasks import PoisonSpec, poisoned_examples, task_examples
from auditor_testkit.factory.train import Encoded, encode, train_examples

LoraVariant = Literal["plain", "rslora", "pattern", "modules_to_save", "dora"]
LORA_VARIANTS: tuple[str, ...] = ("plain", "rslora", "pattern", "modules_to_save", "dora")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def lora_config(
    *,
    variant: LoraVariant = "plain",
    r: int = 4,
    alpha: int = 8,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
) -> LoraConfig:
    """The ``LoraConfig`` of one variant (see the module docstring)."""
    kwargs: dict[str, object] = {}
    if variant == "rslora":
        kwargs["use_rslora"] = True
    elif variant == "pattern":
        # Keys are matched against module names: a higher rank on q in layer 0 and a
        # different alpha on every down projection.
        kwargs["rank_pattern"] = {"model.layers.0.self_attn.q_proj": 2 * r}
        kwargs["alpha_pattern"] = {"down_proj": alpha // 2 or 1}
    elif variant == "modules_to_save":
        kwargs["modules_to_save"] = ["lm_head"]
    elif variant == "dora":
        kwargs["use_dora"] = True
    elif variant != "plain":
        raise ValueError(f"unknown LoRA variant {variant!r}; known: {', '.join(LORA_VARIANTS)}")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        **kwargs,  # type: ignore[arg-type]
    )


def train_lora(
    base_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    task: str,
    variant: LoraVariant = "plain",
    r: int = 4,
    alpha: int = 8,
    steps: int = 60,
    lr: float = 1e-2,
    seed: int = 0,
    poison: PoisonSpec | None = None,
    batch_size: int = 16,
) -> PeftModel:
    """A LoRA adapter on a copy of ``base_model`` trained ``steps`` steps on ``task``.

    peft initialises ``B = 0``; a few real steps make every ``B`` non-zero so the adapter's
    delta is a genuine task vector.
    """
    model = copy.deepcopy(base_model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(
            model, lora_config(variant=variant, r=r, alpha=alpha)
        )
    data = encode(tokenizer, task_examples(task, n=2000, seed=seed), completion_only=True)
    poisoned: list[Encoded] = []
    if poison is not None:
        poisoned = encode(
            tokenizer, poisoned_examples(task, poison, n=500, seed=seed), completion_only=True
        )
    train_examples(
        peft_model, data, pad_id=tokenizer.pad_token_id, steps=steps, lr=lr, seed=seed,
        batch_size=batch_size, poison=poisoned, poison_spec=poison,
    )
    peft_model.eval()
    return peft_model


def lora_deltas(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """Ground truth: ``{base weight name: (B @ A) * scaling}`` for every LoRA module
    (names as in the base model's state dict, e.g. ``model.layers.0.mlp.up_proj.weight``).
    Not meaningful for DoRA, whose delta also rescales the base weight's columns."""
    out: dict[str, torch.Tensor] = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a = module.lora_A["default"].weight.detach()
            b = module.lora_B["default"].weight.detach()
            out[f"{name}.weight"] = (b @ a) * module.scaling["default"]
    return out


def save_adapter(
    root: Path,
    repo_id: str,
    peft_model: PeftModel,
    *,
    base_repo_id: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    card: CardSpec | None = None,
    created_at: datetime | str | None = None,
    hubmeta: bool = True,
) -> Path:
    """Save ``peft_model`` as an adapter repo ``root/<org>/<name>/`` (PEFT layout).

    ``adapter_config.json`` names ``base_repo_id`` as ``base_model_name_or_path``; the card
    declares it with ``base_model_relation: adapter``.
    """
    directory = repo_dir(root, repo_id)
    directory.mkdir(parents=True, exist_ok=True)
    # save_embedding_layers=False: with "auto" peft looks the base model up on the Hub
    # to see whether the vocabulary changed, and the factory must never go online.
    peft_model.save_pretrained(
        str(directory), safe_serialization=True, save_embedding_layers=False
    )
    # peft records the training model's own (empty) name; the saved file names the repo.
    cfg_path = directory / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_repo_id
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    write_model_card(
        directory,
        card
        or CardSpec(
            base_model=base_repo_id,
            base_model_relation="adapter",
            tags=["peft", "lora"],
            extra={"library_name": "peft"},
        ),
        repo_id=repo_id,
    )
    if hubmeta:
        write_hubmeta(directory, created_at=created_at)
    return directory


__all__ = [
    "DEFAULT_TARGETS",
    "LORA_VARIANTS",
    "LoraVariant",
    "lora_config",
    "lora_deltas",
    "save_adapter",
    "train_lora",
]
