"""Undo function-preserving disguises before taking a task vector.

A thief can permute a Llama MLP's intermediate neurons (gate/up rows and down columns by
one permutation), rescale each neuron's up row by s and its down column by 1/s (SiLU(gate)
is untouched, so the output is unchanged), and map each attention head through an
invertible matrix: q rows by A and k rows by A^-T (PaRaMS rescales with A = a I; MergeLock
uses general maps that commute with RoPE), v rows by B and o columns by B^-1. The task
vector of such a copy against the base is garbage, so the subject is first aligned to the
base. Only models the linear-time screen (``auditor.analysis.disguise_screen``) suspects
are aligned at all; memory stays bounded by a few copies of the largest layer tensor:

* MLP: each subject neuron's gate row is compared with the base's in a random sketch
  (row blocks, top few candidates per neuron, never an n x n matrix), candidates are
  rescored exactly (|cosine| of gate rows, up rows and down columns: scale-free), the best
  is taken greedily, and an exact assignment (``linear_sum_assignment``) runs only on the
  neurons whose best match is contested;
* per-neuron scale: least squares of up row against the base's and of down column, combined
  as sqrt(s_up / s_down) so the fine-tune's own small change is split evenly;
* attention: whole heads permuted back (equal q and kv head counts) by assignment over
  heads; then per kv group one head_dim x head_dim map for Q/K and one for V/O, solved by
  Gauss-Newton on min ||A X_s - X_b||^2 + ||A^-T Y_s - Y_b||^2, each step a Sylvester
  equation in head_dim x head_dim (no Kronecker products). q/k/v biases (Qwen2) travel with
  their rows; grouped-query attention shares one map per kv head.

Changes are only undone where they are clearly not the identity (|log s| > tolerance, or
a map far from a scalar), so an honest fine-tune passes through unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from scipy.optimize import linear_sum_assignment

from auditor.analysis.neuron_match import _ls_scale, _match_neurons, _symmetric_scale, _unit_rows
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


def _align_mlp(
    prefix: str,
    layer: str,
    subject: TensorSource,
    base: TensorSource,
    tol: float,
    out: dict[str, torch.Tensor],
) -> LayerAlignment | None:
    names = {p: f"{prefix}.{p}_proj.weight" for p in ("gate", "up", "down")}
    skeys, bkeys = _keyset(subject), _keyset(base)
    if not all(n in skeys and n in bkeys for n in names.values()):
        return None
    g_s, g_b = subject.get(names["gate"]), base.get(names["gate"])
    u_s, u_b = subject.get(names["up"]), base.get(names["up"])
    d_s, d_b = subject.get(names["down"]), base.get(names["down"])
    if g_s.shape != g_b.shape or u_s.shape != u_b.shape or d_s.shape != d_b.shape:
        return None
    n = g_s.shape[0]
    perm, match = _match_neurons(g_s, g_b, u_s, u_b, d_s, d_b)
    moved = int((perm != torch.arange(n)).sum())
    score = float(match.mean())
    g_a, u_a, d_a = (g_s[perm], u_s[perm], d_s[:, perm]) if moved else (g_s, u_s, d_s)
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


def _keyset(source: TensorSource) -> set[str]:
    return set(source.keys())


def _with_bias(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``w`` with the bias as one more column: a row map moves both alike."""
    return w if b is None else torch.cat([w, b[:, None]], dim=1)


