"""A classifier's mistakes, for people: the confusion matrix as a picture (PNG and TensorBoard),
per-class accuracy and the most confused pairs of classes.

Rows of a confusion matrix are true classes, columns predicted ones (as `loop.evaluate` counts them).
matplotlib is imported inside the drawing functions: importing it costs start-up time that every
`ec2train` command would otherwise pay. Only its Agg canvas is used (never pyplot), so drawing
works without a display and leaves no global figure state behind in a training process.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from ec2train.export import atomic_write

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Up to this many classes each cell shows its count and both axes show names;
# above it the colour scale carries the values and the columns are numbered.
ANNOTATE_MAX = 20
NAMES_ON_BOTH_AXES_MAX = 40
LABEL_CHARS = 36  # fits every dogImages breed; longer class names are cut, with an ellipsis, in tick labels
TOP_K = 10
PIPE, ESCAPED_PIPE = "|", "\\|"  # a | in a class name would end a markdown table cell


# The first drawing in a process costs seconds (matplotlib's import, its font cache, FreeType),
# the next ones a fraction of a second; fit starts one in the background (`warm_up`).
_warm_up: threading.Thread | None = None


def warm_up() -> None:
    """Import matplotlib and draw a throwaway figure in a background thread, so that the
    confusion picture at the end of fit is drawn warm. Drawing waits for it to finish."""
    global _warm_up
    if _warm_up is None:
        _warm_up = threading.Thread(target=_draw_once, name="ec2train-plots-warm-up", daemon=True)
        _warm_up.start()


def _draw_once() -> None:
    try:
        render(confusion_figure(torch.eye(2), ["a", "b"]))
    except Exception:  # the real drawing reports what is wrong
        pass


def _wait_for_warm_up() -> None:
    if _warm_up is not None and _warm_up is not threading.current_thread():
        _warm_up.join()


class Confusion(NamedTuple):
    """`count` images of class `true` were predicted as `predicted`: `fraction_of_true` of that class."""

    true: str
    predicted: str
    count: int
    fraction_of_true: float

    @property
    def true_images(self) -> int:
        return round(self.count / self.fraction_of_true)


def _matrix(confusion: Any, class_names: Sequence[str]) -> torch.Tensor:
    m = torch.as_tensor(confusion, dtype=torch.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(class_names):
        raise ValueError(f"confusion matrix of shape {tuple(m.shape)} does not match {len(class_names)} class names")
    return m


def most_confused(confusion: Any, class_names: Sequence[str], k: int = TOP_K) -> list[Confusion]:
    """The k largest off-diagonal cells (most images first; ties: larger share of the true class)."""
    m = _matrix(confusion, class_names)
    totals = m.sum(dim=1)
    cells = [(i, j) for i, j in torch.nonzero(m > 0).tolist() if i != j]
    cells.sort(key=lambda c: (-m[c].item(), -(m[c] / totals[c[0]]).item(), c))
    return [Confusion(class_names[i], class_names[j], int(m[i, j]), float(m[i, j] / totals[i])) for i, j in cells[:k]]


def per_class_accuracy(confusion: Any, class_names: Sequence[str]) -> dict[str, float | None]:
    """Top-1 accuracy of each true class; None for a class with no images."""
    m = _matrix(confusion, class_names)
    totals = m.sum(dim=1)
    return {name: (float(m[i, i] / totals[i]) if totals[i] else None) for i, name in enumerate(class_names)}


def confused_line(pair: Confusion) -> str:
    """One line for a terminal: `Husky -> Malamute: 5 of 10 images (50%)`."""
    return f"{pair.true} -> {pair.predicted}: {pair.count} of {pair.true_images} images ({pair.fraction_of_true:.0%})"


# ---------------------------------------------------------------- the figure


def _short(name: str) -> str:
    return name if len(name) <= LABEL_CHARS else name[: LABEL_CHARS - 1] + "\u2026"


class _Layout(NamedTuple):
    cell_in: float  # side of one cell, inches
    font_pt: float  # tick labels
    annotate: bool  # counts in cells
    names_on_columns: bool  # names (else indices) under the columns
    dpi: int


def _layout(n: int) -> _Layout:
    if n <= ANNOTATE_MAX:
        return _Layout(cell_in=min(0.9, max(0.45, 3.6 / n)), font_pt=9, annotate=True, names_on_columns=True, dpi=110)
    if n <= NAMES_ON_BOTH_AXES_MAX:
        return _Layout(cell_in=0.2, font_pt=8, annotate=False, names_on_columns=True, dpi=110)
    # 133 classes: 0.14 in rows hold a 7 pt name each; the whole picture is about 2,300 px tall.
    return _Layout(cell_in=0.14, font_pt=7, annotate=False, names_on_columns=False, dpi=110)


def _draw_matrix(ax: Axes, m: torch.Tensor, class_names: Sequence[str], lay: _Layout, top: list[tuple[int, int]]):
    from matplotlib.patches import Rectangle

    n = m.shape[0]
    rows = (m / m.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    image = ax.imshow(rows, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="equal")
    if lay.annotate:
        for i in range(n):
            for j in range(n):
                count = int(m[i, j])
                color = "white" if rows[i, j] > 0.55 else ("0.6" if count == 0 else "black")
                ax.text(j, i, str(count), ha="center", va="center", fontsize=lay.font_pt + 1, color=color)
    # The most confused cells get a red frame, so the list beside the matrix can be found in it.
    for i, j in top:
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#d62728", linewidth=1.5))
    ax.set_yticks(
        range(n),
        [_short(c) if lay.names_on_columns else f"{_short(c)} [{i}]" for i, c in enumerate(class_names)],
        fontsize=lay.font_pt,
    )
    if lay.names_on_columns:
        ax.set_xticks(
            range(n),
            [_short(c) for c in class_names],
            fontsize=lay.font_pt,
            rotation=45,
            ha="right",
            rotation_mode="anchor",
        )
    else:
        ax.set_xticks(range(n), [str(i) for i in range(n)], fontsize=lay.font_pt - 1, rotation=90)
        ax.tick_params(axis="x", top=True, labeltop=True)  # a tall matrix: column numbers at both ends
    ax.set_ylabel("true class", fontsize=11)
    ax.set_xlabel(
        "predicted class" + ("" if lay.names_on_columns else " (number in [ ] beside each true class)"), fontsize=11
    )
    # Cell borders as two line sets, not as minor-tick grid lines: 266 minor ticks for 133 classes
    # cost seconds to lay out.
    edges = [x - 0.5 for x in range(1, n)]
    ax.hlines(edges, -0.5, n - 0.5, color="0.92", linewidth=0.5)
    ax.vlines(edges, -0.5, n - 0.5, color="0.92", linewidth=0.5)
    return image


def _inches_right_of(side_in: float, gap_in: float) -> float:
    """An x in axes fraction, gap_in inches right of the matrix (its side is side_in inches)."""
    return 1.0 + gap_in / side_in


def _draw_colorbar(ax: Axes, image, side_in: float) -> None:
    # Beside the matrix's top, at most 4 in tall: a 19 in colour bar next to 133 classes helps nobody.
    height = min(side_in, 4.0)
    bar_ax = ax.inset_axes([_inches_right_of(side_in, 0.15), 1 - height / side_in, 0.2 / side_in, height / side_in])
    bar = ax.figure.colorbar(image, cax=bar_ax)
    bar.set_label("fraction of the true class's images", fontsize=9)
    bar.ax.tick_params(labelsize=8)


def _draw_pairs(ax: Axes, pairs: list[Confusion], side_in: float, index: dict[str, int] | None) -> None:
    def name(c: str) -> str:
        return f"{c} [{index[c]}]" if index else c

    if pairs:
        lines = ["Most confused (true \u2192 predicted)", ""]
        for rank, p in enumerate(pairs, 1):
            lines += [
                f"{rank:>2}. {name(p.true)}",
                f"     \u2192 {name(p.predicted)}:  {p.count} of {p.true_images} ({p.fraction_of_true:.0%})",
            ]
    else:
        lines = ["No confusions: every image", "was predicted as its true class."]
    ax.text(
        _inches_right_of(side_in, 1.3),
        1.0,
        "\n".join(lines),
        transform=ax.transAxes,
        va="top",
        ha="left",
        fontsize=9.5,
        linespacing=1.45,
    )


def confusion_figure(confusion: Any, class_names: Sequence[str], title: str | None = None, k: int = TOP_K) -> Figure:
    """The row-normalised confusion matrix (counts in cells up to 20 classes), its colour scale and
    the k most confused pairs listed beside it: a matplotlib Figure, not attached to pyplot.
    Everything hangs off the matrix's axes, so cropping to what was drawn leaves no gaps."""
    _wait_for_warm_up()  # matplotlib's first-use set-up is not thread-safe
    from matplotlib.figure import Figure

    m = _matrix(confusion, class_names)
    n, lay = m.shape[0], _layout(m.shape[0])
    pairs = most_confused(m, class_names, k)
    index = {name: i for i, name in enumerate(class_names)}
    side = n * lay.cell_in
    # Generous on purpose: render() crops the picture to what was drawn.
    fig = Figure(figsize=(side + 10, side + 5), dpi=lay.dpi)
    ax = fig.add_axes([4 / (side + 10), 2.5 / (side + 5), side / (side + 10), side / (side + 5)])
    image = _draw_matrix(ax, m, class_names, lay, [(index[p.true], index[p.predicted]) for p in pairs])
    _draw_colorbar(ax, image, side)
    _draw_pairs(ax, pairs, side, None if lay.names_on_columns else index)
    total = int(m.sum())
    accuracy = float(m.diagonal().sum() / total) if total else 0.0
    # A fixed title height above the column numbers: matplotlib's automatic placement measures
    # all 133 top tick labels on every draw.
    above = {} if lay.names_on_columns else {"y": 1 + 0.3 / side}
    ax.set_title(
        title or f"Confusion matrix: {total} images, {n} classes, accuracy {accuracy:.1%}", fontsize=13, pad=12, **above
    )
    return fig


