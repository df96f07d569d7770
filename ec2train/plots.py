"""A classifier's mistakes, for people: the confusion matrix as a picture (PNG and TensorBoard),
per-class accuracy and the most confused pairs of classes.

Rows of a confusion matrix are true classes, columns predicted ones (as `loop.evaluate` counts them).
The picture is drawn with Pillow, which every command already imports: matplotlib's import and
first figure would add a noticeable pause at the end of every fit on a small CPU box
(docs/performance.md). `confusion_figure`
decides what is drawn where (testable text and geometry), `render` paints it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ec2train.errors import pip_install
from ec2train.files import atomic_write
from ec2train.names import printable

# Up to this many classes each cell shows its count and both axes show names;
# above it the colour scale carries the values and the columns are numbered.
ANNOTATE_MAX = 20
NAMES_ON_BOTH_AXES_MAX = 40
LABEL_CHARS = 36  # fits every dogImages breed; longer class names are cut, with an ellipsis, in tick labels
PAIR_CHARS = 2 * LABEL_CHARS  # and in the list of most confused pairs
TOP_K = 10
PIPE, ESCAPED_PIPE = "|", "\\|"  # a | in a class name would end a markdown table cell
ARROW = "->"  # Pillow's built-in font has no arrow glyph


class Confusion(NamedTuple):
    """`count` images of class `true` were predicted as `predicted`: `fraction_of_true` of that class."""

    true: str
    predicted: str
    count: int  # type: ignore[assignment]  # a field named like tuple.count: the JSON key is "count"
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
    """One line for a terminal or TensorBoard: `Husky -> Malamute: 5 of 10 images (50%)`; the
    names as `names.printable` shows them."""
    true, predicted = printable(pair.true), printable(pair.predicted)
    return f"{true} -> {predicted}: {pair.count} of {pair.true_images} images ({pair.fraction_of_true:.0%})"


# ---------------------------------------------------------------- the figure


def _short(name: str, limit: int = LABEL_CHARS) -> str:
    """A class name as drawn: escaped (a newline or an escape sequence would break the layout)
    and cut to `limit` characters."""
    return printable(name, limit)


class _Layout(NamedTuple):
    cell: int  # side of one cell, pixels
    font: int  # tick labels, pixels
    annotate: bool  # counts in cells
    names_on_columns: bool  # names (else indices) under the columns


def _layout(n: int) -> _Layout:
    if n <= ANNOTATE_MAX:
        return _Layout(cell=round(min(99, max(50, 400 / n))), font=14, annotate=True, names_on_columns=True)
    if n <= NAMES_ON_BOTH_AXES_MAX:
        return _Layout(cell=22, font=12, annotate=False, names_on_columns=True)
    # 133 classes: 15 px rows hold an 11 px name each; the whole picture is about 2,300 px tall.
    return _Layout(cell=15, font=11, annotate=False, names_on_columns=False)


@dataclass
class Figure:
    """What the picture shows, before it is painted: the matrix (row fractions), every text on it
    and the framed cells. `render` turns it into pixels."""

    fractions: np.ndarray  # n x n, each row divided by its total
    title: str
    row_labels: list[str]
    column_labels: list[str]
    x_label: str
    y_label: str
    cell_texts: list[tuple[int, int, str]]  # (row, column, count) when counts are shown
    framed: list[tuple[int, int]]  # the most confused cells, framed in red
    pairs: list[str]  # the list beside the matrix
    layout: _Layout = field(repr=False)

    @property
    def columns_at_top(self) -> bool:
        """Numbered columns (a tall matrix) repeat above it; named ones are only under it."""
        return not self.layout.names_on_columns


def confusion_figure(confusion: Any, class_names: Sequence[str], title: str | None = None, k: int = TOP_K) -> Figure:
    """The row-normalised confusion matrix (counts in cells up to 20 classes), its colour scale and
    the k most confused pairs listed beside it."""
    m = _matrix(confusion, class_names)
    n, lay = m.shape[0], _layout(m.shape[0])
    pairs = most_confused(m, class_names, k)
    index = {name: i for i, name in enumerate(class_names)}
    total = int(m.sum())
    accuracy = float(m.diagonal().sum() / total) if total else 0.0

    def name(c: str) -> str:
        return _short(c, PAIR_CHARS) + ("" if lay.names_on_columns else f" [{index[c]}]")

    if pairs:
        lines = [f"Most confused (true {ARROW} predicted)", ""]
        for rank, p in enumerate(pairs, 1):
            lines += [
                f"{rank:>2}. {name(p.true)}",
                f"     {ARROW} {name(p.predicted)}:  {p.count} of {p.true_images} ({p.fraction_of_true:.0%})",
            ]
    else:
        lines = ["No confusions: every image", "was predicted as its true class."]
    counts = [(i, j, str(int(m[i, j]))) for i in range(n) for j in range(n)] if lay.annotate else []
    return Figure(
        fractions=(m / m.sum(dim=1, keepdim=True).clamp(min=1)).numpy(),
        title=title or f"Confusion matrix: {total} images, {n} class{'es' * (n != 1)}, accuracy {accuracy:.1%}",
        row_labels=[_short(c) if lay.names_on_columns else f"{_short(c)} [{i}]" for i, c in enumerate(class_names)],
        column_labels=[_short(c) for c in class_names] if lay.names_on_columns else [str(i) for i in range(n)],
        x_label="predicted class" + ("" if lay.names_on_columns else " (number in [ ] beside each true class)"),
        y_label="true class",
        cell_texts=counts,
        framed=[(index[p.true], index[p.predicted]) for p in pairs],
        pairs=lines,
        layout=lay,
    )


# matplotlib's "Blues" (ColorBrewer's 9-step sequential blues), from 0 to 1
_BLUES = np.array(
    [[247, 251, 255], [222, 235, 247], [198, 219, 239], [158, 202, 225], [107, 174, 214],
     [66, 146, 198], [33, 113, 181], [8, 81, 156], [8, 48, 107]],
    dtype=np.float64,
)  # fmt: skip
RED, GRID, INK, FAINT, NOTE_INK = (214, 39, 40), (235, 235, 235), (0, 0, 0), (150, 150, 150), (90, 90, 90)


def blues(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB, by linear steps between the 9 colours of the scale."""
    stops = np.linspace(0.0, 1.0, len(_BLUES))
    v = np.clip(values, 0.0, 1.0)
    return np.stack([np.interp(v, stops, _BLUES[:, c]) for c in range(3)], axis=-1).round().astype(np.uint8)