def _solve_map(
    f_s: torch.Tensor, f_b: torch.Tensor, g_s: torch.Tensor, g_b: torch.Tensor,
    *, iterations: int = 10,
) -> torch.Tensor:
    """A (hd x hd) minimising ||A F_s - F_b||^2 + ||A^-T G_s - G_b||^2.

    Gauss-Newton on A <- (I + E) A: with P = A F_s and S = A^-T G_s the step solves the
    Sylvester equation E (P P^T) + (S S^T) E = (F_b - P) P^T - S (G_b - S)^T, in the
    eigenbases of the two hd x hd Gram matrices (no Kronecker product).
    """
    fs, fb, gs, gb = (t.double() for t in (f_s, f_b, g_s, g_b))
    hd = fs.shape[0]
    eye = torch.eye(hd, dtype=torch.float64)
    # Every term of the step is a product of hd x hd Gram matrices of the four blocks:
    # computed once, the iterations never touch the (hd x hidden) blocks again.
    fss, fbs = fs @ fs.T, fb @ fs.T
    gss, gsb = gs @ gs.T, gs @ gb.T
    a = fbs @ torch.linalg.pinv(fss)
    if not bool(torch.isfinite(a).all()) or torch.linalg.matrix_rank(a) < hd:
        return eye
    for _ in range(iterations):
        ppt = a @ fss @ a.T  # P P^T with P = A F_s
        ai_t = torch.linalg.inv(a).T
        sst = ai_t @ gss @ ai_t.T  # S S^T with S = A^-T G_s
        lam, u = torch.linalg.eigh(0.5 * (ppt + ppt.T))
        mu, w = torch.linalg.eigh(0.5 * (sst + sst.T))
        # (F_b - P) P^T - S (G_b - S)^T
        c = (fbs @ a.T - ppt) - (ai_t @ gsb - sst)
        denom = mu[:, None] + lam[None, :]
        denom = denom.clamp_min(1e-12 * float(denom.max()))
        e = w @ ((w.T @ c @ u) / denom) @ u.T
        a = (eye + e) @ a
        if float(torch.linalg.norm(e)) < 1e-10:
            break
    return a


def _classify_map(a: torch.Tensor, tol: float) -> tuple[str, float]:
    """("identity" | "scalar" | "matrix", log |scalar|) of an alignment map."""
    hd = a.shape[0]
    scalar = float(torch.trace(a)) / hd
    off = float(torch.linalg.norm(a - scalar * torch.eye(hd, dtype=a.dtype)))
    if off > _MATRIX_THRESHOLD * float(torch.linalg.norm(a)):
        return "matrix", math.log(max(abs(scalar), 1e-30))
    log_s = math.log(max(abs(scalar), 1e-30))
    if abs(log_s) > tol or scalar < 0:
        return "scalar", log_s
    return "identity", log_s


