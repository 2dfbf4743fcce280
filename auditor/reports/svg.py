"""SVG primitives shared by the charts: palette, number formatting, escaping, frames.

Numbers go through ``num`` which refuses NaN and infinities (they would make invalid SVG,
and a crafted report could carry them); text goes through ``markupsafe.escape``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from markupsafe import Markup, escape

# Okabe-Ito: readable for the common colour-vision deficiencies.
PALETTE = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#D55E00",
    "#8C6D1F",
    "#000000",
)
AXIS_COLOR = "#94a3b8"
GRID_COLOR = "#e2e8f0"
TEXT_COLOR = "#334155"
FONT = "font-family:system-ui,-apple-system,'Segoe UI',sans-serif"


def num(value: float) -> str:
    """A finite number formatted for an SVG attribute."""
    if not math.isfinite(value):
        value = 0.0
    return f"{value:.2f}".rstrip("0").rstrip(".") or "0"


def finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def fmt_label(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (the classic 1-2-5 steps)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    value = start
    while value <= hi + step * 1e-6 and len(ticks) < 50:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < hi:
        ticks.append(round(value, 10))
    return ticks


def svg_open(width: float, height: float, *, css_class: str, title: str) -> str:
    return (
        f'<svg class="chart {escape(css_class)}" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {num(width)} {num(height)}" width="100%" '
        f'style="max-width:{num(width)}px;{FONT}" role="img" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>'
    )


def markup(parts: Sequence[str]) -> Markup:
    # The one place SVG text becomes Markup: every builder above escapes each interpolated
    # string with ``escape`` and each number with ``num``, so the joined parts are safe.
    return Markup("".join(parts))  # noqa: S704


def empty_chart(css_class: str, title: str, message: str) -> Markup:
    return markup([
        svg_open(480, 60, css_class=css_class, title=title),
        f'<text x="12" y="34" font-size="13" fill="{AXIS_COLOR}">{escape(message)}</text></svg>',
    ])


def legend_block(labels: Sequence[str], *, x: float, y: float, width: float) -> tuple[str, float]:
    """Legend items laid out left to right, wrapping; returns (svg, height used)."""
    parts: list[str] = []
    cx, cy = x, y
    for i, label in enumerate(labels):
        text = clip(label, 48)
        item_w = 22 + 6.6 * len(text) + 18
        if cx + item_w > x + width and cx > x:
            cx, cy = x, cy + 20
        color = PALETTE[i % len(PALETTE)]
        parts.append(
            f'<rect x="{num(cx)}" y="{num(cy - 9)}" width="12" height="12" rx="2" '
            f'fill="{color}"/><text x="{num(cx + 17)}" y="{num(cy + 1)}" font-size="12" '
            f'fill="{TEXT_COLOR}">{escape(text)}</text>'
        )
        cx += item_w
    return "".join(parts), (cy - y) + 20 if labels else 0.0


# --- bars --------------------------------------------------------------------------------------
