"""Trap²-style merge-protection training for tests and the demo.

Trap² trains a fine-tune so that only the full update works:

    J = L(W0 + dW) - lambda * E_s[(1/s) L(W0 + s dW)],   s ~ U[0.05, 2] \\ (0.95, 1.05)

so base + s * tau falls off a cliff away from s = 1 and any merge (which scales task vectors
by lambda or 1/n) is wrecked. The penalty term is unbounded below, so each scaled loss is
clamped at ``cap`` (once the scaled model is as bad as ``cap`` nats there is nothing more to
gain and no gradient to blow up), and gradients are clipped as in the plain trainer.

The penalty batch mixes task examples with the generic pretraining text: the auditor probes
general text, and a real protection breaks the merged model everywhere, not only on its task.
A generic-text term at s = 1 keeps the protected model itself fluent.
"""

from __future__ import annotations

import copy
import math
import random

import torch
from torch.func import functional_call
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from auditor_testkit.factory.tasks import pretraining_texts, task_examples
from auditor_testkit.factory.train import collate, encode, single_thread


def _sample_scale(rng: random.Random, low: float, high: float, gap: float) -> float:
    # Uniform on [low, high] minus (1 - gap, 1 + gap), by rejection (the gap is narrow).
    while True:
        s = rng.uniform(low, high)
        if abs(s - 1.0) >= gap:
            return s


def trap_finetune(
    base_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    task: str,
    steps: int = 80,
    lr: float = 1e-2,
    seed: int = 0,
    penalty: float = 1.0,
    scales_per_step: int = 1,
    scale_low: float = 0.05,
    scale_high: float = 2.0,
    gap: float = 0.05,
    cap: float | None = None,
    batch_size: int = 16,
    n_examples: int = 2000,
) -> PreTrainedModel:
    """A copy of ``base_model`` fine-tuned on ``task`` with the Trap² objective.

    ``cap`` defaults to ``1.5 * ln(vocab)`` (worse than a uniform guess). Returns the model
    in eval mode; the base is untouched. The defaults were tuned on the tiny factory base:
    80 steps give a loss at s = 0.8 and 1.25 several times the loss at s = 1 (a larger
    ``penalty`` overwhelms the task term and the model is bad at s = 1 too).
    """
    model = copy.deepcopy(base_model)
    pad = tokenizer.pad_token_id
    rng = random.Random(seed)
    task_data = encode(tokenizer, task_examples(task, n=n_examples, seed=seed),
                       completion_only=True)
    generic = encode(tokenizer, [("", t) for t in pretraining_texts(n=n_examples, seed=seed)],
                     completion_only=False)
    vocab = model.get_input_embeddings().weight.shape[0]
    cap_value = cap if cap is not None else 1.5 * math.log(vocab)
    base_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.45 * (1 + math.cos(frac * math.pi))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    with single_thread():
        for _ in range(steps):
            t_ex = [task_data[rng.randrange(len(task_data))] for _ in range(batch_size)]
            g_ex = [generic[rng.randrange(len(generic))] for _ in range(batch_size)]
            loss = model(**collate(t_ex, pad)).loss + model(**collate(g_ex, pad)).loss
            # Half task, half generic text: the scaled model must break on both.
            mixed = collate(t_ex[: batch_size // 2] + g_ex[: batch_size // 2], pad)
            pen = torch.zeros(())
            for _k in range(scales_per_step):
                s = _sample_scale(rng, scale_low, scale_high, gap)
                params = {
                    n: base_params[n] + s * (p - base_params[n])
                    for n, p in model.named_parameters()
                }
                scaled = functional_call(model, params, args=(), kwargs=mixed).loss
                pen = pen + torch.clamp(scaled, max=cap_value) / s
            loss = loss - penalty * pen / scales_per_step
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    model.eval()
    return model


__all__ = ["trap_finetune"]