_MATRIX_THRESHOLD = 0.3


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
    skeys, bkeys = _keyset(subject), _keyset(base)
    if not all(n in skeys and n in bkeys for n in names.values()):
        return None
    w = {p: subject.get(n) for p, n in names.items()}
    b = {p: base.get(n) for p, n in names.items()}
    if any(w[p].shape != b[p].shape for p in w):
        return None
    bias_names = {p: f"{prefix}.{p}_proj.bias" for p in ("q", "k", "v")}
    wb: dict[str, torch.Tensor | None] = {}
    bb: dict[str, torch.Tensor | None] = {}
    for p, n in bias_names.items():
        has = n in skeys and n in bkeys
        wb[p] = subject.get(n) if has else None
        bb[p] = base.get(n) if has else None
    hd = w["q"].shape[0] // num_heads
    if hd * num_heads != w["q"].shape[0] or hd * num_kv_heads != w["k"].shape[0]:
        return None
    group = num_heads // num_kv_heads
    changed = False
    head_moved = 0
    if group == 1:
        # whole heads may be permuted (q, k, v rows and o columns together): match heads on
        # |cosine| of their blocks, which per-head maps keep roughly (num_heads^2 only)
        def blocks(t: dict[str, torch.Tensor], p: str) -> torch.Tensor:
            x = t[p].T if p == "o" else t[p]
            return _unit_rows(x.reshape(num_heads, -1))

        sim = sum((blocks(w, p) @ blocks(b, p).T).abs() for p in ("q", "k", "v", "o"))
        assert isinstance(sim, torch.Tensor)
        best = sim.argmax(dim=1)
        if not torch.equal(best, torch.arange(num_heads)):
            rows, cols = linear_sum_assignment(sim.double().numpy(), maximize=True)
            hperm = torch.empty(num_heads, dtype=torch.long)
            hperm[torch.from_numpy(cols)] = torch.from_numpy(rows)
            head_moved = int((hperm != torch.arange(num_heads)).sum())
            if head_moved:
                idx = (hperm[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)
                for p in ("q", "k", "v"):
                    w[p] = w[p][idx]
                    if wb[p] is not None:
                        wb[p] = wb[p][idx]  # type: ignore[index]
                w["o"] = w["o"][:, idx]
                changed = True
    rescaled = mixed = 0
    max_log = 0.0
    for g in range(num_kv_heads):
        kv = slice(g * hd, (g + 1) * hd)
        qh = [slice((g * group + i) * hd, (g * group + i + 1) * hd) for i in range(group)]
        # Q/K: q rows of every head in the group move by A, the shared k rows by A^-T
        f_s = torch.cat([_with_bias(w["q"][s], _part(wb["q"], s)) for s in qh], dim=1)
        f_b = torch.cat([_with_bias(b["q"][s], _part(bb["q"], s)) for s in qh], dim=1)
        g_s = _with_bias(w["k"][kv], _part(wb["k"], kv))
        g_b = _with_bias(b["k"][kv], _part(bb["k"], kv))
        a_qk = _solve_map(f_s, f_b, g_s, g_b)
        # V/O: v rows move by B, o's columns of every head reading them by B^-1
        f_s = _with_bias(w["v"][kv], _part(wb["v"], kv))
        f_b = _with_bias(b["v"][kv], _part(bb["v"], kv))
        g_s = torch.cat([w["o"][:, s].T for s in qh], dim=1)
        g_b = torch.cat([b["o"][:, s].T for s in qh], dim=1)
        a_vo = _solve_map(f_s, f_b, g_s, g_b)
        for which, a in (("qk", a_qk), ("vo", a_vo)):
            kind, log_s = _classify_map(a, tol)
            max_log = max(max_log, abs(log_s))
            if kind == "identity":
                continue
            if kind == "scalar":
                rescaled += 1
                a = torch.eye(hd, dtype=a.dtype) * (float(torch.trace(a)) / hd)
            else:
                mixed += 1
            if not changed:
                w = {p: t.clone() for p, t in w.items()}
                wb = {p: (t.clone() if t is not None else None) for p, t in wb.items()}
                changed = True
            a_inv_t = torch.linalg.inv(a).T
            if which == "qk":
                for s in qh:
                    w["q"][s] = (a @ w["q"][s].double()).to(w["q"].dtype)
                    if wb["q"] is not None:
                        wb["q"][s] = (a @ wb["q"][s].double()).to(wb["q"].dtype)
                w["k"][kv] = (a_inv_t @ w["k"][kv].double()).to(w["k"].dtype)
                if wb["k"] is not None:
                    wb["k"][kv] = (a_inv_t @ wb["k"][kv].double()).to(wb["k"].dtype)
            else:
                w["v"][kv] = (a @ w["v"][kv].double()).to(w["v"].dtype)
                if wb["v"] is not None:
                    wb["v"][kv] = (a @ wb["v"][kv].double()).to(wb["v"].dtype)
                a_inv = torch.linalg.inv(a)
                for s in qh:
                    w["o"][:, s] = (w["o"][:, s].double() @ a_inv).to(w["o"].dtype)
    if changed:
        for p, n in names.items():
            out[n] = w[p]
        for p, n in bias_names.items():
            if wb[p] is not None:
                out[n] = wb[p]  # type: ignore[assignment]
    return LayerAlignment(
        layer=layer,
        kind="attention",
        permuted=head_moved > 0,
        moved=head_moved,
        rescaled=rescaled + mixed,
        max_log_scale=max_log,
        match_score=1.0,
    )


def _part(t: torch.Tensor | None, s: slice) -> torch.Tensor | None:
    return None if t is None else t[s]


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
        _compact(changed, subject)
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


def _compact(changed: dict[str, torch.Tensor], subject: TensorSource) -> None:
    """Realigned tensors held in the subject's stored dtype (bf16 stays bf16): a disguised
    1B model realigns nearly every layer, 4 GB in float32. The published values carry that
    rounding already; undoing a permutation is exact in any dtype."""
    info = getattr(subject, "info", None)
    if info is None:
        return
    for name, t in changed.items():
        try:
            stored = info(name).dtype_info.torch_dtype
        except (KeyError, AttributeError):
            continue
        if stored is not None and stored.is_floating_point and t.dtype != stored \
                and stored.itemsize < t.element_size():
            changed[name] = t.to(stored)


def _int(v: object) -> int | None:
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else None
