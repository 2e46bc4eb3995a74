"""Fidelity against file size and against latency, with the Pareto front marked (a PNG).

Each point is a model: the original and the final model of every compared pipeline. Cost (file
size, latency) is better when lower, fidelity (accuracy, top-1 agreement, cosine, SNR) when
higher. A point is on the Pareto front when no other point is at least as cheap *and* at least
as faithful, and strictly better in one of the two; equal points do not dominate each other.
The front is drawn as the staircase of the best fidelity reachable at each cost.

matplotlib is an optional extra (``pip install 'graph-opt[plot]'``), imported only when a figure
is drawn; without it `plot_front` raises `PlotUnavailable` and the caller goes on without the
figure. The figure uses matplotlib's object API on the Agg canvas (no pyplot, no global backend
switch), so it draws headless and leaves the caller's matplotlib state alone.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from graph_opt.model_io import write_atomic

PLOT_EXTRA = "pip install 'graph-opt[plot]'"


class PlotUnavailable(Exception):
    """matplotlib is not installed: the plot is skipped, everything else stands."""


@dataclass(frozen=True)
class Point:
    label: str
    size: float | None  # file bytes
    latency: float | None  # ms
    fidelity: float | None
    reference: bool = False  # the original model, drawn as a star


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[bool]:
    """For (cost, fidelity) pairs: True where no other pair dominates (lower cost, higher fidelity).

    A pair with a missing cost or fidelity is never on the front and dominates nothing. An
    infinite fidelity (SNR of the original against itself) compares like any other number.
    """
    def usable(c: float | None, f: float | None) -> bool:
        return _finite(c) and f is not None and not math.isnan(f)

    front = []
    for i, (ci, fi) in enumerate(points):
        if not usable(ci, fi):
            front.append(False)
            continue
        dominated = any(usable(cj, fj) and cj <= ci and fj >= fi and (cj < ci or fj > fi)
                        for j, (cj, fj) in enumerate(points) if j != i)
        front.append(not dominated)
    return front


def _label_offsets(labels: dict[tuple[float, float], list[str]], width: float = 360.0, height: float = 280.0):
    """Greedy label placement: each label goes right of its point, moved up or down (in points)
    until its box clears the labels already placed. Sizes approximate an axes of `width`×`height`
    points with 8-point text, which is enough to keep nearby names (P3, P4) apart."""
    if not labels:
        return []
    xs, ys = [x for x, _ in labels], [y for _, y in labels]
    spanx, spany = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    placed: list[tuple[float, float, float]] = []
    out = []
    for (x, y), names in sorted(labels.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        text = ", ".join(names)
        w = 4.8 * len(text)
        px, py = (x - min(xs)) / spanx * width, (y - min(ys)) / spany * height
        for dy in (4, -12, 16, -24, 28, -36, 40, -48):
            cx, cy = px + 5, py + dy
            if all(not (cx < qx + qw and qx < cx + w and abs(cy - qy) < 10) for qx, qy, qw in placed):
                break
        placed.append((cx, cy, w))
        out.append(((x, y), (5, dy), text))
    return out


def _import_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable(f"matplotlib is not installed ({PLOT_EXTRA})") from None
    return Figure, FigureCanvasAgg


def plot_front(points: Sequence[Point], path: str | Path, *, metric: str, title: str = "") -> Path:
    """Write a PNG: fidelity against file size (and against latency when measured), front marked."""
    Figure, FigureCanvasAgg = _import_matplotlib()
    panels = [("size", "file size", "file size (KB)", 1 / 1024)]
    if any(_finite(p.latency) for p in points):
        panels.append(("latency", "latency", "onnxruntime CPU latency (ms, median, one interleaved run)", 1.0))
    fig = Figure(figsize=(6.0 * len(panels), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    for k, (attr, what, xlabel, scale) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        costs = [getattr(p, attr) for p in points]
        front = pareto_front([(c, p.fidelity) for c, p in zip(costs, points)])
        shown = [(c * scale, p.fidelity, p, on) for c, p, on in zip(costs, points, front)
                 if _finite(c) and _finite(p.fidelity)]
        labels: dict[tuple[float, float], list[str]] = {}  # coinciding points share one label
        for x, y, p, on in shown:
            ax.scatter([x], [y], marker="*" if p.reference else "o", s=160 if p.reference else 50, zorder=3,
                       color="tab:red" if on else "tab:gray", edgecolors="black", linewidths=0.5)
            labels.setdefault((x, y), []).append(p.label)
        for (x, y), (dx, dy), text in _label_offsets(labels):
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8)
        stairs = sorted((x, y) for x, y, _, on in shown if on)
        if stairs:
            ax.step([x for x, _ in stairs], [y for _, y in stairs], where="post", color="tab:red",
                    linestyle="--", linewidth=1, zorder=2, label="Pareto front")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} against {what}")
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    target = Path(path).resolve()
    write_atomic(target, buf.getvalue())
    return target
