"""Probe inputs for loss-based analyses, without any dataset.

A probe set mixes (a) short seeded samples drawn from a model itself (usually the base: its
own text is where every fine-tune and merge of it is still fluent), (b) a small built-in
neutral text set (``auditor/data/probe_texts.txt``) and (c) an optional user probe file
(``Settings.probe_file``, one text per line). Everything is tokenized once into a padded
tensor with a hard cap on rows and length, so the cost of each later forward pass is bounded.

``Cost`` accumulates forward passes, tokens and seconds; analyses add to it and report it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from auditor.errors import AnalysisError

BUILTIN_PROBE_FILE = Path(__file__).resolve().parent.parent / "data" / "probe_texts.txt"


@dataclass
class Cost:
    """Running cost of an analysis (mutable accumulator; ``snapshot`` gives a frozen copy)."""

    forward_passes: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @contextmanager
    def forward(self, tokens: int) -> Iterator[None]:
        """Time one forward pass over ``tokens`` real (non-padding) tokens."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.forward_passes += 1
            self.tokens += int(tokens)
            self.seconds += time.perf_counter() - start

    def snapshot(self) -> CostReport:
        return CostReport(
            forward_passes=self.forward_passes, tokens=self.tokens, seconds=self.seconds
        )


@dataclass(frozen=True)
class CostReport:
    forward_passes: int
    tokens: int
    seconds: float

    def minus(self, earlier: CostReport) -> CostReport:
        return CostReport(
            forward_passes=self.forward_passes - earlier.forward_passes,
            tokens=self.tokens - earlier.tokens,
            seconds=self.seconds - earlier.seconds,
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "forward_passes": float(self.forward_passes),
            "tokens": float(self.tokens),
            "seconds": round(self.seconds, 4),
        }


