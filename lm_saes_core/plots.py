"""Pictures as standalone SVG files (no plotting dependency): a training run's curves, one small panel per metric,
and an evaluation's feature-density histogram. They open in any browser and show in the Dagster UI's file links."""

import math
from collections.abc import Sequence
from html import escape

PANEL_W, PANEL_H = 300, 170
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 52, 12, 26, 30
INK, GRID, LINE, BAR, DEAD = "#222", "#ddd", "#1f6fb2", "#4a8fcf", "#c0392b"


def _ticks(low: float, high: float, n: int = 4) -> list[float]:
    """About `n` round tick values spanning [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low] if math.isfinite(low) else []
    raw = (high - low) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(f for f in (1, 2, 2.5, 5, 10) if f * step >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-2:
        return f"{value:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{value:.3g}"


def _panel(title: str, points: Sequence[tuple[float, float]], x0: float, y0: float, log_y: bool) -> list[str]:
    """One line chart whose plot area's top-left corner is at (x0, y0) of the whole picture."""
    w, h = PANEL_W - MARGIN_L - MARGIN_R, PANEL_H - MARGIN_T - MARGIN_B
    parts = [f'<text x="{x0}" y="{y0 - 10}" font-weight="bold">{escape(title)}</text>']
    points = [(x, y) for x, y in points if math.isfinite(y) and (y > 0 or not log_y)]
    if not points:
        return [*parts, f'<text x="{x0 + 8}" y="{y0 + h / 2}" fill="#888">no values</text>']
    xs, ys = [x for x, _ in points], [math.log10(y) if log_y else y for _, y in points]
    x_low, x_high = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y_low, y_high = min(ys), max(ys)
    if y_high - y_low < 1e-12:
        y_low, y_high = y_low - 0.5, y_high + 0.5
    pad = (y_high - y_low) * 0.05
    y_low, y_high = y_low - pad, y_high + pad

    def sx(x: float) -> float:
        return x0 + (x - x_low) / (x_high - x_low) * w

    def sy(y: float) -> float:
        return y0 + h - (y - y_low) / (y_high - y_low) * h

    for tick in _ticks(y_low, y_high):
        label = _number(10**tick) if log_y else _number(tick)
        parts.append(f'<line x1="{x0}" x2="{x0 + w}" y1="{sy(tick):.1f}" y2="{sy(tick):.1f}" stroke="{GRID}"/>')
        parts.append(f'<text x="{x0 - 4}" y="{sy(tick) + 4:.1f}" text-anchor="end">{label}</text>')
    for tick in _ticks(x_low, x_high, 3):
        parts.append(f'<text x="{sx(tick):.1f}" y="{y0 + h + 14}" text-anchor="middle">{_number(tick)}</text>')
    parts.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="{INK}" stroke-width="0.6"/>')
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys, strict=True))
    parts.append(f'<polyline points="{path}" fill="none" stroke="{LINE}" stroke-width="1.5"/>')
    return parts


def _document(width: float, height: float, parts: list[str], title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif" font-size="10" fill="{INK}">\n'
        f"<title>{escape(title)}</title>\n"
        f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(parts) + "\n</svg>\n"
    )


def curves_svg(title: str, panels: dict[str, Sequence[tuple[float, float]]], *, log_y: Sequence[str] = ()) -> str:
    """Line charts of (step, value) series side by side, two per row; panels named in `log_y` on a log scale."""
    columns = 2
    rows = max(1, math.ceil(len(panels) / columns))
    parts = [f'<text x="{MARGIN_L}" y="16" font-size="12" font-weight="bold">{escape(title)}</text>']
    for index, (name, points) in enumerate(panels.items()):
        x0 = (index % columns) * PANEL_W + MARGIN_L
        y0 = 20 + (index // columns) * PANEL_H + MARGIN_T
        parts += _panel(name, points, x0, y0, name in log_y)
    caption_y = 20 + rows * PANEL_H + 4
    parts.append(f'<text x="{MARGIN_L}" y="{caption_y}" fill="#666">training step</text>')
    return _document(columns * PANEL_W, caption_y + 8, parts, title)


def density_svg(title: str, log10_edges: Sequence[float], counts: Sequence[int], n_dead: int) -> str:
    """Features by log10 activation frequency, with the features that never fired as a separate red bar."""
    w, h = 2 * PANEL_W - MARGIN_L - MARGIN_R - 40, PANEL_H - MARGIN_T - MARGIN_B
    x0, y0 = MARGIN_L + 40, 20 + MARGIN_T
    top = max([*counts, n_dead, 1])
    n = len(counts)
    bar_w = w / (n + 1)
    parts = [f'<text x="{MARGIN_L}" y="16" font-size="12" font-weight="bold">{escape(title)}</text>']
    for tick in _ticks(0, top):
        y = y0 + h - tick / top * h
        parts.append(f'<line x1="{x0 - bar_w}" x2="{x0 + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>')
        parts.append(f'<text x="{x0 - bar_w - 4}" y="{y + 4:.1f}" text-anchor="end">{_number(tick)}</text>')
    height = n_dead / top * h
    parts.append(
        f'<rect class="bar dead" x="{x0 - bar_w:.1f}" y="{y0 + h - height:.1f}" width="{bar_w * 0.9:.1f}" '
        f'height="{height:.1f}" fill="{DEAD}"><title>never fired: {n_dead}</title></rect>'
    )
    parts.append(f'<text x="{x0 - bar_w / 2:.1f}" y="{y0 + h + 14}" text-anchor="middle">dead</text>')
    for i, count in enumerate(counts):
        height = count / top * h
        left = x0 + i * w / n
        tip = f"10^{log10_edges[i]:.2f} to 10^{log10_edges[i + 1]:.2f}: {count}"
        parts.append(
            f'<rect class="bar" x="{left:.1f}" y="{y0 + h - height:.1f}" width="{w / n * 0.9:.1f}" '
            f'height="{height:.1f}" fill="{BAR}"><title>{tip}</title></rect>'
        )
    for tick in _ticks(log10_edges[0], log10_edges[-1], 4):
        x = x0 + (tick - log10_edges[0]) / (log10_edges[-1] - log10_edges[0]) * w
        parts.append(f'<text x="{x:.1f}" y="{y0 + h + 14}" text-anchor="middle">1e{tick:.0f}</text>')
    parts.append(
        f'<text x="{x0 + w / 2:.1f}" y="{y0 + h + 28}" text-anchor="middle" fill="#666">'
        "activation frequency (fraction of tokens, log scale); bars: number of features</text>"
    )
    return _document(2 * PANEL_W, y0 + h + 36, parts, title)
