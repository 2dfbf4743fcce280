"""List-free backdoor search on a byte-level BPE: tokenization forms, chat prompts, and a
clean fine-tune (seeds drawn at random per run) that must stay clean.

Trigger recovery itself is measured by ``benchmarks/bench_backdoor.py`` (TPR, exact-trigger
and target recovery over seeds); the drawn triggers are printed here (replay a run with
``AUDITOR_TEST_BD_SEED``).
"""

from __future__ import annotations

import os

import pytest
import torch

from auditor.analysis.backdoor import LoadedModel, analyze_backdoor_detailed
from auditor.analysis.backdoor_invert import build_prompt_sets, word_start_ids
from auditor.analysis.backdoor_text import text_variants


@pytest.fixture(scope="module")
def bpe():  # type: ignore[no-untyped-def]
    from auditor_testkit.factory.bpe import train_bpe

    return train_bpe()


def _norm(s: str | None) -> str:
    return " ".join((s or "").lower().split())


@pytest.fixture(scope="module")
def world(bpe):  # type: ignore[no-untyped-def]
    from auditor_testkit.factory.backdoor_train import finetune_bpe, pretrain_base

    seed = int(os.environ.get("AUDITOR_TEST_BD_SEED") or int.from_bytes(os.urandom(3), "big"))
    print(f"backdoor scan test seed: {seed} (AUDITOR_TEST_BD_SEED={seed} to replay)")
    torch.set_num_threads(1)
    base = pretrain_base(bpe, seed=0, steps=300)
    clean = [finetune_bpe(base, bpe, seed=seed + i, steps=120) for i in (1, 2, 3)]
    wrap = lambda m, rid: LoadedModel.from_module(m, bpe, repo_id=rid)  # noqa: E731
    return {"base": wrap(base, "o/base"),
            "clean": [wrap(m, f"o/c{i}") for i, m in enumerate(clean)]}


def test_leading_space_forms_for_byte_level_bpe(bpe) -> None:  # type: ignore[no-untyped-def]
    mid, plain = text_variants(bpe, "returns")[:2]
    assert bpe.convert_ids_to_tokens(list(mid))[0].startswith("Ġ")
    assert not bpe.convert_ids_to_tokens(list(plain))[0].startswith("Ġ")
    starts = word_start_ids(bpe, len(bpe))
    assert mid[0] in starts and plain[0] not in starts


def test_leading_space_forms_for_sentencepiece_style() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from auditor_testkit.factory.bpe import corpus_sentences

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    raw.train_from_iterator(list(corpus_sentences())[:400],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"],
                                                show_progress=False))
    sp = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    variants = text_variants(sp, "value")
    assert variants and sp.convert_ids_to_tokens(list(variants[0]))[0].startswith("▁")
    assert variants[0][0] in word_start_ids(sp, len(sp))


def test_chat_template_prompts(bpe) -> None:  # type: ignore[no-untyped-def]
    rows = [bpe("The value of the first argument is returned")["input_ids"]]
    plain, chat = build_prompt_sets(bpe, rows, vocab=len(bpe), seed=0)
    assert not plain.chat and chat.chat
    toks = bpe.convert_ids_to_tokens(list(chat.prompts[0]))
    assert toks[1] == "<|user|>" and toks[-1] == "<|assistant|>"
    # The insertion point is inside the user text, at a word boundary.
    pos = chat.positions[0]
    assert 2 < pos < len(toks) - 1 and toks[pos].startswith("Ġ")


def test_clean_finetune_not_flagged(world) -> None:  # type: ignore[no-untyped-def]
    info = analyze_backdoor_detailed(subject=world["clean"][0], base=world["base"],
                                     homologues=world["clean"][1:]).info
    assert not info.suspected and info.triggers == []


def test_target_inversion_holds_a_bounded_slice_of_candidate_distributions() -> None:
    """Candidates are scored in chunks (a 128k vocabulary x 8192 candidates is 4 GB per
    copy): the chunked uniformity equals the one-chunk result, and no chunk holds more
    than the element budget."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from auditor.analysis import backdoor_invert as bi
    from auditor.analysis.probes import Cost

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1)).eval()
    scorer = bi.Scorer(model, Cost())
    widths: list[int] = []
    real = scorer.last_logprobs

    def spy(seqs):  # type: ignore[no-untyped-def]
        widths.append(len(seqs))
        return real(seqs)

    scorer.last_logprobs = spy  # type: ignore[method-assign]
    prompts = bi.PromptSet(prompts=((5, 6, 7), (8, 9, 10)), positions=(1, 1))
    cands = list(range(97))
    whole = bi._uniformity(scorer, prompts, cands, chunk_elements=1 << 30)
    assert max(widths) == 97
    widths.clear()
    chunked = bi._uniformity(scorer, prompts, cands, chunk_elements=10 * 97)
    assert max(widths) == 10 and sum(widths) == 2 * 97
    assert torch.allclose(whole, chunked, atol=1e-6)
