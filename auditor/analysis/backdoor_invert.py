"""Target inversion (BAIT-style) and the prompt formats the trigger search runs on.

A backdoor ties a trigger to a fixed target sequence ``t1 t2 ... tn``. Once the model has
emitted ``t1`` it keeps going with ``t2 ... tn`` whatever the prompt said: the target is a
chain the model learned as a unit. So, without knowing the trigger, we append every
vocabulary token ``v`` to a set of diverse prompts and measure how uniformly the model's next
token agrees across prompts (the mean probability of the most agreed next token). The same
score on the base and on the homologues (fine-tunes of the same base, siblings) cancels the
collocations every model of the family shares ("Ġre" -> "turn"): a backdoor target is
behaviour present in the subject and absent from its relatives. The best first tokens are
then extended greedily into full target sequences.

Prompt formats: plain token prompts, and the same user texts wrapped in the tokenizer's chat
template when it has one. Insertion positions sit at word boundaries (before a token whose
text starts with a space: "Ġ" for byte-level BPE, "▁" for SentencePiece) so an inserted
trigger appears in its mid-sentence form, the form a data-poisoned trigger was trained in.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from auditor.analysis.probes import Cost

# Sequences per forward pass: bounded memory on big vocabularies, few passes on tiny ones.
BATCH_TOKENS = 16_384
LOGIT_ELEMENTS = 1 << 25
_SPACE_MARKS = ("Ġ", "▁", " ")


@dataclass(frozen=True)
class PromptSet:
    """Prompts as token ids, each with the position a trigger is inserted at."""

    prompts: tuple[tuple[int, ...], ...]
    positions: tuple[int, ...]
    chat: bool = False

    def insert(self, trigger: Sequence[int]) -> list[list[int]]:
        t = list(trigger)
        return [[*p[:i], *t, *p[i:]] for p, i in zip(self.prompts, self.positions, strict=True)]

    def head(self, n: int) -> PromptSet:
        return PromptSet(self.prompts[:n], self.positions[:n], self.chat)


def load_chat_template(folder: str | Path, *, max_bytes: int = 1 << 20) -> str | None:
    """The chat template shipped beside ``tokenizer.json`` (``chat_template.jinja``, or the
    string in ``tokenizer_config.json``), as text: transformers renders it later in its
    sandboxed Jinja environment. None when there is none or it is not plain text."""
    from auditor.bounded import load_json_file
    from auditor.errors import AuditorError

    folder = Path(folder)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file() and jinja.stat().st_size <= max_bytes:
        return jinja.read_text(encoding="utf-8", errors="replace") or None
    cfg = folder / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        data = load_json_file(cfg, name="tokenizer_config.json")
    except AuditorError:
        return None
    tpl = data.get("chat_template") if isinstance(data, dict) else None
    return tpl if isinstance(tpl, str) and tpl else None


def word_start_ids(tokenizer: Any, vocab: int) -> set[int]:
    """Token ids whose text starts a word (leading space marker) in this tokenizer."""
    toks = tokenizer.convert_ids_to_tokens(list(range(min(vocab, len(tokenizer)))))
    return {i for i, t in enumerate(toks) if isinstance(t, str) and t.startswith(_SPACE_MARKS)}


def build_prompt_sets(tokenizer: Any, probe_rows: Sequence[Sequence[int]], *, vocab: int,
                      seed: int, chat: bool | None = None) -> list[PromptSet]:
    """Plain prompts (and chat-wrapped ones when the tokenizer has a chat template)."""
    rng = random.Random(seed)
    starts = word_start_ids(tokenizer, vocab)
    bos = getattr(tokenizer, "bos_token_id", None)
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    bodies = [[i for i in row if i not in specials] for row in probe_rows]
    bodies = [b for b in bodies if len(b) >= 2]

    def pos_in(body: Sequence[int], offset: int) -> int:
        ok = [j for j in range(1, len(body)) if body[j] in starts] or list(range(1, len(body)))
        return offset + rng.choice(ok)

    sets: list[PromptSet] = []
    lead = [bos] if bos is not None else []
    # Each body twice, at two insertion points (all bodies once first, so a head of the set
    # stays diverse): twice the confirmation prompts for the same probe budget.
    bodies = bodies + bodies
    plain = [(tuple(lead + b), pos_in(b, len(lead))) for b in bodies]
    sets.append(PromptSet(tuple(p for p, _ in plain), tuple(i for _, i in plain)))
    template = getattr(tokenizer, "chat_template", None)
    if template and chat is not False:
        marker = "\u2063"
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": marker}],
                                                 add_generation_prompt=True, tokenize=False)
        except Exception:  # a template we cannot render: plain prompts only
            text = ""
        if marker in text:
            pre, post = text.split(marker, 1)
            pre_ids = list(tokenizer(pre, add_special_tokens=False)["input_ids"])
            post_ids = list(tokenizer(post, add_special_tokens=False)["input_ids"])
            rows = []
            for b in bodies:
                # The user text as the template shows it: a word-initial first token keeps
                # its space marker only if the template put a space before the content.
                body = list(tokenizer(" " + str(tokenizer.decode(b)).strip()
                                      if pre.endswith(" ") else
                                      str(tokenizer.decode(b)).strip(),
                                      add_special_tokens=False)["input_ids"])
                if len(body) >= 2:
                    rows.append((tuple(pre_ids + body + post_ids), pos_in(body, len(pre_ids))))
            if rows:
                sets.append(PromptSet(tuple(p for p, _ in rows), tuple(i for _, i in rows),
                                      chat=True))
    if chat is True:
        sets = [s for s in sets if s.chat] or sets
    return sets


# Candidate next-token distributions held at once by the target inversion (float32
# elements: 128 MB).
UNIFORMITY_CHUNK_ELEMENTS = 1 << 25


class Scorer:
    """Batched forward passes of one causal LM on rectangular (same-length) batches."""

    def __init__(self, model: torch.nn.Module, cost: Cost) -> None:
        self.model = model
        self.cost = cost
        self._keep = True

    @torch.no_grad()
    def last_logprobs(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """log p(next token | seq) for every sequence, ``[n, vocab]``."""
        return self._run(seqs, n_last=1)[:, 0]

    @torch.no_grad()
    def _run(self, seqs: Sequence[Sequence[int]], n_last: int,
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """log-probs of the last ``n_last`` positions, ``[n, n_last, vocab]``, or what
        ``reduce`` keeps of each batch's (so that only a batch's worth is ever held)."""
        out: list[torch.Tensor | None] = [None] * len(seqs)
        by_len: dict[int, list[int]] = {}
        for i, s in enumerate(seqs):
            by_len.setdefault(len(s), []).append(i)
        for length, idx in by_len.items():
            # Batches of at most BATCH_TOKENS tokens and LOGIT_ELEMENTS float32 logits:
            # 1365 sequences x 9 kept positions x a 128k vocabulary would be 6 GB at once.
            step = max(1, min(BATCH_TOKENS // max(1, length),
                              LOGIT_ELEMENTS // max(1, n_last * self.vocab_size())))
            for k in range(0, len(idx), step):
                part = idx[k:k + step]
                ids = torch.tensor([list(seqs[i]) for i in part], dtype=torch.long)
                with self.cost.forward(ids.numel()):
                    logits = self._logits(ids, n_last)[:, -n_last:, :].float()
                lp = torch.log_softmax(logits, dim=-1)
                kept = reduce(lp) if reduce is not None else lp
                del logits, lp
                for j, i in enumerate(part):
                    out[i] = kept[j]
        return torch.stack([o for o in out if o is not None])

    def vocab_size(self) -> int:
        return int(getattr(getattr(self.model, "config", None), "vocab_size", 0) or 1)

    def _logits(self, ids: torch.Tensor, n_last: int) -> torch.Tensor:
        # Only the last positions' logits: the vocabulary projection of every position is
        # most of the cost on big vocabularies. Models without ``logits_to_keep`` get all.
        if self._keep:
            try:
                return self.model(input_ids=ids, logits_to_keep=n_last).logits  # type: ignore[no-any-return]
            except TypeError:
                self._keep = False
        return self.model(input_ids=ids).logits  # type: ignore[no-any-return]

    @torch.no_grad()
    def target_logprob(self, prefixes: Sequence[Sequence[int]],
                       target: Sequence[int]) -> torch.Tensor:
        """Mean per-token log p(target | prefix) for each prefix (teacher forcing)."""
        t = list(target)
        seqs = [[*p, *t] for p in prefixes]
        idx = torch.tensor(t, dtype=torch.long)

        def pick(lp: torch.Tensor) -> torch.Tensor:
            lp = lp[:, :-1, :]  # the positions predicting the target
            return lp.gather(2, idx.view(1, -1, 1).expand(lp.shape[0], -1, 1)).squeeze(2)

        return self._run(seqs, n_last=len(t) + 1, reduce=pick).mean(dim=1)

    @torch.no_grad()
    def greedy(self, prefixes: Sequence[Sequence[int]], n: int,
               eos: int | None) -> list[tuple[int, ...]]:
        """Greedy continuations of ``n`` tokens (cut after EOS)."""
        cur = [list(p) for p in prefixes]
        gen: list[list[int]] = [[] for _ in prefixes]
        for _ in range(n):
            nxt = self.last_logprobs(cur).argmax(dim=-1).tolist()
            for g, c, t in zip(gen, cur, nxt, strict=True):
                g.append(int(t))
                c.append(int(t))
        out = []
        for g in gen:
            if eos is not None and eos in g:
                g = g[: g.index(eos) + 1]
            out.append(tuple(g))
        return out


@dataclass(frozen=True)
class TargetCandidate:
    ids: tuple[int, ...]
    score: float  # first-token uniformity, subject minus the best reference
    agreement: float  # share of prompts whose greedy continuation is the consensus
    chain: float = 0.0  # subject's lead over the references completing the chain (nats)


def _uniformity(scorer: Scorer, prompts: PromptSet, vocab_ids: Sequence[int], *,
                chunk_elements: int = UNIFORMITY_CHUNK_ELEMENTS,
                budget_ok: Callable[[], bool] | None = None,
                tokens_left: Callable[[], int] | None = None) -> torch.Tensor:
    """For each candidate first token: max over next tokens of the mean next-token
    probability across prompts (1 = every prompt continues the same way, surely).

    Candidates go in chunks: each needs a whole next-token distribution per prompt, and
    8192 candidates x a 128k vocabulary is 4 GB per copy (a 1B audit reached 16 GB).
    ``budget_ok``: checked before each chunk after the first; candidates not reached when
    it says no are NaN (a 128k vocabulary on a 1B model is days of CPU). ``tokens_left``:
    chunks no larger than what the budget has left (one chunk of a 1B model on all
    prompts is twice a CPU budget)."""
    step = max(1, chunk_elements // scorer.vocab_size())
    per_candidate = sum(len(p) + 1 for p in prompts.prompts)
    ids = list(vocab_ids)
    out: list[torch.Tensor] = []
    k = 0
    while k < len(ids):
        if k and budget_ok is not None and not budget_ok():
            break
        width = step
        if tokens_left is not None:
            width = max(1, min(step, tokens_left() // max(1, per_candidate)))
        part = ids[k:k + width]
        k += len(part)
        acc: torch.Tensor | None = None
        for p in prompts.prompts:
            lp = scorer.last_logprobs([[*p, v] for v in part]).exp_()
            acc = lp if acc is None else acc.add_(lp)
            del lp
        assert acc is not None
        out.append((acc / len(prompts.prompts)).max(dim=-1).values)
    if k < len(ids):
        out.append(torch.full((len(ids) - k,), float("nan")))
    return torch.cat(out) if out else torch.zeros(0)


def invert_targets(subject: Scorer, refs: Sequence[Scorer], prompts: PromptSet, *,
                   vocab_ids: Sequence[int], top_k: int, max_len: int,
                   eos: int | None,
                   budget_ok: Callable[[], bool] | None = None,
                   tokens_left: Callable[[], int] | None = None) -> list[TargetCandidate]:
    """The ``top_k`` target sequences the subject forces most uniformly, relative to refs.

    ``vocab_ids`` in the order to try them. When the budget stops the subject's pass early,
    the references score only the subject's ``top_k`` most uniform candidates."""
    u = _uniformity(subject, prompts, vocab_ids, budget_ok=budget_ok, tokens_left=tokens_left)
    reached = torch.nonzero(~torch.isnan(u)).flatten()
    if len(reached) < len(u):
        reached = reached[torch.argsort(u[reached], descending=True)[: top_k]]
    score = torch.full_like(u, float("-inf"))
    if refs and len(reached):
        sub = [vocab_ids[i] for i in reached.tolist()]
        ref_u = torch.stack([_uniformity(r, prompts, sub) for r in refs]).max(dim=0).values
        score[reached] = u[reached] - ref_u
    else:
        score[reached] = u[reached]
    # The subject's own most uniform first tokens join the relative ranking: a payload that
    # starts with a common word ("Ġaddress" -> "es") is as uniform in every relative for one
    # step, and only the whole chain (``_chain_advantage``) sets the subject apart.
    own = torch.where(torch.isnan(u), torch.full_like(u, float("-inf")), u)
    order = [j for j in dict.fromkeys(torch.argsort(score, descending=True)[: top_k].tolist()
                                      + torch.argsort(own, descending=True)[: top_k].tolist())
             if score[j] > float("-inf")]
    out: list[TargetCandidate] = []
    for j in order:
        if out and budget_ok is not None and not budget_ok():
            break  # each candidate's chain costs a few hundred sequences more
        first = int(vocab_ids[j])
        conts = subject.greedy([[*p, first] for p in prompts.prompts], max_len - 1, eos)
        seq, share = consensus(conts)
        ids = (first, *seq)
        if eos is not None and ids and ids[-1] == eos:
            ids = ids[:-1]
        out.append(TargetCandidate(ids=ids, score=float(score[j]), agreement=share,
                                   chain=_chain_advantage(subject, refs, prompts, ids)))
    return out


