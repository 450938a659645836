"""The book's figure style: one place for fonts, sizes and colours.

Every chapter draws with it::

    from monosemantic import style

    fig, ax = style.figure("half")          # sized for the PDF's text width, style applied
    ax.plot(x, y, color=style.COLORS["ours"])
    style.savefig(fig, "sae-loss")          # also writes figures/sae-loss.png for the README (returns None)

    style.table(frame)                      # a DataFrame as a markdown table: `code` and $math$ in cells render

Colours are the Okabe-Ito palette (Okabe & Ito 2008, "Color Universal Design"), distinguishable with
the common colour-vision deficiencies and in greyscale print; yellow is kept last because it is faint on
white paper. Sizes are in inches for the PDF's text column (A4, 2.3 cm margins: 6.4 in wide), so a figure
is never scaled down and its 9-pt labels stay 9 pt.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from .config import project_root

# Okabe-Ito, ordered for line plots: strongest contrast first.
PALETTE: tuple[str, ...] = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#CC79A7",  # reddish purple
    "#000000",  # black
    "#F0E442",  # yellow
)
# Fixed meanings: the same thing has the same colour in every chapter, and each colour means one thing
# (a test checks both). A figure picks its colours here by meaning, never from PALETTE by position; two
# series of one thing (training and validation loss) differ by line style, not colour; ordered series
# (dictionary sizes) are shades of SEQUENTIAL (:func:`sequence`).
COLORS: dict[str, str] = {
    "ours": PALETTE[0],  # our SAEs (the TopK recipe) and their features, and our own runs
    "anchor": PALETTE[1],  # the work we reproduce (Ward's "Monosemanticity at Home"): its ReLU + L1 recipe
    "neurons": PALETTE[6],  # the neuron basis (MLP neurons, of any model)
    "random": PALETTE[5],  # random baselines and controls (random directions, a random dictionary, a control fine-tune)
    "random_model": "#7A3F63",  # the one control drawn beside another: the SAE of a randomly initialised model
    # (a darker shade of "random", so the two controls part in colour and in greyscale)
    "other": PALETTE[4],  # other methods compared (a plain ReLU autoencoder, PCA)
    "alive": PALETTE[2],
    "dead": PALETTE[3],
    "muted": "#8C8C8C",  # guides, not data: thresholds, reference lines, points out of focus
}
# the kinds of unit the monosemanticity comparisons draw side by side (analysis unit sets), by meaning
UNIT_COLORS: dict[str, str] = {"neurons": COLORS["neurons"], "topk": COLORS["ours"], "anchor": COLORS["anchor"],
                               "random": COLORS["random"], "random-model": COLORS["random_model"]}
SEQUENTIAL = "viridis"  # heatmaps: perceptually uniform, colour-blind safe, prints in greyscale
DIVERGING = "RdBu_r"  # signed quantities (logit effects), centred on zero by the caller

TEXT_WIDTH_IN = 6.4
SIZES: dict[str, tuple[float, float]] = {
    "full": (TEXT_WIDTH_IN, 3.4),
    "wide": (TEXT_WIDTH_IN, 2.4),  # a row of small panels
    "half": (TEXT_WIDTH_IN / 2, 2.4),
    "square": (3.6, 3.4),
}
FONT_SIZE = 9
DPI = 150  # in the book: sharp on screen and in print at the sizes above
SAVE_DPI = 200  # committed PNGs (figures/)

RC: dict[str, object] = {
    "font.family": "DejaVu Sans",  # ships with matplotlib, so every machine renders the same glyphs
    "font.size": FONT_SIZE,
    "axes.titlesize": FONT_SIZE + 1,
    "axes.labelsize": FONT_SIZE,
    "xtick.labelsize": FONT_SIZE - 1,
    "ytick.labelsize": FONT_SIZE - 1,
    "legend.fontsize": FONT_SIZE - 1,
    "legend.frameon": False,
    "axes.prop_cycle": None,  # filled in by apply()
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#E5E5E5",
    "grid.linewidth": 0.6,
    "axes.axisbelow": True,
    "axes.edgecolor": "#4D4D4D",
    "axes.linewidth": 0.8,
    "lines.linewidth": 1.6,
    "lines.markersize": 4,
    "image.cmap": SEQUENTIAL,
    "figure.dpi": DPI,
    "savefig.dpi": SAVE_DPI,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.05,
    "figure.constrained_layout.use": True,
}

Width = Literal["full", "wide", "half", "square"]
_MARKDOWN_PUNCTUATION = re.compile(r"[!-/:-@\\[-`{-~]")  # ASCII punctuation: pandoc escapes any of it


def _rc() -> dict[str, object]:
    from cycler import cycler

    return {**RC, "axes.prop_cycle": cycler(color=PALETTE)}


def apply() -> None:
    """Make the book's style matplotlib's default for this process (chapters call it once)."""
    import matplotlib as mpl

    mpl.rcParams.update(_rc())


@contextlib.contextmanager
def context() -> Iterator[None]:
    """The book's style inside a ``with`` block only."""
    import matplotlib as mpl

    with mpl.rc_context(_rc()):
        yield


