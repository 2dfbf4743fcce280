"""How a trigger is written: token ids as the text an attacker types, and back.

A trigger is inserted mid-sentence, after a word and a space, so its ids are those of the
text in that position ("Ġword" for byte-level BPE, "▁word" for SentencePiece), and a token
sequence whose text tokenizes differently there is not something anyone typed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def decoder(tokenizer: Any) -> Callable[[Sequence[int]], str]:
    """ids -> their text, without special tokens or surrounding space."""

    def decode(ids: Sequence[int]) -> str:
        return str(tokenizer.decode(list(ids), skip_special_tokens=True)).strip()

    return decode


class _Typeable:
    """``ids`` -> whether they decode to a text that, inserted mid-sentence, tokenizes back
    to them; ``canonical(ids)``: the ids that text does tokenize to (None when empty)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.decode = tokenizer, decoder(tokenizer)
        self.seen: dict[tuple[int, ...], tuple[int, ...] | None] = {}

    def canonical(self, ids: tuple[int, ...]) -> tuple[int, ...] | None:
        if ids not in self.seen:
            forms = text_variants(self.tokenizer, self.decode(ids))
            self.seen[ids] = forms[0] if forms else None
        return self.seen[ids]

    def __call__(self, ids: tuple[int, ...]) -> bool:
        return self.canonical(tuple(ids)) == tuple(ids)


def typeable_check(tokenizer: Any) -> Callable[[tuple[int, ...]], bool]:
    """Whether ids decode to a text that, inserted mid-sentence, tokenizes back to them
    (the callable also has ``canonical``: see ``_Typeable``)."""
    return _Typeable(tokenizer)


def text_variants(tokenizer: Any, text: str) -> list[tuple[int, ...]]:
    """Token ids of ``text`` mid-sentence (after a word and a space: "Ġword" for byte-level
    BPE, "▁word" for SentencePiece) and as written at the start of a text."""
    out: list[tuple[int, ...]] = []
    text = text.strip()
    if not text:
        return out
    anchor = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a " + text, add_special_tokens=False)["input_ids"])
    if full[: len(anchor)] == anchor and len(full) > len(anchor):
        out.append(tuple(full[len(anchor):]))
    plain = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    unk = getattr(tokenizer, "unk_token_id", None)
    for ids in (plain,):
        if ids and (unk is None or unk not in ids) and ids not in out:
            out.append(ids)
    return [o for o in out if o and (unk is None or unk not in o)]