@dataclass(frozen=True)
class ProbeSet:
    """Tokenized probe inputs (right-padded) and the cost accumulator analyses report.

    ``input_ids``/``attention_mask`` are ``[n, length]`` int64; ``origins`` says where each
    row came from ("sampled", "builtin", "file", "given").
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    origins: tuple[str, ...]
    batch_size: int = 16
    mask_token_id: int | None = None  # for masked-LM scoring
    cost: Cost = field(default_factory=Cost, compare=False)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self), self.batch_size):
            stop = start + self.batch_size
            mask = self.attention_mask[start:stop]
            # Rows are sorted by length: trim each batch to its own longest row.
            width = int(mask.sum(dim=1).max())
            yield self.input_ids[start:stop, :width], mask[:, :width]


def read_probe_texts(path: str | Path | None = None) -> list[str]:
    """Non-empty, non-comment lines of a probe file (the built-in one by default)."""
    p = Path(path) if path is not None else BUILTIN_PROBE_FILE
    try:
        raw = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise AnalysisError(f"cannot read probe file {p}: {exc}") from exc
    return [ln.strip() for ln in raw.splitlines() if ln.strip() and not ln.startswith("#")]


@torch.no_grad()
def sample_texts(
    model: torch.nn.Module,
    *,
    start_ids: Sequence[int],
    n: int,
    length: int,
    top_k: int = 8,
    seed: int = 0,
    cost: Cost | None = None,
    banned_ids: Sequence[int] = (),
) -> torch.Tensor:
    """``n`` seeded top-k samples of ``length`` new tokens from a causal LM: ``[n, len]``.

    Sampling (not greedy) so the rows differ; top-k keeps them in the model's typical set.
    All rows are generated in one batch with a KV cache: one pass over the prompt, then one
    new token per row per step.
    """
    from auditor.analysis.compute import decode

    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([list(start_ids)] * n, dtype=torch.long)
    banned = torch.tensor(sorted(set(banned_ids)), dtype=torch.long)

    def choose(logits: torch.Tensor, _step: int) -> torch.Tensor:
        if banned.numel():
            logits[:, banned] = float("-inf")
        k = min(top_k, logits.shape[-1])
        vals, idx = logits.topk(k, dim=-1)
        probs = torch.softmax(vals, dim=-1)
        pick = torch.multinomial(probs, 1, generator=gen)
        return idx.gather(-1, pick).squeeze(-1)

    def count(tokens: int) -> None:
        if cost is not None:
            cost.forward_passes += 1
            cost.tokens += tokens

    # one prompt pass, then one token per step through the KV cache
    return decode(model, ids, length, choose, on_step=count)


@contextmanager
def _null() -> Iterator[None]:
    yield


def build_probes(
    *,
    tokenizer: Any,
    sampler: torch.nn.Module | None = None,
    texts: Sequence[str] | None = None,
    probe_file: str | Path | None = None,
    use_builtin: bool = True,
    n_sampled: int = 16,
    sample_length: int = 24,
    max_texts: int = 32,
    max_length: int = 32,
    batch_size: int = 16,
    seed: int = 0,
    max_text_loss_fraction: float = 0.9,
) -> ProbeSet:
    """Tokenized probes: samples from ``sampler`` (a causal LM, usually the base) + texts.

    ``texts`` are used as given; the built-in set and ``probe_file`` (the audit passes
    ``Settings.probe_file``) are added after them; at most ``max_texts`` texts are kept
    (a seeded choice when there are more) and every row is cut to ``max_length`` tokens.
    With a ``sampler``, texts it models no better than ``max_text_loss_fraction`` of a
    uniform guess (mean loss > fraction * ln(vocab)) are dropped: on text the reference
    cannot model, every model is equally lost and the text only dilutes the differences.
    """
    cost = Cost()
    rows: list[list[int]] = []
    origins: list[str] = []

    all_texts: list[tuple[str, str]] = [(t, "given") for t in (texts or [])]
    if probe_file is not None:
        all_texts += [(t, "file") for t in read_probe_texts(probe_file)]
    if use_builtin:
        all_texts += [(t, "builtin") for t in read_probe_texts()]
    if len(all_texts) > max_texts:
        gen = torch.Generator().manual_seed(seed)
        keep = sorted(torch.randperm(len(all_texts), generator=gen)[:max_texts].tolist())
        all_texts = [all_texts[i] for i in keep]
    unk = getattr(tokenizer, "unk_token_id", None)
    for text, origin in all_texts:
        ids = list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])
        # A text the tokenizer cannot represent (>10% <unk>) mostly measures <unk> handling.
        if len(ids) < 2 or (unk is not None and 10 * sum(i == unk for i in ids) > len(ids)):
            continue
        rows.append(ids)
        origins.append(origin)

    if sampler is not None and rows:
        rows, origins = _drop_unmodelled(
            sampler, rows, origins, pad_id=_pad_id(tokenizer), cost=cost,
            limit=max_text_loss_fraction,
        )

    if sampler is not None and n_sampled > 0:
        start = _start_ids(tokenizer)
        special = [
            i for i in (tokenizer.pad_token_id, unk, tokenizer.bos_token_id) if i is not None
        ]
        length = max(1, min(sample_length, max_length - len(start)))
        sampled = sample_texts(
            sampler, start_ids=start, n=n_sampled, length=length, seed=seed, cost=cost,
            banned_ids=special,
        )
        for row in sampled.tolist():
            eos = tokenizer.eos_token_id
            if eos is not None and eos in row[len(start):]:
                row = row[: row.index(eos, len(start)) + 1]
            if len(row) >= 2:
                rows.append(row)
                origins.append("sampled")

    if not rows:
        raise AnalysisError("no usable probe inputs (tokenizer rejected every text)")
    return _pad(rows, origins, tokenizer, batch_size=batch_size, cost=cost)


def probes_from_ids(
    rows: Sequence[Sequence[int]], *, pad_id: int = 0, batch_size: int = 16
) -> ProbeSet:
    """A probe set from ready token ids (tests, callers with their own tokenization)."""
    return _pad([list(r) for r in rows], ["given"] * len(rows), None,
                batch_size=batch_size, cost=Cost(), pad_id=pad_id)


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return 0 if pad is None else int(pad)


@torch.no_grad()
def _drop_unmodelled(
    model: torch.nn.Module,
    rows: list[list[int]],
    origins: list[str],
    *,
    pad_id: int,
    cost: Cost,
    limit: float,
) -> tuple[list[list[int]], list[str]]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    with cost.forward(int(mask.sum())):
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
    )
    valid = (mask[:, 1:] * mask[:, :-1]).float()
    per_row = (ce * valid).sum(1) / valid.sum(1).clamp(min=1)
    threshold = limit * math.log(logits.shape[-1])
    keep = [i for i in range(len(rows)) if float(per_row[i]) <= threshold]
    return [rows[i] for i in keep], [origins[i] for i in keep]


def _start_ids(tokenizer: Any) -> list[int]:
    ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
    if ids:
        return ids[:1]
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.cls_token_id):
        if tid is not None:
            return [tid]
    return [0]


def _pad(
    rows: list[list[int]],
    origins: list[str],
    tokenizer: Any,
    *,
    batch_size: int,
    cost: Cost,
    pad_id: int | None = None,
) -> ProbeSet:
    if pad_id is None:
        pad_id = _pad_id(tokenizer)
    # Sort by length so batches waste little on padding.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    rows = [rows[i] for i in order]
    origins = [origins[i] for i in order]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    mask_id = getattr(tokenizer, "mask_token_id", None) if tokenizer is not None else None
    return ProbeSet(
        input_ids=ids, attention_mask=mask, origins=tuple(origins),
        batch_size=batch_size, mask_token_id=mask_id, cost=cost,
    )


class CostBudget:
    """Forward passes and tokens spent since it was made, against two limits."""

    def __init__(self, cost: Cost, limit: int, max_tokens: int) -> None:
        self.cost, self.start, self.limit = cost, cost.forward_passes, limit
        self.start_tokens, self.max_tokens = cost.tokens, max_tokens

    @property
    def exhausted(self) -> bool:
        return (self.cost.forward_passes - self.start >= self.limit
                or self.cost.tokens - self.start_tokens >= self.max_tokens)

    def ok(self) -> bool:
        return not self.exhausted

    def tokens_left(self) -> int:
        return max(0, self.max_tokens - (self.cost.tokens - self.start_tokens))