def figure(width: Width = "full", nrows: int = 1, ncols: int = 1, height: float | None = None, **kwargs):
    """``(fig, ax)`` (or ``(fig, axes)`` for several panels) at one of the book's sizes, style applied."""
    import matplotlib.pyplot as plt

    apply()
    w, h = SIZES[width]
    return plt.subplots(nrows, ncols, figsize=(w, height or h), **kwargs)


def sequence(n: int) -> list[str]:
    """``n`` colours for an ordered series (dictionary sizes, training steps): shades of :data:`SEQUENTIAL`
    from dark to light, so that no series borrows a colour that means something else (:data:`COLORS`)."""
    import matplotlib as mpl

    cmap = mpl.colormaps[SEQUENTIAL]
    return [mpl.colors.to_hex(cmap(0.05 + 0.8 * i / max(n - 1, 1))) for i in range(n)]


def legend_above(ax, ncols: int | None = None, **kwargs):
    """The legend of ``ax`` set above its plotting area, in one row where it fits (``ncols``), so that it
    never covers data, a threshold line or a label; constrained layout makes room for it."""
    handles, labels = ax.get_legend_handles_labels()
    kwargs.setdefault("fontsize", FONT_SIZE - 2)
    if ncols is None:  # as many columns as fit the axes' width (a column: its handle and longest label)
        room = ax.get_position().width * ax.figure.get_figwidth() * 72 / (0.65 * kwargs["fontsize"])  # chars
        widest = max((len(t) for t in labels), default=0) + 8
        ncols = next((c for c in range(len(labels), 0, -1) if c * widest <= room), 1)
    return ax.legend(handles, labels, loc="lower left", bbox_to_anchor=(0, 1.02, 1, 0.2), mode="expand",
                     ncols=max(1, ncols), borderaxespad=0, **kwargs)


# candidate places for a point's label, in points from the point: right, above, left, below, the diagonals
_LABEL_OFFSETS = ((4, -3), (3, 4), (-4, -3), (0, -9), (0, 5), (3, -10), (-3, 4), (-3, -10), (7, 7), (-7, -13))