# DejaVu Sans (most Linux images have it) covers accented, Greek and Cyrillic class names;
# Pillow's own font, the fallback, covers ASCII only.
FONT_FILES = ("DejaVuSans.ttf",)


def can_draw() -> str | None:
    """Why this Pillow cannot draw the picture (it needs FreeType for its fonts), or None."""
    from PIL import features

    if not features.check("freetype2"):
        return (
            "this Pillow was built without FreeType, so the confusion picture is left out; to have it, install "
            f"Pillow's wheel from PyPI: {pip_install('--force-reinstall', '--only-binary', ':all:', 'pillow')}"
        )
    return None


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont:
    for name in FONT_FILES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    # With a size, Pillow's own font is a FreeTypeFont too (FreeType is there: see can_draw).
    return cast(ImageFont.FreeTypeFont, ImageFont.load_default(size=size))


def _text_size(text: str, font) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return int(right - left), int(bottom - top)


def _paste_text(canvas: Image.Image, xy: tuple[float, float], text: str, font, fill, angle: int, anchor: str) -> None:
    """Text turned by angle degrees (counter-clockwise), placed so that its anchor point lands on
    xy: "end" (the end of the text), "start" or "middle"; the point is the text's vertical middle."""
    width, height = _text_size(text, font)
    ascent, descent = font.getmetrics()
    box = Image.new("L", (width + 2, ascent + descent + 2), 0)
    ImageDraw.Draw(box).text((1, 1), text, font=font, fill=255)
    turned = box.rotate(angle, expand=True, resample=Image.Resampling.BICUBIC)
    along = {"end": box.width / 2, "start": -box.width / 2, "middle": 0.0}[anchor]
    t = np.radians(angle)
    x = turned.width / 2 + along * np.cos(t)
    y = turned.height / 2 - along * np.sin(t)
    colour = Image.new("RGB", turned.size, fill)
    canvas.paste(colour, (round(xy[0] - x), round(xy[1] - y)), turned)


