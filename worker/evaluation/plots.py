"""Small PNG plots drawn with PIL (no matplotlib dependency): line charts (linear or log10 axes), histograms and
image grids. Enough for DET curves, score histograms and the D<->(s) plot of the evaluation report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75), (23, 190, 207)]
W, H = 640, 440
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 36, 56


def _font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]
    color: tuple[int, int, int] | None = None
    dashed: bool = False


class Axes:
    """Maps data to pixels for one plot area; ``log`` axes take log10 of positive values."""

    def __init__(
        self, xlim: tuple[float, float], ylim: tuple[float, float], xlog: bool = False, ylog: bool = False
    ) -> None:
        self.xlim, self.ylim, self.xlog, self.ylog = xlim, ylim, xlog, ylog

    def _t(self, v, log):
        return math.log10(v) if log else v

    def px(self, x: float, y: float) -> tuple[float, float]:
        x0, x1 = (self._t(v, self.xlog) for v in self.xlim)
        y0, y1 = (self._t(v, self.ylog) for v in self.ylim)
        fx = (self._t(x, self.xlog) - x0) / (x1 - x0)
        fy = (self._t(y, self.ylog) - y0) / (y1 - y0)
        return LEFT + fx * (W - LEFT - RIGHT), H - BOTTOM - fy * (H - TOP - BOTTOM)


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        return [10.0**e for e in range(math.ceil(math.log10(lo) - 1e-9), math.floor(math.log10(hi) + 1e-9) + 1)]
    span = hi - lo
    step = 10 ** math.floor(math.log10(span / 5)) if span > 0 else 1
    for mult in (1, 2, 5, 10):
        if span / (step * mult) <= 6:
            step *= mult
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _fmt(v: float, log: bool) -> str:
    if log:
        return f"1e{int(round(math.log10(v)))}"
    return f"{v:.2f}".rstrip("0").rstrip(".") if abs(v) < 100 else f"{v:.0f}"


def _frame(draw: ImageDraw.ImageDraw, ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    font = _font()
    draw.rectangle([LEFT, TOP, W - RIGHT, H - BOTTOM], outline=(0, 0, 0))
    for t in _ticks(*ax.xlim, ax.xlog):
        x, _ = ax.px(t, ax.ylim[0])
        draw.line([x, TOP, x, H - BOTTOM], fill=(225, 225, 225))
        draw.text((x, H - BOTTOM + 4), _fmt(t, ax.xlog), fill=(0, 0, 0), font=font, anchor="ma")
    for t in _ticks(*ax.ylim, ax.ylog):
        _, y = ax.px(ax.xlim[0], t)
        draw.line([LEFT, y, W - RIGHT, y], fill=(225, 225, 225))
        draw.text((LEFT - 4, y), _fmt(t, ax.ylog), fill=(0, 0, 0), font=font, anchor="rm")
    draw.rectangle([LEFT, TOP, W - RIGHT, H - BOTTOM], outline=(0, 0, 0))
    draw.text((W // 2, 10), title, fill=(0, 0, 0), font=_font(15), anchor="ma")
    draw.text(((LEFT + W - RIGHT) // 2, H - 22), xlabel, fill=(0, 0, 0), font=font, anchor="ma")
    draw.text((6, TOP - 18), ylabel, fill=(0, 0, 0), font=font)


def _legend(draw: ImageDraw.ImageDraw, labels: list[tuple[str, tuple[int, int, int]]]) -> None:
    font = _font(12)
    y = TOP + 6
    for label, color in labels:
        draw.line([W - RIGHT - 235, y + 6, W - RIGHT - 215, y + 6], fill=color, width=3)
        draw.text((W - RIGHT - 210, y), label, fill=(0, 0, 0), font=font)
        y += 16


def _polyline(draw, pts, color, dashed=False, width=2):
    if len(pts) < 2:
        return
    if not dashed:
        draw.line(pts, fill=color, width=width)
        return
    for i in range(0, len(pts) - 1, 2):
        draw.line([pts[i], pts[i + 1]], fill=color, width=width)


def line_plot(
    series: Sequence[Series],
    title: str,
    xlabel: str,
    ylabel: str,
    xlim: tuple[float, float],
    ylim: tuple[float, float],
    xlog: bool = False,
    ylog: bool = False,
) -> Image.Image:
    """Line chart; on log axes, points <= 0 are clipped to the axis minimum."""
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    ax = Axes(xlim, ylim, xlog, ylog)
    _frame(draw, ax, title, xlabel, ylabel)
    labels = []
    for i, s in enumerate(series):
        color = s.color or COLORS[i % len(COLORS)]
        xs = np.clip(np.asarray(s.x, float), *xlim)
        ys = np.clip(np.asarray(s.y, float), *ylim)
        _polyline(draw, [ax.px(x, y) for x, y in zip(xs, ys, strict=True)], color, s.dashed)
        labels.append((s.label, color))
    _legend(draw, labels)
    return img


def histogram(
    groups: Sequence[tuple[str, np.ndarray]],
    title: str,
    xlabel: str,
    xlim: tuple[float, float] = (-1.0, 1.0),
    bins: int = 60,
    marks: Sequence[tuple[str, float]] = (),
) -> Image.Image:
    """Density histograms (each group integrates to 1) drawn as outlines, with vertical threshold marks."""
    edges = np.linspace(xlim[0], xlim[1], bins + 1)
    dens = []
    for _, v in groups:
        v = np.asarray(v, float)
        v = v[np.isfinite(v)]
        d, _ = np.histogram(np.clip(v, *xlim), bins=edges, density=True) if v.size else (np.zeros(bins), None)
        dens.append(d)
    top = max([float(d.max()) for d in dens] + [1e-6]) * 1.1
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    ax = Axes(xlim, (0.0, top))
    _frame(draw, ax, title, xlabel, "density")
    labels = []
    for i, ((label, v), d) in enumerate(zip(groups, dens, strict=True)):
        color = COLORS[i % len(COLORS)]
        pts = []
        for k in range(bins):
            pts += [ax.px(edges[k], d[k]), ax.px(edges[k + 1], d[k])]
        _polyline(draw, pts, color)
        labels.append((f"{label} (n={np.isfinite(np.asarray(v, float)).sum()})", color))
    for label, x in marks:
        if xlim[0] <= x <= xlim[1]:
            px, _ = ax.px(x, 0)
            for y in range(TOP, H - BOTTOM, 8):
                draw.line([px, y, px, y + 4], fill=(0, 0, 0))
            draw.text((px + 3, H - BOTTOM - 16), label, fill=(0, 0, 0), font=_font(11))
    _legend(draw, labels)
    return img


def image_grid(rows: np.ndarray, column_labels: Sequence[str], row_labels: Sequence[str]) -> Image.Image:
    """rows (R, C, S, S, 3) uint8 -> one labelled grid image."""
    r, c, s = rows.shape[0], rows.shape[1], rows.shape[2]
    head, side, gap = 30, 130, 4
    img = Image.new("RGB", (side + c * (s + gap), head + r * (s + gap)), "white")
    draw = ImageDraw.Draw(img)
    font = _font(11)
    for j, label in enumerate(column_labels[:c]):
        draw.text((side + j * (s + gap) + s // 2, 8), label, fill=(0, 0, 0), font=font, anchor="ma")
    for i in range(r):
        draw.text((4, head + i * (s + gap) + s // 2), row_labels[i][:20], fill=(0, 0, 0), font=font, anchor="lm")
        for j in range(c):
            img.paste(Image.fromarray(rows[i, j]), (side + j * (s + gap), head + i * (s + gap)))
    return img
