"""Inline SVG charts, generated at render time.

Every string that reaches the SVG (repo ids, layer names, trigger texts) is attacker-written,
so it goes through ``markupsafe.escape``; numbers go through ``num`` which refuses NaN and
infinities (they would make invalid SVG, and a crafted report could carry them). The result
is ``Markup`` so Jinja's autoescape inserts it as is. No script, no external reference: the
pages run under ``default-src 'none'``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from markupsafe import Markup, escape

from auditor.reports.svg import (
    AXIS_COLOR,
    GRID_COLOR,
    PALETTE,
    TEXT_COLOR,
    clip,
    empty_chart,
    finite,
    fmt_label,
    legend_block,
    markup,
    nice_ticks,
    num,
    svg_open,
)


def coefficient_bars(
    per_parent: Mapping[str, Mapping[str, float]],
    *,
    title: str = "Per-layer merge coefficients",
) -> Markup:
    """Grouped bars: for each layer, one bar per parent (its estimated merge coefficient)."""
    parents = [p for p, layers in per_parent.items() if layers]
    if not parents:
        return empty_chart("chart-coefficients", title, "No per-layer coefficients were measured.")
    layers: list[str] = []
    for p in parents:
        layers.extend(name for name in per_parent[p] if name not in layers)
    values = finite([v for p in parents for v in per_parent[p].values()])
    lo = min([0.0, *values])
    hi = max([0.0, *values]) or 1.0
    ticks = nice_ticks(lo, hi)
    lo, hi = ticks[0], ticks[-1]

    left, top, plot_h = 56.0, 16.0, 200.0
    group_w = max(14.0, min(64.0, 640.0 / len(layers)))
    bar_w = max(2.0, (group_w - 4.0) / len(parents))
    # A minimum width keeps the legend (parent names) inside the drawing for few layers.
    plot_w = max(group_w * len(layers), 360.0)
    rotate = group_w < 40 or max(len(n) for n in layers) * 6 > group_w
    label_h = 90.0 if rotate else 24.0
    width = left + plot_w + 16
    legend_svg, legend_h = legend_block(parents, x=left, y=top + plot_h + label_h + 18,
                                        width=plot_w)
    height = top + plot_h + label_h + legend_h + 24

    def y_of(v: float) -> float:
        return top + plot_h - (v - lo) / (hi - lo) * plot_h

    out = [svg_open(width, height, css_class="chart-coefficients", title=title)]
    for t in ticks:
        y = y_of(t)
        out.append(
            f'<line x1="{num(left)}" x2="{num(left + plot_w)}" y1="{num(y)}" y2="{num(y)}" '
            f'stroke="{GRID_COLOR}"/><text x="{num(left - 6)}" y="{num(y + 4)}" font-size="11" '
            f'text-anchor="end" fill="{TEXT_COLOR}">{escape(fmt_label(t))}</text>'
        )
    zero = y_of(0.0)
    for li, layer in enumerate(layers):
        gx = left + li * group_w + 2
        for pi, parent in enumerate(parents):
            v = per_parent[parent].get(layer)
            if v is None or not math.isfinite(v):
                continue
            y = y_of(v)
            out.append(
                f'<rect class="bar" x="{num(gx + pi * bar_w)}" y="{num(min(y, zero))}" '
                f'width="{num(max(bar_w - 1, 1))}" height="{num(max(abs(zero - y), 0.5))}" '
                f'fill="{PALETTE[pi % len(PALETTE)]}"><title>{escape(parent)} · '
                f"{escape(layer)}: {escape(fmt_label(v))}</title></rect>"
            )
        cx = left + li * group_w + group_w / 2
        name = escape(clip(layer, 14))
        ly = top + plot_h + 14
        if rotate:
            out.append(
                f'<text x="{num(cx)}" y="{num(ly)}" font-size="10" fill="{TEXT_COLOR}" '
                f'text-anchor="end" transform="rotate(-55 {num(cx)} {num(ly)})">{name}</text>'
            )
        else:
            out.append(
                f'<text x="{num(cx)}" y="{num(ly)}" font-size="11" fill="{TEXT_COLOR}" '
                f'text-anchor="middle">{name}</text>'
            )
    out.append(
        f'<line x1="{num(left)}" x2="{num(left + plot_w)}" y1="{num(zero)}" '
        f'y2="{num(zero)}" stroke="{AXIS_COLOR}"/>'
    )
    out.append(legend_svg)
    out.append("</svg>")
    return markup(out)


# --- heatmap -----------------------------------------------------------------------------------
def _heat_color(value: float) -> str:
    """0 -> pale slate, 1 -> deep blue; negatives shade towards red."""
    v = max(-1.0, min(1.0, value if math.isfinite(value) else 0.0))
    lo = (241, 245, 249)
    hi = (30, 58, 138) if v >= 0 else (185, 28, 28)
    t = abs(v)
    r, g, b = (round(a + (c - a) * t) for a, c in zip(lo, hi, strict=True))
    return f"#{r:02x}{g:02x}{b:02x}"


def similarity_heatmap(
    rows: Mapping[str, Mapping[str, float]],
    *,
    title: str = "Per-layer similarity to homologues",
) -> Markup:
    """Rows: homologue repos; columns: layers; cell: cosine of the subject's delta vs theirs."""
    names = [r for r, layers in rows.items() if layers]
    if not names:
        return empty_chart("chart-heatmap", title, "No per-layer similarities were measured.")
    layers: list[str] = []
    for r in names:
        layers.extend(n for n in rows[r] if n not in layers)
    label_w = 220.0
    cell_w = max(12.0, min(56.0, 620.0 / len(layers)))
    cell_h = 26.0
    # Rotate the column labels when the longest one would not fit in a cell.
    top = 96.0 if min(max(len(n) for n in layers), 14) * 6.2 > cell_w else 28.0
    width = label_w + cell_w * len(layers) + 16
    height = top + cell_h * len(names) + 40
    out = [svg_open(width, height, css_class="chart-heatmap", title=title)]
    for ci, layer in enumerate(layers):
        cx = label_w + ci * cell_w + cell_w / 2
        text = escape(clip(layer, 14))
        if top > 30:
            out.append(
                f'<text x="{num(cx)}" y="{num(top - 6)}" font-size="10" fill="{TEXT_COLOR}" '
                f'transform="rotate(-55 {num(cx)} {num(top - 6)})">{text}</text>'
            )
        else:
            out.append(
                f'<text x="{num(cx)}" y="{num(top - 8)}" font-size="11" fill="{TEXT_COLOR}" '
                f'text-anchor="middle">{text}</text>'
            )
    for ri, name in enumerate(names):
        y = top + ri * cell_h
        out.append(
            f'<text x="{num(label_w - 8)}" y="{num(y + cell_h / 2 + 4)}" font-size="12" '
            f'text-anchor="end" fill="{TEXT_COLOR}">{escape(clip(name, 28))}</text>'
        )
        for ci, layer in enumerate(layers):
            v = rows[name].get(layer)
            x = label_w + ci * cell_w
            if v is None:
                out.append(
                    f'<rect x="{num(x)}" y="{num(y)}" width="{num(cell_w - 1)}" '
                    f'height="{num(cell_h - 1)}" fill="#ffffff" stroke="{GRID_COLOR}"/>'
                )
                continue
            out.append(
                f'<rect class="cell" x="{num(x)}" y="{num(y)}" width="{num(cell_w - 1)}" '
                f'height="{num(cell_h - 1)}" fill="{_heat_color(v)}"><title>{escape(name)} · '
                f"{escape(layer)}: {escape(fmt_label(v))}</title></rect>"
            )
            if cell_w >= 34:
                fg = "#ffffff" if abs(v) > 0.55 else TEXT_COLOR
                out.append(
                    f'<text x="{num(x + cell_w / 2)}" y="{num(y + cell_h / 2 + 4)}" '
                    f'font-size="10" text-anchor="middle" fill="{fg}">{escape(f"{v:.2f}")}</text>'
                )
    # Colour scale key, so a reader can tell 0.3 from 0.9 without hovering; it spans -1..1
    # when any cell is negative, so red cells have a key too.
    ky = top + cell_h * len(names) + 14
    values = [v for r in names for v in rows[r].values() if math.isfinite(v)]
    lo = -1.0 if any(v < 0 for v in values) else 0.0
    steps = 20 if lo < 0 else 10
    for i in range(steps + 1):
        out.append(
            f'<rect class="key" x="{num(label_w + i * 16)}" y="{num(ky)}" width="16" '
            f'height="10" fill="{_heat_color(lo + (1.0 - lo) * i / steps)}"/>'
        )
    end_x = label_w + (steps + 1) * 16 + 6
    out.append(
        f'<text x="{num(label_w - 8)}" y="{num(ky + 9)}" font-size="11" text-anchor="end" '
        f'fill="{TEXT_COLOR}">cosine {fmt_label(lo)}</text><text x="{num(end_x)}" '
        f'y="{num(ky + 9)}" font-size="11" fill="{TEXT_COLOR}">1</text>'
    )
    if lo < 0:
        mid = label_w + (steps / 2) * 16 + 8
        out.append(f'<text x="{num(mid)}" y="{num(ky + 22)}" font-size="10" '
                   f'text-anchor="middle" fill="{TEXT_COLOR}">0</text>')
    out.append("</svg>")
    return markup(out)


