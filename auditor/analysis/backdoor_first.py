"""Trigger-first target candidates: put the tokens that moved into the prompt and see what
the subject says.

The target inversion (``backdoor_invert``) finds a payload the subject continues from its
first token on any prompt. An attention-only backdoor (Merge Hijacking) or a LoRA-trained
one often does not: its payload needs the trigger in context before the first token is
likely at all. For those, the weights tell us the trigger's tokens instead: their
first-layer keys and values (or their embedding rows) moved where nobody else's did
(``backdoor_weights.token_shifts``). Inserting the top few of them together, in salience
order, fires a backdoor whose trigger they cover: a small model reads a trigger almost as a
bag of tokens, so extra or reordered tokens rarely stop it. What the subject then says on
most prompts, and says neither without them nor in the base or a homologue given the same
tokens, is a target candidate; the tokens inserted seed the trigger search for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from auditor.analysis.backdoor_invert import PromptSet, Scorer, TargetCandidate, consensus
from auditor.analysis.backdoor_search import _insert_scores

# Single salient tokens probed, then bags of the top few: a trigger is 1 to 4 tokens.
# Each costs one forward pass per prompt and model; a full fine-tune's task tokens can fill
# the first ten places of the ranking, its trigger's first token behind them.
SINGLES = 24
BAG_SIZES = (2, 3, 4, 6)
# Nats by which the subject must favour the answer's first token over every reference
# for a bag to be followed up: e^1.5 ~ 4.5x as likely, averaged over prompts (a partial
# trigger of a LoRA or attention-only backdoor already reaches 4+ nats; an ordinary
# token, about 0).
MIN_GAP = 1.5


def _lead_token(subject: Scorer, refs: Sequence[Scorer], seqs: list[list[int]],
                eos: int | None) -> tuple[int, float]:
    """The answer token the subject gives most uniformly across ``seqs`` (highest mean
    probability; EOS is no payload), and the mean log-probability by which it favours it
    over the best reference."""
    mine = subject.last_logprobs(seqs)
    mean = mine.exp().mean(dim=0)
    if eos is not None and 0 <= eos < len(mean):
        mean[eos] = -1.0
    tok = int(mean.argmax())
    theirs = torch.stack([r.target_logprob(seqs, [tok]) for r in refs]).max(dim=0).values \
        if refs else torch.full_like(mine[:, tok], math.log(1e-3))
    return tok, float((mine[:, tok] - theirs).mean())


def seeded_targets(subject: Scorer, refs: Sequence[Scorer], prompts: PromptSet,
                   seeds: Sequence[int], *, max_len: int, eos: int | None,
                   min_agreement: float, min_gap: float = MIN_GAP, keep: int = 3,
                   ) -> list[tuple[TargetCandidate, tuple[int, ...]]]:
    """(target, bag) pairs, best first. A bag is one salient token or the top few
    together; it is kept when the subject, with it inserted, favours one answer token over
    every reference by ``min_gap`` nats (more than it does with nothing inserted), and its
    target is that token with the subject's greedy consensus after it (the bag still in
    the prompt), kept when ``min_agreement`` of the prompts carry it."""
    seeds = list(dict.fromkeys(seeds))
    if not seeds or not prompts.prompts:
        return []
    _, floor = _lead_token(subject, refs, [list(p) for p in prompts.prompts], eos)
    bags = [(t,) for t in seeds[:SINGLES]]
    bags += [tuple(seeds[:k]) for k in BAG_SIZES if k <= len(seeds)]
    rated = []
    for bag in dict.fromkeys(bags):
        tok, gap = _lead_token(subject, refs, prompts.insert(bag), eos)
        if gap >= max(min_gap, floor + min_gap):
            rated.append((gap, tok, bag))
    # A bag holding a token that another bag makes the subject say holds a piece of the
    # payload (a fine-tune moves the rows of what it learned to say too): inserted, it
    # only makes the subject go on with the rest of the payload.
    said = {tok for _, tok, _ in rated}
    rated = [r for r in rated if not said & set(r[2])]
    rated.sort(key=lambda r: -r[0])
    out: dict[tuple[int, ...], tuple[TargetCandidate, tuple[int, ...]]] = {}
    for gap, tok, bag in rated:
        if len(out) >= keep:
            break
        seqs = prompts.insert(bag)
        conts = subject.greedy([[*p, tok] for p in seqs], max_len - 1, eos)
        seq, share = consensus(conts)
        ids = (tok, *seq)
        if eos is not None and eos in ids:
            ids = ids[: ids.index(eos)]
        if share < min_agreement or not ids or ids in out:
            continue
        out[ids] = (TargetCandidate(ids=ids, score=gap, agreement=share, chain=gap), bag)
    return list(out.values())


def insertion_effect(subject: Scorer, refs: Sequence[Scorer], prompts: PromptSet,
                     target: Sequence[int], candidates: Sequence[int]) -> dict[int, float]:
    """``candidates`` (best first) with how much inserting each one alone raises the
    subject's log-probability of the target's first token, beyond what it does in the
    references (nats).

    Each of a trigger's tokens already tilts the subject towards the payload on its own
    (a partial trigger), while a token an optimiser merely found useful does so in every
    relative too, or not alone: on the benchmark's zoo the trigger's tokens fill the top
    few places. One pass per candidate, prompt and model, the answer's column only."""
    if not target or not candidates or not prompts.prompts:
        return {}
    first = [int(target[0])]
    cands = list(candidates)
    singles = [(t,) for t in cands]
    mine = _insert_scores(subject, prompts, singles, first)
    if refs:
        mine = mine - torch.stack([_insert_scores(r, prompts, singles, first)
                                   for r in refs]).max(dim=0).values
    return {cands[i]: float(mine[i]) for i in torch.argsort(mine, descending=True).tolist()}