def render(fig: Figure, pad_in: float = 0.25):
    """The figure drawn once by Agg (no pyplot, no display), cropped to what was drawn: a PIL RGB image.
    Like savefig(bbox_inches="tight"), which draws twice, seconds more for 133 classes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    box = fig.get_tightbbox(canvas.get_renderer()).padded(pad_in)  # inches, origin bottom left
    width, height = canvas.get_width_height()
    image = Image.frombuffer("RGBA", (width, height), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
    dpi = fig.dpi
    crop = (
        max(0, int(box.x0 * dpi)),
        max(0, int(height - box.y1 * dpi)),
        min(width, int(box.x1 * dpi + 1)),
        min(height, int(height - box.y0 * dpi + 1)),
    )
    return image.crop(crop).convert("RGB")


def write_confusion_png(path: str | Path, confusion: Any, class_names: Sequence[str], title: str | None = None) -> Path:
    """confusion_figure saved as a PNG, atomically."""
    image = render(confusion_figure(confusion, class_names, title))
    return atomic_write(path, lambda p: image.save(p, format="PNG"))


# ---------------------------------------------------------------- TensorBoard


def per_class_markdown(confusion: Any, class_names: Sequence[str]) -> str:
    """A markdown table of per-class accuracy, worst first (TensorBoard's text tab renders it)."""
    m = _matrix(confusion, class_names)
    acc = per_class_accuracy(m, class_names)
    rows = sorted(enumerate(class_names), key=lambda ic: (acc[ic[1]] is None, acc[ic[1]] or 0.0, ic[0]))
    lines = ["| class | accuracy | images |", "|---|---:|---:|"]
    for i, name in rows:
        value = acc[name]
        shown = "n/a" if value is None else f"{value:.3f}"
        lines.append(f"| {name.replace(PIPE, ESCAPED_PIPE)} | {shown} | {int(m[i].sum())} |")
    return "\n".join(lines)


def log_confusion(writer: Any, confusion: Any, class_names: Sequence[str], step: int, tag: str = "test") -> None:
    """Log the confusion figure (`<tag>/confusion_matrix`, an image), per-class accuracy
    (`<tag>/per_class_accuracy`, a text table) and the most confused pairs (`<tag>/most_confused`)
    to a TensorBoard SummaryWriter."""
    m = _matrix(confusion, class_names)
    # add_image of the Agg rendering is what add_figure does, minus its import of pyplot and its
    # uncropped canvas.
    rgb = np.asarray(render(confusion_figure(m, class_names)))
    writer.add_image(f"{tag}/confusion_matrix", rgb, step, dataformats="HWC")
    writer.add_text(f"{tag}/per_class_accuracy", per_class_markdown(m, class_names), step)
    pairs = most_confused(m, class_names)
    writer.add_text(f"{tag}/most_confused", "\n\n".join(confused_line(p) for p in pairs) or "no confusions", step)
    writer.flush()