def label_points(ax, xs, ys, labels, *, fontsize: float = FONT_SIZE - 3, color: str | None = None) -> list:
    """Label the points ``(xs[i], ys[i])`` of ``ax`` with ``labels[i]``, each where its text overlaps no other
    label, no marker or line already drawn in ``ax``, and stays inside the axes: the first free place of a
    few beside the point (the least crowded one when none is free). Call it after everything else is drawn
    in ``ax`` (lines, markers, axis scales and limits). Returns the annotations."""
    import numpy as np
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()  # the layout, so that display coordinates are final
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    obstacles: list[Bbox] = [t.get_window_extent(renderer) for t in ax.texts]
    px = fig.dpi / 72  # display pixels per point
    for line in ax.get_lines():
        xy = ax.transData.transform(np.column_stack([np.asarray(v, dtype=float) for v in line.get_data()]))
        xy = xy[np.isfinite(xy).all(axis=1)]
        r = max(line.get_markersize() * px / 2, 1.5) if line.get_marker() not in (None, "None", "", " ") else 1.0
        samples = [xy]
        if line.get_linestyle() not in ("None", "", " "):  # the segments between points, every few pixels
            for a, b in zip(xy[:-1], xy[1:], strict=True):
                n = int(np.hypot(*(b - a)) // 3) + 2
                samples.append(a + np.linspace(0, 1, n)[:, None] * (b - a))
        obstacles += [Bbox.from_bounds(x - r, y - r, 2 * r, 2 * r) for x, y in np.concatenate(samples)]
    for coll in ax.collections:
        offsets = coll.get_offsets()
        if len(offsets):
            xy = coll.get_offset_transform().transform(offsets)
            obstacles += [Bbox.from_bounds(x - 2 * px, y - 2 * px, 4 * px, 4 * px) for x, y in xy]
    placed = []
    for x, y, text in zip(xs, ys, labels, strict=True):
        best, best_cost = None, None
        for dx, dy in _LABEL_OFFSETS:
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                              color=color, ha="left" if dx > 0 else "right" if dx < 0 else "center",
                              annotation_clip=False)
            ann.set_in_layout(False)
            box = ann.get_window_extent(renderer).expanded(1.05, 1.1)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            cost = sum(box.overlaps(o) for o in obstacles) + (0 if inside else 1000)
            if best_cost is None or cost < best_cost:
                if best is not None:
                    best.remove()
                best, best_cost = ann, cost
            else:
                ann.remove()
            if cost == 0:
                break
        obstacles.append(best.get_window_extent(renderer))
        placed.append(best)
    return placed


def figure_path(name: str, folder: Path | None = None) -> Path:
    """Where :func:`savefig` writes the figure called ``name``: ``figures/<name>.png``."""
    return (folder or project_root() / "figures") / f"{name}.png"


def savefig(fig, name: str, folder: Path | None = None) -> None:
    """Write ``fig`` as ``figures/<name>.png`` (the committed figures the README shows). In a chapter the
    figure is displayed as usual as well; nothing is returned, so a cell may end with this call without
    printing a value."""
    path = figure_path(name, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=SAVE_DPI, metadata={"Software": None})  # no version string: same bytes on rebuild


def table(frame, *, index: bool = True, digits: int = 3, literal: Iterable[str] = ()):
    """``frame`` (a pandas DataFrame) displayed as a markdown pipe table rather than pandas' HTML, so
    that markdown in its cells (`code`, $math$, links) is rendered, by Quarto and by the preview builder
    alike; use it in a cell labelled ``tbl-...``. Floats are shown to ``digits`` significant digits;
    columns of numbers are right-aligned. The columns named in ``literal`` hold data shown as it is
    (tokens, contexts: a backtick or a dollar sign there is text), so their markdown characters are escaped."""
    import numbers

    from IPython.display import Markdown

    def cell(value, plain: bool = False) -> str:
        if isinstance(value, float):
            from .chapter import sci

            text = sci(value, digits) if 0 < abs(value) < 1e-3 else f"{value:.{digits}g}"  # never 1e-05
        else:
            text = str(value)
        if plain:
            return _MARKDOWN_PUNCTUATION.sub(r"\\\g<0>", text).replace("\n", " ")
        return text.replace("|", "\\|").replace("\n", " ")

    import pandas as pd

    # a meaningful index (named, or not just 0..n-1) becomes the first column
    default_index = isinstance(frame.index, pd.RangeIndex) and frame.index.name is None
    data = frame.reset_index() if index and not default_index else frame
    columns = [str(c) for c in data.columns]
    numeric = [all(isinstance(v, numbers.Number) for v in data[c]) for c in data.columns]
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in columns) + " |",
             "|" + "|".join("---:" if n else ":---" for n in numeric) + "|"]
    plain = [c in set(literal) for c in columns]
    lines += ["| " + " | ".join(cell(v, p) for v, p in zip(row, plain, strict=True)) + " |"
              for row in data.itertuples(index=False)]
    return Markdown("\n".join(lines))
