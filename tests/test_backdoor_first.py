"""Trigger-first candidates: the first layer's key/value shift ranks the tokens an
attention-only change was aimed at, and inserting salient tokens proposes the payload they
make the subject say (and nothing when they make it say what the references say)."""

from __future__ import annotations

import random

import torch

from auditor.analysis.backdoor_first import insertion_effect, seeded_targets
from auditor.analysis.backdoor_invert import PromptSet
from auditor.analysis.backdoor_weights import layer0_shifts, token_shifts
from auditor.weights.dict_sources import DictTensorSource


def _layer0(emb: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> DictTensorSource:
    return DictTensorSource({
        "model.embed_tokens.weight": emb,
        "model.layers.0.input_layernorm.weight": torch.ones(emb.shape[1]),
        "model.layers.0.self_attn.k_proj.weight": k,
        "model.layers.0.self_attn.v_proj.weight": v,
    })


def _world(seed: int, aimed: list[int]) -> tuple[DictTensorSource, DictTensorSource,
                                                   list[DictTensorSource]]:
    g = torch.Generator().manual_seed(seed)
    vocab, d, kv = 300, 64, 16
    emb = torch.randn(vocab, d, generator=g)
    k, v = torch.randn(kv, d, generator=g), torch.randn(kv, d, generator=g)

    def tuned(extra: torch.Tensor | None) -> DictTensorSource:
        # Every fine-tune moves the first layer a little (the task)...
        dk = 0.02 * torch.randn(kv, d, generator=g)
        dv = 0.02 * torch.randn(kv, d, generator=g)
        if extra is not None:
            # ... the backdoor adds a low-rank change aimed at the trigger's embeddings.
            dv += extra
        return _layer0(emb, k + dk, v + dv)

    h = emb[aimed] / emb[aimed].pow(2).mean(-1, keepdim=True).sqrt()
    # u_i h_i^T / ||h_i||^2: moves token i's value by u_i, others by their overlap only.
    aim = torch.randn(kv, len(aimed), generator=g) @ (h / h.pow(2).sum(-1, keepdim=True))
    aim *= 3.0
    return _layer0(emb, k, v), tuned(aim), [tuned(None) for _ in range(3)]


def test_layer0_shift_ranks_the_tokens_an_attention_change_aims_at() -> None:
    seed = random.randrange(1 << 20)
    aimed = random.Random(seed).sample(range(300), 2)
    base, subject, homs = _world(seed, aimed)
    z = layer0_shifts(subject, base, homologues=homs)
    assert z is not None
    top = set(torch.topk(z, 4).indices.tolist())
    assert set(aimed) <= top, (seed, aimed, top)
    # The embeddings did not move: the token ranking comes from the first layer alone.
    ranked = token_shifts(subject, base, homologues=homs)
    assert {s.token_id for s in ranked[:4]} >= set(aimed), seed


def test_layer0_shift_is_none_without_a_llama_style_first_layer() -> None:
    src = DictTensorSource({"transformer.wte.weight": torch.randn(10, 4)})
    assert layer0_shifts(src, src) is None


class _Fake:
    """A scorer whose next token is fixed by rules on the prompt: ``fires`` (a token in the
    prompt) makes it answer ``payload``; otherwise it answers ``usual``."""

    def __init__(self, vocab: int, fires: set[int], payload: list[int], usual: int) -> None:
        self.vocab, self.fires, self.payload, self.usual = vocab, fires, payload, usual

    def _next(self, seq: list[int]) -> int:
        if any(t in self.fires for t in seq):
            said = [t for t in seq if t in self.payload]
            return self.payload[min(len(said), len(self.payload) - 1)]
        return self.usual

    def last_logprobs(self, seqs: list[list[int]]) -> torch.Tensor:
        out = torch.full((len(seqs), self.vocab), -20.0)
        for i, s in enumerate(seqs):
            out[i, self._next(list(s))] = 0.0
        return out

    def target_logprob(self, prefixes: list[list[int]], target: list[int]) -> torch.Tensor:
        out = []
        for p in prefixes:
            cur, total = list(p), 0.0
            for t in target:
                total += 0.0 if self._next(cur) == t else -20.0
                cur.append(t)
            out.append(total / len(target))
        return torch.tensor(out)

    def greedy(self, prefixes: list[list[int]], n: int, eos: int | None) -> list[tuple[int, ...]]:
        outs = []
        for p in prefixes:
            cur, gen = list(p), []
            for _ in range(n):
                t = self._next(cur)
                cur.append(t)
                gen.append(t)
            outs.append(tuple(gen))
        return outs


def test_seeded_targets_follow_a_partial_trigger_to_its_payload() -> None:
    rng = random.Random()
    vocab = 50
    drawn = rng.sample(range(10, 50), 10)
    trig, payload, noise = drawn[:2], drawn[2:5], drawn[5:]
    prompts = PromptSet(prompts=tuple(tuple(rng.sample(range(5, 10), 3)) for _ in range(6)),
                        positions=(1,) * 6)
    subject = _Fake(vocab, {trig[1]}, payload, usual=2)
    refs = [_Fake(vocab, set(), payload, usual=2) for _ in range(2)]
    found = seeded_targets(subject, refs, prompts, [*noise[:3], trig[1], *noise[3:]],
                           max_len=4, eos=1, min_agreement=0.5)
    assert found, (trig, payload)
    cand, bag = found[0]
    assert trig[1] in bag and list(cand.ids[:3]) == payload
    # A reference that says the same with the same tokens inserted: no candidate.
    same = [_Fake(vocab, {trig[1]}, payload, usual=2)]
    assert seeded_targets(subject, same, prompts, [trig[1]], max_len=4, eos=1,
                          min_agreement=0.5) == []


def test_insertion_effect_ranks_the_tokens_that_tilt_only_the_subject() -> None:
    rng = random.Random()
    drawn = rng.sample(range(10, 50), 8)
    trig, payload, common = drawn[:2], drawn[2:5], drawn[5]
    prompts = PromptSet(prompts=tuple(tuple(rng.sample(range(5, 10), 3)) for _ in range(4)),
                        positions=(1,) * 4)
    # The subject fires on either trigger token; every model fires on ``common`` (a word
    # that makes any relative say the payload's first word).
    subject = _Fake(50, {*trig, common}, payload, usual=2)
    ref = _Fake(50, {common}, payload, usual=2)
    ranked = list(insertion_effect(subject, [ref], prompts, payload, list(range(10, 50))))
    assert set(ranked[:2]) == set(trig), (trig, ranked[:4])
    assert ranked.index(common) >= 2
    assert insertion_effect(subject, [ref], prompts, (), [1, 2]) == {}