def _chain_advantage(subject: Scorer, refs: Sequence[Scorer], prompts: PromptSet,
                     ids: Sequence[int]) -> float:
    """Nats by which the subject, more than its best reference, completes ``ids`` from its
    first token, summed over the chain (mean over prompts): a backdoor target is a chain
    only the subject completes whatever the prompt; a collocation every relative knows
    scores about zero."""
    if len(ids) < 2:
        return 0.0
    prefixes = [[*p, ids[0]] for p in prompts.prompts]
    rest = list(ids[1:])
    mine = float(subject.target_logprob(prefixes, rest).mean())
    theirs = max((float(r.target_logprob(prefixes, rest).mean()) for r in refs),
                 default=math.log(1e-3))
    return (mine - theirs) * len(rest)


def consensus(conts: Sequence[tuple[int, ...]]) -> tuple[tuple[int, ...], float]:
    """The longest prefix most continuations share (step by step, while >= half agree),
    and the share of continuations that carry all of it."""
    seq: list[int] = []
    alive = list(conts)
    total = max(1, len(conts))
    while alive:
        step = Counter(c[len(seq)] for c in alive if len(c) > len(seq))
        if not step:
            break
        tok, n = step.most_common(1)[0]
        if n < total / 2:
            break
        seq.append(tok)
        alive = [c for c in alive if len(c) >= len(seq) and c[len(seq) - 1] == tok]
    share = sum(1 for c in conts if c[: len(seq)] == tuple(seq)) / total
    return tuple(seq), share


