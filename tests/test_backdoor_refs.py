"""The backdoor search's references within a memory budget, and its budgeted inversion.

A large model cannot have a module copy per reference (a 1B audit held six copies, 15 GB);
there the references are views that load their weights into the subject's own module.
They must answer exactly as copies do, and the subject must always run, and be read, with
its own weights.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from auditor.analysis import backdoor_invert as bi
from auditor.analysis.backdoor_refs import module_bytes, own_weights, reference_models
from auditor.analysis.probes import Cost
from auditor.weights.dict_sources import DictTensorSource


def _model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1)).eval()


def _weights(m: torch.nn.Module) -> DictTensorSource:
    return DictTensorSource({k: v.detach().clone() for k, v in m.state_dict().items()})


def _logits(m, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return m(input_ids=ids).logits


def test_views_answer_as_copies_and_the_subject_keeps_its_own_weights() -> None:
    subject, ref_a, ref_b = _model(0), _model(1), _model(2)
    own, wa, wb = _weights(subject), _weights(ref_a), _weights(ref_b)
    ids = torch.tensor([[3, 5, 7, 11, 13]])
    want_s, want_a, want_b = _logits(subject, ids), _logits(ref_a, ids), _logits(ref_b, ids)

    # room for copies: deep copies, the subject's module untouched
    copies, shared = reference_models(subject, own, [wa, wb], memory_bytes=None)
    assert shared is None and all(c is not subject for c in copies)
    assert torch.allclose(_logits(copies[1], ids), want_b, atol=1e-5)

    # no room: views of the subject's own module
    size = module_bytes(subject)
    views, shared = reference_models(subject, own, [wa, wb], memory_bytes=size)
    assert shared is not None
    assert torch.allclose(_logits(views[0], ids), want_a, atol=1e-5)
    assert torch.allclose(_logits(views[1], ids), want_b, atol=1e-5)
    # generation through a view keeps the module's fast path (KV cache, last logits only)
    from auditor.analysis.compute import _forward_params

    assert "logits_to_keep" in _forward_params(views[0])
    # the subject called directly after a view: its own weights are loaded back first
    assert torch.allclose(_logits(subject, ids), want_s, atol=1e-5)
    assert torch.allclose(_logits(views[1], ids), want_b, atol=1e-5)
    # read directly (no forward): own_weights() puts them back
    assert not torch.allclose(subject.get_input_embeddings().weight,
                              own.get("model.embed_tokens.weight"))
    own_weights(subject)
    assert torch.equal(subject.get_input_embeddings().weight,
                       own.get("model.embed_tokens.weight"))
    loads = shared.loads
    assert _logits(subject, ids) is not None and shared.loads == loads  # nothing to reload
    shared.close()
    assert torch.allclose(_logits(subject, ids), want_s, atol=1e-5)
    own_weights(subject)  # closed: a no-op


def test_budgeted_inversion_tries_the_priority_tokens_and_scores_only_what_it_reached(
    monkeypatch,  # type: ignore[no-untyped-def]
) -> None:
    """Under a budget that stops after the first chunk, only that chunk's candidates (the
    priority ones, tried first) can be targets, and the references score only the
    subject's best of them; with budget to spare the order changes nothing."""
    # chunks of 10 candidates (a 128k vocabulary's chunks are ~260)
    monkeypatch.setitem(bi._uniformity.__kwdefaults__, "chunk_elements", 10 * 97)
    subject, ref = bi.Scorer(_model(0), Cost()), bi.Scorer(_model(1), Cost())
    prompts = bi.PromptSet(prompts=((5, 6, 7), (8, 9, 10)), positions=(1, 1))
    priority = [90, 80, 70, 60, 50, 40, 30, 20, 10, 5]
    order = priority + [i for i in range(97) if i not in priority]
    calls = {"n": 0}

    def one_chunk() -> bool:
        calls["n"] += 1
        return False

    cut = bi.invert_targets(subject, [ref], prompts, vocab_ids=order, top_k=4, max_len=2,
                            eos=None, budget_ok=one_chunk)
    # one chunk of the subject's pass, then one candidate's chain: the budget said no
    assert len(cut) == 1 and cut[0].ids[0] in priority[:10]
    fed = ref.cost.tokens
    # 4 candidates x 2 prompts (and their chains), far from the 97 x 2 of a full pass
    assert 0 < fed < 97 * 2 * 4 // 4
    full_a = bi.invert_targets(subject, [ref], prompts, vocab_ids=list(range(97)), top_k=4,
                               max_len=2, eos=None)
    full_b = bi.invert_targets(subject, [ref], prompts, vocab_ids=order, top_k=4, max_len=2,
                               eos=None, budget_ok=lambda: True)
    assert [t.ids for t in full_a] == [t.ids for t in full_b]
    assert [round(t.score, 5) for t in full_a] == [round(t.score, 5) for t in full_b]


def test_inversion_chunks_fit_what_the_budget_has_left() -> None:
    """With 40 tokens left, a chunk takes only as many candidates as 40 tokens pay for."""
    subject = bi.Scorer(_model(0), Cost())
    prompts = bi.PromptSet(prompts=((5, 6, 7), (8, 9, 10)), positions=(1, 1))
    per_candidate = 2 * 4  # two prompts of 3 tokens, plus the candidate
    left = {"tokens": 40}
    start = subject.cost.tokens

    def tokens_left() -> int:
        return max(0, left["tokens"] - (subject.cost.tokens - start))

    u = bi._uniformity(subject, prompts, list(range(97)), budget_ok=lambda: tokens_left() > 0,
                       tokens_left=tokens_left)
    reached = int((~torch.isnan(u)).sum())
    assert reached == 40 // per_candidate
    assert subject.cost.tokens - start == reached * per_candidate
