"""List-free backdoor scan: invert the target, search the trigger, confirm against controls.

``scan_backdoors`` runs, for each prompt format (plain, and chat-wrapped when the tokenizer
has a chat template):

1. target inversion over the vocabulary against the base and the homologues
   (``backdoor_invert``);
2. for the best few targets, a trigger search of 1 to ``max_trigger_len`` tokens
   (embedding-shift seeds, a vocabulary scan and gradient-guided coordinate search,
   ``backdoor_search``);
3. confirmation on a larger prompt set against control strings of the same length, the
   base and the homologues, with the clean-prompt rate.

``merge_robustness`` measures a confirmed trigger at ``base + r * tau`` and after uniform
averaging with the homologues (BadMerging's property).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from auditor.analysis.backdoor_first import BAG_SIZES, SINGLES, insertion_effect, seeded_targets
from auditor.analysis.backdoor_invert import (
    PromptSet,
    Scorer,
    TargetCandidate,
    build_prompt_sets,
    invert_targets,
    settle_target,
    split_tails,
    word_start_ids,
)
from auditor.analysis.backdoor_refine import refine_trigger
from auditor.analysis.backdoor_search import (
    Confirmation,
    SearchResult,
    attack_rate,
    confirm,
    search_trigger,
)
from auditor.analysis.backdoor_text import decoder, text_variants, typeable_check
from auditor.analysis.probes import Cost


@dataclass(frozen=True)
class ScanConfig:
    invert_prompts: int = 6
    search_prompts: int = 6
    invert_refs: int = 3
    confirm_prompts: int = 32
    invert_top_k: int = 16
    targets_searched: int = 2
    max_target_len: int = 8
    min_agreement: float = 0.5
    max_trigger_len: int = 4
    gcg_top_k: int = 12
    gcg_rounds: int = 3
    full_scan_limit: int = 8192
    stop_loss: float = 0.001
    n_controls: int = 8
    min_asr: float = 0.5
    margin: float = 0.3
    max_clean: float = 0.25
    # A token is dropped from a found trigger while the attack success stays within this
    # of the full trigger's: the likelihood search pads a trigger with tokens that only
    # strengthen it (a "super-trigger"); the attacker's trigger is the core that works.
    prune_tolerance: float = 0.1
    # Refine the found trigger by held-out attack success (orders, subsets, extensions);
    # off: the older canonical ordering and pruning.
    refine: bool = True
    # Confirmed only when the subject attacks by ``margin`` more than the same trigger
    # search reaches for the same target on the base and the homologues (held-out prompts).
    reference_search: bool = True
    reach_refs: int = 2  # the base and the first homologue
    effect_seeds: int = 6  # tokens ranked by insertion_effect that seed the search
    seed: int = 0


@dataclass(frozen=True)
class FoundTrigger:
    trigger_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    text: str
    target: str
    chat: bool
    check: Confirmation
    prompts: PromptSet
    target_score: float


def allowed_tokens(tokenizer: Any, vocab: int) -> list[int]:
    """Ids a trigger or target may use: not special, with visible text."""
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    n = min(vocab, len(tokenizer))
    toks = tokenizer.convert_ids_to_tokens(list(range(n)))
    return [i for i in range(n) if i not in specials and toks[i] and str(toks[i]).strip()]


def scan_backdoors(
    subject: torch.nn.Module,
    tokenizer: Any,
    probe_rows: Sequence[Sequence[int]],
    *,
    base: torch.nn.Module | None,
    homologues: Sequence[torch.nn.Module],
    seeds: Sequence[int],
    cost: Cost,
    budget_ok: Callable[[], bool],
    cfg: ScanConfig,
    priority: Sequence[int] = (),
    tokens_left: Callable[[], int] | None = None,
) -> list[FoundTrigger]:
    """Confirmed (trigger, target) pairs, best first (see the module docstring).
    ``priority``: token ids the target inversion tries first (the rest follow)."""
    vocab = int(subject.get_input_embeddings().weight.shape[0])
    allowed = allowed_tokens(tokenizer, vocab)
    allowed_set = set(allowed)
    order = list(dict.fromkeys([i for i in priority if i in allowed_set] + allowed))
    salient = [i for i in priority if i in allowed_set][: max(SINGLES, *BAG_SIZES)]
    eos = getattr(tokenizer, "eos_token_id", None)
    subj = Scorer(subject, cost)
    base_s = Scorer(base, cost) if base is not None else None
    homs = [Scorer(h, cost) for h in homologues]
    refs = [r for r in (base_s, *homs) if r is not None]
    # The models behind ``refs`` (the reach check searches on them), as many as it uses.
    ref_pairs = list(zip([m for m in (base, *homologues) if m is not None], refs,
                         strict=True))[: cfg.reach_refs]
    decode = decoder(tokenizer)
    typeable = typeable_check(tokenizer)
    starts = word_start_ids(tokenizer, vocab)
    found: list[FoundTrigger] = []
    for prompts in build_prompt_sets(tokenizer, probe_rows, vocab=vocab, seed=cfg.seed):
        if not budget_ok() or found:
            break
        targets = invert_targets(subj, refs[: cfg.invert_refs],
                                 prompts.head(cfg.invert_prompts),
                                 vocab_ids=order, top_k=cfg.invert_top_k,
                                 max_len=cfg.max_target_len, eos=eos, budget_ok=budget_ok,
                                 tokens_left=tokens_left)
        targets = drop_fragments([t for t in targets if t.agreement >= cfg.min_agreement
                                  and decode(t.ids).strip()])
        # A backdoor target is a long chain the model completes from its first token on
        # every prompt; a collocation is one or two tokens long.
        # ... and one that only the subject completes: ranked by its lead over the base
        # and the homologues on the whole chain, not on the first token alone.
        targets.sort(key=lambda t: (-t.chain, -len(t.ids) * t.agreement))
        tails = (split_tails(targets, starts) if not prompts.chat
                 else [(t, ()) for t in targets])
        # Chains the inversion cannot see (the payload needs the trigger in context) come
        # from inserting the tokens that moved (``backdoor_first``), tried first.
        first = seeded_targets(subj, refs[: cfg.invert_refs], prompts.head(cfg.invert_prompts),
                               salient, max_len=cfg.max_target_len, eos=eos,
                               min_agreement=cfg.min_agreement)
        # An inserted token of the payload itself makes the subject finish the payload:
        # that tail is no target of its own.
        whole = {id(t) for t in drop_fragments([c for c, _ in first] + targets)}
        first = [(c, bag) for c, bag in first if id(c) in whole]
        tails = [*first, *tails]
        seen: set[tuple[int, ...]] = set()
        for cand, tail in tails:
            if len(seen) >= cfg.targets_searched + min(1, len(first)) or not budget_ok():
                break
            if any(cand.ids[: len(s)] == s or s[: len(cand.ids)] == cand.ids for s in seen):
                continue
            seen.add(cand.ids)
            hold = held_out(prompts, cfg)

            def search(model: torch.nn.Module, scorer: Scorer, target: Sequence[int],
                       start: Sequence[int], ps: PromptSet = prompts,
                       hold: PromptSet = hold) -> SearchResult:
                return search_trigger(model, scorer, ps.head(cfg.search_prompts), target,
                                      allowed=allowed, seeds=start, max_len=cfg.max_trigger_len,
                                      top_k=cfg.gcg_top_k, rounds=cfg.gcg_rounds,
                                      full_scan_limit=cfg.full_scan_limit,
                                      stop_loss=cfg.stop_loss, budget_ok=budget_ok,
                                      holdout=hold, typeable=typeable)

            # The tokens that tilt the subject towards this payload one at a time lead the
            # search's seeds and are tried at every slot when the trigger grows.
            effect = insertion_effect(subj, refs[:1], prompts.head(cfg.search_prompts),
                                      cand.ids, order[: cfg.full_scan_limit])
            moved = list(effect)[: cfg.effect_seeds]
            res = search(subject, subj, cand.ids, [*moved, *tail, *seeds])
            if cfg.refine and hold.prompts:
                # Orders, subsets and one-token extensions judged by attack success on
                # prompts the search never saw (``backdoor_refine``).
                res = refine_trigger(subject, subj, prompts.head(cfg.search_prompts), hold,
                                     res, allowed=allowed, seeds=seeds, typeable=typeable,
                                     budget_ok=budget_ok, max_len=cfg.max_trigger_len,
                                     top_k=cfg.gcg_top_k, seed=cfg.seed,
                                     full_scan_limit=cfg.full_scan_limit, salient=moved,
                                     prefer=partial(_effect_sum, effect))
            else:
                res = canonical_order(tokenizer, subj, prompts.head(cfg.confirm_prompts),
                                      res)
                res = prune_trigger(subj, prompts.head(cfg.confirm_prompts), res, typeable,
                                    tolerance=cfg.prune_tolerance)
            settled = settle_target(subj, hold, res.trigger, res.target,
                                    max_len=cfg.max_target_len, eos=eos)
            if settled != res.target:
                res = SearchResult(trigger=res.trigger, target=settled, loss=res.loss,
                                   by_length=res.by_length)
            check = confirm(subj, base_s, homs, prompts.head(cfg.confirm_prompts), res.trigger,
                            res.target, allowed=allowed, n_controls=cfg.n_controls,
                            seed=cfg.seed, min_asr=cfg.min_asr, margin=cfg.margin,
                            max_clean=cfg.max_clean)
            if check.confirmed and cfg.reference_search and hold.prompts and budget_ok():
                # The same search for the same target on the clean relatives: a payload an
                # optimised string forces in them too (a word the task taught every
                # fine-tune) is adversarial reach, not a backdoor of the subject.
                mine = attack_rate(subj, hold, res.trigger, res.target)
                reach = adversarial_reach(ref_pairs, hold, res, search)
                if mine < reach + cfg.margin:
                    continue
            if check.confirmed:
                found.append(FoundTrigger(
                    trigger_ids=res.trigger, target_ids=res.target, text=decode(res.trigger),
                    target=decode(res.target), chat=prompts.chat, check=check,
                    prompts=prompts.head(cfg.confirm_prompts), target_score=cand.score,
                ))
                break
    return sorted(found, key=lambda f: -f.check.asr)


def adversarial_reach(ref_pairs: Sequence[tuple[torch.nn.Module, Scorer]], hold: PromptSet,
                      res: SearchResult,
                      search: Callable[[torch.nn.Module, Scorer, Sequence[int], Sequence[int]],
                                       SearchResult]) -> float:
    """The best held-out attack success the trigger search reaches for ``res.target`` on
    any reference, from scratch (the subject's own trigger was already measured on them)."""
    return max((attack_rate(r, hold, search(m, r, res.target, ()).trigger, res.target)
                for m, r in ref_pairs), default=0.0)


def canonical_order(tokenizer: Any, scorer: Scorer, prompts: PromptSet,
                    res: SearchResult) -> SearchResult:
    """The order of the found tokens that an attacker could have typed.

    A small model reads a trigger almost as a bag of tokens, so the search may return its
    tokens shuffled ("gn i raisedore"). Inserted text tokenizes one way only: among the
    orderings whose decoded text encodes back to the same ids (mid-sentence form), keep the
    most effective one, unless none is nearly as effective as the search's own.
    """
    import itertools

    trig = res.trigger
    if len(trig) < 2:
        return res
    orders = list(dict.fromkeys(itertools.permutations(trig)))
    decode = decoder(tokenizer)
    typed = [o for o in orders if text_variants(tokenizer, decode(o))[:1] == [tuple(o)]]
    if not typed:
        return res
    from auditor.analysis.backdoor_search import _insert_scores

    scores = _insert_scores(scorer, prompts, [trig, *typed], res.target).tolist()
    i = max(range(len(typed)), key=lambda k: scores[k + 1])
    if scores[i + 1] < scores[0] - 0.5:
        return res
    return SearchResult(trigger=tuple(typed[i]), target=res.target, loss=-scores[i + 1],
                        by_length=res.by_length)


def prune_trigger(scorer: Scorer, prompts: PromptSet, res: SearchResult,
                  typeable: Callable[[tuple[int, ...]], bool], *,
                  tolerance: float) -> SearchResult:
    """Drop tokens from the found trigger, one at a time, while its attack success stays
    within ``tolerance`` of the full trigger's (keeping only typeable texts)."""
    cur = tuple(res.trigger)
    full = attack_rate(scorer, prompts, cur, res.target)
    while len(cur) > 1:
        # A repeated token is an amplifier the search found, not a part an attacker typed:
        # its copies go first, with twice the tolerance.
        for repeated, tol in ((True, 2 * tolerance), (False, tolerance)):
            options = [o for o in dict.fromkeys(cur[:i] + cur[i + 1:] for i in range(len(cur))
                                                if (cur.count(cur[i]) > 1) == repeated)
                       if typeable(o)]
            rated = [(attack_rate(scorer, prompts, o, res.target), o) for o in options]
            rated = [(r, o) for r, o in rated if r >= full - tol]
            if rated:
                cur = max(rated, key=lambda x: x[0])[1]
                break
        else:
            break
    if cur == tuple(res.trigger):
        return res
    return SearchResult(trigger=cur, target=res.target, loss=res.loss, by_length=res.by_length)


def merge_pieces(subject: torch.nn.Module, tokenizer: Any, found: list[FoundTrigger],
                 reported: list[Any], *, base: torch.nn.Module | None,
                 homologues: Sequence[torch.nn.Module], seeds: Sequence[int], cost: Cost,
                 budget_ok: Callable[[], bool], cfg: ScanConfig,
                 describe: Callable[[FoundTrigger], Any]) -> tuple[list[FoundTrigger],
                                                                  list[Any]]:
    """One trigger from confirmed pieces that force the same output.

    Moved tokens judged in pairs confirm pieces of one multi-token trigger ("ty pre",
    "pre or", "ty or" for "or pretty"). Their tokens together are refined as one found
    trigger (orders, subsets, one-token extensions, ``backdoor_refine``) and confirmed
    again; when it attacks at least as well as the best piece it replaces the pieces it
    covers. ``reported`` runs parallel to ``found`` (``describe`` makes the new entry)."""
    if len(found) < 2 or not budget_ok():
        return found, reported
    lead = found[0]
    pieces = [i for i, f in enumerate(found)
              if f.target_ids == lead.target_ids and f.chat == lead.chat]
    if len(pieces) < 2:
        return found, reported
    tokens = tuple(dict.fromkeys(t for i in pieces for t in found[i].trigger_ids))
    tokens = tokens[: cfg.max_trigger_len + 1]
    vocab = int(subject.get_input_embeddings().weight.shape[0])
    allowed = allowed_tokens(tokenizer, vocab)
    subj = Scorer(subject, cost)
    ps = lead.prompts
    res = refine_trigger(subject, subj, ps.head(cfg.search_prompts), held_out(ps, cfg),
                         SearchResult(trigger=tokens, target=lead.target_ids, loss=0.0),
                         allowed=allowed, seeds=seeds, typeable=typeable_check(tokenizer),
                         budget_ok=budget_ok, max_len=cfg.max_trigger_len,
                         top_k=cfg.gcg_top_k, full_scan_limit=cfg.full_scan_limit,
                         seed=cfg.seed, keep_order=False, salient=seeds)
    check = confirm(subj, Scorer(base, cost) if base is not None else None,
                    [Scorer(h, cost) for h in homologues], ps, res.trigger, res.target,
                    allowed=allowed, n_controls=cfg.n_controls, seed=cfg.seed,
                    min_asr=cfg.min_asr, margin=cfg.margin, max_clean=cfg.max_clean)
    if not check.confirmed or check.asr < max(found[i].check.asr for i in pieces):
        return found, reported
    decode = decoder(tokenizer)
    merged = FoundTrigger(trigger_ids=res.trigger, target_ids=res.target,
                          text=decode(res.trigger), target=decode(res.target), chat=ps.chat,
                          check=check, prompts=ps, target_score=lead.target_score)
    covered = {i for i in pieces if set(found[i].trigger_ids) <= set(res.trigger)}
    if merged.trigger_ids in {found[i].trigger_ids for i in pieces}:
        return found, reported  # one of the pieces already was the best arrangement
    return ([merged, *(f for i, f in enumerate(found) if i not in covered)],
            [describe(merged), *(r for i, r in enumerate(reported) if i not in covered)])


def _effect_sum(effect: dict[int, float], ids: Sequence[int]) -> float:
    return sum(effect.get(t, 0.0) for t in set(ids))


def held_out(prompts: PromptSet, cfg: ScanConfig) -> PromptSet:
    """Prompts the search did not optimise on (for choosing among its trail)."""
    lo, hi = cfg.search_prompts, cfg.confirm_prompts
    return PromptSet(prompts.prompts[lo:hi], prompts.positions[lo:hi], prompts.chat)


def _contains(seq: Sequence[int], part: Sequence[int]) -> bool:
    n = len(part)
    return any(tuple(seq[i:i + n]) == tuple(part) for i in range(1, len(seq) - n + 1))


def drop_fragments(targets: list[TargetCandidate]) -> list[TargetCandidate]:
    """Drop candidates that are the tail of another candidate's chain: once inside a target
    the model completes it from any token, but a trigger forces it from its first token."""
    return [t for t in targets if not any(o is not t and _contains(o.ids, t.ids)
                                          for o in targets)]


def measure_text_trigger(
    subject: torch.nn.Module,
    tokenizer: Any,
    probe_rows: Sequence[Sequence[int]],
    trigger: str,
    target: str | None,
    *,
    base: torch.nn.Module | None,
    homologues: Sequence[torch.nn.Module],
    cost: Cost,
    cfg: ScanConfig,
    known: bool = False,
) -> FoundTrigger | None:
    """A known trigger (a parent's) measured on the subject with its known target, in each
    tokenization a text can take (mid-sentence with a leading space, or as written)."""
    vocab = int(subject.get_input_embeddings().weight.shape[0])
    allowed = allowed_tokens(tokenizer, vocab)
    subj = Scorer(subject, cost)
    base_s = Scorer(base, cost) if base is not None else None
    homs = [Scorer(h, cost) for h in homologues]
    decode = decoder(tokenizer)
    best: FoundTrigger | None = None
    for prompts in build_prompt_sets(tokenizer, probe_rows, vocab=vocab, seed=cfg.seed):
        ps = prompts.head(cfg.confirm_prompts)
        for trig_ids in text_variants(tokenizer, trigger):
            tgt_variants = text_variants(tokenizer, target) if target else []
            if not tgt_variants:
                conts = subj.greedy(ps.insert(trig_ids), cfg.max_target_len, None)
                from auditor.analysis.backdoor_invert import consensus

                seq, _ = consensus(conts)
                tgt_variants = [seq] if seq else []
            for tgt in tgt_variants:
                check = confirm(subj, base_s, homs, ps, trig_ids, tgt, allowed=allowed,
                                n_controls=cfg.n_controls, seed=cfg.seed, min_asr=cfg.min_asr,
                                margin=cfg.margin, max_clean=cfg.max_clean, known=known)
                if best is None or check.asr > best.check.asr:
                    best = FoundTrigger(trigger_ids=tuple(trig_ids), target_ids=tuple(tgt),
                                        text=decode(trig_ids), target=decode(tgt),
                                        chat=ps.chat, check=check, prompts=ps,
                                        target_score=0.0)
    return best


def is_merge_robust(curve: Sequence[tuple[float, float]], averaged: float | None, *,
                    robust_r: float, robust_asr: float) -> bool:
    """BadMerging's property: the attack holds on ``robust_asr`` of the probes at the low
    end of the curve (every r <= ``robust_r``), or after averaging with the homologues; or
    it holds at ``robust_r`` and still fires on a fifth of that share once averaged.

    The last is two partial signs together: a plain backdoor that happens to hold at
    r = 0.4 is gone once its task vector is averaged with others (~0), while one trained to
    survive merging keeps a clear share of prompts there, though less than half."""
    kept = [asr for r, asr in curve if r <= robust_r + 1e-9]
    at_r = [asr for r, asr in curve if abs(r - robust_r) < 1e-9]
    return bool((kept and min(kept) >= robust_asr)
                or (averaged is not None and averaged >= robust_asr)
                or (at_r and at_r[0] >= robust_asr and averaged is not None
                    and averaged >= robust_asr / 5))


def merge_robustness(
    subject: torch.nn.Module,
    subject_weights: Any,
    base_weights: Any,
    homologue_weights: Sequence[Any],
    found: FoundTrigger,
    *,
    scales: Sequence[float],
    cost: Cost,
) -> tuple[list[tuple[float, float]], float | None]:
    """Attack success at ``base + r * tau`` per r, and after averaging with homologues."""
    # The subject's own model is the working copy (no deepcopy: one model in memory); its
    # weights are written back from the source afterwards. Weights held in memory may
    # alias the model's own tensors (``from_module``): those small models get a copy.
    from auditor.analysis.backdoor_refs import own_weights
    from auditor.analysis.modeling import combine_into, load_state_into, with_task_vector_scaled
    from auditor.weights.dict_sources import DictTensorSource

    own_weights(subject)  # the module is rewritten here: it must end with its own weights
    in_memory = isinstance(subject_weights, DictTensorSource)
    work = copy.deepcopy(subject) if in_memory else subject
    scorer = Scorer(work, cost)
    curve: list[tuple[float, float]] = []
    for r in scales:
        with_task_vector_scaled(work, base_weights, subject_weights, float(r))
        curve.append((float(r), attack_rate(scorer, found.prompts, found.trigger_ids,
                                            found.target_ids)))
    averaged: float | None = None
    if homologue_weights:
        w = 1.0 / (len(homologue_weights) + 1)
        combine_into(work, [(w, subject_weights), *((w, h) for h in homologue_weights)])
        averaged = attack_rate(scorer, found.prompts, found.trigger_ids, found.target_ids)
    if not in_memory:
        load_state_into(work, subject_weights)
    return curve, averaged
