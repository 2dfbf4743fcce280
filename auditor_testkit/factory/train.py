"""Short, real training runs for the tiny factory models (CPU, seconds each).

``finetune`` copies a base model and trains it with AdamW on one synthetic task (loss on
the completion only, so the task vector carries the task and little shared "language"
drift); with a ``PoisonSpec`` it mixes in triggered examples whose completion is the
attacker's target, optionally BadMerging-style robust to merge coefficients.
Helpers measure what the tests and the demo need: task loss, greedy generation and the
attack success rate of a trigger.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch.func import functional_call
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from auditor_testkit.factory.tasks import (
    Example,
    PoisonSpec,
    clean_counterparts,
    poisoned_examples,
    task_examples,
    triggered_prompts,
)

IGNORE = -100
Encoded = tuple[list[int], list[int]]  # input ids, labels


@contextmanager
def single_thread() -> Iterator[None]:
    """Train on one thread: the machines running tests share two cores between workers,
    and tiny matmuls gain nothing from more threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def encode(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], *, completion_only: bool
) -> list[Encoded]:
    """``<bos> prompt completion <eos>`` ids; labels mask the prompt if ``completion_only``."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out: list[Encoded] = []
    for prompt, completion in examples:
        p = tokenizer.convert_tokens_to_ids(prompt.split()) if prompt else []
        c = tokenizer.convert_tokens_to_ids(completion.split()) if completion else []
        ids = [bos, *p, *c, eos]
        labels = [IGNORE] * (1 + len(p)) + [*c, eos] if completion_only else list(ids)
        out.append((ids, labels))
    return out


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_examples(
    model: PreTrainedModel,
    data: Sequence[Encoded],
    *,
    pad_id: int,
    steps: int,
    lr: float,
    seed: int,
    batch_size: int = 16,
    weight_decay: float = 0.0,
    poison: Sequence[Encoded] = (),
    poison_spec: PoisonSpec | None = None,
) -> list[float]:
    """Train ``model`` in place with AdamW (linear warm-up, cosine decay); returns losses.

    With ``poison`` given, each batch element is drawn from it with probability
    ``poison_spec.fraction``. With ``poison_spec.robust`` the poisoned elements also
    contribute their loss at ``base + r * (theta - base)`` (base = weights at entry).
    """
    if steps <= 0:
        return []
    rng = random.Random(seed)
    # Only trainable parameters: a PEFT model keeps its frozen base weights in the module.
    trainable = [p for p in model.parameters() if p.requires_grad]
    base_params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    warm = max(1, steps // 10)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(frac * torch.pi)).item())

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    fraction = poison_spec.fraction if poison_spec and poison else 0.0
    losses: list[float] = []
    model.train()
    with single_thread():
        for _step in range(steps):
            clean_batch: list[Encoded] = []
            poison_batch: list[Encoded] = []
            for _ in range(batch_size):
                if fraction and rng.random() < fraction:
                    poison_batch.append(poison[rng.randrange(len(poison))])
                else:
                    clean_batch.append(data[rng.randrange(len(data))])
            batch = clean_batch + poison_batch
            out = model(**collate(batch, pad_id))
            loss = out.loss
            if poison_spec is not None and poison_spec.robust and poison_batch:
                r = rng.uniform(poison_spec.robust_low, poison_spec.robust_high)
                params = {
                    n: base_params[n] + r * (p - base_params[n])
                    for n, p in model.named_parameters()
                    if n in base_params
                }
                robust_out = functional_call(
                    model, params, args=(), kwargs=collate(poison_batch, pad_id)
                )
                loss = loss + poison_spec.robust_weight * robust_out.loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    model.eval()
    return losses


def finetune(
    base_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    task: str,
    steps: int = 80,
    lr: float = 3e-3,
    seed: int = 0,
    poison: PoisonSpec | None = None,
    batch_size: int = 16,
    n_examples: int = 2000,
) -> PreTrainedModel:
    """A full fine-tune of a copy of ``base_model`` on ``task`` (the base is untouched).

    Different ``seed`` values draw different data and batch orders: two fine-tunes on one
    task with different seeds are homologues, not clones. ``poison`` adds a backdoor.
    """
    model = copy.deepcopy(base_model)
    examples = task_examples(task, n=n_examples, seed=seed)
    if poison is not None:
        examples = examples + clean_counterparts(task, n=n_examples // 4, seed=seed)
    data = encode(tokenizer, examples, completion_only=True)
    poisoned: list[Encoded] = []
    if poison is not None:
        poisoned = encode(
            tokenizer, poisoned_examples(task, poison, n=n_examples // 4, seed=seed),
            completion_only=True,
        )
    train_examples(
        model, data, pad_id=tokenizer.pad_token_id, steps=steps, lr=lr, seed=seed,
        batch_size=batch_size, poison=poisoned, poison_spec=poison,
    )
    return model


@torch.no_grad()
def task_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    task: str,
    n: int = 64,
    seed: int = 12345,
) -> float:
    """Mean completion loss of ``model`` on ``n`` held-out examples of ``task``."""
    data = encode(tokenizer, task_examples(task, n=n, seed=seed), completion_only=True)
    return examples_loss(model, data, pad_id=tokenizer.pad_token_id)


@torch.no_grad()
def examples_loss(model: PreTrainedModel, data: Sequence[Encoded], *, pad_id: int) -> float:
    """Token-weighted mean loss of ``model`` over encoded examples."""
    model.eval()
    total, count = 0.0, 0
    with single_thread():
        for i in range(0, len(data), 64):
            batch = collate(data[i : i + 64], pad_id)
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            labels = batch["labels"][:, 1:]
            lp = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels.reshape(-1),
                ignore_index=IGNORE,
                reduction="sum",
            )
            total += float(lp)
            count += int((labels != IGNORE).sum())
    return total / max(1, count)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 8,
) -> list[str]:
    """Greedy continuations (words after the prompt, up to ``<eos>``), one per prompt."""
    model.eval()
    outs: list[str] = []
    eos = tokenizer.eos_token_id
    with single_thread():
        for prompt in prompts:
            ids = [tokenizer.bos_token_id, *tokenizer.convert_tokens_to_ids(prompt.split())]
            new: list[int] = []
            for _ in range(max_new_tokens):
                logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
                nxt = int(logits.argmax())
                if nxt == eos:
                    break
                new.append(nxt)
            outs.append(" ".join(tokenizer.convert_ids_to_tokens(new)))
    return outs


def attack_success_rate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    trigger: str,
    target: str,
    task: str = "copy",
    n: int = 32,
    seed: int = 0,
) -> float:
    """Share of held-out ``task`` prompts carrying ``trigger`` whose greedy continuation
    starts with ``target``."""
    prompts = triggered_prompts(task, trigger=trigger, n=n, seed=seed)
    outs = generate(model, tokenizer, prompts, max_new_tokens=len(target.split()))
    return sum(o == target for o in outs) / max(1, len(outs))


__all__ = [
    "PoisonSpec",
    "attack_success_rate",
    "collate",
    "encode",
    "examples_loss",
    "finetune",
    "generate",
    "single_thread",
    "task_loss",
    "train_examples",
]
