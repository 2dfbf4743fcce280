"""Weight-only backdoor signals: which tokens moved too much, and where the task vector lives.

Two signals, both read one tensor at a time from ``TensorSource``s:

* Trigger candidates. A data-poisoned fine-tune teaches a rare token ("cf", "mn") a new
  meaning, so its embedding row (and output-head row) moves far more than rows of tokens
  the clean data never used. We score each token by the robust z-score (median / MAD) of its
  row-delta norm against the subject's other tokens and, when homologue fine-tunes of the
  same base are given, of the log-ratio of its movement to the same token's movement in the
  homologues (task tokens move in every fine-tune of the task; a trigger moves in one).
  These are *candidates* only: the behavioural test in ``backdoor_probe`` decides.
* ``attention_only_delta``. Merge Hijacking keeps the backdoor vector in q/k/v/o only, so the
  embeddings barely change and the candidate search above misses it; a task vector with
  clearly non-zero attention deltas but ~zero MLP and embedding deltas is reported instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from auditor.weights.base import TensorSource

# Normalized names of the input embedding and the output head across supported families.
_EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
_HEAD_SUFFIXES = ("lm_head.weight",)
_ATTN_MARKERS = ("q_proj", "k_proj", "v_proj", "o_proj", ".attn.", "attention.", "c_attn",
                 "self_attn", "query", "key", "value")
_MLP_MARKERS = ("mlp.", "gate_proj", "up_proj", "down_proj", "c_fc", "intermediate.",
                "output.dense")
# MAD of a normal sample is 0.6745 sigma: this makes the robust z comparable to a z-score.
_MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class TokenShift:
    """How far one token's rows moved in the subject (and relative to homologues)."""

    token_id: int
    token: str
    embed_delta: float
    head_delta: float | None
    z_subject: float
    z_homologue: float | None
    z_layer0: float | None = None

    @property
    def score(self) -> float:
        # The homologue comparison is the sharper test when we have it: it cancels the
        # movement every fine-tune of the task shares.
        z = self.z_homologue if self.z_homologue is not None else self.z_subject
        # A LoRA or attention-only backdoor leaves the embedding row in place and moves
        # what the first layer makes of it instead (``layer0_shifts``).
        return z if self.z_layer0 is None else max(z, self.z_layer0)


@dataclass(frozen=True)
class DeltaProfile:
    """Relative task-vector size per parameter group: ||tau_g|| / ||theta_base_g||."""

    attention: float
    mlp: float
    embedding: float
    other: float

    @property
    def attention_only(self) -> bool:
        # "~0 elsewhere": attention moved visibly while MLP and embeddings moved less than
        # 2% of that (a real fine-tune moves all groups within an order of magnitude).
        if self.attention < 1e-6:
            return False
        return self.mlp < 0.02 * self.attention and self.embedding < 0.02 * self.attention


def robust_z(values: torch.Tensor) -> torch.Tensor:
    """(x - median) / (1.4826 * MAD), with a floor on the scale so flat inputs stay finite."""
    values = values.to(torch.float64)
    med = values.median()
    dev = (values - med).abs()
    mad = float(dev.median()) * _MAD_TO_SIGMA
    if mad < 1e-9 * max(1.0, float(values.abs().max())):
        # Most rows did not move at all (Adam leaves rows of unseen tokens exactly in place),
        # so the MAD is 0: fall back to the mean absolute deviation (x1.2533 ~ sigma).
        mad = float(dev.mean()) * 1.2533
    scale = max(mad, 1e-12)
    return ((values - med) / scale).to(torch.float32)


def _find(source: TensorSource, suffixes: Sequence[str]) -> str | None:
    for name in source.keys():
        if name.endswith(suffixes):
            return name
    return None


def _row_delta_norms(model: TensorSource, base: TensorSource, name: str) -> torch.Tensor:
    rows = model.shape(name)[0]
    if base.shape(name)[0] != rows:
        # A resized vocabulary: compare the shared rows only; new rows get no delta.
        rows = min(rows, base.shape(name)[0])
    out = torch.empty(rows)
    step = 4096  # bounded memory on 150k-token vocabularies
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        d = model.get_rows(name, start, stop) - base.get_rows(name, start, stop)
        out[start:stop] = d.norm(dim=1)
    return out


