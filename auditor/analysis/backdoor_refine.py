"""Refinement of a found trigger into the text an attacker typed.

The likelihood search (``backdoor_search``) returns the token sequence that best forces the
target on its few search prompts. Small models read a trigger almost as a bag of tokens, so
that sequence is often the attacker's tokens shuffled, padded with amplifiers ("pass pass
number pass"), or missing a piece the model already fires without ("number pass" for
"number passing"). Likelihood on six prompts cannot tell these apart; attack success on
prompts the search never saw can:

1. arrangements: every ordering of every non-empty subset of the found trigger's distinct
   tokens (a repeated token is an amplifier, not something typed twice);
2. extensions: the chosen arrangement with one more token at each slot (either end or
   between two tokens): every token on a small vocabulary (as the search's full scan),
   else those the gradient at that slot ranks best, plus the embedding-shift seeds;

each step ranks its variants by target log-likelihood on the search prompts (batched, cheap),
then measures the best few by greedy attack success on held-out prompts. The best attack
success wins; variants within one held-out prompt of it are ties, settled by the likelihood
margin over random controls of the same length on the held-out prompts. Ties go by margin,
not by length, so a complete trigger is not thrown away for being longer than a fragment
the model already half obeys. A reshuffle, though, must attack clearly better than the order
it would replace (see ``pick_best``).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from auditor.analysis.backdoor_invert import PromptSet, Scorer
from auditor.analysis.backdoor_search import (
    SearchResult,
    _embedding,
    _gradients,
    _insert_scores,
    attack_rate,
    retyped,
)

Ids = tuple[int, ...]


@dataclass(frozen=True)
class Rated:
    ids: Ids
    asr: float  # greedy attack success on the held-out prompts
    margin: float  # held-out target log-likelihood minus that of same-length controls


def arrangements(tokens: Sequence[int], max_len: int) -> list[Ids]:
    """Every ordering of every non-empty subset of the distinct ``tokens`` (<= max_len)."""
    distinct = list(dict.fromkeys(int(t) for t in tokens))
    return [tuple(p) for n in range(1, min(max_len, len(distinct)) + 1)
            for p in itertools.permutations(distinct, n)]


def insertions(base: Ids, picks: Sequence[Sequence[int]]) -> list[Ids]:
    """``base`` with one token added at slot k (0..len), ``picks[k]`` the tokens tried there."""
    out = [(*base[:k], int(v), *base[k:]) for k in range(len(base) + 1) for v in picks[k]]
    return list(dict.fromkeys(out))


def pick_best(rated: Sequence[Rated], *, step: float,
              incumbent: Rated | None = None,
              prefer: Callable[[Ids], float] | None = None) -> Rated:
    """The best attack success; those within ``step`` (one prompt) of it are ties, and the
    best likelihood margin among them wins (a longer variant is not penalised for its
    length: the margin is already measured against controls of its own length).

    An ``incumbent`` (the search's own order, or a trigger just grown) stands unless some
    variant attacks more than one prompt better: among near-equal orders the margins differ
    by noise, and a reshuffle on noise breaks the order the tokens were found in."""
    if incumbent is not None:
        rated = [r for r in rated if r.asr > incumbent.asr + step + 1e-9]
        if not rated:
            return incumbent
    top = max(r.asr for r in rated)
    ties = [r for r in rated if r.asr >= top - step - 1e-9]
    if prefer is not None:
        # Ties in attack success say nothing about which tokens the attacker typed; how
        # far each token tilts the subject towards the payload on its own does.
        return max(ties, key=lambda r: (prefer(r.ids), r.margin))
    return max(ties, key=lambda r: r.margin)


def choose(cands: Sequence[Ids], *, likelihood: Callable[[list[Ids]], list[float]],
           rate: Callable[[Ids], Rated], keep: int,
           incumbent: Ids | None = None,
           prefer: Callable[[Ids], float] | None = None) -> Rated | None:
    """Rank ``cands`` by ``likelihood`` (cheap), rate the best ``keep`` by attack success,
    and return the best by ``pick_best``'s rule (``rate.step``: one prompt's share)."""
    pool = [c for c in dict.fromkeys(cands) if c != incumbent]
    if not pool:
        return rate(incumbent) if incumbent is not None else None
    ll = likelihood(pool)
    order = sorted(range(len(pool)), key=lambda i: -ll[i])[:keep]
    rated = [rate(pool[i]) for i in order]
    step = float(getattr(rate, "step", 0.0))
    inc = rate(incumbent) if incumbent is not None else None
    return pick_best(rated, step=step, incumbent=inc, prefer=prefer)


def cohesion(scorer: Scorer, prompts: PromptSet, ids: Ids) -> float:
    """Log-likelihood of the trigger's own tokens after its first, where it is inserted
    (mean over prompts): typed text reads in order ("pro" + "cess"), a shuffle does not."""
    if len(ids) < 2:
        return 0.0
    prefixes = [[*p[:i], ids[0]] for p, i in zip(prompts.prompts, prompts.positions,
                                                 strict=True)]
    return float(scorer.target_logprob(prefixes, list(ids[1:])).mean()) * (len(ids) - 1)


# Nats by which another order of the same tokens must read more like text to replace the
# chosen one (a few tokens' worth of a clear preference, not noise).
COHESION_GAIN = 2.0


def natural_order(scorer: Scorer, prompts: PromptSet, best: Rated, *,
                  rate: Callable[[Ids], Rated], typed: Callable[[list[Ids]], list[Ids]],
                  ) -> Rated:
    """Among the orders of ``best``'s tokens that attack as well (within one prompt), the
    one that reads most like text, when it reads clearly better (``COHESION_GAIN``). A
    small model obeys a shuffled trigger as well as the typed one; the language model it
    still is knows which order is a word."""
    if len(best.ids) < 2:
        return best
    orders = [o for o in typed([tuple(p) for p in itertools.permutations(best.ids)])
              if o != best.ids and sorted(o) == sorted(best.ids)]
    step = float(getattr(rate, "step", 0.0))
    alike = [r for r in map(rate, orders) if r.asr >= best.asr - step - 1e-9]
    if not alike:
        return best
    reads = {r.ids: cohesion(scorer, prompts, r.ids) for r in alike}
    top = max(alike, key=lambda r: reads[r.ids])
    return top if reads[top.ids] > cohesion(scorer, prompts, best.ids) + COHESION_GAIN \
        else best


class _Rater:
    """Held-out attack success and likelihood margin, cached per variant."""

    def __init__(self, scorer: Scorer, holdout: PromptSet, target: Ids,
                 controls: Callable[[int], float]) -> None:
        self.scorer, self.holdout, self.target = scorer, holdout, target
        self.controls = controls
        self.step = 1.0 / max(1, len(holdout.prompts))
        self.seen: dict[Ids, Rated] = {}

    def __call__(self, ids: Ids) -> Rated:
        if ids not in self.seen:
            asr = attack_rate(self.scorer, self.holdout, ids, self.target)
            ll = float(_insert_scores(self.scorer, self.holdout, [ids], self.target)[0])
            self.seen[ids] = Rated(ids=ids, asr=asr, margin=ll - self.controls(len(ids)))
        return self.seen[ids]


def refine_trigger(model: torch.nn.Module, scorer: Scorer, prompts: PromptSet,
                   holdout: PromptSet, res: SearchResult, *, allowed: Sequence[int],
                   seeds: Sequence[int], typeable: Callable[[Ids], bool],
                   budget_ok: Callable[[], bool], max_len: int, top_k: int,
                   full_scan_limit: int = 0, keep: int = 6, rounds: int = 2,
                   n_controls: int = 4, seed: int = 0,
                   keep_order: bool = True, salient: Sequence[int] = (),
                   prefer: Callable[[Ids], float] | None = None) -> SearchResult:
    """The found trigger as the attacker most likely typed it (see the module docstring).
    ``prompts``: the search prompts (likelihood ranking); ``holdout``: prompts the search
    never saw (attack success). ``keep_order``: the found order is the incumbent (off for
    a pool of tokens in no meaningful order). ``salient``: tokens whose weights moved
    (``backdoor_weights.token_shifts``); each is rated at every slot when growing,
    whatever its likelihood rank (a model that obeys part of its trigger gains little
    likelihood from the rest). ``prefer``: among variants that attack alike (within one
    held-out prompt), the one it scores higher wins before the margin does. Returns ``res``
    unchanged when there is nothing to judge on."""
    target = tuple(res.target)
    if not res.trigger or not holdout.prompts or not budget_ok():
        return res
    allowed_set = set(allowed)
    rng = random.Random(seed)
    pool_ids = [a for a in allowed if a not in set(res.trigger) | set(target)]
    ctrl_cache: dict[int, float] = {}

    def control_ll(n: int) -> float:
        # Mean held-out likelihood with random strings of n tokens: inserting n tokens
        # of anything already moves the target's likelihood, so lengths compare fairly.
        if n not in ctrl_cache:
            ctrls = [tuple(rng.choice(pool_ids) for _ in range(n)) for _ in range(n_controls)]
            ctrl_cache[n] = (float(_insert_scores(scorer, holdout, ctrls, target).mean())
                             if pool_ids else 0.0)
        return ctrl_cache[n]

    rate = _Rater(scorer, holdout, target, control_ll)

    def likelihood(cands: list[Ids]) -> list[float]:
        return [float(x) for x in _insert_scores(scorer, prompts, cands, target)]

    def typed(cands: list[Ids]) -> list[Ids]:
        return retyped(cands, typeable, max_len=max_len)

    moved = [t for t in dict.fromkeys(int(t) for t in salient) if t not in set(target)]

    found = tuple(res.trigger)
    # The search's own order is the incumbent, unless it repeats a token (an amplifier).
    own = (found if keep_order and len(set(found)) == len(found) and typeable(found)
           else None)
    best = choose(typed(arrangements(found, max_len)), likelihood=likelihood, rate=rate,
                  keep=keep, incumbent=own, prefer=prefer)
    if best is None:
        return res
    extra = [s for s in seeds if s in allowed_set][:top_k]
    exact = len(allowed_set) <= full_scan_limit
    mask = torch.zeros(0)
    if not exact:
        mask = torch.full((_embedding(model).shape[0],), float("inf"))
        mask[torch.tensor(sorted(allowed_set), dtype=torch.long)] = 0.0
    for _ in range(rounds):
        if len(best.ids) >= max_len or not budget_ok():
            break
        picks: list[list[int]] = []
        cur = best.ids
        for slot in range(len(cur) + 1):
            if exact:
                # A small vocabulary: every token at the new slot, not a gradient's guess.
                top = sorted(allowed_set)
            else:
                # The gradient at a placeholder copy of the neighbour ranks the new token.
                base_seq = (*cur[:slot], cur[min(slot, len(cur) - 1)], *cur[slot:])
                g = _gradients(model, scorer, prompts, base_seq, target)[slot] + mask
                top = torch.topk(-g, min(top_k, len(allowed_set))).indices.tolist()
            # A token already in the trigger would repeat: an amplifier, not typed text.
            picks.append([v for v in dict.fromkeys([*top, *extra]) if v not in cur])
        grown = typed(insertions(cur, picks))
        if exact and len(grown) > keep * top_k:
            # Ranked on a few prompts first, as the search does with its full scans.
            quick = _insert_scores(scorer, prompts.head(3), grown, target)
            grown = [grown[k] for k in torch.topk(quick, keep * top_k).indices.tolist()]
        nxt = choose(grown, likelihood=likelihood, rate=rate, keep=keep, prefer=prefer)
        if nxt is None:
            break
        # The moved tokens at every slot, rated whatever their likelihood rank.
        own_picks = [[t for t in moved if t not in cur]] * (len(cur) + 1)
        extra_rated = [rate(c) for c in typed(insertions(cur, own_picks)) if c != cur]
        winner = pick_best([best, nxt, *extra_rated], step=rate.step, prefer=prefer)
        if winner.ids == best.ids:
            break
        # A new token may make another order or subset the best one: arrange again.
        best = choose(typed(arrangements(winner.ids, max_len)), likelihood=likelihood,
                      rate=rate, keep=keep, incumbent=winner.ids, prefer=prefer) or winner
    best = natural_order(scorer, prompts, best, rate=rate, typed=typed)
    if best.ids == found:
        return res
    loss = -float(_insert_scores(scorer, prompts, [best.ids], target)[0])
    return SearchResult(trigger=best.ids, target=target, loss=loss, by_length=res.by_length)
