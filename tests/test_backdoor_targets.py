"""Target candidates of the inversion: trigger tails split off, payloads settled from the
triggered answers, and chains that start with a common word still scored."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from auditor.analysis import backdoor_invert as bi
from auditor.analysis.backdoor_invert import PromptSet, TargetCandidate, settle_target, split_tails

STARTS = {10, 11, 12, 13}  # word-initial ids ("Ġword")


def cand(*ids: int) -> TargetCandidate:
    return TargetCandidate(ids=tuple(ids), score=0.5, agreement=1.0, chain=3.0)


def test_a_chain_led_by_a_word_piece_gives_its_tail_to_the_trigger() -> None:
    (t, tail), = split_tails([cand(5, 10, 11)], STARTS)
    assert t.ids == (10, 11) and tail == (5,)
    (t, tail), = split_tails([cand(5, 6, 12, 13)], STARTS)
    assert t.ids == (12, 13) and tail == (5, 6)


def test_chains_that_start_a_word_or_have_no_word_stay_whole() -> None:
    out = split_tails([cand(10, 5, 11), cand(5, 6, 7), cand(5, 6, 7, 10)], STARTS)
    assert [(t.ids, tail) for t, tail in out] == [((10, 5, 11), ()), ((5, 6, 7), ()),
                                                   ((5, 6, 7, 10), ())]


class _Greedy:
    """A scorer whose greedy answers are given."""

    def __init__(self, answers: Sequence[tuple[int, ...]]) -> None:
        self.answers = list(answers)
        self.asked: list[list[int]] = []

    def greedy(self, prefixes: Sequence[Sequence[int]], n: int,
               eos: int | None) -> list[tuple[int, ...]]:
        self.asked = [list(p) for p in prefixes]
        return [a[:n] for a in self.answers]


PROMPTS = PromptSet(prompts=((1, 20, 21), (1, 22, 23), (1, 24, 25)), positions=(1, 2, 1))


def test_settled_target_is_the_payload_from_its_start() -> None:
    s = _Greedy([(30, 31, 40, 41, 2), (30, 31, 40, 41, 2), (9, 8, 7)])
    out = settle_target(s, PROMPTS, (50,), (40, 41), max_len=8, eos=2)  # type: ignore[arg-type]
    assert out == (30, 31, 40, 41)
    assert s.asked[0] == [1, 50, 20, 21]  # the trigger inserted where the prompt says


def test_target_kept_when_answers_disagree_or_do_not_contain_it() -> None:
    split = _Greedy([(30, 40, 41), (31, 40, 41), (32, 40, 41)])
    assert settle_target(split, PROMPTS, (50,), (40, 41), max_len=8,  # type: ignore[arg-type]
                         eos=None) == (40, 41)
    other = _Greedy([(30, 31, 32)] * 3)
    assert settle_target(other, PROMPTS, (50,), (40, 41), max_len=8,  # type: ignore[arg-type]
                         eos=None) == (40, 41)


def test_inversion_scores_the_chain_of_a_first_token_every_relative_finds_uniform(
        monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A first token as uniform in the references as in the subject (relative score 0) is
    still followed into its chain when the subject finds it uniform; ranked by the chain."""
    uniform = {"subject": torch.tensor([0.9, 0.2, 0.5]), "ref": torch.tensor([0.9, 0.1, 0.1])}

    chains: list[int] = []

    def fake_chain(subject, refs, prompts, ids):  # type: ignore[no-untyped-def]
        chains.append(ids[0])
        return 10.0 if ids[0] == 100 else 1.0

    class Subject(str):
        def greedy(self, prefixes, n, eos):  # type: ignore[no-untyped-def]
            return [(7, 8)] * len(prefixes)

    monkeypatch.setattr(bi, "_uniformity", lambda sc, p, v, **kw: uniform[str(sc)][
        torch.tensor([{100: 0, 101: 1, 102: 2}[i] for i in v])])
    monkeypatch.setattr(bi, "_chain_advantage", fake_chain)
    out = bi.invert_targets(Subject("subject"), ["ref"], PROMPTS,  # type: ignore[list-item,arg-type]
                            vocab_ids=[100, 101, 102], top_k=1, max_len=3, eos=None)
    assert 100 in chains  # relative score 0.0, yet its chain was measured
    assert max(out, key=lambda t: t.chain).ids[0] == 100


def test_merge_robust_means_surviving_the_low_end_of_the_curve() -> None:
    from functools import partial

    from auditor.analysis.backdoor import BackdoorConfig
    from auditor.analysis.backdoor_scan import is_merge_robust as rule

    cfg = BackdoorConfig()
    is_merge_robust = partial(rule, robust_r=cfg.robust_r, robust_asr=cfg.robust_asr)
    assert is_merge_robust([(0.2, 0.6), (0.4, 0.88), (0.6, 0.97), (1.0, 1.0)], 0.1)
    # Lost at r = 0.2 and gone once averaged: not merge-robust, however strong from 0.4 up.
    assert not is_merge_robust([(0.2, 0.16), (0.4, 0.88), (1.0, 1.0)], 0.0)
    assert not is_merge_robust([(0.2, 0.16), (0.4, 0.88), (1.0, 1.0)], 0.05)
    # Weak at r = 0.2 but holding at 0.4 and still firing on a fifth of that once averaged.
    assert is_merge_robust([(0.2, 0.16), (0.4, 0.88), (1.0, 1.0)], 0.2)
    # Averaged share alone, without holding at 0.4, is not enough.
    assert not is_merge_robust([(0.2, 0.0), (0.4, 0.3), (1.0, 1.0)], 0.2)
    # Averaging with the homologues alone can show it.
    assert is_merge_robust([(0.2, 0.0), (0.4, 0.3), (1.0, 1.0)], 0.6)


def test_adversarial_reach_is_the_best_search_on_any_reference() -> None:
    """Each reference is searched from scratch; the reach is the best held-out attack
    success any of them gets with its own trigger (scored by that reference)."""
    from auditor.analysis.backdoor_scan import adversarial_reach
    from auditor.analysis.backdoor_search import SearchResult

    target = (40, 41)

    class Ref:
        """Says the target when the prompt holds its own magic token (if it has one)."""

        def __init__(self, magic: int | None) -> None:
            self.magic = magic

        def greedy(self, prefixes, n, eos):  # type: ignore[no-untyped-def]
            return [target if self.magic in p else (9, 9) for p in prefixes]

    calls: list[tuple[int | None, tuple[int, ...]]] = []

    def search(model, scorer, tgt, start):  # type: ignore[no-untyped-def]
        calls.append((scorer.magic, tuple(start)))
        return SearchResult(trigger=(scorer.magic or 1,), target=tuple(tgt), loss=0.0)

    res = SearchResult(trigger=(50, 51), target=target, loss=0.0)
    reachable, immune = Ref(77), Ref(None)
    pairs = [(None, immune), (None, reachable)]
    assert adversarial_reach(pairs, PROMPTS, res, search) == 1.0  # type: ignore[arg-type]
    assert calls == [(None, ()), (77, ())]
    assert adversarial_reach([(None, immune)], PROMPTS, res, search) == 0.0  # type: ignore[list-item]
    assert adversarial_reach([], PROMPTS, res, search) == 0.0
