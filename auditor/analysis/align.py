"""Undo function-preserving disguises before taking a task vector.

A thief can permute a Llama MLP's intermediate neurons (gate/up rows and down columns by
one permutation), rescale each neuron's up row by s and its down column by 1/s (SiLU(gate)
is untouched, so the output is unchanged), and rescale each attention head's q rows by a
and k rows by 1/a, v rows by b and o columns by 1/b. The task vector of such a copy against
the base is garbage, so the subject's weights are first aligned to the base:

* MLP: neurons matched to the base by Hungarian assignment on |cosine| of gate rows (gate
  is only permuted) plus |cosine| of up rows and down columns (scale-free); a fast path
  skips the assignment when each neuron's best match is itself;
* per-neuron scale: least squares of up row against the base's and of down column, combined
  as sqrt(s_up / s_down) so the fine-tune's own small change is split evenly;
* attention: per head the same symmetric least-squares scale for (q, k) and (v, o).

Scales are only undone where they are clearly not 1 (|log s| > ``scale_tolerance``), so an
honest fine-tune passes through unchanged and the report says so.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from scipy.optimize import linear_sum_assignment

from auditor.weights.base import TensorSource
from auditor.weights.dict_sources import DictTensorSource

_MLP = re.compile(r"^(.*layers\.(\d+)\.mlp)\.gate_proj\.weight$")
_ATTN = re.compile(r"^(.*layers\.(\d+)\.self_attn)\.q_proj\.weight$")


@dataclass(frozen=True)
class LayerAlignment:
    layer: str
    kind: str  # "mlp" or "attention"
    permuted: bool
    moved: int  # neurons not mapped to themselves
    rescaled: int  # neurons / heads whose scale was undone
    max_log_scale: float
    match_score: float  # mean |cosine| of matched neurons (1.0 for identical)


@dataclass(frozen=True)
class AlignmentReport:
    applied: bool  # anything changed
    permuted: bool
    rescaled: bool
    layers: tuple[LayerAlignment, ...] = ()
    skipped: tuple[str, ...] = ()  # why parts were not aligned
    distance_from_identity: float = 0.0  # share of MLP neurons moved, over all layers

    @property
    def layers_changed(self) -> list[str]:
        return [la.layer for la in self.layers if la.moved or la.rescaled]


@dataclass(frozen=True)
class AlignmentResult:
    source: TensorSource
    report: AlignmentReport
    changed: dict[str, torch.Tensor] = field(default_factory=dict)


class _OverlaySource:
    """The subject's tensors, with aligned replacements for the few that changed."""

    def __init__(self, base: TensorSource, overlay: Mapping[str, torch.Tensor]) -> None:
        self._base = base
        self._over = DictTensorSource(overlay)
        self._names = set(overlay)

    def keys(self) -> list[str]:
        return self._base.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._base.shape(name)

    def get(self, name: str) -> torch.Tensor:
        return self._over.get(name) if name in self._names else self._base.get(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name in self._names:
            return self._over.get_rows(name, start, stop)
        return self._base.get_rows(name, start, stop)

    def close(self) -> None:
        self._base.close()


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _ls_scale(sub: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Per-row least-squares s with sub_row ~ s * base_row."""
    num = (sub.double() * base.double()).sum(dim=1)
    den = (base.double() ** 2).sum(dim=1).clamp_min(1e-30)
    return num / den


def _symmetric_scale(s_fwd: torch.Tensor, s_inv: torch.Tensor) -> torch.Tensor:
    """Combine s (from rows scaled by s) and 1/s (from rows scaled by 1/s): sqrt(s / s')."""
    ratio = (s_fwd / s_inv.where(s_inv.abs() > 1e-30, torch.full_like(s_inv, 1e-30))).abs()
    return torch.sign(s_fwd) * torch.sqrt(ratio)


def _align_mlp(
    prefix: str,
    layer: str,
    subject: TensorSource,
    base: TensorSource,
    tol: float,
    out: dict[str, torch.Tensor],
) -> LayerAlignment | None:
    names = {p: f"{prefix}.{p}_proj.weight" for p in ("gate", "up", "down")}
    if not all(n in subject.keys() and n in base.keys() for n in names.values()):
        return None
    g_s, g_b = subject.get(names["gate"]), base.get(names["gate"])
    u_s, u_b = subject.get(names["up"]), base.get(names["up"])
    d_s, d_b = subject.get(names["down"]), base.get(names["down"])
    if g_s.shape != g_b.shape or u_s.shape != u_b.shape or d_s.shape != d_b.shape:
        return None
    # similarity[i, j]: subject neuron i vs base neuron j; gate signed (never rescaled),
    # up rows and down columns in absolute value (their scale may be negative)
    sim = _unit_rows(g_s) @ _unit_rows(g_b).T
    sim = sim + (_unit_rows(u_s) @ _unit_rows(u_b).T).abs()
    sim = sim + (_unit_rows(d_s.T) @ _unit_rows(d_b.T).T).abs()
    n = sim.shape[0]
    best = sim.argmax(dim=1)
    if torch.equal(best, torch.arange(n)):
        perm = best  # each neuron's best match is itself: no assignment needed
    elif torch.unique(best).numel() == n:
        perm = best
    else:
        rows, cols = linear_sum_assignment(sim.double().numpy(), maximize=True)
        perm = torch.empty(n, dtype=torch.long)
        perm[torch.from_numpy(cols)] = torch.from_numpy(rows)  # base j <- subject perm[j]
        best = None
    if best is not None:
        # best[i] = base index for subject neuron i; invert to base j <- subject perm[j]
        inv = torch.empty(n, dtype=torch.long)
        inv[best] = torch.arange(n)
        perm = inv
    moved = int((perm != torch.arange(n)).sum())
    score = float(sim[perm, torch.arange(n)].mean() / 3.0)
    g_a, u_a, d_a = g_s[perm], u_s[perm], d_s[:, perm]
    s = _symmetric_scale(_ls_scale(u_a, u_b), _ls_scale(d_a.T, d_b.T))
    logs = s.abs().clamp_min(1e-30).log()
    fix = (logs.abs() > tol) | (s < 0)
    rescaled = int(fix.sum())
    if rescaled:
        s_fix = torch.where(fix, s, torch.ones_like(s)).float()
        u_a = u_a / s_fix[:, None]
        d_a = d_a * s_fix[None, :]
    if moved or rescaled:
        out[names["gate"]] = g_a
        out[names["up"]] = u_a
        out[names["down"]] = d_a
    return LayerAlignment(
        layer=layer,
        kind="mlp",
        permuted=moved > 0,
        moved=moved,
        rescaled=rescaled,
        max_log_scale=float(logs.abs().max()) if logs.numel() else 0.0,
        match_score=score,
    )


def _align_attention(
    prefix: str,
    layer: str,
    subject: TensorSource,
    base: TensorSource,
    num_heads: int,
    num_kv_heads: int,
    tol: float,
    out: dict[str, torch.Tensor],
) -> LayerAlignment | None:
    names = {p: f"{prefix}.{p}_proj.weight" for p in ("q", "k", "v", "o")}
    if not all(n in subject.keys() and n in base.keys() for n in names.values()):
        return None
    w = {p: subject.get(n) for p, n in names.items()}
    b = {p: base.get(n) for p, n in names.items()}
    if any(w[p].shape != b[p].shape for p in w):
        return None
    hd = w["q"].shape[0] // num_heads
    if hd * num_heads != w["q"].shape[0] or hd * num_kv_heads != w["k"].shape[0]:
        return None
    group = num_heads // num_kv_heads
    head_moved = 0
    if group == 1:
        # whole heads may be permuted (q, k, v rows and o columns together): match heads to
        # the base on |cosine| of their blocks, which per-head scales do not change
        def blocks(t: dict[str, torch.Tensor], p: str) -> torch.Tensor:
            x = t[p].T if p == "o" else t[p]
            return _unit_rows(x.reshape(num_heads, -1))

        sim = sum((blocks(w, p) @ blocks(b, p).T).abs() for p in ("q", "k", "v", "o"))
        assert isinstance(sim, torch.Tensor)
        rows, cols = linear_sum_assignment(sim.double().numpy(), maximize=True)
        hperm = torch.empty(num_heads, dtype=torch.long)
        hperm[torch.from_numpy(cols)] = torch.from_numpy(rows)
        head_moved = int((hperm != torch.arange(num_heads)).sum())
        if head_moved:
            rows_idx = (hperm[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)
            for p in ("q", "k", "v"):
                w[p] = w[p][rows_idx]
            w["o"] = w["o"][:, rows_idx]
            for p in ("q", "k", "v", "o"):
                out[names[p]] = w[p]

    def head_scale(x: torch.Tensor, y: torch.Tensor, heads: int) -> torch.Tensor:
        xs = x.reshape(heads, -1)
        ys = y.reshape(heads, -1)
        return _ls_scale(xs, ys)

    # q heads in one kv group share k: q scaled by a, k by 1/a (per kv head)
    a_q = head_scale(w["q"], b["q"], num_heads).reshape(num_kv_heads, group)
    a_q = a_q.abs().log().mean(dim=1).exp() * torch.sign(a_q[:, 0])
    a = _symmetric_scale(a_q, head_scale(w["k"], b["k"], num_kv_heads))
    # v scaled by c, o's columns of every q head reading that kv head by 1/c
    # o's columns are contiguous per q head, so per kv head they are one block of rows of o^T
    c_o = _ls_scale(w["o"].T.reshape(num_kv_heads, -1), b["o"].T.reshape(num_kv_heads, -1))
    c = _symmetric_scale(head_scale(w["v"], b["v"], num_kv_heads), c_o)
    logs = torch.cat([a.abs().log(), c.abs().log()])
    fix_a = (a.abs().log().abs() > tol) | (a < 0)
    fix_c = (c.abs().log().abs() > tol) | (c < 0)
    rescaled = int(fix_a.sum() + fix_c.sum())
    if rescaled:
        a_f = torch.where(fix_a, a, torch.ones_like(a)).float()
        c_f = torch.where(fix_c, c, torch.ones_like(c)).float()
        q_rows = a_f.repeat_interleave(group * hd)
        kv_rows = a_f.repeat_interleave(hd)
        w["q"] = w["q"] / q_rows[:, None]
        w["k"] = w["k"] * kv_rows[:, None]
        w["v"] = w["v"] / c_f.repeat_interleave(hd)[:, None]
        w["o"] = w["o"] * c_f.repeat_interleave(group * hd)[None, :]
        for p in ("q", "k", "v", "o"):
            out[names[p]] = w[p]
    # an invertible matrix per head between V and O (MergeLock-style protection) survives
    # every scalar step: undo it per kv head where V is clearly not a scaled copy of the base
    mixed = 0
    for h in range(num_kv_heads):
        vs = slice(h * hd, (h + 1) * hd)
        os_ = slice(h * group * hd, (h + 1) * group * hd)
        fixed = _undo_vo_matrix(w["v"][vs], w["o"][:, os_], b["v"][vs], b["o"][:, os_], group)
        if fixed is not None:
            if not mixed:
                w["v"], w["o"] = w["v"].clone(), w["o"].clone()
            w["v"][vs], w["o"][:, os_] = fixed
            mixed += 1
    if mixed:
        out[names["v"]], out[names["o"]] = w["v"], w["o"]
    return LayerAlignment(
        layer=layer,
        kind="attention",
        permuted=head_moved > 0,
        moved=head_moved,
        rescaled=rescaled + mixed,
        max_log_scale=float(logs.abs().max()) if logs.numel() else 0.0,
        match_score=1.0,
    )


def _undo_vo_matrix(
    v_s: torch.Tensor,
    o_s: torch.Tensor,
    v_b: torch.Tensor,
    o_b: torch.Tensor,
    group: int,
    *,
    threshold: float = 0.3,
    iterations: int = 8,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Undo ``v -> M v``, ``o -> o M^-1`` for one kv head (``v`` rows hd x hidden, ``o``
    columns hidden x group*hd), or None when M is close to a scalar (honest fine-tune).

    Only the products O_h V_h are invariant, so the split of a fine-tune's change between V
    and O is not identifiable; we pick the A = M^-1 that makes the aligned task vector
    smallest, min ||A V_s - V_b||^2 + ||O_s A^-1 - O_b||^2 (Gauss-Newton from the V-only
    least-squares solution), i.e. the most conservative reading of the copy.
    """
    hd = v_s.shape[0]
    vs, vb = v_s.double(), v_b.double()
    # o columns of every q head in the group read the same kv head: stack them as rows
    os_ = torch.cat([o_s.double()[:, i * hd : (i + 1) * hd] for i in range(group)], dim=0)
    ob = torch.cat([o_b.double()[:, i * hd : (i + 1) * hd] for i in range(group)], dim=0)
    gram = vs @ vs.T
    if torch.linalg.matrix_rank(gram) < hd:
        return None
    a = vb @ vs.T @ torch.linalg.inv(gram)
    scalar = torch.trace(a) / hd
    off = float(torch.linalg.norm(a - scalar * torch.eye(hd, dtype=a.dtype)))
    if off <= threshold * float(torch.linalg.norm(a)):
        return None
    eye = torch.eye(hd, dtype=a.dtype)
    for _ in range(iterations):
        # A <- (I + E) A: A V_s ~ P + E P, O_s A^-1 ~ Q - Q E; least squares in vec(E)
        p = a @ vs
        q = os_ @ torch.linalg.inv(a)
        jac = torch.cat([torch.kron(p.T.contiguous(), eye), -torch.kron(eye, q)], dim=0)
        res = torch.cat([(vb - p).T.reshape(-1), (ob - q).T.reshape(-1)])
        e = torch.linalg.lstsq(jac, res.unsqueeze(1)).solution.reshape(hd, hd).T
        a = (eye + e) @ a
        if float(torch.linalg.norm(e)) < 1e-9:
            break
    v_a = (a @ vs).to(v_s.dtype)
    o_a = os_ @ torch.linalg.inv(a)
    o_cols = torch.cat([o_a[i * o_s.shape[0] : (i + 1) * o_s.shape[0]] for i in range(group)], 1)
    return v_a, o_cols.to(o_s.dtype)


def align_to_base(
    subject: TensorSource,
    base: TensorSource,
    *,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    config: Mapping[str, object] | None = None,
    scale_tolerance: float = 0.05,
) -> AlignmentResult:
    """Align a Llama-style subject to its base (see the module docstring).

    Head counts come from ``num_heads`` / ``num_kv_heads`` or a ``config.json`` mapping;
    without them attention is left alone (the report says so). Other architectures pass
    through unchanged with a note in ``report.skipped``.
    """
    if config is not None:
        num_heads = num_heads or _int(config.get("num_attention_heads"))
        num_kv_heads = num_kv_heads or _int(config.get("num_key_value_heads")) or num_heads
    num_kv_heads = num_kv_heads or num_heads
    changed: dict[str, torch.Tensor] = {}
    layers: list[LayerAlignment] = []
    skipped: list[str] = []
    total = moved = 0
    mlp_found = attn_found = False
    for name in subject.keys():
        m = _MLP.match(name)
        if m:
            mlp_found = True
            la = _align_mlp(
                m.group(1), f"layer.{m.group(2)}", subject, base, scale_tolerance, changed
            )
            if la is None:
                skipped.append(f"{m.group(1)}: MLP tensors missing or shapes differ")
            else:
                layers.append(la)
                total += subject.shape(name)[0]
                moved += la.moved
        a = _ATTN.match(name)
        if a:
            attn_found = True
            if not num_heads:
                continue
            la = _align_attention(
                a.group(1),
                f"layer.{a.group(2)}",
                subject,
                base,
                num_heads,
                num_kv_heads or num_heads,
                scale_tolerance,
                changed,
            )
            if la is None:
                skipped.append(f"{a.group(1)}: attention tensors missing or shapes differ")
            else:
                layers.append(la)
    if not mlp_found and not attn_found:
        skipped.append("no Llama-style MLP/attention tensors: architecture not aligned")
    elif attn_found and not num_heads:
        skipped.append("attention not aligned: head count unknown")
    permuted = any(la.permuted for la in layers)
    rescaled = any(la.rescaled for la in layers)
    report = AlignmentReport(
        applied=bool(changed),
        permuted=permuted,
        rescaled=rescaled,
        layers=tuple(layers),
        skipped=tuple(skipped),
        distance_from_identity=moved / total if total else 0.0,
    )
    source: TensorSource = _OverlaySource(subject, changed) if changed else subject
    return AlignmentResult(source=source, report=report, changed=changed)


def _int(v: object) -> int | None:
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else None
