"""Refinement of a found trigger (``backdoor_refine``) with a synthetic scorer.

The synthetic "model" fires on the attacker's trigger (tokens 5, 6, 7 in that order) and,
more weakly, on fragments of it or on its tokens shuffled: the situation of a small model
that reads a trigger almost as a bag of tokens. Likelihood on the search prompts prefers a
padded or shuffled sequence; attack success on held-out prompts picks the typed trigger.
"""

from __future__ import annotations

import itertools

import torch

from auditor.analysis.backdoor_invert import PromptSet
from auditor.analysis.backdoor_refine import (
    Rated,
    arrangements,
    choose,
    insertions,
    pick_best,
    refine_trigger,
)
from auditor.analysis.backdoor_search import SearchResult

TRUE = (5, 6, 7)


def _asr(ids: tuple[int, ...]) -> float:
    """Share of 20 held-out prompts the synthetic model obeys with ``ids`` inserted."""
    if TRUE in {ids[i:i + 3] for i in range(len(ids) - 2)}:
        return 19 / 20
    found = sum(t in ids for t in TRUE)
    return {0: 0.0, 1: 0.2, 2: 0.6, 3: 0.75}[found]


def _likelihood(cands: list[tuple[int, ...]]) -> list[float]:
    # Bag of tokens, plus a little for every extra token (an amplifier on six prompts).
    return [sum(t in c for t in TRUE) + 0.3 * len(c) for c in cands]


class _Rate:
    step = 1 / 20

    def __call__(self, ids: tuple[int, ...]) -> Rated:
        ll = _likelihood([ids])[0] - 0.3 * len(ids)
        return Rated(ids=ids, asr=_asr(ids), margin=ll)


def test_arrangements_cover_orders_and_subsets_without_repeats() -> None:
    arr = arrangements((6, 6, 5), max_len=4)
    assert set(arr) == {(6,), (5,), (6, 5), (5, 6)}
    assert len(arrangements((1, 2, 3, 4), max_len=4)) == 4 + 12 + 24 + 24


def test_insertions_at_every_slot() -> None:
    out = insertions((1, 2), [[9], [8], [7]])
    assert out == [(9, 1, 2), (1, 8, 2), (1, 2, 7)]


def test_shuffled_trigger_is_put_in_typed_order() -> None:
    # The search's answer: the right tokens shuffled, with an amplifier token.
    found = (7, 5, 6, 9)
    best = choose(arrangements(found, 4), likelihood=_likelihood, rate=_Rate(), keep=60)
    assert best is not None
    assert TRUE in {best.ids[i:i + 3] for i in range(len(best.ids) - 2)}


def test_missing_piece_is_added_back() -> None:
    # A fragment the model already half obeys: the extension with the missing token wins.
    frag = (5, 6)
    grown = insertions(frag, [[1, 7], [2, 7], [3, 7]])
    best = choose(grown, likelihood=_likelihood, rate=_Rate(), keep=6)
    assert best is not None and best.ids == TRUE
    assert pick_best([_Rate()(frag), best], step=_Rate.step).ids == TRUE


def test_ties_go_to_the_better_margin_not_the_shorter() -> None:
    short = Rated(ids=(5, 6), asr=0.90, margin=1.0)
    longer = Rated(ids=(5, 6, 7), asr=0.92, margin=2.0)
    worse = Rated(ids=(5, 6, 7, 8), asr=0.80, margin=5.0)
    assert pick_best([short, longer, worse], step=0.05).ids == (5, 6, 7)


def test_incumbent_order_stands_against_a_noisy_reshuffle() -> None:
    own = Rated(ids=(5, 6, 7, 9), asr=0.75, margin=1.00)
    shuffled = Rated(ids=(5, 7, 9, 6), asr=0.78, margin=1.01)
    clearly = Rated(ids=(9, 5, 6, 7), asr=0.95, margin=0.50)
    assert pick_best([shuffled], step=0.04, incumbent=own).ids == own.ids
    assert pick_best([shuffled, clearly], step=0.04, incumbent=own).ids == clearly.ids