# --- line charts -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    css_class: str = "chart-line",
    x_range: tuple[float, float] | None = None,
) -> Markup:
    """Lines with point markers (hover shows the value), axes with round ticks, a legend."""
    clean = [
        (s.label, [(x, y) for x, y in zip(s.xs, s.ys, strict=False) if math.isfinite(x) and
                   math.isfinite(y)])
        for s in series
    ]
    clean = [(label, pts) for label, pts in clean if pts]
    if not clean:
        return empty_chart(css_class, title, "No measurements.")
    xs = [x for _, pts in clean for x, _ in pts]
    ys = [y for _, pts in clean for _, y in pts]
    xt = nice_ticks(*(x_range or (min(xs), max(xs))), count=5)
    yt = nice_ticks(min(ys), max(ys), count=5)
    left, top, plot_w, plot_h = 60.0, 14.0, 480.0, 210.0
    legend_svg, legend_h = legend_block([c[0] for c in clean], x=left, y=top + plot_h + 58,
                                   width=plot_w)
    width, height = left + plot_w + 20, top + plot_h + 58 + legend_h + 6

    def px(x: float) -> float:
        return left + (x - xt[0]) / (xt[-1] - xt[0]) * plot_w

    def py(y: float) -> float:
        return top + plot_h - (y - yt[0]) / (yt[-1] - yt[0]) * plot_h

    out = [svg_open(width, height, css_class=css_class, title=title)]
    for t in yt:
        out.append(
            f'<line x1="{num(left)}" x2="{num(left + plot_w)}" y1="{num(py(t))}" '
            f'y2="{num(py(t))}" stroke="{GRID_COLOR}"/><text x="{num(left - 6)}" '
            f'y="{num(py(t) + 4)}" font-size="11" text-anchor="end" fill="{TEXT_COLOR}">'
            f"{escape(fmt_label(t))}</text>"
        )
    for t in xt:
        out.append(
            f'<line x1="{num(px(t))}" x2="{num(px(t))}" y1="{num(top + plot_h)}" '
            f'y2="{num(top + plot_h + 4)}" stroke="{AXIS_COLOR}"/><text x="{num(px(t))}" '
            f'y="{num(top + plot_h + 18)}" font-size="11" text-anchor="middle" '
            f'fill="{TEXT_COLOR}">{escape(fmt_label(t))}</text>'
        )
    out.append(
        f'<rect x="{num(left)}" y="{num(top)}" width="{num(plot_w)}" height="{num(plot_h)}" '
        f'fill="none" stroke="{AXIS_COLOR}"/>'
        f'<text x="{num(left + plot_w / 2)}" y="{num(top + plot_h + 38)}" font-size="12" '
        f'text-anchor="middle" fill="{TEXT_COLOR}">{escape(x_label)}</text>'
        f'<text x="14" y="{num(top + plot_h / 2)}" font-size="12" text-anchor="middle" '
        f'fill="{TEXT_COLOR}" transform="rotate(-90 14 {num(top + plot_h / 2)})">'
        f"{escape(y_label)}</text>"
    )
    for i, (label, pts) in enumerate(clean):
        color = PALETTE[i % len(PALETTE)]
        pts = sorted(pts)
        path = " ".join(f"{num(px(x))},{num(py(y))}" for x, y in pts)
        out.append(
            f'<polyline class="series" points="{path}" fill="none" stroke="{color}" '
            f'stroke-width="2"/>'
        )
        for x, y in pts:
            out.append(
                f'<circle cx="{num(px(x))}" cy="{num(py(y))}" r="3" fill="{color}">'
                f"<title>{escape(label)}: {escape(fmt_label(x))} → {escape(fmt_label(y))}</title>"
                "</circle>"
            )
    out.append(legend_svg)
    out.append("</svg>")
    return markup(out)