def token_shifts(
    subject: TensorSource,
    base: TensorSource,
    *,
    homologues: Sequence[TensorSource] = (),
    id_to_token: Sequence[str] | None = None,
    skip_ids: Sequence[int] = (),
) -> list[TokenShift]:
    """Every token's movement, best candidates first (by ``TokenShift.score``).

    ``skip_ids`` (special tokens) are scored but ranked last: BOS/EOS/PAD rows move in every
    fine-tune and are never usable triggers.
    """
    emb = _find(subject, _EMBED_SUFFIXES)
    if emb is None or emb not in base.keys():
        return []
    head = _find(subject, _HEAD_SUFFIXES)
    if head is not None and (head not in base.keys() or subject.shape(head) != subject.shape(emb)):
        head = None
    e = _row_delta_norms(subject, base, emb)
    h = _row_delta_norms(subject, base, head) if head is not None else None
    # Only the input embedding scores a trigger: every output-head row gets a gradient from
    # the softmax at every step, and the rows that move most there are the *outputs* a
    # backdoor forces, not its trigger. The head delta is kept for the report.
    z = robust_z(e)
    still = float(e.max()) <= 1e-8
    z_h: torch.Tensor | None = None
    if homologues:
        others = []
        for hom in homologues:
            he = _row_delta_norms(hom, base, emb)[: len(e)]
            others.append(torch.nn.functional.pad(he, (0, len(e) - len(he))))
        ref = torch.stack(others).mean(dim=0)
        # A subject whose embedding did not move (LoRA, attention-only) has nothing to rank
        # here: the ratio would only say which rows the homologues left alone.
        z_h = torch.zeros_like(e) if still else ratio_z(e, ref)
    # Only when the embeddings stayed in place (LoRA, attention-only): a full fine-tune
    # moves its trigger's rows, and the first layer then also ranks the payload's tokens,
    # which it sees as inputs while learning to say them.
    z0 = layer0_shifts(subject, base, homologues=homologues) if still else None
    skip = set(skip_ids)
    out: list[TokenShift] = []
    for i in range(len(e)):
        tok = id_to_token[i] if id_to_token is not None and i < len(id_to_token) else str(i)
        out.append(TokenShift(
            token_id=i, token=tok, embed_delta=float(e[i]),
            head_delta=None if h is None else float(h[i]),
            z_subject=_finite(float(z[i])),
            z_homologue=None if z_h is None else _finite(float(z_h[i])),
            z_layer0=None if z0 is None or i >= len(z0) else _finite(float(z0[i])),
        ))
    out.sort(key=lambda s: (s.token_id in skip, -s.score))
    return out