class Geometry(NamedTuple):
    """Where render puts things, in pixels: the matrix's top-left corner and side, the canvas size."""

    left: int
    top: int
    side: int
    col_h: int  # the column labels' band
    width: int
    height: int


BAR_X, BAR_W, BAR_MAX = 16, 22, 440  # the colour scale: gap from the matrix, width, most height
CAPTION_X = 70  # the colour scale's caption (turned upright) is centred this far right of the scale
LIST_GAP = 32  # from the caption to the list of confused pairs


def geometry(fig: Figure, pad: int = 24) -> Geometry:
    lay = fig.layout
    side = len(fig.row_labels) * lay.cell
    tick, list_font = _font(lay.font), _font(14)
    row_w = max(_text_size(t, tick)[0] for t in fig.row_labels)
    axis_h = _text_size("Hg", _font(15))[1]
    widest = max(_text_size(t, tick)[0] for t in fig.column_labels)
    # Numbers turned 90 degrees under and above the matrix, or names turned 45 degrees under it.
    col_h = widest + 8 if fig.columns_at_top else round((widest + lay.font) * 0.71) + 8
    title_w, title_h = _text_size(fig.title, _font(18))
    # The title is centred over the matrix: with few classes it is the wider of the two.
    left = max(pad + axis_h + 12 + row_w + 8, pad + (title_w - side) // 2)
    top = pad + title_h + 16 + (col_h if fig.columns_at_top else 0)
    list_w = max(_text_size(t, list_font)[0] for t in fig.pairs)
    # The list keeps twice the margin from the right edge: text there must not seem to touch it.
    width = max(left + side + list_x() + list_w + 2 * pad, left + (side + title_w) // 2 + pad)
    below = max(side + col_h + axis_h + 12, bar_height(side), len(fig.pairs) * round(list_font.size * 1.45))
    return Geometry(left, top, side, col_h, width, top + below + pad)


BAR_CAPTION = "fraction of the true class's images"


def list_x() -> int:
    """Where the list of confused pairs starts, right of the matrix: a gap after the scale's caption."""
    ascent, descent = _font(13).getmetrics()
    return BAR_X + CAPTION_X + (ascent + descent + 2) // 2 + LIST_GAP


def bar_height(side: int) -> int:
    """The colour scale beside the matrix's top: as tall as the matrix, within [its caption's
    length, BAR_MAX]."""
    return min(max(side, _text_size(BAR_CAPTION, _font(13))[0] + 10), BAR_MAX)


def render(fig: Figure, pad: int = 24) -> Image.Image:
    """The figure painted by Pillow: a PIL RGB image, sized to what it shows."""
    lay, n = fig.layout, len(fig.row_labels)
    left, top, side, col_h, width, height = geometry(fig, pad)
    tick, axis_font, title_font, list_font = _font(lay.font), _font(15), _font(18), _font(14)
    line_h = round(list_font.size * 1.45)
    bar_h = bar_height(side)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    # The matrix: one pixel per cell, scaled up without blurring.
    cells = Image.fromarray(blues(fig.fractions), "RGB").resize((side, side), Image.Resampling.NEAREST)
    canvas.paste(cells, (left, top))
    for e in range(1, n):
        draw.line([(left + e * lay.cell, top), (left + e * lay.cell, top + side - 1)], fill=GRID)
        draw.line([(left, top + e * lay.cell), (left + side - 1, top + e * lay.cell)], fill=GRID)
    draw.rectangle([left - 1, top - 1, left + side, top + side], outline=INK)
    count_font = _font(lay.font + 1)
    for i, j, text in fig.cell_texts:
        share = fig.fractions[i, j]
        colour = (255, 255, 255) if share > 0.55 else (FAINT if text == "0" else INK)
        centre = (left + (j + 0.5) * lay.cell, top + (i + 0.5) * lay.cell)
        draw.text(centre, text, font=count_font, fill=colour, anchor="mm")
    for i, j in fig.framed:
        x, y = left + j * lay.cell, top + i * lay.cell
        draw.rectangle([x, y, x + lay.cell, y + lay.cell], outline=RED, width=2)
    # Labels: true classes left of their rows, predicted ones under (and above) their columns.
    for i, text in enumerate(fig.row_labels):
        draw.text((left - 6, top + (i + 0.5) * lay.cell), text, font=tick, fill=INK, anchor="rm")
    for j, text in enumerate(fig.column_labels):
        mid = left + (j + 0.5) * lay.cell
        if fig.columns_at_top:
            _paste_text(canvas, (mid, top + side + 4), text, tick, INK, 90, "end")
            _paste_text(canvas, (mid, top - 4), text, tick, INK, 90, "start")
        else:
            _paste_text(canvas, (mid, top + side + 6), text, tick, INK, 45, "end")
    _paste_text(canvas, (pad + axis_font.size / 2, top + side / 2), fig.y_label, axis_font, INK, 90, "middle")
    draw.text((left + side / 2, top + side + col_h + 6), fig.x_label, font=axis_font, fill=INK, anchor="mt")
    draw.text((left + side / 2, pad), fig.title, font=title_font, fill=INK, anchor="mt")
    # The colour scale beside the matrix's top, at most 440 px tall.
    bx = left + side + BAR_X
    ramp = blues(np.linspace(1.0, 0.0, bar_h))[:, None, :].repeat(BAR_W, axis=1)
    canvas.paste(Image.fromarray(ramp, "RGB"), (bx, top))
    draw.rectangle([bx - 1, top - 1, bx + BAR_W, top + bar_h], outline=INK)
    for v in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        y = top + round((1 - v) * (bar_h - 1))
        draw.line([(bx + BAR_W, y), (bx + BAR_W + 4, y)], fill=INK)
        draw.text((bx + BAR_W + 7, y), f"{v:.1f}", font=_font(12), fill=INK, anchor="lm")
    _paste_text(canvas, (bx + CAPTION_X, top + bar_h / 2), BAR_CAPTION, _font(13), INK, 90, "middle")
    # The most confused pairs, right of the colour scale.
    for k, text in enumerate(fig.pairs):
        draw.text((left + side + list_x(), top + k * line_h), text, font=list_font, fill=INK)
    return canvas


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
        lines.append(f"| {printable(name).replace(PIPE, ESCAPED_PIPE)} | {shown} | {int(m[i].sum())} |")
    return "\n".join(lines)


# TensorBoard shows an image scaled to its card (about 350 px wide) until the user asks for its
# actual size, where the picture's 14 px labels become 5 px. The note says where to ask, in
# letters sized to the picture's width so that they stay readable at the card's size.
VIEWING_NOTE = (
    "To read it, show it at actual size:",
    "Time Series: the image icon at the card's top right",
    "Images tab: tick Show actual image size",
)
NOTE_WIDTH_SHARE = 0.9  # of the picture's width, for the note's longest line


def with_viewing_note(image: Image.Image) -> Image.Image:
    """`image` under a note on how to see it at its actual size in TensorBoard."""
    widest = max(_text_size(line, _font(100))[0] for line in VIEWING_NOTE)
    size = max(12, int(100 * NOTE_WIDTH_SHARE * image.width / widest))
    line_h = round(size * 1.3)
    canvas = Image.new("RGB", (image.width, image.height + line_h * len(VIEWING_NOTE) + size), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(VIEWING_NOTE):
        draw.text(
            (image.width / 2, size / 2 + k * line_h), line, font=_font(size), fill=NOTE_INK if k else INK, anchor="mt"
        )
    canvas.paste(image, (0, canvas.height - image.height))
    return canvas


def log_confusion(writer: Any, confusion: Any, class_names: Sequence[str], step: int, tag: str = "test") -> str | None:
    """Log the confusion figure (`<tag>/confusion_matrix`, an image), per-class accuracy
    (`<tag>/per_class_accuracy`, a text table) and the most confused pairs (`<tag>/most_confused`)
    to a TensorBoard SummaryWriter. Returns why the figure was left out (see `can_draw`), or None."""
    m = _matrix(confusion, class_names)
    missing = can_draw()
    if missing is None:
        rgb = np.asarray(with_viewing_note(render(confusion_figure(m, class_names))))
        writer.add_image(f"{tag}/confusion_matrix", rgb, step, dataformats="HWC")
    writer.add_text(f"{tag}/per_class_accuracy", per_class_markdown(m, class_names), step)
    pairs = most_confused(m, class_names)
    writer.add_text(f"{tag}/most_confused", "\n\n".join(confused_line(p) for p in pairs) or "no confusions", step)
    writer.flush()
    return missing