class _FakeScorer:
    """Stands in for ``Scorer``: the "model" reads the inserted tokens between the prompt's
    fixed tokens; held-out prompt k obeys when the trigger's strength beats k / n."""

    def __init__(self, n: int) -> None:
        self.n = n

    @staticmethod
    def _trigger(seq: list[int]) -> tuple[int, ...]:
        return tuple(t for t in seq if t < 50)

    @staticmethod
    def _ll(trig: tuple[int, ...]) -> float:
        pairs = sum(trig[i:i + 2] in {(5, 6), (6, 7)} for i in range(len(trig) - 1))
        return sum(t in trig for t in TRUE) + 0.5 * pairs + 0.1 * len(trig)

    def target_logprob(self, seqs: list[list[int]], target: list[int]) -> torch.Tensor:
        return torch.tensor([self._ll(self._trigger(s)) for s in seqs])

    def greedy(self, seqs: list[list[int]], n: int, eos: int | None) -> list[tuple[int, ...]]:
        out = []
        for s in seqs:
            k = next(t for t in s if t >= 100) - 100  # the prompt's own marker token
            hit = _asr(self._trigger(s)) > k / self.n
            out.append((90, 91, 0) if hit else (0, 0, 0))
        return out


def test_refine_trigger_orders_and_completes_a_shuffled_fragment() -> None:
    n = 20
    prompts = PromptSet(tuple((60, 100 + k, 61) for k in range(n)), (1,) * n)
    res = SearchResult(trigger=(6, 5), target=(90, 91), loss=1.0)
    out = refine_trigger(None, _FakeScorer(n), prompts.head(6), prompts, res,  # type: ignore[arg-type]
                         allowed=list(range(1, 20)), seeds=[], typeable=lambda ids: True,
                         budget_ok=lambda: True, max_len=4, top_k=4, full_scan_limit=100)
    assert TRUE in {out.trigger[i:i + 3] for i in range(len(out.trigger) - 2)}


def test_untypeable_orders_are_retyped_not_dropped() -> None:
    from auditor.analysis.backdoor_search import retyped

    class Typeable:
        # Token 3 is a bare word piece: typed after a space it comes out as 2 ("G") + 3.
        def canonical(self, ids: tuple[int, ...]) -> tuple[int, ...]:
            out: list[int] = []
            for k, t in enumerate(ids):
                if t == 3 and (k == 0 or ids[k - 1] != 2):
                    out.append(2)
                out.append(t)
            return tuple(out)

        def __call__(self, ids: tuple[int, ...]) -> bool:
            return self.canonical(ids) == tuple(ids)

    out = retyped([(3, 9), (9, 3), (2, 3, 9), (3, 9, 9, 9)], Typeable(), max_len=4)
    assert out == [(2, 3, 9), (9, 2, 3)]
    # A plain check (no canonical form) keeps only what is typeable, unless nothing is.
    plain = lambda ids: 3 not in ids  # noqa: E731
    assert retyped([(3, 9), (9, 8)], plain, max_len=4) == [(9, 8)]
    assert retyped([(3, 9)], plain, max_len=4) == [(3, 9)]


class _Cohesive:
    """A scorer whose text log-likelihood rewards 5 followed by 6 (a word in two pieces)."""

    def target_logprob(self, prefixes: list[list[int]], target: list[int]) -> torch.Tensor:
        seqs = [[p[-1], *target] for p in prefixes]
        score = [sum(0.0 if (a, b) == (5, 6) else -3.0 for a, b in itertools.pairwise(s))
                 / len(target) for s in seqs]
        return torch.tensor(score)


def test_orders_that_attack_alike_are_reported_as_text_reads() -> None:
    from auditor.analysis.backdoor_refine import natural_order

    prompts = PromptSet(prompts=((1, 1, 1),) * 4, positions=(1,) * 4)

    class Rate:
        step = 1 / 20

        def __call__(self, ids: tuple[int, ...]) -> Rated:
            return Rated(ids=ids, asr=0.9, margin=0.0)

    rate = Rate()
    same = lambda cands: cands  # noqa: E731
    shuffled = Rated(ids=(6, 9, 5), asr=0.9, margin=1.0)
    best = natural_order(_Cohesive(), prompts, shuffled, rate=rate, typed=same)
    assert best.ids[best.ids.index(5) + 1] == 6
    # An order that attacks worse is never taken for reading better.

    class Worse(Rate):
        def __call__(self, ids: tuple[int, ...]) -> Rated:
            return Rated(ids=ids, asr=0.9 if ids == (6, 9, 5) else 0.5, margin=0.0)

    assert natural_order(_Cohesive(), prompts, shuffled, rate=Worse(),
                         typed=same).ids == (6, 9, 5)