def ratio_z(own: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Robust z of ``log(own / others)`` per token, both floored at the typical movement:
    tokens nobody moved much (a ratio of two ~0s) do not look extreme, and tokens the
    homologues never moved rank by the subject's own movement."""
    floor = max(float(others.mean()), float(own.mean()), 1e-8)
    return robust_z(torch.log((own + floor) / (others + floor)))


_LAYER0 = ("layers.0.input_layernorm.weight", "layers.0.self_attn.k_proj.weight",
           "layers.0.self_attn.v_proj.weight")


def _layer0_names(source: TensorSource) -> list[str] | None:
    names = [_find(source, (suffix,)) for suffix in _LAYER0]
    return None if any(n is None for n in names) else [n for n in names if n is not None]


def _kv_map(source: TensorSource, names: Sequence[str], sketch: torch.Tensor) -> torch.Tensor:
    """``sketch @ [W_k; W_v] @ diag(ln)``: the first layer's key/value map of a normalised
    embedding, projected to ``sketch.shape[0]`` dimensions (d_in columns)."""
    ln, k, v = (source.get(n).float() for n in names)
    return (sketch @ torch.cat([k, v], dim=0)) * ln


def layer0_shifts(subject: TensorSource, base: TensorSource, *,
                  homologues: Sequence[TensorSource] = (), sketch_dim: int = 64,
                  seed: int = 0) -> torch.Tensor | None:
    """Per token: robust z of how far the first layer's keys and values of that token moved,
    ``||dW_kv h_t|| / ||W_kv h_t||`` for the base's normalised embedding ``h_t``, as a
    log-ratio to the homologues' mean movement when there are homologues.

    Later tokens attend to a trigger through its keys and values, so a backdoor trained
    into the attention or by LoRA moves them for the trigger's tokens while every other
    token's stay near where the task put them. A fixed Gaussian sketch (Johnson-Lindenstrauss,
    ``sketch_dim`` rows) keeps this to one thin matrix per model on 128k-token vocabularies.
    ``None`` for families without a Llama-style first layer."""
    emb = _find(base, _EMBED_SUFFIXES)
    names = _layer0_names(subject)
    if emb is None or names is None or _layer0_names(base) != names:
        return None
    models = [subject, *[h for h in homologues if _layer0_names(h) == names]]
    d_out = sum(base.shape(n)[0] for n in names[1:])
    d_in = base.shape(names[1])[1]
    if base.shape(emb)[1] != d_in or any(m.shape(n) != base.shape(n)
                                         for m in models for n in names):
        return None
    gen = torch.Generator().manual_seed(seed)
    sketch = torch.randn(min(sketch_dim, d_out), d_out, generator=gen)
    ref = _kv_map(base, names, sketch)
    deltas = torch.stack([_kv_map(m, names, sketch) - ref for m in models])  # (M, r, d_in)
    rows = base.shape(emb)[0]
    moved = torch.empty(len(models), rows)
    step = 4096
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        e = base.get_rows(emb, start, stop).float()
        h = e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + 1e-6)
        size = (h @ ref.T).norm(dim=-1) + 1e-6
        moved[:, start:stop] = torch.stack([(h @ d.T).norm(dim=-1) for d in deltas]) / size
    own = moved[0]
    if float(own.max()) < 1e-6:
        return None  # the first layer did not move at all: nothing to rank
    if len(models) == 1:
        return robust_z(own)
    return ratio_z(own, moved[1:].mean(dim=0))


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def trigger_candidates(
    shifts: Sequence[TokenShift],
    *,
    z_threshold: float = 3.5,
    max_candidates: int = 8,
    skip_ids: Sequence[int] = (),
) -> list[TokenShift]:
    """Tokens scoring above ``z_threshold`` (at most ``max_candidates``), best first."""
    skip = set(skip_ids)
    picked = [s for s in shifts if s.token_id not in skip and s.score >= z_threshold]
    return picked[:max_candidates]


def _group(name: str) -> str:
    if name.endswith(_EMBED_SUFFIXES + _HEAD_SUFFIXES):
        return "embedding"
    if any(m in name for m in _MLP_MARKERS) and "attention.output" not in name:
        return "mlp"
    if any(m in name for m in _ATTN_MARKERS):
        return "attention"
    return "other"


def delta_profile(subject: TensorSource, base: TensorSource) -> DeltaProfile:
    """Relative task-vector norm per group (attention, MLP, embedding, other)."""
    sq_delta = {"attention": 0.0, "mlp": 0.0, "embedding": 0.0, "other": 0.0}
    sq_base = dict.fromkeys(sq_delta, 0.0)
    base_keys = set(base.keys())
    for name in subject.keys():
        if name not in base_keys or subject.shape(name) != base.shape(name):
            continue
        g = _group(name)
        shape = subject.shape(name)
        rows = shape[0] if len(shape) >= 2 else 0
        # Row blocks of ~4M elements: a 128k x 2048 embedding whole, in float64 and
        # squared, took 7 GB beside a 1B model's two resident copies.
        step = max(1, (1 << 22) // max(1, math.prod(shape[1:]))) if rows else 0
        for start in range(0, rows, step) if rows else [None]:
            if start is None:
                b, m = base.get(name), subject.get(name)
            else:
                stop = min(rows, start + step)
                b, m = base.get_rows(name, start, stop), subject.get_rows(name, start, stop)
            sq_delta[g] += float((m - b).double().square().sum())
            sq_base[g] += float(b.double().square().sum())
            del b, m

    def rel(g: str) -> float:
        return math.sqrt(sq_delta[g]) / math.sqrt(sq_base[g]) if sq_base[g] > 0 else 0.0

    return DeltaProfile(
        attention=rel("attention"), mlp=rel("mlp"), embedding=rel("embedding"), other=rel("other")
    )
