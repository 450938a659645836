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
from collections.abc import Iterator
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
# Fixed meanings, so that the same thing has the same colour in every chapter.
COLORS: dict[str, str] = {
    "ours": PALETTE[0],
    "anchor": PALETTE[1],  # the work we reproduce (Ward's "Monosemanticity at Home")
    "reference": PALETTE[6],  # published values, baselines
    "dead": PALETTE[3],
    "alive": PALETTE[2],
    "highlight": PALETTE[1],
    "muted": "#8C8C8C",
}
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


def table(frame, *, index: bool = True, digits: int = 3):
    """``frame`` (a pandas DataFrame) displayed as a markdown pipe table rather than pandas' HTML, so
    that markdown in its cells (`code`, $math$, links) is rendered, by Quarto and by the preview builder
    alike; use it in a cell labelled ``tbl-...``. Floats are shown to ``digits`` significant digits;
    columns of numbers are right-aligned."""
    import numbers

    from IPython.display import Markdown

    def cell(value) -> str:
        if isinstance(value, float):
            text = f"{value:.{digits}g}"
        else:
            text = str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    import pandas as pd

    # a meaningful index (named, or not just 0..n-1) becomes the first column
    default_index = isinstance(frame.index, pd.RangeIndex) and frame.index.name is None
    data = frame.reset_index() if index and not default_index else frame
    columns = [str(c) for c in data.columns]
    numeric = [all(isinstance(v, numbers.Number) for v in data[c]) for c in data.columns]
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in columns) + " |",
             "|" + "|".join("---:" if n else ":---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in data.itertuples(index=False)]
    return Markdown("\n".join(lines))