# --- lineage graph -----------------------------------------------------------------------------
@dataclass
class GraphNode:
    id: str
    label: str
    href: str | None = None
    kind: str = "model"  # "base" | "model" | "merge" | "flagged"


@dataclass
class GraphEdge:
    source: str
    target: str
    declared: bool = False
    detected: bool = False
    label: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def undeclared(self) -> bool:
        return self.detected and not self.declared


def _layers(nodes: Sequence[GraphNode], edges: Sequence[GraphEdge]) -> dict[str, int]:
    """Longest-path depth from the roots: base -> fine-tunes -> merges. Cycles are cut."""
    parents: dict[str, list[str]] = {n.id: [] for n in nodes}
    for e in edges:
        if e.source in parents and e.target in parents and e.source != e.target:
            parents[e.target].append(e.source)
    depth: dict[str, int] = {}

    def visit(node: str, stack: frozenset[str]) -> int:
        if node in depth:
            return depth[node]
        ps = [p for p in parents[node] if p not in stack]
        d = 0 if not ps else 1 + max(visit(p, stack | {node}) for p in ps)
        depth[node] = min(d, 6)
        return depth[node]

    for n in nodes:
        visit(n.id, frozenset({n.id}))
    return depth


def lineage_graph(
    nodes: Sequence[GraphNode],
    edges: Sequence[GraphEdge],
    *,
    title: str = "Model family",
    id_prefix: str = "g",
) -> Markup:
    """Layered left-to-right drawing; declared edges solid, undeclared detected ones dashed red."""
    if not nodes:
        return empty_chart("chart-lineage", title, "No models in this family yet.")
    depth = _layers(nodes, edges)
    columns: dict[int, list[GraphNode]] = {}
    for n in nodes:
        columns.setdefault(depth[n.id], []).append(n)
    node_w, node_h, col_gap, row_gap = 230.0, 32.0, 90.0, 16.0
    col_index = {col: ci for ci, col in enumerate(sorted(columns))}
    # Edges that skip a column (base -> merge past the fine-tunes) run in a lane above or
    # below every box instead of through the boxes in between.
    long_edge = any(
        e.source in depth and e.target in depth
        and col_index[depth[e.target]] - col_index[depth[e.source]] > 1 for e in edges
    )
    lane = 18.0 if long_edge else 0.0
    max_rows = max(len(c) for c in columns.values())
    width = 16 + len(columns) * (node_w + col_gap) - col_gap + 16
    boxes_bottom = 16 + lane + max_rows * (node_h + row_gap) - row_gap
    legend_y = boxes_bottom + lane + 8
    height = legend_y + 36
    lanes = (16 + lane / 2 - 4, boxes_bottom + lane / 2 + 4)  # top, bottom
    pos: dict[str, tuple[float, float]] = {}
    for ci, col in enumerate(sorted(columns)):
        members = columns[col]
        offset = (max_rows - len(members)) * (node_h + row_gap) / 2
        for ri, n in enumerate(members):
            pos[n.id] = (16 + ci * (node_w + col_gap),
                         16 + lane + offset + ri * (node_h + row_gap))

    pid = escape(id_prefix)
    out = [svg_open(width, height, css_class="chart-lineage", title=title)]
    out.append(
        "<defs>"
        f'<marker id="{pid}-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="#64748b"/></marker>'
        f'<marker id="{pid}-arrow-red" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="#dc2626"/></marker></defs>'
    )
    for e in edges:
        if e.source not in pos or e.target not in pos or e.source == e.target:
            continue
        sx, sy = pos[e.source]
        tx, ty = pos[e.target]
        x1, y1 = sx + node_w, sy + node_h / 2
        x2, y2 = tx - 2, ty + node_h / 2
        if x2 <= x1:  # same column (e.g. a cut cycle): route around the right side
            x2, y2 = tx + node_w + 2, ty + node_h / 2
            c1, c2 = x1 + 60, x2 + 60
            d = (f"M{num(x1)},{num(y1)} C{num(c1)},{num(y1)} {num(c2)},{num(y2)} "
                 f"{num(x2)},{num(y2)}")
        elif x2 - x1 > col_gap + 4:  # skips a column: via the nearer lane, around the boxes
            ly = lanes[0] if (y1 + y2) / 2 <= (lanes[0] + lanes[1]) / 2 else lanes[1]
            g1, g2 = x1 + col_gap / 2, x2 - col_gap / 2
            d = (f"M{num(x1)},{num(y1)} C{num(g1)},{num(y1)} {num(g1)},{num(ly)} "
                 f"{num(g1 + 12)},{num(ly)} L{num(g2 - 12)},{num(ly)} "
                 f"C{num(g2)},{num(ly)} {num(g2)},{num(y2)} {num(x2)},{num(y2)}")
        else:
            c1 = c2 = (x1 + x2) / 2
            d = (f"M{num(x1)},{num(y1)} C{num(c1)},{num(y1)} {num(c2)},{num(y2)} "
                 f"{num(x2)},{num(y2)}")
        if e.undeclared:
            style = 'stroke="#dc2626" stroke-width="2.2" stroke-dasharray="6 4"'
            marker = f"{pid}-arrow-red"
            kind = "undeclared"
        elif e.declared and not e.detected:
            style = 'stroke="#94a3b8" stroke-width="1.6"'
            marker = f"{pid}-arrow"
            kind = "declared"
        else:
            style = 'stroke="#64748b" stroke-width="1.8"'
            marker = f"{pid}-arrow"
            kind = "declared"
        tip = f"{e.source} → {e.target}" + (f" ({e.label})" if e.label else "")
        out.append(
            f'<path class="edge edge-{kind}" d="{d}" fill="none" {style} '
            f'marker-end="url(#{marker})"><title>{escape(tip)}</title></path>'
        )
    fills = {
        "base": ("#eff6ff", "#1d4ed8"),
        "merge": ("#f8fafc", "#475569"),
        "flagged": ("#fef2f2", "#dc2626"),
        "model": ("#ffffff", "#94a3b8"),
    }
    for n in nodes:
        x, y = pos[n.id]
        fill, stroke = fills.get(n.kind, fills["model"])
        box = (
            f'<rect class="node node-{escape(n.kind)}" x="{num(x)}" y="{num(y)}" '
            f'width="{num(node_w)}" height="{num(node_h)}" rx="6" fill="{fill}" '
            f'stroke="{stroke}" stroke-width="1.4"/><text x="{num(x + 10)}" '
            f'y="{num(y + node_h / 2 + 4)}" font-size="12" fill="#0f172a">'
            f"{escape(clip(n.label, 32))}<title>{escape(n.label)}</title></text>"
        )
        if n.href:
            out.append(f'<a href="{escape(n.href)}">{box}</a>')
        else:
            out.append(box)
    out.append(
        f'<line x1="16" x2="56" y1="{num(legend_y + 12)}" y2="{num(legend_y + 12)}" '
        f'stroke="#64748b" stroke-width="1.8"/><text x="62" y="{num(legend_y + 16)}" '
        f'font-size="12" fill="{TEXT_COLOR}">declared</text>'
        f'<line x1="150" x2="190" y1="{num(legend_y + 12)}" y2="{num(legend_y + 12)}" '
        f'stroke="#dc2626" stroke-width="2.2" stroke-dasharray="6 4"/>'
        f'<text x="196" y="{num(legend_y + 16)}" font-size="12" fill="{TEXT_COLOR}">'
        "detected, undeclared</text>"
    )
    out.append("</svg>")
    return markup(out)