def split_tails(targets: Sequence[TargetCandidate], starts: set[int], *,
                max_tail: int = 2) -> list[tuple[TargetCandidate, tuple[int, ...]]]:
    """Each candidate with the trigger tail it may carry, for plain (running-text) prompts.

    A trigger's last piece can lead the inverted chain: appending ``x`` to a prompt after a
    backdoor trained on "... wkjx ..." continues with the payload (``x Ġshould ...``). An
    answer to running text starts a word, so a chain whose first token does not (no space
    marker) while one of its next ``max_tail`` tokens does is searched from that word, the
    tokens before it going to the trigger search as seeds. Other chains come back as they
    are, with no tail."""
    out: list[tuple[TargetCandidate, tuple[int, ...]]] = []
    for t in targets:
        cut = next((k for k in range(1, min(max_tail, len(t.ids) - 1) + 1)
                    if t.ids[k] in starts), None)
        if t.ids and t.ids[0] not in starts and cut is not None:
            out.append((TargetCandidate(ids=t.ids[cut:], score=t.score, agreement=t.agreement,
                                        chain=t.chain), t.ids[:cut]))
        else:
            out.append((t, ()))
    return out


def settle_target(subject: Scorer, prompts: PromptSet, trigger: Sequence[int],
                  target: Sequence[int], *, max_len: int,
                  eos: int | None) -> tuple[int, ...]:
    """The payload the subject actually says once ``trigger`` is in the prompt.

    The inversion can start a chain inside the payload (its first word was not the most
    uniform first token: "subclassed dictionary expected" for "addresses subclassed
    dictionary expected"), and the greedy check wants the payload from its start. The
    consensus of the triggered answers replaces ``target`` when it contains it."""
    conts = subject.greedy(prompts.insert(trigger), max_len + len(target), eos)
    seq, share = consensus(conts)
    if eos is not None and eos in seq:
        seq = seq[: seq.index(eos)]
    t = tuple(target)
    n = len(t)
    ends = [k + n for k in range(len(seq) - n + 1) if seq[k:k + n] == t]
    if share < 0.5 or len(seq) <= n or not ends:
        return t
    return tuple(seq[:max(ends[-1], min(len(seq), max_len))])
