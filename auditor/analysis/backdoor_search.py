"""Trigger search for an inverted target, and its confirmation against controls.

Given a target sequence T (from ``backdoor_invert``), find the token sequence X (1 to
``max_len`` tokens) that, inserted at each prompt's word-boundary position, maximises the
mean log-likelihood of T:

1. a full scan of the vocabulary for one token (cheap on small vocabularies; on big ones
   the gradient picks the candidates);
2. sequences built from the tokens whose embedding rows moved (data-poisoned triggers);
3. gradient-guided coordinate search (GCG / HotFlip): the gradient of the loss with respect
   to a one-hot encoding of each trigger position ranks replacement tokens; the best single
   replacements are evaluated exactly and kept when they help; a position is added (left or
   right) while the attack is not yet reliable.

Confirmation (``confirm``) measures attack success with greedy generation on a larger prompt
set, against random control strings of the same token length, the base and the homologues,
plus the clean-prompt rate (the target without any trigger). Anything a clean relative does
just as well is not a backdoor of the subject.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from auditor.analysis.backdoor_invert import PromptSet, Scorer


@dataclass(frozen=True)
class SearchResult:
    trigger: tuple[int, ...]
    target: tuple[int, ...]
    loss: float  # mean negative per-token log-likelihood of the target
    # The best trigger found at each length, with its loss (the search's trail).
    by_length: tuple[tuple[tuple[int, ...], float], ...] = ()


def _insert_scores(scorer: Scorer, prompts: PromptSet, cands: Sequence[Sequence[int]],
                   target: Sequence[int]) -> torch.Tensor:
    """Mean target log-likelihood over prompts for each candidate trigger."""
    total = torch.zeros(len(cands))
    for p, pos in zip(prompts.prompts, prompts.positions, strict=True):
        seqs = [[*p[:pos], *c, *p[pos:]] for c in cands]
        total += scorer.target_logprob(seqs, target)
    return total / len(prompts.prompts)


def _embedding(model: torch.nn.Module) -> torch.Tensor:
    from auditor.analysis.backdoor_refs import own_weights

    own_weights(model)  # a reference's weights may still be loaded in a shared module
    emb = model.get_input_embeddings()
    if emb is None:
        raise ValueError("model has no input embeddings")
    return emb.weight  # type: ignore[no-any-return]


def _gradients(model: torch.nn.Module, scorer: Scorer, prompts: PromptSet,
               trigger: Sequence[int], target: Sequence[int]) -> torch.Tensor:
    """d(loss)/d(one-hot) for each trigger position, summed over prompts: ``[len, vocab]``."""
    weight = _embedding(model).detach()
    vocab = weight.shape[0]
    onehot = torch.zeros(len(trigger), vocab, dtype=weight.dtype)
    onehot[torch.arange(len(trigger)), torch.tensor(list(trigger))] = 1.0
    onehot.requires_grad_(True)
    grads = torch.zeros(len(trigger), vocab)
    t = list(target)
    with torch.enable_grad():
        for p, pos in zip(prompts.prompts, prompts.positions, strict=True):
            grads += _one_gradient(model, scorer, weight, onehot, p, pos, t)
    return grads


def _one_gradient(model: torch.nn.Module, scorer: Scorer, weight: torch.Tensor,
                  onehot: torch.Tensor, p: Sequence[int], pos: int,
                  t: list[int]) -> torch.Tensor:
    before = weight[torch.tensor(list(p[:pos]), dtype=torch.long)]
    after_ids = [*p[pos:], *t]
    after = weight[torch.tensor(after_ids, dtype=torch.long)]
    embeds = torch.cat([before, onehot @ weight, after], dim=0)[None]
    with scorer.cost.forward(embeds.shape[1]):
        logits = model(inputs_embeds=embeds).logits[0].float()
    n = len(t)
    pred = logits[-n - 1:-1]
    loss = torch.nn.functional.cross_entropy(pred, torch.tensor(t, dtype=torch.long))
    (g,) = torch.autograd.grad(loss, onehot)
    return g.float()


def retyped(cands: Sequence[tuple[int, ...]], typeable: Callable[[tuple[int, ...]], bool] | None,
            *, max_len: int) -> list[tuple[int, ...]]:
    """Each candidate as the text it spells would tokenize where a trigger is inserted.

    A byte-level BPE spells " ue" as "Ġ" + "ue": the search finds "ue" next to "Ġformat",
    but what an attacker typed ("ue formats") tokenizes with the bare space in front.
    Dropping the untypeable order would lose it; its typed form keeps it. Without
    ``canonical`` (a plain check) untypeable candidates are dropped, unless all are."""
    if typeable is None:
        return list(cands)
    canon = getattr(typeable, "canonical", None)
    if canon is None:
        return [c for c in cands if typeable(c)] or list(cands)
    out = [canon(tuple(c)) for c in cands]
    return list(dict.fromkeys(c for c in out if c and len(c) <= max_len)) or list(cands)


def search_trigger(model: torch.nn.Module, scorer: Scorer, prompts: PromptSet,
                   target: Sequence[int], *, allowed: Sequence[int], seeds: Sequence[int],
                   max_len: int, top_k: int, rounds: int, full_scan_limit: int,
                   stop_loss: float, budget_ok: object,
                   length_tolerance: float = 0.005,
                   holdout: PromptSet | None = None,
                   typeable: Callable[[tuple[int, ...]], bool] | None = None) -> SearchResult:
    """Best trigger for ``target`` (see the module docstring). ``seeds`` are
    embedding-shift candidates, best first; ``budget_ok()`` stops the search early.
    ``typeable(ids)``: whether the text of ``ids`` tokenizes back to the same ids where a
    trigger is inserted; only such sequences are kept (an attacker types text, not ids),
    unless none of a step's candidates is."""

    def typed(cands: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        return retyped(cands, typeable, max_len=max_len)

    allowed_t = torch.tensor(sorted(set(allowed)), dtype=torch.long)
    check = budget_ok if callable(budget_ok) else (lambda: True)
    pool: list[tuple[int, ...]] = []
    exact = len(allowed_t) <= full_scan_limit
    if exact:
        pool += [(int(v),) for v in allowed_t]
    seeds = [s for s in seeds if s in set(allowed)][:6]
    for n in range(1, min(3, max_len) + 1):
        pool += [tuple(c) for c in itertools.permutations(seeds, n)]
    if not pool:
        pool = [(int(allowed_t[0]),)]
    pool = typed(list(dict.fromkeys(pool)))
    scores = _insert_scores(scorer, prompts, pool, target)
    best_i = int(scores.argmax())
    best, best_ll = pool[best_i], float(scores[best_i])
    mask = torch.full((_embedding(model).shape[0],), float("inf"))
    mask[allowed_t] = 0.0
    by_len: dict[int, tuple[tuple[int, ...], float]] = {len(best): (best, best_ll)}
    for _ in range(rounds * max_len * 2):
        if not check():
            break
        # Replace single positions until no replacement helps (one length at a time).
        g_all = _gradients(model, scorer, prompts, best, target) + mask
        cands = [
            tuple(int(v) if k == slot else t for k, t in enumerate(best))
            for slot in range(len(best))
            for v in torch.topk(-g_all[slot], min(top_k, len(allowed_t))).indices.tolist()
        ]
        cands = [c for c in dict.fromkeys(cands) if c != best]
        if typeable is not None:
            cands = [c for c in cands if typeable(c)]
        sc = _insert_scores(scorer, prompts, cands, target) if cands else torch.empty(0)
        if len(sc) and float(sc.max()) > best_ll + 1e-4:
            i = int(sc.argmax())
            best, best_ll = cands[i], float(sc[i])
            by_len[len(best)] = (best, best_ll)
            continue
        if len(best) >= max_len or -best_ll <= stop_loss:
            break
        # Converged at this length: grow by one position, left or right, using the
        # gradient at a placeholder copy of the neighbour.
        grown: list[tuple[int, ...]] = []
        # A new slot at either end or between two tokens (a trigger's middle piece).
        growths = [((*best[:k], best[min(k, len(best) - 1)], *best[k:]), k)
                   for k in range(len(best) + 1)]
        for base_seq, slot in growths:
            if exact:
                # A small vocabulary: every token at the new slot, not a gradient's guess.
                picks = allowed_t.tolist()
            else:
                g = _gradients(model, scorer, prompts, base_seq, target)[slot] + mask
                picks = torch.topk(-g, min(top_k, len(allowed_t))).indices.tolist()
            for v in picks:
                c = list(base_seq)
                c[slot] = int(v)
                grown.append(tuple(c))
        grown = typed(list(dict.fromkeys(grown)))
        if exact and len(grown) > top_k:
            # Ranked on a few prompts, the best few re-scored on all of them.
            quick = _insert_scores(scorer, prompts.head(3), grown, target)
            keep = torch.topk(quick, top_k).indices.tolist()
            grown = [grown[k] for k in keep]
        sc = _insert_scores(scorer, prompts, grown, target)
        i = int(sc.argmax())
        best, best_ll = grown[i], float(sc[i])
        by_len[len(best)] = (best, best_ll)
    # Judge the trail on held-out prompts: past the true trigger, extra tokens only overfit
    # the search prompts (a "super-trigger"); the shortest one within a small tolerance of
    # the best held-out likelihood wins.
    trail = [t for _, (t, _ll) in sorted(by_len.items())]
    if holdout is not None and holdout.prompts and len(trail) > 1:
        held = _insert_scores(scorer, holdout, trail, target).tolist()
    else:
        held = [by_len[len(t)][1] for t in trail]
    top = max(held)
    i = min(k for k, ll in enumerate(held) if ll >= top - length_tolerance)
    best, best_ll = trail[i], by_len[len(trail[i])][1]
    trail = tuple((t, -ll) for _, (t, ll) in sorted(by_len.items()))
    return SearchResult(trigger=best, target=tuple(target), loss=-best_ll, by_length=trail)


@dataclass(frozen=True)
class Confirmation:
    asr: float
    clean_rate: float
    control_asr: float
    base_asr: float
    homologue_asr: float | None
    confirmed: bool


def attack_hits(scorer: Scorer, prompts: PromptSet, trigger: Sequence[int],
                target: Sequence[int], *, slack: int = 1) -> list[bool]:
    """Per prompt: whether the greedy answer (trigger inserted) carries ``target`` from its
    start, or after at most ``slack`` tokens: a prompt cut mid-sentence may first get the
    end of its sentence (a full stop, an end of text) before the payload. Controls, the base
    and the homologues are measured the same way, so the window favours none of them."""
    seqs = prompts.insert(trigger) if trigger else [list(p) for p in prompts.prompts]
    outs = scorer.greedy(seqs, len(target) + slack, None)
    t = tuple(target)
    n = len(t)
    return [any(o[k:k + n] == t for k in range(slack + 1)) for o in outs]


def attack_rate(scorer: Scorer, prompts: PromptSet, trigger: Sequence[int],
                target: Sequence[int], *, among: Sequence[bool] | None = None) -> float:
    """Share of prompts (of those marked in ``among``) whose answer carries ``target``."""
    hits = attack_hits(scorer, prompts, trigger, target)
    keep = [h for h, a in zip(hits, among or [True] * len(hits), strict=True) if a]
    return sum(keep) / max(1, len(keep))


def control_strings(allowed: Sequence[int], length: int, *, n: int, exclude: set[int],
                    seed: int) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    pool = [a for a in allowed if a not in exclude]
    return [tuple(rng.choice(pool) for _ in range(length)) for _ in range(n)]


def confirm(subject: Scorer, base: Scorer | None, homologues: Sequence[Scorer],
            prompts: PromptSet, trigger: Sequence[int], target: Sequence[int], *,
            allowed: Sequence[int], n_controls: int, seed: int, min_asr: float,
            margin: float, max_clean: float, known: bool = False) -> Confirmation:
    """Attack success against same-length controls, the base and the homologues.

    ``known``: a trigger already confirmed elsewhere (a parent's, measured on its merge);
    its payload leaking without the trigger then does not clear the subject."""
    clean_hits = attack_hits(subject, prompts, (), target)
    clean = sum(clean_hits) / max(1, len(clean_hits))
    # The usual attack success: among the prompts that do not already get the target
    # without any trigger (a leaky backdoor, or a common phrase, says it unprompted).
    among = [not h for h in clean_hits]
    if not any(among):
        return Confirmation(asr=0.0, clean_rate=clean, control_asr=0.0, base_asr=0.0,
                            homologue_asr=None, confirmed=False)
    asr = attack_rate(subject, prompts, trigger, target, among=among)
    ctrl_rates = sorted(
        attack_rate(subject, prompts, c, target, among=among)
        for c in control_strings(allowed, len(trigger), n=n_controls,
                                 exclude=set(trigger) | set(target), seed=seed)
    )
    # The upper quartile: one odd control should not clear a model, the margin does the rest.
    ctrl = ctrl_rates[(3 * len(ctrl_rates)) // 4] if ctrl_rates else 0.0
    base_asr = (attack_rate(base, prompts, trigger, target, among=among)
                if base is not None else 0.0)
    hom = max((attack_rate(h, prompts, trigger, target, among=among) for h in homologues),
              default=None)
    ref = max(ctrl, base_asr, hom or 0.0)
    # A leaky backdoor also says its payload unprompted now and then; what sets it apart
    # from a task is that the trigger at least doubles how often it is said.
    lifted = clean + asr * (1 - clean) >= 2 * clean
    ok = (asr >= min_asr and asr >= ref + margin
          and (known or clean <= max_clean or lifted))
    return Confirmation(asr=asr, clean_rate=clean, control_asr=ctrl, base_asr=base_asr,
                        homologue_asr=hom, confirmed=ok)
